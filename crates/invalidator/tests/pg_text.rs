//! Direct mode vs Debezium mode on real PostgreSQL rows: for every supported column type, the
//! value PostgreSQL prints (its output function's text, what pgoutput sends to cacheclear's own
//! source; `col::text` except for booleans) and
//! the invalidator's rendering of the Debezium JSON for the same value (written per the
//! connector's documented encodings, "Data type mappings") give the same key, under each
//! `decimal.handling.mode`, `time.precision.mode`, `binary.handling.mode`, with and without the
//! schema, in several `DateStyle`/`TimeZone` settings. Also: the start-up refusals.

use std::sync::Arc;

use base64::Engine as _;
use cacheclear_harness::PgInstance;
use cacheclear_invalidator::{
    BinaryHandlingMode, DebeziumConfig, DecimalHandlingMode, Decoded, Decoder, Format,
    InvalidatorConfig, InvalidatorRule, KafkaConfig, PostgresConfig, TimePrecisionMode,
};
/// The escaped form of a value in a key (the rules' percent-encoding).
fn enc(v: &str) -> String {
    let mut out = String::new();
    cacheclear_rules::encode_value(v, &mut out);
    out
}
use cacheclear_sink_redis::RedisConfig;
use serde_json::{Value, json};

/// (column, PostgreSQL type) of the test table; every one is a key column.
const COLUMNS: &[(&str, &str)] = &[
    ("i2", "smallint"),
    ("i8", "bigint"),
    ("b", "boolean"),
    ("tx", "text"),
    ("vc", "varchar(20)"),
    ("ch", "char(5)"),
    ("u", "uuid"),
    ("js", "json"),
    ("jb", "jsonb"),
    ("mood", "mood"),
    ("n", "numeric(12,3)"),
    ("nu", "numeric"),
    ("r", "real"),
    ("d", "double precision"),
    ("dt", "date"),
    ("tm", "time"),
    ("tm3", "time(3)"),
    ("ts", "timestamp"),
    ("ts3", "timestamp(3)"),
    ("tstz", "timestamptz"),
    ("ttz", "timetz"),
    ("by", "bytea"),
];

const ROWS: &str = "
INSERT INTO t VALUES
 (1, 7, 9007199254740993, true, 'a b:c}%', 'ü', 'ab', '6f1c0000-0000-4000-8000-000000000001',
  '{\"b\": 1,  \"a\": [1, 2]}', '{\"b\": 1, \"a\": [1, 2]}', 'happy', 9.990, 1.500, 1.1, 1e20,
  '2026-12-02', '10:15:30.123456', '10:15:30.123', '2026-12-02 10:15:30.5', '2026-12-02 10:15:30.123',
  '2026-12-02 10:15:30.123456+02', '10:15:30.5+00', '\\x00ff10'),
 (2, -32768, -9223372036854775808, false, '', 'x', 'a', '00000000-0000-0000-0000-000000000000',
  '[]', '{}', 'sad', -0.001, -123456789012345678901234.5678901, -0.0, 'NaN',
  '0001-01-01 BC', '24:00:00', '00:00:00', '1969-12-31 23:59:59.999999', '0044-03-15 12:00:00 BC',
  '1970-01-01 00:00:00+00', '00:00:00+00', ''),
 (3, 0, 0, true, 'line\nbreak', 'tab\t', '     ', 'ffffffff-ffff-ffff-ffff-ffffffffffff',
  '\"s\"', '[1.50, null]', 'ok', 0, 0.000, 1e-5, 123456789012345.6,
  '9999-12-31', '23:59:59.999999', '12:00:00.001', '12345-06-07 08:09:10', '2000-02-29 00:00:00',
  '2024-03-31 01:30:00-07:30', '23:59:59.999999+00', '\\x5c78')";

/// One configuration of the connector (and of the invalidator to match).
#[derive(Clone, Copy, Debug)]
struct Mode {
    decimal: DecimalHandlingMode,
    time: TimePrecisionMode,
    binary: BinaryHandlingMode,
}

const MODES: &[Mode] = &[
    Mode {
        decimal: DecimalHandlingMode::Precise,
        time: TimePrecisionMode::Adaptive,
        binary: BinaryHandlingMode::Bytes,
    },
    Mode {
        decimal: DecimalHandlingMode::String,
        time: TimePrecisionMode::AdaptiveTimeMicroseconds,
        binary: BinaryHandlingMode::Base64,
    },
    Mode {
        decimal: DecimalHandlingMode::Double,
        time: TimePrecisionMode::Connect,
        binary: BinaryHandlingMode::Base64UrlSafe,
    },
    Mode {
        decimal: DecimalHandlingMode::Precise,
        time: TimePrecisionMode::Adaptive,
        binary: BinaryHandlingMode::Hex,
    },
];

/// Whether a column can be rendered exactly under `mode` (else the invalidator refuses it at
/// start, checked separately).
fn usable(column: &str, mode: Mode) -> bool {
    match column {
        "nu" => mode.decimal != DecimalHandlingMode::Double,
        "tm" | "ts" => mode.time != TimePrecisionMode::Connect,
        // timetz arrives converted to GMT, without the offset PostgreSQL prints: never rendered
        // (its table is evicted instead; see `timetz_is_never_rendered`).
        "ttz" => false,
        _ => true,
    }
}

/// Minimal big-endian two's-complement bytes of `v` (Java's `BigInteger.toByteArray`).
fn twos_complement(v: i128) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let mut start = 0;
    while start < 15 {
        let (b, next) = (bytes[start], bytes[start + 1]);
        if (b == 0 && next & 0x80 == 0) || (b == 0xFF && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    bytes[start..].to_vec()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The raw facts of one row, read from PostgreSQL in forms that are not its text output: what
/// the connector starts from.
struct Raw(std::collections::HashMap<String, String>);

impl Raw {
    fn get(&self, k: &str) -> &str {
        self.0
            .get(k)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no {k}"))
    }
    fn int(&self, k: &str) -> i64 {
        self.get(k)
            .parse()
            .unwrap_or_else(|_| panic!("{k} = {}", self.get(k)))
    }
}

const RAW_SQL: &str = "SELECT id::text,
    (dt - date '1970-01-01')::text AS dt_days,
    (extract(epoch from tm) * 1000000)::int8::text AS tm_us,
    (extract(epoch from tm3) * 1000)::int8::text AS tm3_ms,
    (extract(epoch from ts) * 1000000)::int8::text AS ts_us,
    (extract(epoch from ts3) * 1000)::int8::text AS ts3_ms,
    to_char(tstz AT TIME ZONE 'UTC', 'FMYYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS tstz_iso,
    to_char(date '2000-01-01' + ttz::time, 'HH24:MI:SS.US') || 'Z' AS ttz_iso,
    (n * 1000)::int8::text AS n_unscaled, n::float8::text AS n_double,
    scale(nu)::text AS nu_scale, trunc(nu * 10::numeric ^ scale(nu))::text AS nu_unscaled,
    r::float8::text AS r_num, d::float8::text AS d_num,
    encode(by, 'hex') AS by_hex,
    i2::text AS i2, i8::text AS i8, b::text AS b";

/// The Debezium JSON value (per the connector's documentation) and Kafka Connect schema field of
/// `column` in `row` under `mode`.
fn encode(column: &str, raw: &Raw, text: &str, mode: Mode) -> (Value, Value) {
    let num = |s: &str| -> Value {
        match s {
            "NaN" | "Infinity" | "-Infinity" => Value::String(s.into()),
            // Jackson writes a double as Double.toString: always a `.` or an exponent (-0.0).
            _ if !s.contains(['.', 'e', 'E']) => {
                serde_json::from_str(&format!("{s}.0")).unwrap_or_else(|e| panic!("{s}: {e}"))
            }
            _ => serde_json::from_str(s).unwrap_or_else(|e| panic!("{s}: {e}")),
        }
    };
    let field = |ty: &str, name: Option<&str>| -> Value {
        let mut f = json!({"type": ty, "optional": true, "field": column});
        if let Some(n) = name {
            f["name"] = n.into();
        }
        f
    };
    let bytes = || -> (Value, Value) {
        let hex = raw.get("by_hex");
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        match mode.binary {
            BinaryHandlingMode::Bytes => (Value::String(b64(&bytes)), field("bytes", None)),
            BinaryHandlingMode::Base64 => (Value::String(b64(&bytes)), field("string", None)),
            BinaryHandlingMode::Base64UrlSafe => (
                Value::String(base64::engine::general_purpose::URL_SAFE.encode(&bytes)),
                field("string", None),
            ),
            _ => (Value::String(hex.into()), field("string", None)),
        }
    };
    let (ms, us) = (
        mode.time == TimePrecisionMode::Connect,
        mode.time == TimePrecisionMode::AdaptiveTimeMicroseconds,
    );
    match column {
        "i2" => (json!(raw.int("i2")), field("int16", None)),
        "i8" => (json!(raw.int("i8")), field("int64", None)),
        "b" => (json!(raw.get("b") == "true"), field("boolean", None)),
        "tx" | "vc" | "ch" => (Value::String(text.into()), field("string", None)),
        "u" => (
            Value::String(text.into()),
            field("string", Some("io.debezium.data.Uuid")),
        ),
        "js" | "jb" => (
            Value::String(text.into()),
            field("string", Some("io.debezium.data.Json")),
        ),
        "mood" => (
            Value::String(text.into()),
            field("string", Some("io.debezium.data.Enum")),
        ),
        "n" => match mode.decimal {
            DecimalHandlingMode::Precise => {
                let mut f = field("bytes", Some("org.apache.kafka.connect.data.Decimal"));
                f["parameters"] = json!({"scale": "3", "connect.decimal.precision": "12"});
                let unscaled = raw.int("n_unscaled") as i128;
                (Value::String(b64(&twos_complement(unscaled))), f)
            }
            DecimalHandlingMode::Double => (num(raw.get("n_double")), field("double", None)),
            DecimalHandlingMode::String => (Value::String(text.into()), field("string", None)),
        },
        "nu" => match mode.decimal {
            DecimalHandlingMode::Precise => {
                let unscaled: i128 = raw.get("nu_unscaled").parse().unwrap();
                (
                    json!({"scale": raw.int("nu_scale"), "value": b64(&twos_complement(unscaled))}),
                    field("struct", Some("io.debezium.data.VariableScaleDecimal")),
                )
            }
            _ => (Value::String(text.into()), field("string", None)),
        },
        "r" => (num(raw.get("r_num")), field("float", None)),
        "d" => (num(raw.get("d_num")), field("double", None)),
        "dt" if ms => (
            json!(raw.int("dt_days")),
            field("int32", Some("org.apache.kafka.connect.data.Date")),
        ),
        "dt" => (
            json!(raw.int("dt_days")),
            field("int32", Some("io.debezium.time.Date")),
        ),
        "tm" => (
            json!(raw.int("tm_us")),
            field("int64", Some("io.debezium.time.MicroTime")),
        ),
        "tm3" if ms => (
            json!(raw.int("tm3_ms")),
            field("int32", Some("org.apache.kafka.connect.data.Time")),
        ),
        "tm3" if us => (
            json!(raw.int("tm3_ms") * 1000),
            field("int64", Some("io.debezium.time.MicroTime")),
        ),
        "tm3" => (
            json!(raw.int("tm3_ms")),
            field("int32", Some("io.debezium.time.Time")),
        ),
        "ts" => (
            json!(raw.int("ts_us")),
            field("int64", Some("io.debezium.time.MicroTimestamp")),
        ),
        "ts3" if ms => (
            json!(raw.int("ts3_ms")),
            field("int64", Some("org.apache.kafka.connect.data.Timestamp")),
        ),
        "ts3" => (
            json!(raw.int("ts3_ms")),
            field("int64", Some("io.debezium.time.Timestamp")),
        ),
        "tstz" => (
            Value::String(raw.get("tstz_iso").into()),
            field("string", Some("io.debezium.time.ZonedTimestamp")),
        ),
        "ttz" => (
            Value::String(raw.get("ttz_iso").into()),
            field("string", Some("io.debezium.time.ZonedTime")),
        ),
        "by" => bytes(),
        other => panic!("no encoding for {other}"),
    }
}

fn rule(columns: &[&str], with_types: bool) -> InvalidatorRule {
    let mut r = InvalidatorRule::new(
        "public.t",
        columns
            .iter()
            .map(|c| format!("{c}:{{id}}:{{{c}}}"))
            .collect(),
    )
    .with_type("id", "integer");
    if with_types {
        for (c, ty) in COLUMNS.iter().filter(|(c, _)| columns.contains(c)) {
            let ty = if *c == "mood" { "enum" } else { ty };
            r = r.with_type(*c, ty);
        }
    }
    r
}

fn config(debezium: DebeziumConfig, rule: InvalidatorRule) -> InvalidatorConfig {
    let mut k = KafkaConfig::new("127.0.0.1:1", "g", vec![], "dlq");
    k.debezium_topics = vec!["shop.public.t".into()];
    InvalidatorConfig::new(k, RedisConfig::new("redis://127.0.0.1:1/"))
        .with_debezium(debezium)
        .with_rules([rule])
}

fn event(after: Value, schema_fields: Option<Vec<Value>>) -> Vec<u8> {
    let payload = json!({
        "before": null, "after": after, "op": "c", "ts_ms": 1_764_445_200_100i64,
        "source": {"connector": "postgresql", "schema": "public", "table": "t",
                   "lsn": 24_023_128u64, "txId": 555, "ts_ms": 1_764_445_200_000i64}
    });
    let v = match schema_fields {
        Some(fields) => {
            let row = json!({"type": "struct", "optional": true, "name": "shop.public.t.Value",
                             "field": "after", "fields": fields});
            json!({"schema": {"type": "struct", "name": "shop.public.t.Envelope",
                              "fields": [row, {"type": "string", "field": "op"}]},
                   "payload": payload})
        }
        None => payload,
    };
    serde_json::to_vec(&v).unwrap()
}

fn keys(d: Decoded, what: &str) -> Vec<String> {
    match d {
        Decoded::Evict(e) => {
            assert!(e.patterns.is_empty(), "{what}: table-wide");
            e.keys
        }
        Decoded::Skip(why) => panic!("skipped: {why}"),
        Decoded::Control(c) => panic!("a control record: {c:?}"),
    }
}

/// The (DateStyle, TimeZone) pairs tried: PostgreSQL's `SET` forms and the invalidator's.
const STYLES: &[(&str, &str, &str)] = &[
    ("ISO, MDY", "'UTC'", "UTC"),
    ("SQL, DMY", "INTERVAL '+05:30' HOUR TO MINUTE", "+05:30"),
    ("Postgres, MDY", "'UTC'", "UTC"),
    ("German", "INTERVAL '-08:00' HOUR TO MINUTE", "-08:00"),
    ("ISO", "INTERVAL '+14:00' HOUR TO MINUTE", "+14:00"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_keys_equal_postgres_text_keys_for_every_type() {
    let pg = PgInstance::start().expect("start PostgreSQL");
    let (client, conn) = tokio_postgres::connect(&pg.conn_string(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let cols: Vec<String> = COLUMNS.iter().map(|(c, t)| format!("{c} {t}")).collect();
    client
        .batch_execute(&format!(
            "CREATE TYPE mood AS ENUM ('happy', 'sad', 'ok');
             CREATE TABLE t (id integer PRIMARY KEY, {});
             ALTER TABLE t REPLICA IDENTITY FULL;
             SET TimeZone = 'UTC'; {ROWS}",
            cols.join(", ")
        ))
        .await
        .expect("create and fill the table");
    let raw_rows = client
        .simple_query(&format!(
            "SET TimeZone = 'UTC'; {RAW_SQL} FROM t ORDER BY id"
        ))
        .await
        .unwrap();
    let raws: Vec<Raw> = raw_rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(Raw(r
                .columns()
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name().to_owned(), r.get(i).unwrap_or("").to_owned()))
                .collect())),
            _ => None,
        })
        .collect();
    assert_eq!(raws.len(), 3);
    let all: Vec<&str> = COLUMNS.iter().map(|(c, _)| *c).collect();
    let mut checked = 0;
    for &(date_style, pg_zone, zone) in STYLES {
        // Direct mode: the text PostgreSQL's output functions print under this DateStyle and
        // TimeZone, which is what pgoutput sends (the simple query protocol returns the same
        // text; `col::text` would differ for booleans: `true` instead of `t`).
        let sql = format!(
            "SET DateStyle = '{date_style}'; SET TIME ZONE {pg_zone}; SELECT id::text, {} FROM t ORDER BY id",
            all.join(", ")
        );
        let texts: Vec<Vec<String>> = client
            .simple_query(&sql)
            .await
            .unwrap()
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                    (0..=all.len())
                        .map(|i| r.get(i).unwrap_or("").to_owned())
                        .collect(),
                ),
                _ => None,
            })
            .collect();
        for &mode in MODES {
            let columns: Vec<&str> = all.iter().copied().filter(|c| usable(c, mode)).collect();
            let debezium = DebeziumConfig::new()
                .with_decimal_handling_mode(mode.decimal)
                .with_time_precision_mode(mode.time)
                .with_binary_handling_mode(mode.binary)
                .with_date_style(date_style)
                .with_time_zone(zone);
            // Three ways to know the types: the schema, declared types, the catalog.
            let with_schema = config(debezium.clone(), rule(&columns, true));
            let declared = config(
                debezium.clone().with_schemas_enable(false),
                rule(&columns, true),
            );
            let catalog = config(
                debezium.clone().with_schemas_enable(false),
                rule(&columns, false),
            )
            .with_postgres(PostgresConfig::new(pg.conn_string()));
            for (variant, cfg, schema) in [
                ("schema", &with_schema, true),
                ("declared types", &declared, false),
                ("[postgres] url", &catalog, false),
            ] {
                let rules = Arc::new(
                    cfg.validate()
                        .unwrap_or_else(|e| panic!("{variant} {mode:?}: {e}")),
                );
                let decoder = Decoder::for_config(cfg, rules)
                    .await
                    .unwrap_or_else(|e| panic!("{variant} {mode:?}: {e}"));
                for (raw, text) in raws.iter().zip(&texts) {
                    let mut after = serde_json::Map::new();
                    let mut fields = vec![json!({"type": "int32", "field": "id"})];
                    after.insert("id".into(), json!(raw.int("id")));
                    let mut want = Vec::new();
                    for c in &columns {
                        let i = all.iter().position(|x| x == c).unwrap() + 1;
                        let (v, f) = encode(c, raw, &text[i], mode);
                        after.insert((*c).into(), v);
                        fields.push(f);
                        want.push(format!("{c}:{}:{}", enc(&text[0]), enc(&text[i])));
                    }
                    let ev = event(Value::Object(after), schema.then_some(fields));
                    let got = decoder
                        .decode(Format::Debezium, None, Some(&ev))
                        .unwrap_or_else(|e| panic!("{variant} {mode:?} {date_style}: {e}"));
                    let mut got = keys(
                        got,
                        &format!("{variant} {mode:?} {date_style} row {}", text[0]),
                    );
                    got.sort();
                    want.sort();
                    for (g, w) in got.iter().zip(&want) {
                        assert_eq!(
                            g, w,
                            "{variant}, {mode:?}, DateStyle {date_style}, TimeZone {zone}, row {}",
                            text[0]
                        );
                    }
                    assert_eq!(got.len(), want.len());
                    checked += want.len();
                }
            }
        }
    }
    // 5 styles × 3 ways × 3 rows × (21 + 21 + 18 + 21 columns: every type but timetz).
    assert_eq!(checked, 5 * 3 * 3 * (21 + 21 + 18 + 21));
}

/// The issue's table: `sale(sku uuid, day date, at timestamptz, price numeric(10,2))` with
/// `keys = ["sale:{sku}:{day}:{at}:{price}"]`; Debezium 3.x JSON (precise, adaptive) written
/// from the connector's documentation, with and without the schema.
fn sale_rule(types: bool) -> InvalidatorRule {
    let r = InvalidatorRule::new("public.sale", vec!["sale:{sku}:{day}:{at}:{price}".into()]);
    if types {
        r.with_type("sku", "uuid")
            .with_type("day", "date")
            .with_type("at", "timestamptz")
            .with_type("price", "numeric(10,2)")
    } else {
        r
    }
}

fn sale_config(debezium: DebeziumConfig, rule: InvalidatorRule) -> InvalidatorConfig {
    let mut k = KafkaConfig::new("127.0.0.1:1", "g", vec![], "dlq");
    k.debezium_topics = vec!["shop.public.sale".into()];
    InvalidatorConfig::new(k, RedisConfig::new("redis://127.0.0.1:1/"))
        .with_debezium(debezium)
        .with_rules([rule])
}

fn sale_event(op: &str, before: Value, after: Value, schema: bool) -> Vec<u8> {
    let payload = json!({
        "before": before, "after": after, "op": op, "ts_ms": 1_764_445_200_100i64,
        "source": {"connector": "postgresql", "schema": "public", "table": "sale",
                   "lsn": 24_023_128u64, "ts_ms": 1_764_445_200_000i64}
    });
    let v = if schema {
        let row = |field: &str| {
            json!({"type": "struct", "optional": true, "field": field, "fields": [
                {"type": "string", "optional": false, "name": "io.debezium.data.Uuid", "version": 1, "field": "sku"},
                {"type": "int32", "optional": false, "name": "io.debezium.time.Date", "version": 1, "field": "day"},
                {"type": "string", "optional": true, "name": "io.debezium.time.ZonedTimestamp", "version": 1, "field": "at"},
                {"type": "bytes", "optional": true, "name": "org.apache.kafka.connect.data.Decimal", "version": 1,
                 "parameters": {"scale": "2", "connect.decimal.precision": "10"}, "field": "price"}]})
        };
        json!({"schema": {"type": "struct", "fields": [row("before"), row("after")]},
               "payload": payload})
    } else {
        payload
    };
    serde_json::to_vec(&v).unwrap()
}

async fn decoder(cfg: &InvalidatorConfig) -> Decoder {
    let rules = Arc::new(cfg.validate().expect("valid"));
    Decoder::for_config(cfg, rules).await.expect("decoder")
}

#[tokio::test]
async fn composite_key_with_date_timestamptz_and_numeric_schema_on_and_off() {
    let row = |day: i64, price: &str| {
        json!({"sku": "6f1c0000-0000-4000-8000-000000000001", "day": day,
               "at": "2026-12-02T10:15:30.5Z", "price": price, "note": "x"})
    };
    // 20789 = 2026-12-02; "A+c=" = 0x03E7 = 999 → 9.99; "Jw8=" = 0x270F = 9999 → 99.99.
    let want_old = "sale:6f1c0000-0000-4000-8000-000000000001:2026-12-02:2026-12-02%2010%3A15%3A30.5%2B00:9.99";
    let want_new = "sale:6f1c0000-0000-4000-8000-000000000001:2026-12-01:2026-12-02%2010%3A15%3A30.5%2B00:99.99";
    let on = decoder(&sale_config(DebeziumConfig::new(), sale_rule(false))).await;
    let off = decoder(&sale_config(
        DebeziumConfig::new().with_schemas_enable(false),
        sale_rule(true),
    ))
    .await;
    for (d, schema) in [(&on, true), (&off, false)] {
        let ev = sale_event("u", row(20789, "A+c="), row(20788, "Jw8="), schema);
        let mut got = keys(
            d.decode(Format::Debezium, None, Some(&ev)).unwrap(),
            "sale update",
        );
        got.sort();
        assert_eq!(got, [want_new, want_old], "schema {schema}");
    }
    // Schema on, types not declared, but the event lacks its schema: dead-lettered with the
    // reason, never rendered as `…:20789:…`.
    let ev = sale_event("c", Value::Null, row(20789, "A+c="), false);
    let err = on.decode(Format::Debezium, None, Some(&ev)).unwrap_err().0;
    assert!(
        err.contains("public.sale") && err.contains("`after.at`") && err.contains("no schema"),
        "{err}"
    );
    // A value of the wrong JSON type for its column: dead-lettered, never rendered.
    let ev = sale_event("c", Value::Null, row(20789, "A+c="), false);
    let mut bad: Value = serde_json::from_slice(&ev).unwrap();
    bad["after"]["day"] = "2026-12-02".into();
    let err = off
        .decode(
            Format::Debezium,
            None,
            Some(&serde_json::to_vec(&bad).unwrap()),
        )
        .unwrap_err()
        .0;
    assert!(
        err.contains("`after.day`")
            && err.contains("days since 1970-01-01")
            && err.contains("\"2026-12-02\""),
        "{err}"
    );
    // The unavailable-value placeholder without an old image: the only table-wide case.
    let mut toast = row(20789, "A+c=");
    toast["price"] = "__debezium_unavailable_value".into();
    let ev = sale_event("u", Value::Null, toast.clone(), true);
    match off
        .decode(Format::Debezium, Some(br#"{"sku":"x","day":1}"#), Some(&ev))
        .unwrap()
    {
        Decoded::Evict(e) => assert_eq!(
            (e.keys.len(), e.patterns),
            (0, vec!["{sale:*:*:*:*}*".to_owned()])
        ),
        other => panic!("{other:?}"),
    }
    // With an old image the placeholder takes the old value.
    let ev = sale_event("u", row(20789, "A+c="), toast, true);
    let got = keys(
        on.decode(Format::Debezium, None, Some(&ev)).unwrap(),
        "toast",
    );
    assert_eq!(got, [want_old]);
}

#[test]
fn refuses_to_start_without_column_types() {
    let cfg = sale_config(
        DebeziumConfig::new().with_schemas_enable(false),
        sale_rule(false),
    );
    let e = cfg.validate().unwrap_err();
    let msg = e.to_string();
    for part in [
        "rules[0]",
        "public.sale",
        "`sale:{sku}:{day}:{at}:{price}`",
        "column `sku`",
        "[postgres] url",
        "[rules.types] sku =",
    ] {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }
    // Declared: starts.
    sale_config(
        DebeziumConfig::new().with_schemas_enable(false),
        sale_rule(true),
    )
    .validate()
    .unwrap();
    // Modes that lose what PostgreSQL prints are refused with the reason.
    let mut r = sale_rule(true);
    r.types.insert("price".into(), "numeric".into());
    let msg = sale_config(
        DebeziumConfig::new().with_decimal_handling_mode(DecimalHandlingMode::Double),
        r,
    )
    .validate()
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("unconstrained numeric") && msg.contains("price"),
        "{msg}"
    );
    let mut r = sale_rule(true);
    r.types.insert("day".into(), "timestamp(6)".into());
    let msg = sale_config(
        DebeziumConfig::new().with_time_precision_mode(TimePrecisionMode::Connect),
        r,
    )
    .validate()
    .unwrap_err()
    .to_string();
    assert!(msg.contains("connect") && msg.contains("day"), "{msg}");
    let mut r = sale_rule(true);
    r.types.insert("day".into(), "interval".into());
    let msg = sale_config(DebeziumConfig::new(), r)
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("rules[0].types.day") && msg.contains("interval"),
        "{msg}"
    );
    let msg = sale_config(
        DebeziumConfig::new().with_time_zone("Europe/Berlin"),
        sale_rule(true),
    )
    .validate()
    .unwrap_err()
    .to_string();
    assert!(msg.contains("debezium.time_zone"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_url_reads_types_and_checks_the_replica_identity() {
    let pg = PgInstance::start().expect("start PostgreSQL");
    pg.psql(
        "CREATE TABLE sale (sku uuid, day date, at timestamptz, price numeric(10,2), \
         PRIMARY KEY (sku, day))",
    )
    .unwrap();
    let cfg = sale_config(
        DebeziumConfig::new().with_schemas_enable(false),
        sale_rule(false),
    )
    .with_postgres(PostgresConfig::new(pg.conn_string()));
    let rules = Arc::new(cfg.validate().unwrap());
    // REPLICA IDENTITY DEFAULT: `before` lacks `at` and `price`: the same refusal `run` gives.
    let msg = Decoder::for_config(&cfg, Arc::clone(&rules))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("ALTER TABLE public.sale REPLICA IDENTITY FULL;"),
        "{msg}"
    );
    pg.psql("ALTER TABLE sale REPLICA IDENTITY FULL").unwrap();
    let d = Decoder::for_config(&cfg, rules).await.unwrap();
    let ev = sale_event(
        "c",
        Value::Null,
        json!({"sku": "6f1c0000-0000-4000-8000-000000000001", "day": 20789,
               "at": "2026-12-02T10:15:30.5Z", "price": "A+c="}),
        false,
    );
    assert_eq!(
        keys(
            d.decode(Format::Debezium, None, Some(&ev)).unwrap(),
            "catalog"
        ),
        [
            "sale:6f1c0000-0000-4000-8000-000000000001:2026-12-02:2026-12-02%2010%3A15%3A30.5%2B00:9.99"
        ]
    );
    // A rule table missing from the database: named.
    let cfg = sale_config(
        DebeziumConfig::new().with_schemas_enable(false),
        InvalidatorRule::new("public.nope", vec!["n:{id}".into()]),
    )
    .with_postgres(PostgresConfig::new(pg.conn_string()));
    let rules = Arc::new(cfg.validate().unwrap());
    let msg = Decoder::for_config(&cfg, rules)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("postgres.url") && msg.contains("public.nope"),
        "{msg}"
    );
}

#[tokio::test]
async fn timetz_is_never_rendered() {
    // `12:00:00+02` arrives as `10:00:00Z`: no key can be rebuilt from it, so the table goes.
    let d = decoder(&config(DebeziumConfig::default(), rule(&["ttz"], false))).await;
    let ev = event(
        json!({"id": 1, "ttz": "10:00:00Z"}),
        Some(vec![
            json!({"type": "int32", "field": "id"}),
            json!({"type": "string", "optional": true, "name": "io.debezium.time.ZonedTime", "field": "ttz"}),
        ]),
    );
    match d.decode(Format::Debezium, None, Some(&ev)) {
        Ok(Decoded::Evict(e)) => assert!(!e.patterns.is_empty(), "table-wide: {:?}", e.keys),
        Ok(Decoded::Skip(why)) => panic!("skipped: {why}"),
        Ok(Decoded::Control(c)) => panic!("a control record: {c:?}"),
        Err(e) => panic!("dead-lettered: {}", e.0),
    }
}
