//! `[kafka]`: where and how the Kafka sink publishes.

use cacheclear_protocol::ConfigError;
use std::collections::BTreeMap;

/// The Kafka sink's configuration (`[kafka]` in `cacheclear.toml`).
///
/// ```toml
/// [kafka]
/// brokers = "kafka-1:9092,kafka-2:9092"   # required
/// topic = "cacheclear.invalidations"      # default
/// message_timeout_ms = 30000              # default
/// linger_ms = 2                           # default
/// max_in_flight = 10000                   # default
///
/// [kafka.properties]                      # optional extra librdkafka producer properties
/// "compression.type" = "lz4"
/// "security.protocol" = "ssl"
/// ```
///
/// The producer always runs with `acks=all` and `enable.idempotence=true`; those (and the
/// properties the fields above set) cannot be overridden in `properties`.
///
/// In code, start from [`KafkaConfig::new`] and chain the `with_*` methods, or assign the public
/// fields of a `mut` value. Struct literals are not available outside this crate
/// (`#[non_exhaustive]`: options may be added in minor releases).
///
/// ```
/// use cacheclear_sink_kafka::KafkaConfig;
/// let cfg = KafkaConfig::new("kafka-1:9092,kafka-2:9092")
///     .with_topic("shop.invalidations")
///     .with_linger_ms(5)
///     .with_property("compression.type", "lz4");
/// assert!(cfg.validate().is_ok());
/// ```
#[derive(Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port[,host:port…]` (librdkafka `bootstrap.servers`). Required.
    pub brokers: String,
    /// The topic the bus records go to. It must exist (the sink does not create it); give it as
    /// many partitions as invalidator workers you want. Default `cacheclear.invalidations`.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// How long librdkafka keeps trying to deliver one record, in ms (`message.timeout.ms`).
    /// After that the record's delivery fails, so the batch fails and is retried from the start.
    /// Default 30000.
    #[serde(default = "default_message_timeout_ms")]
    pub message_timeout_ms: u64,
    /// How long the producer waits to fill a request before sending it, in ms (`linger.ms`).
    /// Low for latency: an invalidation that waits here is a stale read window. Default 2.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// Records awaiting their delivery report at once, per batch (the source applies up to
    /// `postgres.max_batches_in_flight` batches at once). Bounds memory on bulk changes (a
    /// million-key transaction is sent as a sliding window, not all at once). Default 10000.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Extra librdkafka producer properties (`security.protocol`, `sasl.*`, `ssl.*`,
    /// `compression.type`, `client.id`, …), passed through verbatim. Default empty.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// `Debug` with secret properties (`sasl.password`, `ssl.key.password`, …) shown as `***`
/// (a panic or a debug log line must not print them).
impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("message_timeout_ms", &self.message_timeout_ms)
            .field("linger_ms", &self.linger_ms)
            .field("max_in_flight", &self.max_in_flight)
            .field(
                "properties",
                &cacheclear_protocol::redact_properties(&self.properties),
            )
            .finish()
    }
}

/// The default topic, `cacheclear.invalidations`.
pub const DEFAULT_TOPIC: &str = "cacheclear.invalidations";

fn default_topic() -> String {
    DEFAULT_TOPIC.into()
}
fn default_message_timeout_ms() -> u64 {
    30_000
}
fn default_linger_ms() -> u64 {
    2
}
fn default_max_in_flight() -> usize {
    10_000
}

/// librdkafka properties the sink sets itself, with the field (or reason) that owns each.
const RESERVED: [(&str, &str); 11] = [
    ("bootstrap.servers", "use kafka.brokers"),
    ("metadata.broker.list", "use kafka.brokers"),
    ("message.timeout.ms", "use kafka.message_timeout_ms"),
    ("delivery.timeout.ms", "use kafka.message_timeout_ms"),
    ("linger.ms", "use kafka.linger_ms"),
    ("queue.buffering.max.ms", "use kafka.linger_ms"),
    (
        "acks",
        "always `all`: an invalidation must be durable before the LSN is confirmed",
    ),
    (
        "request.required.acks",
        "always `all`: an invalidation must be durable before the LSN is confirmed",
    ),
    ("enable.idempotence", "always `true`"),
    (
        "delivery.report.only.error",
        "the sink needs every delivery report",
    ),
    ("dr_msg_cb", "the sink needs every delivery report"),
];

impl KafkaConfig {
    /// Every default, with these bootstrap brokers, `host:port[,host:port…]` (see
    /// [`KafkaConfig::brokers`]).
    pub fn new(brokers: impl Into<String>) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.into(),
            topic: default_topic(),
            message_timeout_ms: default_message_timeout_ms(),
            linger_ms: default_linger_ms(),
            max_in_flight: default_max_in_flight(),
            properties: BTreeMap::new(),
        }
    }

    /// Sets [`KafkaConfig::topic`]: the topic the bus records go to. Default
    /// **`cacheclear.invalidations`** ([`DEFAULT_TOPIC`]). It must exist.
    #[must_use]
    pub fn with_topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = topic.into();
        self
    }

    /// Sets [`KafkaConfig::message_timeout_ms`]: how long librdkafka keeps trying to deliver
    /// one record, ms. Default **30 000**. Must be in 1 ..= `i32::MAX` and above `linger_ms`.
    #[must_use]
    pub fn with_message_timeout_ms(mut self, message_timeout_ms: u64) -> Self {
        self.message_timeout_ms = message_timeout_ms;
        self
    }

    /// Sets [`KafkaConfig::linger_ms`]: how long the producer waits to fill a request, ms.
    /// Default **2**. At most 900 000, and below `message_timeout_ms`.
    #[must_use]
    pub fn with_linger_ms(mut self, linger_ms: u64) -> Self {
        self.linger_ms = linger_ms;
        self
    }

    /// Sets [`KafkaConfig::max_in_flight`]: records awaiting their delivery report at once, per
    /// batch (a count). Default **10 000**. Must be ≥ 1.
    #[must_use]
    pub fn with_max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.max_in_flight = max_in_flight;
        self
    }

    /// Replaces [`KafkaConfig::properties`], the extra librdkafka producer properties. Default
    /// empty. The sink's own properties may not appear (see [`KafkaConfig::validate`]).
    #[must_use]
    pub fn with_properties(mut self, properties: BTreeMap<String, String>) -> Self {
        self.properties = properties;
        self
    }

    /// Adds one extra librdkafka producer property to [`KafkaConfig::properties`] (replacing
    /// the same key's previous value).
    #[must_use]
    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// Checks values that parse but make no sense. Errors name the field (`kafka.<field>`) and
    /// the reason.
    ///
    /// # Errors
    /// An empty `brokers`; a `topic` Kafka would refuse (empty, over 249 characters, `.`/`..`,
    /// characters other than ASCII letters, digits, `.`, `_`, `-`); `message_timeout_ms` or
    /// `max_in_flight` of 0; `linger_ms` over 900000 or not below `message_timeout_ms`; a reserved
    /// key in `properties`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.split(',').all(|b| b.trim().is_empty()) {
            return Err(ConfigError::new(
                "kafka.brokers",
                "empty; give the bootstrap brokers as host:port[,host:port…]",
            ));
        }
        validate_topic(&self.topic)
            .map_err(|e| ConfigError::new("kafka.topic", format!("`{}` {e}", self.topic)))?;
        if self.message_timeout_ms == 0 {
            return Err(ConfigError::new(
                "kafka.message_timeout_ms",
                "must be > 0 (0 would mean \"retry forever\" inside librdkafka, hiding a dead broker from the pipeline)",
            ));
        }
        if self.message_timeout_ms > i32::MAX as u64 {
            return Err(ConfigError::new(
                "kafka.message_timeout_ms",
                format!(
                    "{} is over librdkafka's maximum {}",
                    self.message_timeout_ms,
                    i32::MAX
                ),
            ));
        }
        if self.linger_ms > 900_000 {
            return Err(ConfigError::new(
                "kafka.linger_ms",
                format!("{} is over librdkafka's maximum 900000", self.linger_ms),
            ));
        }
        if self.linger_ms >= self.message_timeout_ms {
            return Err(ConfigError::new(
                "kafka.linger_ms",
                format!(
                    "{} must be below kafka.message_timeout_ms ({}): a record may not \
                 wait longer than it is allowed to take in all",
                    self.linger_ms, self.message_timeout_ms
                ),
            ));
        }
        if self.max_in_flight == 0 {
            return Err(ConfigError::new("kafka.max_in_flight", "must be > 0"));
        }
        for key in self.properties.keys() {
            if let Some((_, why)) = RESERVED.iter().find(|(k, _)| k == key) {
                return Err(ConfigError::new(
                    format!("kafka.properties.\"{key}\""),
                    format!("set by the sink itself ({why})"),
                ));
            }
        }
        Ok(())
    }

    /// The librdkafka producer properties this configuration stands for.
    pub fn producer_properties(&self) -> BTreeMap<String, String> {
        let mut p = BTreeMap::new();
        p.insert("client.id".to_string(), "cacheclear".to_string());
        // Invalidations are small and latency-bound: Nagle's algorithm would hold a produce
        // request behind the previous one's ACK (up to the peer's delayed-ACK timer).
        p.insert("socket.nagle.disable".to_string(), "true".to_string());
        // A mistyped topic must fail the batch (naming the topic), not be created with the
        // broker's defaults on brokers that auto-create topics (tansu does).
        p.insert("allow.auto.create.topics".to_string(), "false".to_string());
        // Extra properties first, so the sink's own below win (validate() refuses clashes).
        p.extend(self.properties.clone());
        p.insert("bootstrap.servers".into(), self.brokers.clone());
        p.insert("acks".into(), "all".into());
        p.insert("enable.idempotence".into(), "true".into());
        p.insert(
            "message.timeout.ms".into(),
            self.message_timeout_ms.to_string(),
        );
        p.insert("linger.ms".into(), self.linger_ms.to_string());
        p
    }
}

fn validate_topic(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        return Err("is empty");
    }
    if topic.len() > 249 {
        return Err("is longer than Kafka's 249 characters");
    }
    if topic == "." || topic == ".." {
        return Err("is not a valid Kafka topic name");
    }
    if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("has characters Kafka refuses (allowed: ASCII letters, digits, `.`, `_`, `-`)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let cfg = KafkaConfig::new("127.0.0.1:9092");
        assert_eq!(cfg.topic, "cacheclear.invalidations");
        assert_eq!(cfg.linger_ms, 2);
        cfg.validate().expect("defaults are valid");
        let p = cfg.producer_properties();
        assert_eq!(p["acks"], "all");
        assert_eq!(p["enable.idempotence"], "true");
        assert_eq!(p["bootstrap.servers"], "127.0.0.1:9092");

        let bad = |f: &dyn Fn(&mut KafkaConfig), field: &str| {
            let mut c = KafkaConfig::new("b:9092");
            f(&mut c);
            let err = c.validate().expect_err(field);
            assert!(err.field.starts_with(field), "{err}");
        };
        bad(&|c| c.brokers = " , ".into(), "kafka.brokers");
        bad(&|c| c.topic = String::new(), "kafka.topic");
        bad(&|c| c.topic = "a b".into(), "kafka.topic");
        bad(&|c| c.topic = "x".repeat(250), "kafka.topic");
        bad(&|c| c.message_timeout_ms = 0, "kafka.message_timeout_ms");
        bad(&|c| c.max_in_flight = 0, "kafka.max_in_flight");
        bad(&|c| c.linger_ms = 1_000_000, "kafka.linger_ms");
        bad(
            &|c| {
                c.message_timeout_ms = 100;
                c.linger_ms = 100;
            },
            "kafka.linger_ms",
        );
        bad(
            &|c| {
                c.properties.insert("acks".into(), "1".into());
            },
            "kafka.properties.\"acks\"",
        );
    }

    #[test]
    fn extra_properties_pass_through() {
        let mut cfg = KafkaConfig::new("b:9092");
        cfg.properties
            .insert("compression.type".into(), "lz4".into());
        cfg.properties.insert("client.id".into(), "mine".into());
        cfg.validate().expect("valid");
        let p = cfg.producer_properties();
        assert_eq!(p["compression.type"], "lz4");
        assert_eq!(p["client.id"], "mine");
    }
}
