//! Kafka record → evictions: cacheclear bus records and Debezium PostgreSQL change events.
//!
//! Pure functions of the record's key and value (no I/O), so every mapping rule is unit-tested.

use std::collections::HashMap;
use std::sync::Arc;

use cacheclear_protocol::{BusControl, BusRecord, ConfigError, KeyLayout, Lsn, NamespaceLayout};
use cacheclear_rules::{Column, KeyBuildError, MapRow, RowImage, Rules, TableRules};
use serde_json::{Map, Value};

use crate::config::{BeforeImages, DebeziumConfig};
use crate::pgtext::{self, Encoding, RenderError, Style};
use crate::telemetry;
use crate::types::ColumnTypes;

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
    /// A bus control record (epoch or watermark), applied to the namespace's keys once every
    /// record before it on its partition is acknowledged.
    Control(BusControl),
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
///
/// Debezium values of template columns are rendered in PostgreSQL's text output form
/// (`crate::pgtext`): from the event's Kafka Connect schema when it carries one, else from the
/// column's PostgreSQL type (declared in the rule or read from `[postgres] url`) and the
/// connector's modes in [`DebeziumConfig`].
#[derive(Debug, Clone)]
pub struct Decoder {
    rules: Arc<Rules>,
    debezium: DebeziumConfig,
    style: Style,
    types: Arc<ColumnTypes>,
}

impl Decoder {
    /// A decoder mapping Debezium rows through `rules` (bus records carry their keys already),
    /// knowing no column types beyond what the events' schemas say.
    ///
    /// # Errors
    /// A [`ConfigError`] when `debezium.date_style` or `debezium.time_zone` is invalid.
    pub fn new(rules: Arc<Rules>, debezium: DebeziumConfig) -> Result<Decoder, ConfigError> {
        Decoder::with_types(rules, debezium, ColumnTypes::default())
    }

    pub(crate) fn with_types(
        rules: Arc<Rules>,
        debezium: DebeziumConfig,
        types: ColumnTypes,
    ) -> Result<Decoder, ConfigError> {
        Ok(Decoder {
            style: debezium.style()?,
            rules,
            debezium,
            types: Arc::new(types),
        })
    }

    /// The decoder of a configuration: column types from the rules' `types` and, when
    /// `[postgres] url` is set, from PostgreSQL's catalog (read once, now; the replica
    /// identities are checked as `cacheclear run` checks them).
    ///
    /// # Errors
    /// A [`ConfigError`]: PostgreSQL cannot be reached or lacks a rule table (`postgres.url`), a
    /// replica identity does not carry a template column under `before_images = "full"`, or a
    /// template column's type is needed and unknown or cannot be rendered (names the table,
    /// template and column, and both fixes).
    pub async fn for_config(
        cfg: &crate::InvalidatorConfig,
        rules: Arc<Rules>,
    ) -> Result<Decoder, ConfigError> {
        let catalog = match (&cfg.postgres, cfg.kafka.debezium_topics.is_empty()) {
            (Some(pg), false) => Some(crate::types::read_catalog(&pg.url, &rules).await?),
            _ => None,
        };
        let types = if cfg.kafka.debezium_topics.is_empty() {
            ColumnTypes::default()
        } else {
            crate::types::resolve(&cfg.rules, &rules, &cfg.debezium, catalog.as_ref())?
        };
        Decoder::with_types(rules, cfg.debezium.clone(), types)
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
        let schema_fields = SchemaFields::from_schema(schema);
        let key_columns = key.and_then(message_key_columns);
        let image =
            |field: &str, fallback: Option<&MapRow>| -> Result<Option<MapRow>, ImageError> {
                match payload.get(field) {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::Object(obj)) => self
                        .row_image(
                            table,
                            obj,
                            &schema_fields,
                            field == "before",
                            key_columns.as_ref(),
                            fallback,
                        )
                        .map(Some),
                    Some(_) => Err(ImageError::Malformed(malformed(format!(
                        "Debezium change event: `{field}` is neither an object nor null"
                    )))),
                }
            };
        let fallback = |reason: &'static str, why: &str| {
            metrics::counter!(telemetry::TABLE_FALLBACKS, "reason" => reason).increment(1);
            tracing::debug!(table = %table.qualified(), reason, why, "Debezium event: keys unknown, evicting the table whole");
            Ok(table_wide())
        };
        let images = (|| {
            let before = image("before", None)?;
            let after = image("after", before.as_ref())?;
            Ok((before, after))
        })();
        let (before, after) = match images {
            Ok(images) => images,
            Err(ImageError::Malformed(m)) => return Err(m),
            Err(ImageError::TableWide(reason, why)) => return fallback(reason, &why),
        };
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
                None => return fallback("no_before_image", "delete without `before`"),
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
                            return fallback(
                                "no_before_image",
                                "update without `before`, a template uses non-key columns",
                            );
                        }
                        vec![after]
                    }
                }
            }
        };
        let mut keys = Vec::new();
        for img in images {
            if let Err(e) = table.keys_for(img, &mut keys) {
                // A template column without a usable value: the unavailable-value placeholder
                // without an old image, or a column the image does not carry (REPLICA IDENTITY
                // DEFAULT `before`). The keys are unknown, so every key of the table goes.
                let reason = match e {
                    KeyBuildError::UnchangedToast { .. } => "unavailable_value",
                    _ => "column_absent",
                };
                return fallback(reason, &e.to_string());
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

    /// The row image of one `before`/`after` object, restricted to the template columns, each
    /// value rendered in PostgreSQL's text form.
    fn row_image(
        &self,
        table: &TableRules,
        obj: &Map<String, Value>,
        schema: &SchemaFields,
        is_before: bool,
        key_columns: Option<&Vec<String>>,
        toast_fallback: Option<&MapRow>,
    ) -> Result<MapRow, ImageError> {
        let mut row = MapRow::new();
        let field = if is_before { "before" } else { "after" };
        for column in table.columns() {
            let Some(v) = obj.get(column) else {
                continue; // Absent
            };
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
                v => {
                    let text = self.render(table, field, column, v, schema)?;
                    row.text(column, text)
                }
            };
        }
        Ok(row)
    }

    /// One template column's value in PostgreSQL's text form.
    fn render(
        &self,
        table: &TableRules,
        image: &str,
        column: &str,
        v: &Value,
        schema: &SchemaFields,
    ) -> Result<String, ImageError> {
        let pg = self.types.get(table.qualified(), column);
        let at = || format!("table {}, `{image}.{column}`", table.qualified());
        let encoding = match schema.get(image, column) {
            Some(f) => Encoding::from_schema(f, pg, &self.debezium.modes()),
            None => match pg {
                Some(t) => Encoding::from_type(t, &self.debezium.modes()).map_err(|r| {
                    ImageError::Malformed(malformed(format!(
                        "Debezium change event: {}: {r}",
                        at()
                    )))
                })?,
                None => {
                    return Err(ImageError::Malformed(malformed(format!(
                        "Debezium change event: {}: the event carries no schema and the column's \
                         PostgreSQL type is unknown, so its value cannot be rendered as PostgreSQL \
                         prints it; set [postgres] url, or declare [rules.types] {column} = \
                         \"<type>\" (and debezium.schemas_enable = false to check this at start)",
                        at()
                    ))));
                }
            },
        };
        pgtext::render(v, &encoding, &self.style).map_err(|e| match e {
            RenderError::Mismatch(r) => ImageError::Malformed(malformed(format!(
                "Debezium change event: {}: {r} (the column's type says so; a value of another \
                 JSON type is never rendered)",
                at()
            ))),
            RenderError::Unrenderable(reason, why) => {
                ImageError::TableWide(reason, format!("{}: {why}", at()))
            }
        })
    }
}

/// Why a row image could not be built.
enum ImageError {
    /// Dead-letter the record.
    Malformed(Malformed),
    /// Evict the table whole; the reason label and the detail.
    TableWide(&'static str, String),
}

/// A bus record: its key or patterns, as published by cacheclear's Kafka sink.
fn decode_bus(value: Option<&[u8]>) -> Result<Decoded, Malformed> {
    let Some(value) = value else {
        return Ok(Decoded::Skip("tombstone".into()));
    };
    if BusControl::is_control(value) {
        let c = BusControl::from_json(value)
            .map_err(|e| malformed(format!("bus control record: {e}")))?;
        NamespaceLayout::new(c.namespace())
            .map_err(|e| malformed(format!("bus control record: namespace: {e}")))?;
        if let BusControl::Watermark { partitions: 0, .. } = c {
            return Err(malformed("bus control record: `partitions` is 0"));
        }
        return Ok(Decoded::Control(c));
    }
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

/// The Kafka Connect schema of each `before`/`after` column, when the value carries one.
#[derive(Debug, Default)]
struct SchemaFields {
    /// (`before`|`after`, column) → the column's schema field.
    fields: HashMap<(String, String), Value>,
}

impl SchemaFields {
    fn from_schema(schema: Option<&Value>) -> SchemaFields {
        let mut fields = HashMap::new();
        let images = schema
            .and_then(|s| s.get("fields"))
            .and_then(Value::as_array);
        for image in images.into_iter().flatten() {
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
                fields.insert((image_name.to_owned(), name.to_owned()), col.clone());
            }
        }
        SchemaFields { fields }
    }

    fn get(&self, image: &str, column: &str) -> Option<&Value> {
        self.fields.get(&(image.to_owned(), column.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cacheclear_rules::RuleConfig;

    fn decoder(before: BeforeImages) -> Decoder {
        decoder_typed(before, "integer")
    }

    /// The product rules with `id integer` and `category_id` of `category_type` declared.
    fn decoder_typed(before: BeforeImages, category_type: &str) -> Decoder {
        let cfg = vec![
            crate::InvalidatorRule::new(
                "public.product",
                vec![
                    "product:{id}".into(),
                    "category:{category_id}:products".into(),
                ],
            )
            .with_type("id", "integer")
            .with_type("category_id", category_type),
        ];
        let configs: Vec<RuleConfig> = cfg.iter().map(|r| r.rule_config()).collect();
        let rules = Rules::compile(&configs).unwrap();
        let debezium = DebeziumConfig {
            before_images: before,
            ..DebeziumConfig::default()
        };
        let types = crate::types::resolve(&cfg, &rules, &debezium, None).unwrap();
        Decoder::with_types(Arc::new(rules), debezium, types).unwrap()
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
            Decoded::Control(c) => panic!("a control record: {c:?}"),
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
        // With the schema: category_id is a date (days since epoch), rendered as PostgreSQL prints it.
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
        assert_eq!(k, ["category:2022-01-08:products", "product:5"]);
        assert!(p.is_empty());
    }

    #[test]
    fn toast_placeholder_never_becomes_a_key() {
        let d = decoder_typed(BeforeImages::Full, "text");
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
        assert!(matches!(
            bus(br#"{"control":"epoch","namespace":"ns","open":1,"origin":"1/1"}"#).unwrap(),
            Decoded::Control(BusControl::Epoch { open: 1, .. })
        ));
        let bad = bus(br#"{"control":"epoch","namespace":"n{s","open":1,"origin":"1/1"}"#);
        assert!(bad.unwrap_err().0.contains("namespace"));
        assert!(bus(br#"{"control":"watermark","namespace":"ns","open":1,"origin":"1/1","lsn":"0/1","commit_time_us":1,"lag_ms":0,"partitions":0}"#).is_err());
        assert!(bus(br#"{"control":"epoch"}"#).is_err());
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
