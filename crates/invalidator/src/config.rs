//! `[kafka]` and `[debezium]` sections of `invalidator.toml`.

use cacheclear_protocol::ConfigError;
use std::collections::BTreeMap;

/// `[kafka]`: the consumer group, its input topics and the dead-letter topic.
///
/// ```toml
/// [kafka]
/// brokers = "kafka-1:9092,kafka-2:9092"   # bootstrap.servers
/// group_id = "cacheclear-eu-west"          # one group per Redis deployment (region)
/// topics = ["cacheclear.invalidations"]    # cacheclear bus records (the Kafka sink's topic)
/// debezium_topics = ["shop.public.product"] # Debezium PostgreSQL change-event topics
/// dead_letter_topic = "cacheclear.invalidator.dlq"
/// batch_max_records = 10000
/// batch_max_wait_ms = 5
///
/// [kafka.properties]                       # any other librdkafka setting, verbatim
/// "session.timeout.ms" = "10000"
/// ```
///
/// In code, start from [`KafkaConfig::new`] and chain the `with_*` methods, or assign the public
/// fields of a `mut` value. Struct literals are not available outside this crate
/// (`#[non_exhaustive]`: options may be added in minor releases).
///
/// ```
/// use cacheclear_invalidator::KafkaConfig;
/// let cfg = KafkaConfig::new("kafka-1:9092", "cacheclear-eu-west", vec![], "cacheclear.dlq")
///     .with_debezium_topics(["shop.public.product"])
///     .with_commit_interval_ms(500)
///     .with_property("session.timeout.ms", "10000");
/// assert!(cfg.validate().is_ok());
/// ```
#[derive(Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// `bootstrap.servers`: comma-separated `host:port` list.
    pub brokers: String,
    /// `group.id` of the consumer group. Every process with the same group id shares the input
    /// partitions (scale out by starting more); each group receives every record, so one group per
    /// Redis deployment fans the stream out to all of them.
    pub group_id: String,
    /// Topics carrying cacheclear bus records ([`cacheclear_protocol::BusRecord`] JSON).
    #[serde(default)]
    pub topics: Vec<String>,
    /// Topics carrying Debezium PostgreSQL connector change events (JSON, with or without the
    /// `{"schema":…,"payload":…}` wrapper), usually one per table: `<topic.prefix>.<schema>.<table>`.
    /// Exact names (no regular expressions). Mapped to keys through `[[rules]]`.
    #[serde(default)]
    pub debezium_topics: Vec<String>,
    /// Where malformed records go, with the reason in header `cacheclear.dlq.reason` (see the crate
    /// docs). Required: a record that cannot be applied is never dropped silently. The topic must
    /// exist (checked at start by [`crate::check_dead_letter_topic`]; the invalidator never
    /// creates it).
    pub dead_letter_topic: String,
    /// `bootstrap.servers` of the cluster holding `dead_letter_topic`, when that is not
    /// `brokers` (a dead-letter topic kept in another cluster). `properties` apply to it too.
    /// Default: none, the dead-letter topic is on `brokers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_brokers: Option<String>,
    /// Most records applied as one batch (one Redis round of pipelines, one offset commit).
    /// Default 10000.
    #[serde(default = "default_batch_max_records")]
    pub batch_max_records: usize,
    /// Longest time, in ms, spent collecting one batch after its first record. A batch takes the
    /// records librdkafka has already fetched and ends early when none is ready, so an idle
    /// stream is never delayed by this; it bounds the collection on a busy one. Default 5.
    #[serde(default = "default_batch_max_wait_ms")]
    pub batch_max_wait_ms: u64,
    /// Shortest time, in ms, between two offset commits. Offsets are committed only up to
    /// records Redis acknowledged, so a longer interval never loses an invalidation: after a
    /// crash or rebalance the partition's next owner re-applies at most this long's worth
    /// (idempotent). Each commit is a write on the group coordinator, so committing after every
    /// small batch costs the brokers more than the invalidations do. 0 commits after every
    /// batch. Default 100.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// Extra librdkafka properties for the consumer and the dead-letter producer (security,
    /// timeouts, `partition.assignment.strategy`, …). `bootstrap.servers`, `group.id`,
    /// `enable.auto.commit` and `enable.auto.offset.store` are set by the invalidator and may not
    /// appear here. Defaults set by the invalidator and overridable here:
    /// `auto.offset.reset = "earliest"` (a new group starts at the oldest retained record: nothing
    /// published before it started is skipped) and `fetch.wait.max.ms = "10"` (low latency).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// This member's static group membership id (KIP-345, librdkafka `group.instance.id`),
    /// stable across restarts and unique in the group: the StatefulSet pod name, `%H-%i` in a
    /// systemd template unit. A member that restarts with the same id gets its partitions back
    /// at once, without a rebalance; without one, a broker that never reassigns a dead member's
    /// partitions (tansu 0.6.0) leaves them unowned. The trade-off: a member that never comes
    /// back holds its partitions until `session.timeout.ms` passes on a real Kafka (the
    /// invalidator sets it to 30000 with an instance id unless `properties` says otherwise;
    /// choose it above your supervisor's restart time). Default none (dynamic membership).
    #[serde(default)]
    pub instance_id: Option<String>,
}

/// `Debug` with secret properties (`sasl.password`, `ssl.key.password`, …) shown as `***`
/// (a panic or a debug log line must not print them).
impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("debezium_topics", &self.debezium_topics)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("dead_letter_brokers", &self.dead_letter_brokers)
            .field("instance_id", &self.instance_id)
            .field(
                "properties",
                &cacheclear_protocol::redact_properties(&self.properties),
            )
            .finish_non_exhaustive()
    }
}

fn default_batch_max_records() -> usize {
    10_000
}
fn default_batch_max_wait_ms() -> u64 {
    5
}
fn default_commit_interval_ms() -> u64 {
    100
}

/// Properties the invalidator owns: setting them would break its commit protocol or identity.
const RESERVED_PROPERTIES: [&str; 4] = [
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
];

impl KafkaConfig {
    /// Every default, with these brokers ([`KafkaConfig::brokers`], `host:port[,host:port…]`),
    /// consumer group ([`KafkaConfig::group_id`]), bus topics ([`KafkaConfig::topics`]) and
    /// dead-letter topic ([`KafkaConfig::dead_letter_topic`]).
    pub fn new(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topics: Vec<String>,
        dead_letter_topic: impl Into<String>,
    ) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.into(),
            group_id: group_id.into(),
            topics,
            debezium_topics: Vec::new(),
            dead_letter_topic: dead_letter_topic.into(),
            dead_letter_brokers: None,
            batch_max_records: default_batch_max_records(),
            batch_max_wait_ms: default_batch_max_wait_ms(),
            commit_interval_ms: default_commit_interval_ms(),
            properties: BTreeMap::new(),
            instance_id: None,
        }
    }

    /// Sets [`KafkaConfig::instance_id`], this member's static group membership id.
    #[must_use]
    pub fn with_instance_id(mut self, instance_id: impl Into<String>) -> Self {
        self.instance_id = Some(instance_id.into());
        self
    }

    /// Sets [`KafkaConfig::topics`] (replacing the list): topics carrying cacheclear bus records.
    /// Default: the list given to [`KafkaConfig::new`].
    #[must_use]
    pub fn with_topics<I, S>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.topics = topics.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`KafkaConfig::debezium_topics`] (replacing the list): topics carrying Debezium
    /// change events, exact names. Default empty. They need `[[rules]]`
    /// ([`crate::InvalidatorConfig::rules`]).
    #[must_use]
    pub fn with_debezium_topics<I, S>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.debezium_topics = topics.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`KafkaConfig::batch_max_records`]: most records applied as one batch (a count).
    /// Default **10 000**. Must be ≥ 1.
    #[must_use]
    pub fn with_batch_max_records(mut self, batch_max_records: usize) -> Self {
        self.batch_max_records = batch_max_records;
        self
    }

    /// Sets [`KafkaConfig::batch_max_wait_ms`]: longest time spent collecting one batch after
    /// its first record, ms. Default **5**.
    #[must_use]
    pub fn with_batch_max_wait_ms(mut self, batch_max_wait_ms: u64) -> Self {
        self.batch_max_wait_ms = batch_max_wait_ms;
        self
    }

    /// Sets [`KafkaConfig::commit_interval_ms`]: shortest time between two offset commits, ms;
    /// 0 commits after every batch. Default **100**. At most 60 000.
    #[must_use]
    pub fn with_commit_interval_ms(mut self, commit_interval_ms: u64) -> Self {
        self.commit_interval_ms = commit_interval_ms;
        self
    }

    /// Sets [`KafkaConfig::dead_letter_brokers`]: the `host:port[,host:port…]` list of the
    /// cluster holding the dead-letter topic. Default: the dead-letter topic is on
    /// [`KafkaConfig::brokers`].
    #[must_use]
    pub fn with_dead_letter_brokers(mut self, brokers: impl Into<String>) -> Self {
        self.dead_letter_brokers = Some(brokers.into());
        self
    }

    /// `bootstrap.servers` of the dead-letter producer: [`KafkaConfig::dead_letter_brokers`],
    /// else [`KafkaConfig::brokers`].
    pub fn dead_letter_bootstrap(&self) -> &str {
        self.dead_letter_brokers.as_deref().unwrap_or(&self.brokers)
    }

    /// Replaces [`KafkaConfig::properties`], the extra librdkafka properties. Default empty.
    /// The invalidator's own (`bootstrap.servers`, `group.id`, `enable.auto.commit`,
    /// `enable.auto.offset.store`) may not appear.
    #[must_use]
    pub fn with_properties(mut self, properties: BTreeMap<String, String>) -> Self {
        self.properties = properties;
        self
    }

    /// Adds one extra librdkafka property to [`KafkaConfig::properties`] (replacing the same
    /// key's previous value).
    #[must_use]
    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// Checks values that parse but make no sense.
    ///
    /// # Errors
    /// A message naming the first invalid field (`kafka.<field>`) and the reason.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.trim().is_empty() {
            return Err(ConfigError::new(
                "kafka.brokers",
                "empty (expected host:port[,host:port…])",
            ));
        }
        if let Some(id) = &self.instance_id
            && (id.trim().is_empty() || id.len() > 249)
        {
            return Err(ConfigError::new(
                "kafka.instance_id",
                "must be 1-249 characters, unique in the group and stable across restarts (e.g. the pod name)",
            ));
        }
        if self.group_id.trim().is_empty() {
            return Err(ConfigError::new("kafka.group_id", "empty"));
        }
        if self.topics.is_empty() && self.debezium_topics.is_empty() {
            return Err(ConfigError::new(
                "kafka.topics / kafka.debezium_topics",
                "at least one input topic is needed",
            ));
        }
        for t in self.topics.iter().chain(&self.debezium_topics) {
            if t.trim().is_empty() {
                return Err(ConfigError::new("kafka.topics", "empty topic name"));
            }
            if self.topics.contains(t) && self.debezium_topics.contains(t) {
                return Err(ConfigError::new(
                    "kafka.topics",
                    format!("`{t}` is listed both as a bus topic and as a Debezium topic"),
                ));
            }
            if *t == self.dead_letter_topic {
                return Err(ConfigError::new(
                    "kafka.dead_letter_topic",
                    format!("`{t}` is also an input topic (a malformed record would loop)"),
                ));
            }
        }
        if self.dead_letter_topic.trim().is_empty() {
            return Err(ConfigError::new("kafka.dead_letter_topic", "empty"));
        }
        if self
            .dead_letter_brokers
            .as_ref()
            .is_some_and(|b| b.trim().is_empty())
        {
            return Err(ConfigError::new(
                "kafka.dead_letter_brokers",
                "empty (expected host:port[,host:port…], or leave it out to use kafka.brokers)",
            ));
        }
        if self.batch_max_records == 0 {
            return Err(ConfigError::new(
                "kafka.batch_max_records",
                "must be at least 1",
            ));
        }
        if self.commit_interval_ms > 60_000 {
            return Err(ConfigError::new(
                "kafka.commit_interval_ms",
                format!(
                    "{} is over 60000 (a crash would replay over a minute of records)",
                    self.commit_interval_ms
                ),
            ));
        }
        for key in self.properties.keys() {
            if key == "group.instance.id" {
                return Err(ConfigError::new(
                    "kafka.properties",
                    "`group.instance.id` is set with kafka.instance_id (one place for the member's id)",
                ));
            }
            if RESERVED_PROPERTIES.contains(&key.as_str()) {
                return Err(ConfigError::new(
                    "kafka.properties",
                    format!(
                        "`{key}` is set by the invalidator (use kafka.brokers / kafka.group_id; offsets are always committed manually)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// How Debezium `before` images are to be read: the tables' PostgreSQL `REPLICA IDENTITY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BeforeImages {
    /// `REPLICA IDENTITY FULL`: `before` carries every column, so a `null` there is SQL NULL.
    #[default]
    Full,
    /// `REPLICA IDENTITY DEFAULT`/`INDEX`: `before` carries only the identity columns (the
    /// columns of the Kafka message key); Debezium writes `null` for every other column, so those
    /// count as unknown (a template needing one falls back to a table-wide eviction).
    Default,
}

/// The connector's `decimal.handling.mode`: how `numeric`/`decimal` values are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DecimalHandlingMode {
    /// `org.apache.kafka.connect.data.Decimal` (base64 of the big-endian two's-complement
    /// unscaled value; the scale is the column's) or, for an unconstrained `numeric`,
    /// `io.debezium.data.VariableScaleDecimal`. The connector's default.
    #[default]
    Precise,
    /// A JSON double. Only exact for `numeric(p,s)` with p ≤ 15 (the scale must be known: the
    /// invalidator refuses to start without the columns' types; an unconstrained `numeric` key
    /// column is refused).
    Double,
    /// A JSON string, `BigDecimal.toPlainString()`: PostgreSQL's text.
    String,
}

/// The connector's `time.precision.mode`: how `date`, `time` and `timestamp` values are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimePrecisionMode {
    /// `time(0..3)`/`timestamp(0..3)` in ms (`io.debezium.time.Time`/`Timestamp`), precision
    /// 4..6 in µs (`MicroTime`/`MicroTimestamp`). The connector's default.
    #[default]
    Adaptive,
    /// As `adaptive`, but every `time` in µs (`MicroTime`).
    AdaptiveTimeMicroseconds,
    /// Kafka Connect's `Date`/`Time`/`Timestamp`, always ms: a `time(p)`/`timestamp(p)` with
    /// p > 3 loses digits PostgreSQL prints, so such key columns are refused at start.
    Connect,
}

/// The connector's `binary.handling.mode`: how `bytea` values are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BinaryHandlingMode {
    /// Kafka Connect `bytes`, which the JSON converter writes as standard base64. The default.
    #[default]
    Bytes,
    /// A standard base64 string. Like the two below, the schema says only `string`: the
    /// invalidator refuses to start without the columns' types.
    Base64,
    /// A URL-safe base64 string (`base64-url-safe`).
    #[serde(rename = "base64-url-safe")]
    Base64UrlSafe,
    /// A hexadecimal string.
    Hex,
}

/// `[debezium]`: how Debezium change events are read. Every field has a default.
///
/// ```toml
/// [debezium]
/// before_images = "full"          # or "default": see BeforeImages
/// unavailable_value_placeholder = "__debezium_unavailable_value"
/// evict_on_snapshot = true
/// schemas_enable = true           # the connector's value.converter.schemas.enable
/// decimal_handling_mode = "precise"
/// time_precision_mode = "adaptive"
/// binary_handling_mode = "bytes"
/// date_style = "ISO, MDY"         # PostgreSQL DateStyle the application's keys use
/// time_zone = "UTC"               # PostgreSQL TimeZone the application's keys use
/// ```
///
/// Key values are rendered the way PostgreSQL prints them (`col::text`, what cacheclear's own
/// pgoutput source uses). `date`, `timestamp` and `timestamptz` text depends on the session's
/// `DateStyle` and `TimeZone`: `date_style` and `time_zone` must be the ones the application
/// renders its keys with (the source's replication session prints with the server's defaults).
///
/// In code, start from [`DebeziumConfig::default`] (or [`DebeziumConfig::new`]) and chain the
/// `with_*` methods. Struct literals are not available outside this crate
/// (`#[non_exhaustive]`: options may be added in minor releases).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DebeziumConfig {
    /// The tables' replica identity as it shapes `before` images. Default `full`.
    #[serde(default)]
    pub before_images: BeforeImages,
    /// The connector's `unavailable.value.placeholder` (the value it writes for an unchanged
    /// TOASTed column). Never used as a key value. Default `__debezium_unavailable_value`.
    #[serde(default = "default_placeholder")]
    pub unavailable_value_placeholder: String,
    /// Whether snapshot reads (`op = "r"`) evict their row's keys. Default `true`: a snapshot
    /// runs when the connector starts without an offset or re-snapshots after losing its slot,
    /// i.e. exactly when changes may have been missed (docs/architecture.md, "Gaps": a gap is
    /// answered with evictions before serving); evicting what the snapshot reads closes that
    /// gap. `false` for deployments that know their cache started empty.
    #[serde(default = "default_true")]
    pub evict_on_snapshot: bool,
    /// The connector's `value.converter.schemas.enable`: whether events carry the
    /// `{"schema":…,"payload":…}` wrapper. Default `true`. With `false` the invalidator must know
    /// the type of every template column (`[postgres] url` or the rules' `types`) and refuses to
    /// start otherwise. An event without a schema whose column types are unknown is
    /// dead-lettered, never rendered.
    #[serde(default = "default_true")]
    pub schemas_enable: bool,
    /// The connector's `decimal.handling.mode`. Default `precise`.
    #[serde(default)]
    pub decimal_handling_mode: DecimalHandlingMode,
    /// The connector's `time.precision.mode`. Default `adaptive`.
    #[serde(default)]
    pub time_precision_mode: TimePrecisionMode,
    /// The connector's `binary.handling.mode`. Default `bytes`.
    #[serde(default)]
    pub binary_handling_mode: BinaryHandlingMode,
    /// PostgreSQL `DateStyle` keys are rendered in (`ISO`, `SQL`, `Postgres`, `German`, with
    /// `MDY`/`DMY`/`YMD`). Default `ISO, MDY` (PostgreSQL's default).
    #[serde(default = "default_date_style")]
    pub date_style: String,
    /// PostgreSQL `TimeZone` `timestamptz` keys are rendered in: `UTC` or a fixed offset east
    /// of UTC (`+05:30`; PostgreSQL: `SET TIME ZONE INTERVAL '+05:30' HOUR TO MINUTE`). Named
    /// zones with daylight saving time are refused. Default `UTC`.
    #[serde(default = "default_time_zone")]
    pub time_zone: String,
}

fn default_date_style() -> String {
    "ISO, MDY".into()
}
fn default_time_zone() -> String {
    "UTC".into()
}

fn default_placeholder() -> String {
    "__debezium_unavailable_value".into()
}
fn default_true() -> bool {
    true
}

impl Default for DebeziumConfig {
    fn default() -> Self {
        DebeziumConfig {
            before_images: BeforeImages::default(),
            unavailable_value_placeholder: default_placeholder(),
            evict_on_snapshot: true,
            schemas_enable: true,
            decimal_handling_mode: DecimalHandlingMode::default(),
            time_precision_mode: TimePrecisionMode::default(),
            binary_handling_mode: BinaryHandlingMode::default(),
            date_style: default_date_style(),
            time_zone: default_time_zone(),
        }
    }
}

impl DebeziumConfig {
    /// Every default; the same as [`DebeziumConfig::default`].
    pub fn new() -> DebeziumConfig {
        DebeziumConfig::default()
    }

    /// Sets [`DebeziumConfig::before_images`]. Default [`BeforeImages::Full`].
    #[must_use]
    pub fn with_before_images(mut self, before_images: BeforeImages) -> Self {
        self.before_images = before_images;
        self
    }

    /// Sets [`DebeziumConfig::unavailable_value_placeholder`], the connector's
    /// `unavailable.value.placeholder`. Default **`__debezium_unavailable_value`**.
    #[must_use]
    pub fn with_unavailable_value_placeholder(mut self, placeholder: impl Into<String>) -> Self {
        self.unavailable_value_placeholder = placeholder.into();
        self
    }

    /// Sets [`DebeziumConfig::evict_on_snapshot`]: whether snapshot reads evict their row's
    /// keys. Default **`true`**.
    #[must_use]
    pub fn with_evict_on_snapshot(mut self, evict_on_snapshot: bool) -> Self {
        self.evict_on_snapshot = evict_on_snapshot;
        self
    }

    /// Sets [`DebeziumConfig::schemas_enable`] (the connector's
    /// `value.converter.schemas.enable`). Default **`true`**.
    #[must_use]
    pub fn with_schemas_enable(mut self, schemas_enable: bool) -> Self {
        self.schemas_enable = schemas_enable;
        self
    }

    /// Sets [`DebeziumConfig::decimal_handling_mode`]. Default [`DecimalHandlingMode::Precise`].
    #[must_use]
    pub fn with_decimal_handling_mode(mut self, mode: DecimalHandlingMode) -> Self {
        self.decimal_handling_mode = mode;
        self
    }

    /// Sets [`DebeziumConfig::time_precision_mode`]. Default [`TimePrecisionMode::Adaptive`].
    #[must_use]
    pub fn with_time_precision_mode(mut self, mode: TimePrecisionMode) -> Self {
        self.time_precision_mode = mode;
        self
    }

    /// Sets [`DebeziumConfig::binary_handling_mode`]. Default [`BinaryHandlingMode::Bytes`].
    #[must_use]
    pub fn with_binary_handling_mode(mut self, mode: BinaryHandlingMode) -> Self {
        self.binary_handling_mode = mode;
        self
    }

    /// Sets [`DebeziumConfig::date_style`] (PostgreSQL `DateStyle` syntax). Default
    /// **`ISO, MDY`**.
    #[must_use]
    pub fn with_date_style(mut self, date_style: impl Into<String>) -> Self {
        self.date_style = date_style.into();
        self
    }

    /// Sets [`DebeziumConfig::time_zone`] (`UTC` or `+HH:MM`). Default **`UTC`**.
    #[must_use]
    pub fn with_time_zone(mut self, time_zone: impl Into<String>) -> Self {
        self.time_zone = time_zone.into();
        self
    }

    /// The parsed `date_style` and `time_zone`.
    ///
    /// # Errors
    /// A [`ConfigError`] naming `debezium.date_style` or `debezium.time_zone` and the accepted
    /// forms.
    pub(crate) fn style(&self) -> Result<crate::pgtext::Style, ConfigError> {
        Ok(crate::pgtext::Style {
            date_style: crate::pgtext::DateStyle::parse(&self.date_style)
                .map_err(|r| ConfigError::new("debezium.date_style", r))?,
            time_zone: crate::pgtext::TimeZone::parse(&self.time_zone)
                .map_err(|r| ConfigError::new("debezium.time_zone", r))?,
        })
    }

    /// The connector modes that shape values in events without a schema.
    pub(crate) fn modes(&self) -> crate::pgtext::Modes {
        crate::pgtext::Modes {
            decimal: self.decimal_handling_mode,
            time: self.time_precision_mode,
            binary: self.binary_handling_mode,
        }
    }

    /// Whether every template column's PostgreSQL type must be known before starting: events
    /// without schemas, or modes whose values cannot be read without the column's type
    /// (`decimal.handling.mode = double` needs the scale; `time.precision.mode = connect` drops
    /// µs).
    pub(crate) fn needs_column_types(&self) -> Option<&'static str> {
        if !self.schemas_enable {
            Some("debezium.schemas_enable = false (events carry no schema)")
        } else if self.decimal_handling_mode == DecimalHandlingMode::Double {
            Some(
                "debezium.decimal_handling_mode = \"double\" (a double does not say a numeric's scale)",
            )
        } else if self.time_precision_mode == TimePrecisionMode::Connect {
            Some("debezium.time_precision_mode = \"connect\" (milliseconds only)")
        } else if self.binary_handling_mode != BinaryHandlingMode::Bytes {
            Some("debezium.binary_handling_mode other than \"bytes\" (a bytea looks like a string)")
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_fields() {
        let ok = KafkaConfig::new("b:9092", "g", vec!["bus".into()], "dlq");
        assert_eq!(ok.validate(), Ok(()));
        let mut c = ok.clone();
        c.topics.clear();
        assert!(
            c.validate()
                .unwrap_err()
                .reason
                .contains("at least one input topic")
        );
        let mut c = ok.clone();
        c.dead_letter_topic = "bus".into();
        assert_eq!(c.validate().unwrap_err().field, "kafka.dead_letter_topic");
        let mut c = ok.clone();
        c.properties
            .insert("enable.auto.commit".into(), "true".into());
        assert!(
            c.validate()
                .unwrap_err()
                .reason
                .contains("enable.auto.commit")
        );
        let mut c = ok.clone();
        c.instance_id = Some(" ".into());
        assert_eq!(c.validate().unwrap_err().field, "kafka.instance_id");
        let mut c = ok.clone();
        c.properties.insert("group.instance.id".into(), "a".into());
        assert!(
            c.validate()
                .unwrap_err()
                .reason
                .contains("kafka.instance_id")
        );
        let mut c = ok;
        c.debezium_topics = vec!["bus".into()];
        assert!(c.validate().unwrap_err().reason.contains("both"));
    }

    #[test]
    fn debezium_defaults() {
        let d: DebeziumConfig = toml_like(r#"{}"#);
        assert_eq!(d, DebeziumConfig::default());
        assert_eq!(
            d.unavailable_value_placeholder,
            "__debezium_unavailable_value"
        );
        let d: DebeziumConfig = toml_like(r#"{"before_images":"default"}"#);
        assert_eq!(d.before_images, BeforeImages::Default);
    }

    fn toml_like<T: serde::de::DeserializeOwned>(json: &str) -> T {
        serde_json::from_str(json).unwrap()
    }
}
