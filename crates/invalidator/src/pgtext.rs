//! Debezium JSON values → PostgreSQL's text output form (what pgoutput sends, what `col::text`
//! prints), so a key rendered from a Debezium event equals the key cacheclear's own pgoutput
//! source renders for the same row.
//!
//! Sources of the formats:
//! - Debezium connector for PostgreSQL, "Data type mappings"
//!   (<https://debezium.io/documentation/reference/stable/connectors/postgresql.html#postgresql-data-types>):
//!   the Kafka Connect type and semantic type (schema `name`) of each PostgreSQL type under
//!   `time.precision.mode`, `decimal.handling.mode` and `binary.handling.mode`;
//! - Kafka Connect `org.apache.kafka.connect.data.Decimal` (bytes: big-endian two's-complement
//!   unscaled value; the JSON converter writes bytes as base64) and the JSON converter;
//! - PostgreSQL's output functions: `EncodeDateOnly`, `EncodeDateTime`, `EncodeTimeOnly` and
//!   `EncodeTimezone` (src/backend/utils/adt/datetime.c) for `DateStyle` and `TimeZone`,
//!   `float8out`/`float4out` (shortest round-trip, exponent at ≥ 15 / ≥ 6 digits or < -4),
//!   `byteaout` (`bytea_output = hex`), `boolout` (`t`/`f`).

use std::fmt::Write as _;

use base64::Engine as _;
use serde_json::Value;

use crate::config::{BinaryHandlingMode, DecimalHandlingMode, TimePrecisionMode};

/// A PostgreSQL column type, as far as rendering its Debezium value needs to know it. Read from
/// the catalog (`format_type`) or declared in a rule's `types` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PgType {
    /// `smallint`, `integer`, `bigint` (and `oid`).
    Int,
    /// `boolean`.
    Bool,
    /// Types whose Debezium value is PostgreSQL's text itself: `text`, `varchar`, `char`,
    /// `uuid`, `json`, `jsonb`, enums, `citext`, `name`.
    Text,
    /// `numeric(p,s)` (scale `Some(s)`) or unconstrained `numeric` (`None`).
    Numeric(Option<u32>),
    /// `numeric(p,s)` with more than 15 digits of precision (the scale): a double cannot carry
    /// it exactly, so `decimal.handling.mode = double` is refused for it.
    NumericWide(u32),
    /// `real`.
    Float4,
    /// `double precision`.
    Float8,
    /// `date`.
    Date,
    /// `time(p)` without time zone; `p` = fractional-second digits (default 6).
    Time(u8),
    /// `time(p) with time zone`.
    TimeTz,
    /// `timestamp(p)` without time zone.
    Timestamp(u8),
    /// `timestamp(p) with time zone`.
    TimestampTz,
    /// `bytea`.
    Bytea,
}

impl PgType {
    /// Parses a type name as `format_type()` prints it or as written in a rule's `types`
    /// (`date`, `numeric(10,2)`, `timestamp(3) with time zone`, `varchar`, `enum`, …).
    ///
    /// # Errors
    /// The reason, listing the supported names, when the type is not one of them.
    pub(crate) fn parse(name: &str) -> Result<PgType, String> {
        let lower = name.trim().to_ascii_lowercase();
        let (base, args) = match lower.find('(') {
            Some(open) => {
                let close = lower[open..]
                    .find(')')
                    .map(|c| open + c)
                    .ok_or_else(|| format!("type `{name}`: `(` without `)`"))?;
                let rest = format!("{}{}", &lower[..open], &lower[close + 1..]);
                (rest, Some(lower[open + 1..close].to_owned()))
            }
            None => (lower.clone(), None),
        };
        let base = base.split_whitespace().collect::<Vec<_>>().join(" ");
        let nums = |args: &Option<String>| -> Result<Vec<u32>, String> {
            args.as_deref()
                .map(|a| {
                    a.split(',')
                        .map(|n| {
                            n.trim()
                                .parse::<u32>()
                                .map_err(|_| format!("type `{name}`: `{n}` is not a number"))
                        })
                        .collect()
                })
                .unwrap_or_else(|| Ok(Vec::new()))
        };
        let precision = |args: &Option<String>| -> Result<u8, String> {
            match nums(args)?.as_slice() {
                [] => Ok(6),
                [p] if *p <= 6 => Ok(*p as u8),
                _ => Err(format!("type `{name}`: precision must be 0..6")),
            }
        };
        Ok(match base.as_str() {
            "smallint" | "int2" | "integer" | "int" | "int4" | "bigint" | "int8" | "oid"
            | "smallserial" | "serial" | "bigserial" => PgType::Int,
            "boolean" | "bool" => PgType::Bool,
            "text" | "varchar" | "character varying" | "char" | "character" | "bpchar" | "uuid"
            | "json" | "jsonb" | "enum" | "citext" | "name" => PgType::Text,
            "numeric" | "decimal" => match nums(&args)?.as_slice() {
                [] => PgType::Numeric(None),
                [p] if *p > 15 => PgType::NumericWide(0),
                [_] => PgType::Numeric(Some(0)),
                [p, s] if *p > 15 => PgType::NumericWide(*s),
                [_, s] => PgType::Numeric(Some(*s)),
                _ => return Err(format!("type `{name}`: numeric takes (precision, scale)")),
            },
            "real" | "float4" => PgType::Float4,
            "double precision" | "float8" => PgType::Float8,
            "date" => PgType::Date,
            "time" | "time without time zone" => PgType::Time(precision(&args)?),
            "timetz" | "time with time zone" => PgType::TimeTz,
            "timestamp" | "timestamp without time zone" => PgType::Timestamp(precision(&args)?),
            "timestamptz" | "timestamp with time zone" => PgType::TimestampTz,
            "bytea" => PgType::Bytea,
            _ => {
                return Err(format!(
                    "type `{name}` is not supported in key templates of Debezium input (supported: \
                     smallint, integer, bigint, boolean, text, varchar, char, uuid, json, jsonb, enum, \
                     numeric[(p,s)], real, double precision, date, time[(p)], timetz, timestamp[(p)], \
                     timestamptz, bytea)"
                ));
            }
        })
    }
}

/// Why a `timetz` key column cannot be rendered from a Debezium event.
const ZONED_TIME: &str = "a timetz (io.debezium.time.ZonedTime): the connector converts it to GMT \
     and drops the offset PostgreSQL prints, so the key cannot be rebuilt";

/// How one column's value is encoded in the event: derived from its Kafka Connect schema, or
/// from its [`PgType`] and the connector's modes when the event carries no schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// JSON integer (`int8`…`int64`).
    Int,
    /// JSON boolean → `t`/`f`.
    Bool,
    /// JSON string that is PostgreSQL's text already (text, uuid, json, enum, numeric in
    /// `decimal.handling.mode = string`).
    Text,
    /// `float32`: shortest round-trip text of a `real`.
    Float32,
    /// `float64`: shortest round-trip text of a `double precision`.
    Float64,
    /// `org.apache.kafka.connect.data.Decimal`: base64 unscaled bytes, scale from the schema
    /// (or the column's declared scale).
    Decimal(i32),
    /// `io.debezium.data.VariableScaleDecimal`: `{"scale": s, "value": base64}`.
    VariableScaleDecimal,
    /// `numeric` in `decimal.handling.mode = double`: a JSON number printed with the column's
    /// scale.
    DecimalAsDouble(u32),
    /// Days since 1970-01-01 (`io.debezium.time.Date`, `org.apache.kafka.connect.data.Date`).
    Date,
    /// Time of day in ms, µs or ns (`io.debezium.time.Time`, `MicroTime`, `NanoTime`,
    /// `org.apache.kafka.connect.data.Time`): the divisor to seconds.
    Time(i64),
    /// Timestamp without zone as ms/µs/ns since the epoch (`io.debezium.time.Timestamp`,
    /// `MicroTimestamp`, `NanoTimestamp`, `org.apache.kafka.connect.data.Timestamp`).
    Timestamp(i64),
    /// `io.debezium.time.ZonedTimestamp`: ISO-8601 string, converted to GMT by the connector.
    ZonedTimestamp,
    /// `bytea` under `binary.handling.mode`.
    Bytes(BinaryHandlingMode),
    /// A schema type this renderer does not know (intervals, arrays, geometry, bits, …).
    Unsupported(String),
}

impl Encoding {
    /// The encoding of a column from its Kafka Connect schema field (`{"type":…, "name":…,
    /// "parameters":…}`), refined by the column's PostgreSQL type when known (a `float64` of a
    /// `numeric` column in `decimal.handling.mode = double`).
    pub(crate) fn from_schema(field: &Value, pg: Option<&PgType>, modes: &Modes) -> Encoding {
        let ty = field.get("type").and_then(Value::as_str).unwrap_or("");
        let name = field.get("name").and_then(Value::as_str);
        match (name, ty) {
            (Some("io.debezium.time.Date" | "org.apache.kafka.connect.data.Date"), _) => {
                Encoding::Date
            }
            (Some("io.debezium.time.Time" | "org.apache.kafka.connect.data.Time"), _) => {
                Encoding::Time(1_000)
            }
            (Some("io.debezium.time.MicroTime"), _) => Encoding::Time(1_000_000),
            (Some("io.debezium.time.NanoTime"), _) => Encoding::Time(1_000_000_000),
            (Some("io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp"), _) => {
                Encoding::Timestamp(1_000)
            }
            (Some("io.debezium.time.MicroTimestamp"), _) => Encoding::Timestamp(1_000_000),
            (Some("io.debezium.time.NanoTimestamp"), _) => Encoding::Timestamp(1_000_000_000),
            (Some("io.debezium.time.ZonedTimestamp"), _) => Encoding::ZonedTimestamp,
            // The connector converts a timetz to GMT and drops the offset PostgreSQL prints
            // (`12:00:00+02` arrives as `10:00:00Z`): the key cannot be rebuilt.
            (Some("io.debezium.time.ZonedTime"), _) => Encoding::Unsupported(ZONED_TIME.into()),
            (Some("org.apache.kafka.connect.data.Decimal"), _) => {
                let scale = field
                    .get("parameters")
                    .and_then(|p| p.get("scale"))
                    .and_then(|s| match s {
                        Value::String(s) => s.parse::<i32>().ok(),
                        Value::Number(n) => n.as_i64().and_then(|n| i32::try_from(n).ok()),
                        _ => None,
                    });
                match scale {
                    Some(s) => Encoding::Decimal(s),
                    None => Encoding::Unsupported(
                        "org.apache.kafka.connect.data.Decimal without a `scale` parameter".into(),
                    ),
                }
            }
            (Some("io.debezium.data.VariableScaleDecimal"), _) => Encoding::VariableScaleDecimal,
            (
                Some("io.debezium.data.Uuid" | "io.debezium.data.Json" | "io.debezium.data.Enum"),
                "string",
            ) => Encoding::Text,
            (Some(other), _) => Encoding::Unsupported(format!("{ty} ({other})")),
            (None, "int8" | "int16" | "int32" | "int64") => Encoding::Int,
            // The connector sends both `boolean` and `bit(1)` as a Connect boolean, and
            // PostgreSQL prints them differently (`t` and `1`): only the column's type tells.
            (None, "boolean") => match pg {
                Some(PgType::Bool) => Encoding::Bool,
                _ => Encoding::Unsupported(
                    "a Connect boolean without a known column type (PostgreSQL boolean prints                      `t`, bit(1) prints `1`): declare it in [rules.types] or set [postgres] url"
                        .into(),
                ),
            },
            // bytea in binary.handling.mode base64/base64-url-safe/hex: the schema only says
            // "string"; the column's type tells it from text.
            (None, "string") => match (pg, modes.binary) {
                (Some(PgType::Bytea), BinaryHandlingMode::Bytes) => Encoding::Unsupported(
                    "string for a bytea column: set debezium.binary_handling_mode to the connector's"
                        .into(),
                ),
                (Some(PgType::Bytea), mode) => Encoding::Bytes(mode),
                _ => Encoding::Text,
            },
            // The JSON converter names them `float` and `double` (Connect's FLOAT32/FLOAT64).
            (None, "float" | "float32") => Encoding::Float32,
            (None, "double" | "float64") => match pg {
                Some(PgType::Numeric(Some(s))) => Encoding::DecimalAsDouble(*s),
                Some(PgType::NumericWide(_)) => Encoding::Unsupported(
                    "a numeric with more than 15 digits sent as a double".into(),
                ),
                _ => Encoding::Float64,
            },
            (None, "bytes") => Encoding::Bytes(BinaryHandlingMode::Bytes),
            (None, other) => Encoding::Unsupported(other.to_owned()),
        }
    }

    /// The encoding of a column of type `pg` in an event without a schema, per the connector's
    /// modes.
    ///
    /// # Errors
    /// Why the value cannot be rendered exactly (a `numeric` without a scale in `double` mode,
    /// µs lost in `connect` mode).
    pub(crate) fn from_type(pg: &PgType, modes: &Modes) -> Result<Encoding, String> {
        Ok(match pg {
            PgType::Int => Encoding::Int,
            PgType::Bool => Encoding::Bool,
            PgType::Text => Encoding::Text,
            PgType::Float4 => Encoding::Float32,
            PgType::Float8 => Encoding::Float64,
            PgType::NumericWide(s) => match modes.decimal {
                DecimalHandlingMode::String => Encoding::Text,
                DecimalHandlingMode::Precise => Encoding::Decimal(*s as i32),
                DecimalHandlingMode::Double => {
                    return Err(
                        "a numeric with more than 15 digits in decimal.handling.mode = double: \
                         a double cannot carry it exactly (use precise or string)"
                            .into(),
                    );
                }
            },
            PgType::Numeric(scale) => match (modes.decimal, scale) {
                (DecimalHandlingMode::String, _) => Encoding::Text,
                (DecimalHandlingMode::Precise, Some(s)) => Encoding::Decimal(*s as i32),
                (DecimalHandlingMode::Precise, None) => Encoding::VariableScaleDecimal,
                (DecimalHandlingMode::Double, Some(s)) => Encoding::DecimalAsDouble(*s),
                (DecimalHandlingMode::Double, None) => {
                    return Err(
                        "an unconstrained numeric in decimal.handling.mode = double: the \
                                scale PostgreSQL prints is lost (declare numeric(p,s), or use \
                                precise or string)"
                            .into(),
                    );
                }
            },
            PgType::Date => Encoding::Date,
            PgType::Time(p) => match modes.time {
                TimePrecisionMode::Adaptive if *p <= 3 => Encoding::Time(1_000),
                TimePrecisionMode::Adaptive | TimePrecisionMode::AdaptiveTimeMicroseconds => {
                    Encoding::Time(1_000_000)
                }
                TimePrecisionMode::Connect if *p <= 3 => Encoding::Time(1_000),
                TimePrecisionMode::Connect => return Err(connect_lossy("time", *p)),
            },
            PgType::Timestamp(p) => match modes.time {
                TimePrecisionMode::Connect if *p > 3 => {
                    return Err(connect_lossy("timestamp", *p));
                }
                _ if *p <= 3 => Encoding::Timestamp(1_000),
                _ => Encoding::Timestamp(1_000_000),
            },
            PgType::TimeTz => Encoding::Unsupported(ZONED_TIME.into()),
            PgType::TimestampTz => Encoding::ZonedTimestamp,
            PgType::Bytea => Encoding::Bytes(modes.binary),
        })
    }
}

fn connect_lossy(ty: &str, p: u8) -> String {
    format!(
        "{ty}({p}) in time.precision.mode = connect: the connector sends milliseconds and drops \
         the microseconds PostgreSQL prints (declare {ty}(3) if the column holds no more, or use \
         adaptive)"
    )
}

/// The connector's modes that shape values when events carry no schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Modes {
    pub(crate) decimal: DecimalHandlingMode,
    pub(crate) time: TimePrecisionMode,
    pub(crate) binary: BinaryHandlingMode,
}

/// PostgreSQL's `DateStyle`: output style and field order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DateStyle {
    /// `ISO` (the order does not change ISO output).
    Iso,
    /// `SQL`: `12/02/2026` (MDY, YMD) or `02/12/2026` (DMY).
    Sql { dmy: bool },
    /// `Postgres`: `Wed Dec 02 10:15:30 2026` / date `12-02-2026` (DMY: day first).
    Postgres { dmy: bool },
    /// `German`: `02.12.2026`.
    German,
}

impl DateStyle {
    /// Parses a `DateStyle` setting as PostgreSQL accepts it: a style and/or an order,
    /// comma-separated (`ISO, MDY`, `SQL, DMY`, `German`, `Postgres`).
    pub(crate) fn parse(s: &str) -> Result<DateStyle, String> {
        let mut style = None;
        let mut dmy = false;
        for part in s.split(',').map(|p| p.trim().to_ascii_uppercase()) {
            match part.as_str() {
                "ISO" | "SQL" | "POSTGRES" | "GERMAN" => style = Some(part),
                "DMY" | "EURO" | "EUROPEAN" => dmy = true,
                "MDY" | "US" | "NONEURO" | "NONEUROPEAN" | "YMD" => dmy = false,
                _ => {
                    return Err(format!(
                        "`{s}`: expected a style (ISO, SQL, Postgres, German) and/or an order \
                         (MDY, DMY, YMD), as PostgreSQL's DateStyle"
                    ));
                }
            }
        }
        Ok(match style.as_deref() {
            None | Some("ISO") => DateStyle::Iso,
            Some("SQL") => DateStyle::Sql { dmy },
            Some("POSTGRES") => DateStyle::Postgres { dmy },
            _ => DateStyle::German,
        })
    }
}

/// PostgreSQL's `TimeZone` as far as output needs it: UTC or a fixed offset east of UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimeZone {
    /// Seconds east of UTC.
    offset: i32,
    /// Printed as `UTC` by the SQL, Postgres and German styles.
    utc: bool,
}

impl TimeZone {
    /// `UTC` (also `Etc/UTC`, `GMT`, `Z`) or an ISO-8601 offset `+05:30`, `-08`, `+0530`.
    pub(crate) fn parse(s: &str) -> Result<TimeZone, String> {
        let t = s.trim();
        if matches!(
            t.to_ascii_uppercase().as_str(),
            "UTC" | "ETC/UTC" | "GMT" | "ETC/GMT" | "Z" | "ZULU" | "UCT"
        ) {
            return Ok(TimeZone {
                offset: 0,
                utc: true,
            });
        }
        let bad = || {
            format!(
                "`{s}`: expected UTC or a fixed offset east of UTC such as +05:30 or -08:00 \
                 (named zones with daylight saving time are not supported)"
            )
        };
        let (sign, rest) = match t.as_bytes().first() {
            Some(b'+') => (1, &t[1..]),
            Some(b'-') => (-1, &t[1..]),
            _ => return Err(bad()),
        };
        let digits: String = rest.chars().filter(|c| *c != ':').collect();
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 6 {
            return Err(bad());
        }
        let field = |r: std::ops::Range<usize>| {
            digits
                .get(r)
                .map_or(Ok(0), |d| d.parse::<i32>().map_err(|_| bad()))
        };
        let (h, m, sec) = match digits.len() {
            1 | 2 => (field(0..digits.len())?, 0, 0),
            4 => (field(0..2)?, field(2..4)?, 0),
            6 => (field(0..2)?, field(2..4)?, field(4..6)?),
            _ => return Err(bad()),
        };
        if h > 15 || m > 59 || sec > 59 {
            return Err(bad());
        }
        Ok(TimeZone {
            offset: sign * (h * 3600 + m * 60 + sec),
            utc: false,
        })
    }
}

/// Everything rendering needs besides the value: DateStyle and TimeZone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Style {
    pub(crate) date_style: DateStyle,
    pub(crate) time_zone: TimeZone,
}

/// Why a value was not rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RenderError {
    /// The JSON value does not have the shape its column's type/encoding has: the record is
    /// dead-lettered with this reason.
    Mismatch(String),
    /// The value is well-formed but has no PostgreSQL text this renderer can produce (a type it
    /// does not know): the table is evicted whole, counted with this reason.
    Unrenderable(&'static str, String),
}

fn mismatch(expected: &str, got: &Value) -> RenderError {
    let mut shown = got.to_string();
    if shown.len() > 80 {
        let mut cut = 77;
        while !shown.is_char_boundary(cut) {
            cut -= 1;
        }
        shown.truncate(cut);
        shown.push_str("...");
    }
    RenderError::Mismatch(format!("expected {expected}, got {shown}"))
}

/// Renders `v` (not null, not the unavailable-value placeholder) encoded as `enc` in PostgreSQL's
/// text output form under `style`.
pub(crate) fn render(v: &Value, enc: &Encoding, style: &Style) -> Result<String, RenderError> {
    match enc {
        Encoding::Int => match v {
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
            _ => Err(mismatch("a JSON integer", v)),
        },
        Encoding::Bool => match v {
            Value::Bool(b) => Ok(if *b { "t" } else { "f" }.into()),
            _ => Err(mismatch("a JSON boolean", v)),
        },
        Encoding::Text => match v {
            Value::String(s) => Ok(s.clone()),
            _ => Err(mismatch("a JSON string", v)),
        },
        Encoding::Float32 => {
            float(v, "a JSON number (real)").map(|f| float_text(f64::from(f as f32), true))
        }
        Encoding::Float64 => {
            float(v, "a JSON number (double precision)").map(|f| float_text(f, false))
        }
        Encoding::Decimal(scale) => match v {
            Value::String(s) => Ok(decimal_text(&b64(s, v, "base64 decimal bytes")?, *scale)),
            _ => Err(mismatch("a base64 string (Decimal bytes)", v)),
        },
        Encoding::VariableScaleDecimal => {
            let scale = v
                .get("scale")
                .and_then(Value::as_i64)
                .and_then(|s| i32::try_from(s).ok());
            match (scale, v.get("value")) {
                (Some(scale), Some(Value::String(s))) => {
                    Ok(decimal_text(&b64(s, v, "base64 decimal bytes")?, scale))
                }
                _ => Err(mismatch(
                    "a VariableScaleDecimal object {\"scale\": int, \"value\": base64}",
                    v,
                )),
            }
        }
        Encoding::DecimalAsDouble(scale) => match v {
            Value::Number(n) => match n.as_f64() {
                Some(f) if f.is_finite() => Ok(format!("{f:.*}", *scale as usize)),
                _ => Err(mismatch("a finite JSON number (numeric as double)", v)),
            },
            Value::String(s) if s == "NaN" => Ok("NaN".into()),
            _ => Err(mismatch("a JSON number (numeric as double)", v)),
        },
        Encoding::Date => {
            let days = int(v, "a JSON integer (days since 1970-01-01)")?;
            if !(MIN_DAYS..=MAX_DAYS).contains(&days) {
                return Err(RenderError::Unrenderable(
                    "out_of_range",
                    format!("day {days} is outside PostgreSQL's date range (infinity?)"),
                ));
            }
            Ok(date_text(days, style.date_style))
        }
        Encoding::Time(per_second) => {
            let t = int(v, "a JSON integer (time of day)")?;
            if !(0..=86_400 * per_second).contains(&t) {
                return Err(RenderError::Mismatch(format!(
                    "time of day {t} (1/{per_second} s) is outside 00:00:00..24:00:00"
                )));
            }
            let micros = t as i128 * 1_000_000 / *per_second as i128;
            Ok(time_text(micros as i64))
        }
        Encoding::Timestamp(per_second) => {
            let t = int(v, "a JSON integer (timestamp)")?;
            if t == i64::MAX {
                return Ok("infinity".into());
            }
            if t == i64::MIN {
                return Ok("-infinity".into());
            }
            let micros = t as i128 * 1_000_000 / *per_second as i128;
            let micros = i64::try_from(micros).map_err(|_| mismatch("a timestamp", v))?;
            timestamp_text(micros, None, style)
        }
        Encoding::ZonedTimestamp => match v {
            Value::String(s) if s == "infinity" || s == "-infinity" => Ok(s.clone()),
            Value::String(s) => {
                let micros = parse_zoned_timestamp(s)
                    .ok_or_else(|| mismatch("an ISO-8601 timestamp with offset", v))?;
                timestamp_text(micros, Some(style.time_zone), style)
            }
            _ => Err(mismatch("an ISO-8601 string (ZonedTimestamp)", v)),
        },
        Encoding::Bytes(mode) => match v {
            Value::String(s) => {
                let bytes = match mode {
                    BinaryHandlingMode::Bytes | BinaryHandlingMode::Base64 => {
                        b64(s, v, "base64 bytes")?
                    }
                    BinaryHandlingMode::Base64UrlSafe => base64::engine::general_purpose::URL_SAFE
                        .decode(s)
                        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s))
                        .map_err(|_| mismatch("url-safe base64 bytes", v))?,
                    BinaryHandlingMode::Hex => {
                        hex_decode(s).ok_or_else(|| mismatch("hex bytes", v))?
                    }
                };
                let mut out = String::with_capacity(2 + bytes.len() * 2);
                out.push_str("\\x");
                for b in bytes {
                    let _ = write!(out, "{b:02x}");
                }
                Ok(out)
            }
            _ => Err(mismatch("a string (bytea)", v)),
        },
        Encoding::Unsupported(what) => Err(RenderError::Unrenderable(
            "unsupported_type",
            format!("no PostgreSQL text form known for schema type {what}"),
        )),
    }
}

fn int(v: &Value, expected: &str) -> Result<i64, RenderError> {
    v.as_i64().ok_or_else(|| mismatch(expected, v))
}

fn float(v: &Value, expected: &str) -> Result<f64, RenderError> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| mismatch(expected, v)),
        Value::String(s) if s == "NaN" => Ok(f64::NAN),
        Value::String(s) if s == "Infinity" => Ok(f64::INFINITY),
        Value::String(s) if s == "-Infinity" => Ok(f64::NEG_INFINITY),
        _ => Err(mismatch(expected, v)),
    }
}

fn b64(s: &str, v: &Value, what: &str) -> Result<Vec<u8>, RenderError> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|_| mismatch(what, v))
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.strip_prefix("\\x").unwrap_or(s);
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// PostgreSQL's `float8out`/`float4out` (extra_float_digits = 1, the default since 12): the
/// shortest digits that round-trip, in positional notation unless the decimal exponent is
/// < -4 or ≥ 15 (real: ≥ 6), then `d.ddde+XX`.
pub(crate) fn float_text(f: f64, single: bool) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let mut buf = ryu::Buffer::new();
    let s = if single {
        buf.format_finite(f as f32)
    } else {
        buf.format_finite(f)
    };
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (mantissa, exp) = match s.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => (s, 0),
    };
    let (ip, fp) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all: String = format!("{ip}{fp}");
    let lead = all.bytes().take_while(|b| *b == b'0').count();
    let digits = all[lead..].trim_end_matches('0');
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    if digits.is_empty() {
        out.push('0');
        return out;
    }
    let e = ip.len() as i32 - 1 - lead as i32 + exp;
    let dig = if single { 6 } else { 15 };
    if e < -4 || e >= dig {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    } else if e < 0 {
        out.push_str("0.");
        for _ in 0..(-e - 1) {
            out.push('0');
        }
        out.push_str(digits);
    } else {
        let int_len = e as usize + 1;
        if digits.len() <= int_len {
            out.push_str(digits);
            for _ in digits.len()..int_len {
                out.push('0');
            }
        } else {
            out.push_str(&digits[..int_len]);
            out.push('.');
            out.push_str(&digits[int_len..]);
        }
    }
    out
}

/// `unscaled × 10^-scale` from big-endian two's-complement bytes, as `numeric_out` prints it
/// (exactly `scale` fraction digits).
pub(crate) fn decimal_text(bytes: &[u8], scale: i32) -> String {
    let neg = bytes.first().is_some_and(|b| b & 0x80 != 0);
    let mut mag: Vec<u8> = bytes.to_vec();
    if neg {
        // Two's complement → magnitude: invert and add one.
        for b in &mut mag {
            *b = !*b;
        }
        for b in mag.iter_mut().rev() {
            let (v, carry) = b.overflowing_add(1);
            *b = v;
            if !carry {
                break;
            }
        }
    }
    // Magnitude bytes → decimal digits (repeated division by 10^9).
    let mut limbs: Vec<u32> = Vec::new(); // little-endian base 1e9
    for &byte in &mag {
        let mut carry = u64::from(byte);
        for limb in &mut limbs {
            let x = u64::from(*limb) * 256 + carry;
            *limb = (x % 1_000_000_000) as u32;
            carry = x / 1_000_000_000;
        }
        while carry > 0 {
            limbs.push((carry % 1_000_000_000) as u32);
            carry /= 1_000_000_000;
        }
    }
    let mut digits = String::new();
    for (i, limb) in limbs.iter().rev().enumerate() {
        if i == 0 {
            let _ = write!(digits, "{limb}");
        } else {
            let _ = write!(digits, "{limb:09}");
        }
    }
    if digits.is_empty() {
        digits.push('0');
    }
    let mut out = String::new();
    if neg && digits.bytes().any(|b| b != b'0') {
        out.push('-');
    }
    if scale <= 0 {
        out.push_str(&digits);
        if digits != "0" {
            for _ in 0..(-scale) {
                out.push('0');
            }
        }
        return out;
    }
    let scale = scale as usize;
    if digits.len() <= scale {
        out.push_str("0.");
        for _ in digits.len()..scale {
            out.push('0');
        }
        out.push_str(&digits);
    } else {
        let cut = digits.len() - scale;
        out.push_str(&digits[..cut]);
        out.push('.');
        out.push_str(&digits[cut..]);
    }
    out
}

/// Days since 1970-01-01 of 4714-11-24 BC (Julian day 0) and 5874897-12-31, PostgreSQL's
/// date range.
const MIN_DAYS: i64 = -2_440_588;
const MAX_DAYS: i64 = 2_145_031_948;

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01; year 0 is 1 BC
/// (H. Hinnant, "chrono-Compatible Low-Level Date Algorithms", `civil_from_days`).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (`days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];
const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];

/// (printed year, BC?) of an astronomical year.
fn year_bc(y: i64) -> (i64, bool) {
    if y > 0 { (y, false) } else { (1 - y, true) }
}

fn date_text(days: i64, style: DateStyle) -> String {
    let (y, m, d) = civil(days);
    let (yr, bc) = year_bc(y);
    let mut out = match style {
        DateStyle::Iso => format!("{yr:04}-{m:02}-{d:02}"),
        DateStyle::Sql { dmy: true } => format!("{d:02}/{m:02}/{yr:04}"),
        DateStyle::Sql { dmy: false } => format!("{m:02}/{d:02}/{yr:04}"),
        DateStyle::German => format!("{d:02}.{m:02}.{yr:04}"),
        DateStyle::Postgres { dmy: true } => format!("{d:02}-{m:02}-{yr:04}"),
        DateStyle::Postgres { dmy: false } => format!("{m:02}-{d:02}-{yr:04}"),
    };
    if bc {
        out.push_str(" BC");
    }
    out
}

/// `HH:MM:SS[.ffffff]` with trailing fraction zeros dropped (PostgreSQL's `AppendSeconds`).
fn time_text(micros: i64) -> String {
    let mut out = String::new();
    push_hms(&mut out, micros);
    out
}

fn push_hms(out: &mut String, micros: i64) {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let _ = write!(
        out,
        "{:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    );
    if frac != 0 {
        let f = format!("{frac:06}");
        out.push('.');
        out.push_str(f.trim_end_matches('0'));
    }
}

/// `EncodeTimezone`: `+HH`, `+HH:MM` or `+HH:MM:SS` (seconds east of UTC).
fn push_offset(out: &mut String, offset: i32) {
    let sign = if offset < 0 { '-' } else { '+' };
    let a = offset.abs();
    let _ = write!(out, "{sign}{:02}", a / 3600);
    if a % 3600 != 0 {
        let _ = write!(out, ":{:02}", a / 60 % 60);
        if a % 60 != 0 {
            let _ = write!(out, ":{:02}", a % 60);
        }
    }
}

/// A timestamp (µs since the epoch; UTC for `timestamptz`) as `EncodeDateTime` prints it. `tz`:
/// `None` for `timestamp`, the session time zone for `timestamptz`.
fn timestamp_text(micros: i64, tz: Option<TimeZone>, style: &Style) -> Result<String, RenderError> {
    let local = micros + i64::from(tz.map_or(0, |z| z.offset)) * 1_000_000;
    let days = local.div_euclid(86_400_000_000);
    let tod = local.rem_euclid(86_400_000_000);
    if !(MIN_DAYS..=MAX_DAYS).contains(&days) {
        return Err(RenderError::Unrenderable(
            "out_of_range",
            format!("timestamp {micros} µs is outside PostgreSQL's range"),
        ));
    }
    let (y, m, d) = civil(days);
    let (yr, bc) = year_bc(y);
    let mut out = String::new();
    let zone = |out: &mut String, iso: bool| {
        if let Some(z) = tz {
            if iso {
                push_offset(out, z.offset);
            } else if z.utc {
                out.push_str(" UTC");
            } else {
                out.push(' ');
                push_offset(out, z.offset);
            }
        }
    };
    match style.date_style {
        DateStyle::Iso => {
            let _ = write!(out, "{yr:04}-{m:02}-{d:02} ");
            push_hms(&mut out, tod);
            zone(&mut out, true);
        }
        DateStyle::Sql { dmy } => {
            if dmy {
                let _ = write!(out, "{d:02}/{m:02}/{yr:04} ");
            } else {
                let _ = write!(out, "{m:02}/{d:02}/{yr:04} ");
            }
            push_hms(&mut out, tod);
            zone(&mut out, false);
        }
        DateStyle::German => {
            let _ = write!(out, "{d:02}.{m:02}.{yr:04} ");
            push_hms(&mut out, tod);
            zone(&mut out, false);
        }
        DateStyle::Postgres { dmy } => {
            let dow = DAYS[(days + 4).rem_euclid(7) as usize];
            let mon = MONTHS[(m - 1) as usize];
            if dmy {
                let _ = write!(out, "{dow} {d:02} {mon} ");
            } else {
                let _ = write!(out, "{dow} {mon} {d:02} ");
            }
            push_hms(&mut out, tod);
            let _ = write!(out, " {yr:04}");
            zone(&mut out, false);
        }
    }
    if bc {
        out.push_str(" BC");
    }
    Ok(out)
}

/// `[+-]YYYY…-MM-DDTHH:MM:SS[.f…](Z|±HH[:MM[:SS]])` → µs since the epoch.
fn parse_zoned_timestamp(s: &str) -> Option<i64> {
    let (date, rest) = s.split_once('T')?;
    let (neg_year, date) = match date.as_bytes().first()? {
        b'-' => (true, &date[1..]),
        b'+' => (false, &date[1..]),
        _ => (false, date),
    };
    let mut parts = date.split('-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let d: u32 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let y = if neg_year { -y } else { y };
    let (tod, offset) = parse_time_offset(rest)?;
    Some(days_from_civil(y, m, d) * 86_400_000_000 + tod - i64::from(offset) * 1_000_000)
}

fn parse_time_offset(s: &str) -> Option<(i64, i32)> {
    let split = s.find(['Z', 'z', '+', '-'])?;
    let (time, zone) = s.split_at(split);
    let offset = if zone.eq_ignore_ascii_case("z") {
        0
    } else {
        TimeZone::parse(zone).ok()?.offset
    };
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut f = hms.split(':');
    let h: i64 = f.next()?.parse().ok()?;
    let mi: i64 = f.next()?.parse().ok()?;
    let sec: i64 = f.next().map_or(Some(0), |x| x.parse().ok())?;
    if f.next().is_some() || h > 24 || mi > 59 || sec > 60 || frac.len() > 9 {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut micros_frac = 0i64;
    for (i, b) in frac.bytes().take(6).enumerate() {
        micros_frac += i64::from(b - b'0') * 10i64.pow(5 - i as u32);
    }
    if frac.bytes().skip(6).any(|b| b != b'0') {
        return None; // PostgreSQL keeps µs; a ns remainder is not one of its values
    }
    Some(((h * 3600 + mi * 60 + sec) * 1_000_000 + micros_frac, offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn iso() -> Style {
        Style {
            date_style: DateStyle::Iso,
            time_zone: TimeZone::parse("UTC").unwrap(),
        }
    }

    #[test]
    fn a_connect_boolean_needs_its_column_type() {
        let modes = Modes {
            decimal: DecimalHandlingMode::Precise,
            time: TimePrecisionMode::Adaptive,
            binary: BinaryHandlingMode::Bytes,
        };
        let field = json!({"type": "boolean", "field": "on_sale"});
        // boolean and bit(1) both arrive as a Connect boolean; they print `t` and `1`.
        assert!(matches!(
            Encoding::from_schema(&field, None, &modes),
            Encoding::Unsupported(_)
        ));
        assert_eq!(
            Encoding::from_schema(&field, Some(&PgType::Bool), &modes),
            Encoding::Bool
        );
    }

    #[test]
    fn floats_print_like_float8out() {
        for (f, want) in [
            (1e20, "1e+20"),
            (1.5, "1.5"),
            (1e15, "1e+15"),
            (123456789012345.6, "123456789012345.6"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-0.0, "-0"),
            (0.0, "0"),
            (100.0, "100"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
            (1.2345678901234568e-300, "1.2345678901234568e-300"),
        ] {
            assert_eq!(float_text(f, false), want, "{f}");
        }
        for (f, want) in [
            (1e6, "1e+06"),
            (123456.0, "123456"),
            (1.1, "1.1"),
            (1e-5, "1e-05"),
        ] {
            assert_eq!(float_text(f64::from(f as f32), true), want, "{f}");
        }
    }

    #[test]
    fn decimals_from_unscaled_bytes() {
        let b = |s: &str| base64::engine::general_purpose::STANDARD.decode(s).unwrap();
        // The example: "A+c=" = 0x03E7 = 999 at scale 2.
        assert_eq!(decimal_text(&b("A+c="), 2), "9.99");
        assert_eq!(decimal_text(&[0xFF], 2), "-0.01");
        assert_eq!(decimal_text(&[0x00], 3), "0.000");
        assert_eq!(decimal_text(&[0x80], 0), "-128");
        assert_eq!(
            decimal_text(&[0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], 4),
            "1844674407370955.1616"
        );
    }

    #[test]
    fn dates_and_times_in_every_style() {
        assert_eq!(date_text(20789, DateStyle::Iso), "2026-12-02");
        assert_eq!(date_text(20789, DateStyle::Sql { dmy: true }), "02/12/2026");
        assert_eq!(
            date_text(20789, DateStyle::Postgres { dmy: false }),
            "12-02-2026"
        );
        assert_eq!(
            date_text(days_from_civil(0, 1, 1), DateStyle::Iso),
            "0001-01-01 BC"
        );
        assert_eq!(days_from_civil(2026, 12, 2), 20789);
        let ts = days_from_civil(2026, 12, 2) * 86_400_000_000 + 37_530_500_000;
        let style = |ds, tz: &str| Style {
            date_style: ds,
            time_zone: TimeZone::parse(tz).unwrap(),
        };
        let utc = Some(TimeZone::parse("UTC").unwrap());
        let ist = Some(TimeZone::parse("+05:30").unwrap());
        assert_eq!(
            timestamp_text(ts, utc, &iso()).unwrap(),
            "2026-12-02 10:25:30.5+00"
        );
        assert_eq!(
            timestamp_text(ts, None, &iso()).unwrap(),
            "2026-12-02 10:25:30.5"
        );
        assert_eq!(
            timestamp_text(ts, ist, &style(DateStyle::Iso, "+05:30")).unwrap(),
            "2026-12-02 15:55:30.5+05:30"
        );
        assert_eq!(
            timestamp_text(ts, utc, &style(DateStyle::Postgres { dmy: false }, "UTC")).unwrap(),
            "Wed Dec 02 10:25:30.5 2026 UTC"
        );
        assert_eq!(
            timestamp_text(ts, ist, &style(DateStyle::Sql { dmy: true }, "+05:30")).unwrap(),
            "02/12/2026 15:55:30.5 +05:30"
        );
        assert_eq!(parse_zoned_timestamp("2026-12-02T10:25:30.5Z"), Some(ts));
        assert_eq!(
            parse_zoned_timestamp("2026-12-02T15:55:30.500000+05:30"),
            Some(ts)
        );
        assert_eq!(time_text(86_400_000_000), "24:00:00");
    }

    #[test]
    fn mismatches_are_reported() {
        let e = render(&json!("2026-12-02"), &Encoding::Date, &iso()).unwrap_err();
        assert!(
            matches!(e, RenderError::Mismatch(ref m) if m.contains("days since")),
            "{e:?}"
        );
        assert!(matches!(
            render(&json!(1), &Encoding::Text, &iso()),
            Err(RenderError::Mismatch(_))
        ));
        assert!(matches!(
            render(&json!(1), &Encoding::Unsupported("x".into()), &iso()),
            Err(RenderError::Unrenderable("unsupported_type", _))
        ));
    }

    #[test]
    fn type_names_parse() {
        assert_eq!(PgType::parse("numeric(10,2)"), Ok(PgType::Numeric(Some(2))));
        assert_eq!(PgType::parse("numeric(20,2)"), Ok(PgType::NumericWide(2)));
        assert_eq!(
            PgType::parse("timestamp(3) without time zone"),
            Ok(PgType::Timestamp(3))
        );
        assert_eq!(PgType::parse("character varying(20)"), Ok(PgType::Text));
        assert_eq!(PgType::parse("TIMESTAMPTZ"), Ok(PgType::TimestampTz));
        assert!(
            PgType::parse("interval")
                .unwrap_err()
                .contains("not supported")
        );
        assert!(TimeZone::parse("Europe/Berlin").is_err());
        assert_eq!(
            DateStyle::parse("SQL, DMY"),
            Ok(DateStyle::Sql { dmy: true })
        );
    }
}
