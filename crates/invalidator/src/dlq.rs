//! The dead-letter topic: the start-up check, and producing one malformed record so that a
//! permanent refusal never stalls invalidation.
//!
//! A dead letter is produced in the background: the consume loop keeps applying and committing
//! other partitions (and the later records of the same partition, up to the dead letter's offset)
//! while it is retried.

use std::fmt::Write as _;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, FutureProducer, FutureRecord, Producer};
use sha2::{Digest, Sha256};

use crate::config::KafkaConfig;
use crate::offsets::Tp;
use crate::telemetry;

/// Header carrying why the record was dead-lettered.
pub(crate) const DLQ_REASON: &str = "cacheclear.dlq.reason";

/// Bytes of the value a bounded copy keeps (its first bytes).
pub const BOUNDED_COPY_VALUE_BYTES: usize = 1024;
/// Bytes of the key a bounded copy keeps (its first bytes).
pub const BOUNDED_COPY_KEY_BYTES: usize = 256;
/// Longest reason carried in a header or a log line, in bytes (a reason may quote the record).
pub const MAX_REASON_BYTES: usize = 512;

/// How long the start-up check waits for the brokers' metadata answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// librdkafka properties of the dead-letter producer: the invalidator's defaults, then
/// `kafka.properties` (consumer-only ones left out), then what the invalidator owns.
pub fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut producer_cfg = ClientConfig::new();
    producer_cfg
        .set("socket.nagle.disable", "true")
        // A missing dead-letter topic must be reported, not created with the broker's defaults
        // on brokers that auto-create topics (tansu does).
        .set("allow.auto.create.topics", "false");
    for (k, v) in &cfg.properties {
        // Consumer-only settings would only make librdkafka warn on the producer.
        if !matches!(
            k.as_str(),
            "auto.offset.reset"
                | "fetch.wait.max.ms"
                | "session.timeout.ms"
                | "heartbeat.interval.ms"
                | "max.poll.interval.ms"
                | "partition.assignment.strategy"
                | "fetch.min.bytes"
                | "fetch.max.bytes"
                | "max.partition.fetch.bytes"
                | "group.instance.id"
                | "isolation.level"
        ) {
            producer_cfg.set(k, v);
        }
    }
    producer_cfg
        .set("bootstrap.servers", cfg.dead_letter_bootstrap())
        .set("acks", "all")
        .set("message.timeout.ms", "30000");
    producer_cfg
}

/// What [`check_dead_letter_topic`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetterTopic {
    /// The topic's name (`kafka.dead_letter_topic`).
    pub topic: String,
    /// Its partition count, every one with a leader.
    pub partitions: usize,
}

/// Why the dead-letter topic cannot take dead letters. Every message names the topic and the fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeadLetterCheckError {
    /// The brokers do not know the topic.
    #[error(
        "kafka.dead_letter_topic: topic `{topic}` does not exist on {brokers}: create it (e.g. `kafka-topics.sh --bootstrap-server {brokers} --create --topic {topic} --partitions 1`) or fix the name; malformed records need it before the invalidator starts"
    )]
    Missing {
        /// The topic.
        topic: String,
        /// `kafka.brokers`.
        brokers: String,
    },
    /// The brokers refused this client access to the topic (authorization), or reported another
    /// error for it.
    #[error(
        "kafka.dead_letter_topic: topic `{topic}` is not writable by this client: {error}; grant the invalidator's principal Describe and Write on it (e.g. `kafka-acls.sh --add --allow-principal User:<invalidator> --operation Describe --operation Write --topic {topic}`)"
    )]
    NotWritable {
        /// The topic.
        topic: String,
        /// What the brokers answered.
        error: String,
    },
    /// A partition of the topic has no leader: produces to it cannot succeed now.
    #[error(
        "kafka.dead_letter_topic: partition {partition} of topic `{topic}` has no leader; bring its replicas back (or reassign it) before starting"
    )]
    NoLeader {
        /// The topic.
        topic: String,
        /// The partition without a leader.
        partition: i32,
    },
    /// The brokers did not answer (down, unreachable, TLS/SASL failing). Transient: `run` retries
    /// the check; a one-shot caller (`doctor`) reports it.
    #[error(
        "kafka.dead_letter_topic: cannot check topic `{topic}`: brokers {brokers} did not answer within {timeout_s} s: {error}"
    )]
    Unreachable {
        /// The topic.
        topic: String,
        /// `kafka.brokers`.
        brokers: String,
        /// Seconds waited.
        timeout_s: u64,
        /// librdkafka's error.
        error: String,
    },
    /// librdkafka refused the producer configuration (a bad `kafka.properties` entry).
    #[error("kafka.properties: the dead-letter producer cannot be created: {0}")]
    Client(#[source] KafkaError),
}

impl DeadLetterCheckError {
    /// True when the answer may change by itself (brokers unreachable); false when someone has to
    /// fix something first.
    pub fn is_transient(&self) -> bool {
        matches!(self, DeadLetterCheckError::Unreachable { .. })
    }
}

/// Checks that `cfg.dead_letter_topic` can take dead letters: the topic exists on
/// `cfg.brokers`, this client (with `cfg.properties`: security settings included) is authorized
/// to describe it, and every partition has a leader. One metadata request, at most 10 s; blocks
/// a thread of the blocking pool, not the caller's runtime. Nothing is written to the topic.
///
/// `cacheclear invalidate` (`run`) calls it before subscribing and refuses to start on a
/// definitive answer; it retries while the brokers are unreachable.
///
/// Write permission itself cannot be proven without writing a record (which would show up in
/// every dead-letter consumer and alert): a principal allowed to describe but not to write is
/// found at the first dead letter, which is then logged with its coordinates, counted in
/// `cacheclear_invalidator_records_total{outcome="dead_letter_refused"}` and committed.
///
/// # Errors
/// [`DeadLetterCheckError`]: missing topic, authorization refused, a partition without leader,
/// unreachable brokers ([`DeadLetterCheckError::is_transient`]), or a producer configuration
/// librdkafka refuses. Each names the topic and the fix.
pub async fn check_dead_letter_topic(
    cfg: &KafkaConfig,
) -> Result<DeadLetterTopic, DeadLetterCheckError> {
    let client_cfg = producer_config(cfg);
    let topic = cfg.dead_letter_topic.clone();
    let brokers = cfg.dead_letter_bootstrap().to_owned();
    let (t, b) = (topic.clone(), brokers.clone());
    tokio::task::spawn_blocking(move || check_blocking(&client_cfg, t, b))
        .await
        .unwrap_or_else(|e| {
            Err(DeadLetterCheckError::Unreachable {
                topic,
                brokers,
                timeout_s: CHECK_TIMEOUT.as_secs(),
                error: format!("the check's thread failed: {e}"),
            })
        })
}

fn check_blocking(
    client_cfg: &ClientConfig,
    topic: String,
    brokers: String,
) -> Result<DeadLetterTopic, DeadLetterCheckError> {
    let producer: BaseProducer = client_cfg.create().map_err(DeadLetterCheckError::Client)?;
    let metadata = producer
        .client()
        .fetch_metadata(Some(&topic), CHECK_TIMEOUT)
        .map_err(|e| DeadLetterCheckError::Unreachable {
            topic: topic.clone(),
            brokers: brokers.clone(),
            timeout_s: CHECK_TIMEOUT.as_secs(),
            error: e.to_string(),
        })?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err(DeadLetterCheckError::Missing { topic, brokers });
    };
    if let Some(e) = t.error() {
        let code = RDKafkaErrorCode::from(e);
        return Err(match code {
            RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic => {
                DeadLetterCheckError::Missing { topic, brokers }
            }
            // Leader elections in progress and the like: the brokers answer again shortly.
            RDKafkaErrorCode::LeaderNotAvailable | RDKafkaErrorCode::NotLeaderForPartition => {
                DeadLetterCheckError::Unreachable {
                    topic,
                    brokers,
                    timeout_s: CHECK_TIMEOUT.as_secs(),
                    error: code.to_string(),
                }
            }
            _ => DeadLetterCheckError::NotWritable {
                topic,
                error: code.to_string(),
            },
        });
    }
    if t.partitions().is_empty() {
        return Err(DeadLetterCheckError::Missing { topic, brokers });
    }
    if let Some(p) = t.partitions().iter().find(|p| p.leader() < 0) {
        return Err(DeadLetterCheckError::NoLeader {
            topic,
            partition: p.id(),
        });
    }
    Ok(DeadLetterTopic {
        partitions: t.partitions().len(),
        topic,
    })
}

/// A malformed record waiting for the dead-letter topic (owned: produced from its own task).
#[derive(Debug)]
pub(crate) struct DeadLetter {
    pub(crate) tp: Tp,
    pub(crate) generation: u64,
    pub(crate) offset: i64,
    pub(crate) reason: String,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) value: Option<Vec<u8>>,
}

/// How a dead letter ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The topic acknowledged the record as it was.
    Produced,
    /// The full record was refused for its size; a bounded copy was acknowledged.
    BoundedCopy,
    /// Refused permanently (even as a bounded copy): logged with its coordinates, counted, and
    /// its offset committed all the same.
    Refused,
}

/// Whether a produce error can go away by itself (retry) or not (never stall on it).
fn is_permanent(e: &KafkaError) -> bool {
    let code = match e {
        KafkaError::MessageProduction(code) => *code,
        _ => return false,
    };
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownPartition
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::PolicyViolation
    )
}

/// Whether the refusal is about the record's size (a bounded copy may pass).
fn is_size(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
        )
    )
}

/// `s` cut to at most `max` bytes on a character boundary, with `…` when cut.
pub(crate) fn bounded_text(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len()).into()
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for b in digest {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Produces `dl` to `topic`: as it is; if refused for its size, as a bounded copy; if refused
/// permanently, gives up (logged, counted). Transient failures are retried with backoff (100 ms
/// doubling to 5 s) until acknowledged; the caller cancels the future on shutdown or revocation.
pub(crate) async fn produce(dl: &DeadLetter, producer: &FutureProducer, topic: &str) -> Outcome {
    let reason = bounded_text(&dl.reason, MAX_REASON_BYTES);
    let partition = dl.tp.partition.to_string();
    let offset = dl.offset.to_string();
    let base = || {
        OwnedHeaders::new()
            .insert(Header {
                key: DLQ_REASON,
                value: Some(reason.as_ref()),
            })
            .insert(Header {
                key: "cacheclear.dlq.topic",
                value: Some(dl.tp.topic.as_str()),
            })
            .insert(Header {
                key: "cacheclear.dlq.partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "cacheclear.dlq.offset",
                value: Some(offset.as_str()),
            })
    };
    let key = dl.key.as_deref();
    let value = dl.value.as_deref();
    let full_error = match send_retrying(dl, producer, topic, base(), key, value, "record").await {
        Ok(()) => return Outcome::Produced,
        Err(e) => e,
    };
    if is_size(&full_error) {
        // The bounded copy: the first bytes of key and value, the original sizes and SHA-256s.
        let value_size = value.map_or(0, <[u8]>::len).to_string();
        let key_size = key.map_or(0, <[u8]>::len).to_string();
        let value_sha = sha256_hex(value.unwrap_or_default());
        let key_sha = sha256_hex(key.unwrap_or_default());
        let why = bounded_text(&full_error.to_string(), MAX_REASON_BYTES).into_owned();
        let headers = base()
            .insert(Header {
                key: "cacheclear.dlq.truncated",
                value: Some("true"),
            })
            .insert(Header {
                key: "cacheclear.dlq.truncated_because",
                value: Some(why.as_str()),
            })
            .insert(Header {
                key: "cacheclear.dlq.original_size",
                value: Some(value_size.as_str()),
            })
            .insert(Header {
                key: "cacheclear.dlq.sha256",
                value: Some(value_sha.as_str()),
            })
            .insert(Header {
                key: "cacheclear.dlq.original_key_size",
                value: Some(key_size.as_str()),
            })
            .insert(Header {
                key: "cacheclear.dlq.key_sha256",
                value: Some(key_sha.as_str()),
            });
        let short_key = key.map(|k| &k[..k.len().min(BOUNDED_COPY_KEY_BYTES)]);
        let short_value = value.map(|v| &v[..v.len().min(BOUNDED_COPY_VALUE_BYTES)]);
        match send_retrying(
            dl,
            producer,
            topic,
            headers,
            short_key,
            short_value,
            "bounded copy",
        )
        .await
        {
            Ok(()) => {
                tracing::warn!(dead_letter_topic = topic, source_topic = %dl.tp.topic, partition = dl.tp.partition, offset = dl.offset, original_size = value.map_or(0, <[u8]>::len), sha256 = %value_sha, error = %full_error, "dead-letter topic refused the record for its size; dead-lettered a bounded copy (first {BOUNDED_COPY_VALUE_BYTES} bytes, size and SHA-256 in headers)");
                return Outcome::BoundedCopy;
            }
            Err(e) => {
                give_up(dl, topic, &reason, &e);
                return Outcome::Refused;
            }
        }
    }
    give_up(dl, topic, &reason, &full_error);
    Outcome::Refused
}

fn give_up(dl: &DeadLetter, topic: &str, reason: &str, error: &KafkaError) {
    let size = dl.value.as_ref().map_or(0, Vec::len);
    let sha = sha256_hex(dl.value.as_deref().unwrap_or_default());
    tracing::error!(dead_letter_topic = topic, source_topic = %dl.tp.topic, partition = dl.tp.partition, offset = dl.offset, size, sha256 = %sha, reason, error = %error, "dead-letter topic refused the malformed record permanently; skipping it (its offset is committed; find it in the source topic at these coordinates)");
}

/// One produce, retried on transient errors; `Err` with the permanent error.
async fn send_retrying(
    dl: &DeadLetter,
    producer: &FutureProducer,
    topic: &str,
    headers: OwnedHeaders,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    what: &str,
) -> Result<(), KafkaError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(topic).headers(headers.clone());
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(v);
        }
        match producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => return Ok(()),
            Err((e, _)) if is_permanent(&e) => {
                metrics::counter!(telemetry::DLQ_ERRORS, "kind" => "permanent").increment(1);
                return Err(e);
            }
            Err((e, _)) => {
                tracing::error!(error = %e, dead_letter_topic = topic, source_topic = %dl.tp.topic, partition = dl.tp.partition, offset = dl.offset, retry_in_ms = backoff.as_millis() as u64, "dead-letter produce of the {what} failed; retrying (this partition is not committed past it; other partitions go on)");
                metrics::counter!(telemetry::DLQ_ERRORS, "kind" => "transient").increment(1);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_and_size_errors_are_told_apart() {
        let p = |c| KafkaError::MessageProduction(c);
        assert!(is_permanent(&p(RDKafkaErrorCode::MessageSizeTooLarge)));
        assert!(is_size(&p(RDKafkaErrorCode::MessageSizeTooLarge)));
        assert!(is_permanent(&p(RDKafkaErrorCode::TopicAuthorizationFailed)));
        assert!(!is_size(&p(RDKafkaErrorCode::TopicAuthorizationFailed)));
        assert!(is_permanent(&p(RDKafkaErrorCode::UnknownTopic)));
        assert!(is_permanent(&p(RDKafkaErrorCode::InvalidRecord)));
        // Broker down, queue full: transient.
        assert!(!is_permanent(&p(RDKafkaErrorCode::MessageTimedOut)));
        assert!(!is_permanent(&p(RDKafkaErrorCode::QueueFull)));
        assert!(!is_permanent(&p(RDKafkaErrorCode::AllBrokersDown)));
        assert!(!is_permanent(&p(RDKafkaErrorCode::NotEnoughReplicas)));
    }

    #[test]
    fn bounded_text_cuts_on_a_character_boundary() {
        assert_eq!(bounded_text("abc", 3), "abc");
        let s = "é".repeat(10); // 20 bytes
        let cut = bounded_text(&s, 5);
        assert_eq!(cut, "éé… (20 bytes)");
    }

    #[test]
    fn sha256_is_lower_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
