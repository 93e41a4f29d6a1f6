//! Kafka record → evictions: cacheclear bus records and Debezium PostgreSQL change events.
//!
//! Pure functions of the record's key and value (no I/O), so every mapping rule is unit-tested.

use std::collections::HashMap;
use std::sync::Arc;

use cacheclear_protocol::{BusRecord, KeyLayout, Lsn};
use cacheclear_rules::{Column, MapRow, RowImage, Rules, TableRules};
use serde_json::{Map, Value};

use crate::config::{BeforeImages, DebeziumConfig};

/// The input format of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// cacheclear bus records ([`BusRecord`] JSON).
    Bus,
    /// Debezium PostgreSQL connector change events (JSON).
    Debezium,
}

/// What one record asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// Evict these keys and/or every key matching these patterns, with this fence.
    Evict(Evictions),
    /// Nothing to evict; the record is acknowledged (its offset committed) all the same. The
    /// string says why (`"tombstone"`, `"no rule for table public.x"`, …).
    Skip(String),
}

/// The evictions of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evictions {
    /// Cache keys `K` to invalidate (each valid for [`KeyLayout`]).
    pub keys: Vec<String>,
    /// SCAN MATCH patterns of a table-wide eviction (TRUNCATE, or a row whose keys are unknown);
    /// empty for key evictions.
    pub patterns: Vec<String>,
    /// The fence value: the bus record's `commit_lsn`, or Debezium's `source.lsn`.
    pub lsn: Lsn,
    /// Commit time, µs since the Unix epoch (bus `commit_time_us`; Debezium `source.ts_ms` ×
    /// 1000); used for the lag figures only.
    pub commit_time_us: i64,
}

/// Why a record cannot be applied; sent to the dead-letter topic as its reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

fn malformed(msg: impl Into<String>) -> Malformed {
    Malformed(msg.into())
}

/// Maps records to evictions. Cheap to clone; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Decoder {
    rules: Arc<Rules>,
    debezium: DebeziumConfig,
}

impl Decoder {
    /// A decoder mapping Debezium rows through `rules` (bus records carry their keys already).
    pub fn new(rules: Arc<Rules>, debezium: DebeziumConfig) -> Decoder {
        Decoder { rules, debezium }
    }

    /// Decodes one record of a topic in `format`. `key` and `value` are the Kafka record's key
    /// and value (`None` when null).
    ///
    /// # Errors
    /// [`Malformed`] with the reason: not JSON, not the documented shape, an invalid cache key,
    /// an unknown Debezium `op`, a missing `source.lsn`, …
    pub fn decode(
        &self,
        format: Format,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<Decoded, Malformed> {
        match format {
            Format::Bus => decode_bus(value),
            Format::Debezium => self.decode_debezium(key, value),
        }
    }

    fn decode_debezium(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<Decoded, Malformed> {
        // A delete is followed by a tombstone (null value) for log compaction: nothing to do.
        let Some(value) = value else {
            return Ok(Decoded::Skip("tombstone".into()));
        };
        let root: Value = serde_json::from_slice(value)
            .map_err(|e| malformed(format!("Debezium change event: not JSON: {e}")))?;
        let (payload, schema) = unwrap_envelope(&root);
        let payload = payload
            .as_object()
            .ok_or_else(|| malformed("Debezium change event: payload is not a JSON object"))?;
        let op = payload
            .get("op")
            .and_then(Value::as_str)
            .ok_or_else(|| malformed("Debezium change event: no `op` string"))?;
        if op == "m" {
            return Ok(Decoded::Skip("logical decoding message (op m)".into()));
        }
        if !matches!(op, "c" | "r" | "u" | "d" | "t") {
            return Err(malformed(format!(
                "Debezium change event: unknown op `{op}` (expected c, r, u, d, t or m)"
            )));
        }
        let source = payload
            .get("source")
            .and_then(Value::as_object)
            .ok_or_else(|| malformed("Debezium change event: no `source` object"))?;
        let schema_name = source
            .get("schema")
            .and_then(Value::as_str)
            .ok_or_else(|| malformed("Debezium change event: no `source.schema` string"))?;
        let table_name = source
            .get("table")
            .and_then(Value::as_str)
            .ok_or_else(|| malformed("Debezium change event: no `source.table` string"))?;
        let lsn = source_lsn(source)?;
        let ts_ms = source
            .get("ts_ms")
            .or_else(|| payload.get("ts_ms"))
            .and_then(Value::as_i64)
            .ok_or_else(|| malformed("Debezium change event: no `source.ts_ms` integer"))?;
        let commit_time_us = ts_ms.saturating_mul(1000);
        let Some(table) = self.rules.table(schema_name, table_name) else {
            return Ok(Decoded::Skip(format!(
                "no rule for table {schema_name}.{table_name}"
            )));
        };
        let table_wide = || {
            Decoded::Evict(Evictions {
                keys: Vec::new(),
                patterns: table.scan_patterns(),
                lsn,
                commit_time_us,
            })
        };
        if op == "t" {
            return Ok(table_wide());
        }
        if op == "r" && !self.debezium.evict_on_snapshot {
            return Ok(Decoded::Skip(
                "snapshot read (debezium.evict_on_snapshot = false)".into(),
            ));
        }
        let types = FieldTypes::from_schema(schema);
        let key_columns = key.and_then(message_key_columns);
        let image = |field: &str, fallback: Option<&MapRow>| -> Result<Option<MapRow>, Malformed> {
            match payload.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Object(obj)) => Ok(Some(self.row_image(
                    table,
                    obj,
                    &types,
                    field == "before",
                    key_columns.as_ref(),
                    fallback,
                ))),
                Some(_) => Err(malformed(format!(
                    "Debezium change event: `{field}` is neither an object nor null"
                ))),
            }
        };
        let before = image("before", None)?;
        let after = image("after", before.as_ref())?;
        let images: Vec<&MapRow> = match op {
            // Create and snapshot read: the new row's keys.
            "c" | "r" => vec![after.as_ref().ok_or_else(|| {
                malformed(format!(
                    "Debezium change event: op {op} without an `after` object"
                ))
            })?],
            // Delete: the old row's keys. Without a `before` the keys are unknown.
            "d" => match &before {
                Some(b) => vec![b],
                None => return Ok(table_wide()),
            },
            // Update: the old and the new row's keys.
            _ => {
                let after = after.as_ref().ok_or_else(|| {
                    malformed("Debezium change event: op u without an `after` object")
                })?;
                match &before {
                    Some(b) => vec![b, after],
                    // No old image (REPLICA IDENTITY DEFAULT, key unchanged — a key change is a
                    // delete + create pair). The old keys equal the new ones only if every
                    // template column is a key column; otherwise they are unknown.
                    None => {
                        let key_only = key_columns.as_ref().is_some_and(|k| {
                            table.columns().iter().all(|c| k.iter().any(|kc| kc == c))
                        });
                        if !key_only {
                            return Ok(table_wide());
                        }
                        vec![after]
                    }
                }
            }
        };
        let mut keys = Vec::new();
        for img in images {
            if table.keys_for(img, &mut keys).is_err() {
                // A template column without a usable value (unchanged TOAST placeholder, a type
                // we cannot print like PostgreSQL, a column the image lacks): the keys are
                // unknown, so every key of the table goes.
                return Ok(table_wide());
            }
        }
        keys.sort_unstable();
        keys.dedup();
        Ok(Decoded::Evict(Evictions {
            keys,
            patterns: Vec::new(),
            lsn,
            commit_time_us,
        }))
    }

    /// The row image of one `before`/`after` object, restricted to the template columns.
    fn row_image(
        &self,
        table: &TableRules,
        obj: &Map<String, Value>,
        types: &FieldTypes,
        is_before: bool,
        key_columns: Option<&Vec<String>>,
        toast_fallback: Option<&MapRow>,
    ) -> MapRow {
        let mut row = MapRow::new();
        let field = if is_before { "before" } else { "after" };
        for column in table.columns() {
            let Some(v) = obj.get(column) else {
                continue; // Absent
            };
            if !types.printable(field, column) {
                continue; // a type whose JSON form is not PostgreSQL's text form: Absent
            }
            let is_key = key_columns.is_some_and(|k| k.iter().any(|c| c == column));
            row = match v {
                Value::Null => {
                    if is_before && self.debezium.before_images == BeforeImages::Default && !is_key
                    {
                        continue; // not carried by the old image: Absent, not NULL
                    }
                    row.null(column)
                }
                Value::String(s) if *s == self.debezium.unavailable_value_placeholder => {
                    // Unchanged TOAST: same value as in the old image, if that one has it.
                    match toast_fallback.map(|b| b.column(column)) {
                        Some(Column::Text(old)) => row.text(column, old),
                        Some(Column::Null) => row.null(column),
                        _ => row.unchanged_toast(column),
                    }
                }
                Value::String(s) => row.text(column, s.as_str()),
                Value::Bool(b) => row.text(column, if *b { "t" } else { "f" }),
                Value::Number(n) if n.is_i64() || n.is_u64() => row.text(column, n.to_string()),
                // Floats (PostgreSQL's shortest round-trip text differs from JSON's), structs,
                // arrays: not printable exactly as PostgreSQL would; Absent.
                _ => continue,
            };
        }
        row
    }
}

/// A bus record: its key or patterns, as published by cacheclear's Kafka sink.
fn decode_bus(value: Option<&[u8]>) -> Result<Decoded, Malformed> {
    let Some(value) = value else {
        return Ok(Decoded::Skip("tombstone".into()));
    };
    let r = BusRecord::from_json(value).map_err(|e| malformed(e.to_string()))?;
    let keys = match r.key {
        Some(k) => {
            KeyLayout::new(&k).map_err(|e| malformed(format!("bus record: {e}")))?;
            vec![k]
        }
        None => Vec::new(),
    };
    if r.patterns.iter().any(String::is_empty) {
        return Err(malformed("bus record: empty pattern"));
    }
    Ok(Decoded::Evict(Evictions {
        keys,
        patterns: r.patterns,
        lsn: r.commit_lsn,
        commit_time_us: r.commit_time_us,
    }))
}

/// `(payload, schema)` of a value with the JSON converter's `{"schema":…,"payload":…}` wrapper,
/// or `(value, None)` without it.
fn unwrap_envelope(root: &Value) -> (&Value, Option<&Value>) {
    match root.as_object() {
        Some(obj) if obj.contains_key("payload") && !obj.contains_key("op") => (
            obj.get("payload").unwrap_or(&Value::Null),
            obj.get("schema"),
        ),
        _ => (root, None),
    }
}

/// `source.lsn`: a JSON integer (Debezium's numeric LSN), or a string of digits.
fn source_lsn(source: &Map<String, Value>) -> Result<Lsn, Malformed> {
    match source.get("lsn") {
        Some(Value::Number(n)) => n.as_u64().map(Lsn).ok_or_else(|| {
            malformed(format!(
                "Debezium change event: `source.lsn` {n} is not an unsigned 64-bit integer"
            ))
        }),
        Some(Value::String(s)) => s
            .parse::<u64>()
            .map(Lsn)
            .or_else(|_| s.parse::<Lsn>())
            .map_err(|_| {
                malformed(format!(
                    "Debezium change event: `source.lsn` `{s}` is not an LSN"
                ))
            }),
        _ => Err(malformed(
            "Debezium change event: no `source.lsn` (the fence value); snapshot events of old connectors lack it",
        )),
    }
}

/// Column names of the Kafka message key (the table's primary key / replica identity columns),
/// when the key is a JSON object (with or without the schema wrapper).
fn message_key_columns(key: &[u8]) -> Option<Vec<String>> {
    let root: Value = serde_json::from_slice(key).ok()?;
    let obj = match root.as_object() {
        Some(o) if o.contains_key("payload") && o.contains_key("schema") => {
            o.get("payload")?.as_object()?
        }
        Some(o) => o,
        None => return None,
    };
    Some(obj.keys().cloned().collect())
}

/// Per `before`/`after` column: whether its JSON value is PostgreSQL's text form, read from the
/// Kafka Connect schema when the value carries one.
#[derive(Debug, Default)]
struct FieldTypes {
    /// (`before`|`after`, column) → printable.
    printable: HashMap<(String, String), bool>,
}

impl FieldTypes {
    fn from_schema(schema: Option<&Value>) -> FieldTypes {
        let mut printable = HashMap::new();
        let fields = schema
            .and_then(|s| s.get("fields"))
            .and_then(Value::as_array);
        for image in fields.into_iter().flatten() {
            let Some(image_name) = image.get("field").and_then(Value::as_str) else {
                continue;
            };
            if image_name != "before" && image_name != "after" {
                continue;
            }
            let columns = image.get("fields").and_then(Value::as_array);
            for col in columns.into_iter().flatten() {
                let Some(name) = col.get("field").and_then(Value::as_str) else {
                    continue;
                };
                let ty = col.get("type").and_then(Value::as_str).unwrap_or("");
                let logical = col.get("name").and_then(Value::as_str);
                printable.insert(
                    (image_name.to_owned(), name.to_owned()),
                    printable_type(ty, logical),
                );
            }
        }
        FieldTypes { printable }
    }

    fn printable(&self, image: &str, column: &str) -> bool {
        self.printable
            .get(&(image.to_owned(), column.to_owned()))
            .copied()
            .unwrap_or(true)
    }
}

/// Kafka Connect types whose Debezium JSON value prints like PostgreSQL's text output.
fn printable_type(ty: &str, logical: Option<&str>) -> bool {
    let plain = matches!(
        ty,
        "int8" | "int16" | "int32" | "int64" | "string" | "boolean"
    );
    // Logical types (dates as day counts, timestamps as µs, decimals as bytes, json, …) are
    // encodings of the value, not its text; uuid and enum are the text itself.
    let logical_ok = match logical {
        None => true,
        Some(n) => matches!(n, "io.debezium.data.Uuid" | "io.debezium.data.Enum"),
    };
    plain && logical_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use cacheclear_rules::RuleConfig;

    fn decoder(before: BeforeImages) -> Decoder {
        let rules = Rules::compile(&[RuleConfig {
            table: "public.product".into(),
            keys: vec![
                "product:{id}".into(),
                "category:{category_id}:products".into(),
            ],
        }])
        .unwrap();
        Decoder::new(
            Arc::new(rules),
            DebeziumConfig {
                before_images: before,
                ..DebeziumConfig::default()
            },
        )
    }

    fn event(op: &str, before: Value, after: Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "before": before, "after": after, "op": op, "ts_ms": 1_700_000_000_500i64,
            "source": {"connector": "postgresql", "schema": "public", "table": "product",
                       "lsn": 24_023_128u64, "txId": 555, "ts_ms": 1_700_000_000_000i64}
        }))
        .unwrap()
    }

    fn keys(d: Decoded) -> (Vec<String>, Vec<String>) {
        match d {
            Decoded::Evict(e) => {
                assert_eq!(e.lsn, Lsn(24_023_128));
                assert_eq!(e.commit_time_us, 1_700_000_000_000_000);
                (e.keys, e.patterns)
            }
            Decoded::Skip(why) => panic!("skipped: {why}"),
        }
    }

    #[test]
    fn maps_every_op() {
        let d = decoder(BeforeImages::Full);
        let row =
            |id: i64, cat: Value| serde_json::json!({"id": id, "category_id": cat, "name": "x"});
        let dec = |v: &[u8]| {
            d.decode(Format::Debezium, Some(br#"{"id":1}"#), Some(v))
                .unwrap()
        };
        assert_eq!(
            keys(dec(&event("c", Value::Null, row(1, 3.into())))).0,
            ["category:3:products", "product:1"]
        );
        assert_eq!(
            keys(dec(&event("u", row(1, 3.into()), row(1, 7.into())))).0,
            ["category:3:products", "category:7:products", "product:1"]
        );
        assert_eq!(
            keys(dec(&event("d", row(1, Value::Null), Value::Null))).0,
            ["product:1"]
        );
        assert_eq!(
            keys(dec(&event("r", Value::Null, row(2, 4.into())))).0,
            ["category:4:products", "product:2"]
        );
        assert_eq!(
            keys(dec(&event("t", Value::Null, Value::Null))).1,
            ["{product:*}*", "{category:*:products}*"]
        );
        assert_eq!(
            d.decode(Format::Debezium, None, None).unwrap(),
            Decoded::Skip("tombstone".into())
        );
    }

    #[test]
    fn wrapper_and_schema_types() {
        let d = decoder(BeforeImages::Full);
        let payload: Value = serde_json::from_slice(&event(
            "c",
            Value::Null,
            serde_json::json!({"id": 5, "category_id": 19000}),
        ))
        .unwrap();
        // With the schema: category_id is a date (days since epoch): not its text form.
        let wrapped = serde_json::json!({
            "schema": {"type": "struct", "fields": [
                {"field": "after", "type": "struct", "fields": [
                    {"field": "id", "type": "int32"},
                    {"field": "category_id", "type": "int32", "name": "io.debezium.time.Date"}]}]},
            "payload": payload
        });
        let (k, p) = keys(
            d.decode(
                Format::Debezium,
                None,
                Some(&serde_json::to_vec(&wrapped).unwrap()),
            )
            .unwrap(),
        );
        assert!(k.is_empty());
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn toast_placeholder_never_becomes_a_key() {
        let d = decoder(BeforeImages::Full);
        let ph = "__debezium_unavailable_value";
        // Old image has the value: it is used for the unchanged column.
        let (k, _) = keys(
            d.decode(
                Format::Debezium,
                None,
                Some(&event(
                    "u",
                    serde_json::json!({"id": 1, "category_id": "big"}),
                    serde_json::json!({"id": 1, "category_id": ph}),
                )),
            )
            .unwrap(),
        );
        assert_eq!(k, ["category:big:products", "product:1"]);
        // No old image: table-wide.
        let (k, p) = keys(
            d.decode(
                Format::Debezium,
                Some(br#"{"id":1}"#),
                Some(&event(
                    "u",
                    Value::Null,
                    serde_json::json!({"id": 1, "category_id": ph}),
                )),
            )
            .unwrap(),
        );
        assert!(k.is_empty() && p.len() == 2);
    }

    #[test]
    fn default_identity_before_nulls_are_unknown() {
        let d = decoder(BeforeImages::Default);
        let v = event(
            "d",
            serde_json::json!({"id": 1, "category_id": null}),
            Value::Null,
        );
        let (k, p) = keys(
            d.decode(Format::Debezium, Some(br#"{"id":1}"#), Some(&v))
                .unwrap(),
        );
        assert!(k.is_empty() && p.len() == 2, "{k:?}");
        // FULL: null is NULL, so no category key.
        let d = decoder(BeforeImages::Full);
        let (k, _) = keys(
            d.decode(Format::Debezium, Some(br#"{"id":1}"#), Some(&v))
                .unwrap(),
        );
        assert_eq!(k, ["product:1"]);
    }

    #[test]
    fn malformed_records_name_the_reason() {
        let d = decoder(BeforeImages::Full);
        let err = |v: &[u8]| d.decode(Format::Debezium, None, Some(v)).unwrap_err().0;
        assert!(err(b"{").contains("not JSON"));
        assert!(err(br#"{"op":"x","source":{}}"#).contains("unknown op"));
        assert!(
            err(br#"{"op":"c","source":{"schema":"public","table":"product","ts_ms":1}}"#)
                .contains("source.lsn")
        );
        let bus = |v: &[u8]| d.decode(Format::Bus, None, Some(v));
        assert!(bus(br#"{"key":"a}b","commit_lsn":"0/1","commit_time_us":1,"xid":1,"table":"t","op":"insert"}"#).is_err());
        assert!(bus(b"nope").is_err());
        assert_eq!(
            bus(br#"{"key":"p:1","commit_lsn":"0/10","commit_time_us":7,"xid":1,"table":"t","op":"insert"}"#).unwrap(),
            Decoded::Evict(Evictions { keys: vec!["p:1".into()], patterns: vec![], lsn: Lsn(16), commit_time_us: 7 })
        );
    }

    #[test]
    fn tables_without_rules_and_messages_are_skipped() {
        let d = decoder(BeforeImages::Full);
        let v = br#"{"op":"c","after":{"id":1},"source":{"schema":"public","table":"other","lsn":1,"ts_ms":1}}"#;
        assert!(matches!(
            d.decode(Format::Debezium, None, Some(v)).unwrap(),
            Decoded::Skip(_)
        ));
        let m = br#"{"op":"m","source":{"lsn":1,"ts_ms":1}}"#;
        assert!(matches!(
            d.decode(Format::Debezium, None, Some(m)).unwrap(),
            Decoded::Skip(_)
        ));
    }
}
