//! cacheclear's Kafka sink ("bus mode"; docs/architecture.md, "Bus mode"): publishes every
//! eviction of a committed
//! batch as [`BusRecord`]s on one topic, for the invalidator consumer group to apply to Redis.
//!
//! Records (JSON, documented in [`cacheclear_protocol::record`]):
//! - one per cache key: Kafka key = the cache key, so every invalidation of one key lands on one
//!   partition, in commit order; value = `{"key": K, "commit_lsn", "commit_time_us", "xid",
//!   "table", "op"}`;
//! - one per table-wide eviction (TRUNCATE, or a fallback): Kafka key = `schema.table`; value
//!   carries `patterns` (SCAN MATCH globs) instead of `key`.
//!
//! Delivery: the producer runs with `acks=all` and `enable.idempotence=true`, and
//! [`KafkaSink::apply`] returns `Ok` only once **every** record of the batch has a successful
//! delivery report — only then does the CDC source confirm the batch's LSN to PostgreSQL. Any
//! failed report (broker down past `message_timeout_ms`, unknown topic, authorization, …) fails
//! the batch; the source retries it, so records may be published more than once (harmless: the
//! eviction is idempotent). After a failed batch the producer is replaced by a fresh one (new
//! producer id, new connections), so no stuck producer state outlives a failure (batches in
//! flight at the same time share the producer; only the first failure replaces it). At most
//! [`KafkaConfig::max_in_flight`] records per batch await their report at once, so a million-key
//! transaction streams through a bounded window.
//!
//! ```no_run
//! # async fn demo(batch: cacheclear_protocol::Batch) -> Result<(), cacheclear_protocol::SinkError> {
//! use cacheclear_protocol::Sink;
//! use cacheclear_sink_kafka::{KafkaConfig, KafkaSink};
//! let mut sink = KafkaSink::connect(KafkaConfig::new("127.0.0.1:9092"))?;
//! sink.apply(&batch).await?; // every record acknowledged by the partition leader and its ISR
//! # Ok(()) }
//! ```

#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]
// The error carries librdkafka's error and the record's coordinates; it is built once per failed
// batch, so its size does not matter.
#![allow(clippy::result_large_err)]

mod config;
pub mod doctor;
mod telemetry;

use std::time::Duration;

use cacheclear_protocol::{Batch, BusRecord, Sink, SinkError};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

pub use config::{DEFAULT_TOPIC, KafkaConfig};
pub use telemetry::{describe_metrics, register_metrics};

/// What can go wrong in the Kafka sink. Every message names the topic and, where known, the
/// partition and librdkafka's reason.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    /// The configuration is invalid (`kafka.<field>` named in the message).
    #[error(transparent)]
    Config(#[from] cacheclear_protocol::ConfigError),
    /// librdkafka refused the producer configuration (e.g. an unknown or invalid property in
    /// `kafka.properties`).
    #[error("kafka: cannot create the producer: {0} (check kafka.properties)")]
    Create(#[source] KafkaError),
    /// A record could not even be queued in the producer.
    #[error("kafka: cannot queue a record for topic `{topic}`: {reason}")]
    Enqueue {
        /// The topic.
        topic: String,
        /// librdkafka's error.
        #[source]
        reason: KafkaError,
    },
    /// The broker did not acknowledge a record (its delivery report is an error).
    #[error(
        "kafka: delivery to topic `{topic}` partition {partition} failed (record key `{key}`): \
         {reason}{hint}"
    )]
    Delivery {
        /// The topic.
        topic: String,
        /// The partition, or `unassigned` when the record never got one (e.g. unknown topic).
        partition: String,
        /// The record's Kafka key (cache key or table), lossy UTF-8.
        key: String,
        /// librdkafka's error.
        #[source]
        reason: KafkaError,
        /// Advice for common causes, starting with a separator, or empty.
        hint: &'static str,
    },
    /// The producer dropped a delivery report without reporting (it was shut down).
    #[error("kafka: the producer for topic `{topic}` shut down before reporting a delivery")]
    Canceled {
        /// The topic.
        topic: String,
    },
}

/// Publishes batches to Kafka; see the crate docs. Create with [`KafkaSink::connect`].
pub struct KafkaSink {
    cfg: KafkaConfig,
    /// The current producer and its generation (bumped by every replacement). Batches in
    /// flight share it; a failed batch replaces it only if it is still the one that failed.
    producer: std::sync::RwLock<(u64, FutureProducer)>,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("brokers", &self.cfg.brokers)
            .field("topic", &self.cfg.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// Validates `cfg` and creates the producer. Does not contact the brokers (librdkafka
    /// connects in the background; an unreachable broker shows up as failed deliveries).
    ///
    /// # Errors
    /// [`KafkaSinkError::Config`] naming the invalid field; [`KafkaSinkError::Create`] if
    /// librdkafka refuses a property.
    pub fn connect(cfg: KafkaConfig) -> Result<KafkaSink, KafkaSinkError> {
        cfg.validate()?;
        let producer = create_producer(&cfg)?;
        Ok(KafkaSink {
            cfg,
            producer: std::sync::RwLock::new((0, producer)),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &KafkaConfig {
        &self.cfg
    }

    /// Publishes every eviction of `batch` and waits for all delivery reports.
    ///
    /// # Errors
    /// The first failed delivery ([`KafkaSinkError::Delivery`]) or enqueue; the batch should be
    /// retried as a whole (records already delivered are then published again). The producer is
    /// replaced before returning the error.
    pub async fn publish(&self, batch: &Batch) -> Result<(), KafkaSinkError> {
        let (mut generation, mut producer) = self.current_producer();
        if let Some((code, reason)) = producer.client().fatal_error() {
            tracing::warn!(?code, %reason, "kafka producer hit a fatal error; replacing it");
            self.replace_producer(generation)?;
            (generation, producer) = self.current_producer();
        }
        let mut window = Window {
            producer: &producer,
            topic: &self.cfg.topic,
            max: self.cfg.max_in_flight,
            in_flight: FuturesUnordered::new(),
            delivered: 0,
        };
        let result = async {
            for txn in &batch.txns {
                let mut record = BusRecord {
                    key: None,
                    patterns: Vec::new(),
                    commit_lsn: txn.commit_lsn,
                    commit_time_us: txn.commit_time_us,
                    xid: u64::from(txn.xid),
                    table: String::new(),
                    op: cacheclear_protocol::Op::Insert,
                };
                let mut start = 0;
                for run in txn.keys.runs() {
                    record.table.clear();
                    record.table.push_str(&run.table);
                    record.op = run.op;
                    for i in start..run.end {
                        let key = txn.keys.get(i);
                        record.key = Some(key.to_owned());
                        window.send(key.as_bytes(), &record.to_json()).await?;
                    }
                    start = run.end;
                }
                for table in &txn.tables {
                    let record = BusRecord {
                        key: None,
                        patterns: table.patterns.clone(),
                        commit_lsn: txn.commit_lsn,
                        commit_time_us: txn.commit_time_us,
                        xid: u64::from(txn.xid),
                        table: table.table.to_string(),
                        op: table.op,
                    };
                    window
                        .send(table.table.as_bytes(), &record.to_json())
                        .await?;
                }
            }
            window.drain().await
        }
        .await;
        metrics::counter!(crate::telemetry::RECORDS_DELIVERED).increment(window.delivered);
        if result.is_err() {
            // The batch will be sent again in full, so nothing the old producer still holds is
            // needed — and its state may be what failed: a broker that lost our producer id
            // (restarted, or expired it) answers UNKNOWN_PRODUCER_ID to every retry of an
            // idempotent producer, forever. A fresh producer gets a new id and new connections.
            if let Err(e) = self.replace_producer(generation) {
                tracing::warn!(error = %e, "could not replace the kafka producer; keeping it");
            }
        }
        drop(window);
        // If the producer was replaced meanwhile (by this batch or another), this clone may be
        // the last one: dropping it purges the queue and may block, so not on an async thread.
        if self.current_generation() != generation {
            drop_off_async_threads(producer);
        }
        result
    }

    /// The producer in use and its generation (a cheap clone: `FutureProducer` is shared).
    fn current_producer(&self) -> (u64, FutureProducer) {
        let guard = self
            .producer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (guard.0, guard.1.clone())
    }

    /// The current producer's generation (no clone of the producer).
    fn current_generation(&self) -> u64 {
        self.producer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
    }

    /// Swaps in a new producer unless `failed` (a generation) was already replaced by another
    /// batch; the old one is dropped off the async threads (dropping purges its queue and may
    /// block up to ~0.5 s).
    fn replace_producer(&self, failed: u64) -> Result<(), KafkaSinkError> {
        if self.current_generation() != failed {
            return Ok(());
        }
        let fresh = create_producer(&self.cfg)?;
        let mut guard = self
            .producer
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = if guard.0 == failed {
            std::mem::replace(&mut *guard, (failed + 1, fresh)).1
        } else {
            fresh // another batch replaced it meanwhile
        };
        drop(guard);
        drop_off_async_threads(old);
        Ok(())
    }
}

/// Drops a producer on the blocking pool when inside a tokio runtime (dropping the last clone
/// purges its queue and may block up to ~0.5 s).
fn drop_off_async_threads(producer: FutureProducer) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn_blocking(move || drop(producer));
        }
        Err(_) => drop(producer),
    }
}

impl Sink for KafkaSink {
    fn name(&self) -> &'static str {
        "kafka"
    }

    async fn apply(&self, batch: &Batch) -> Result<(), SinkError> {
        self.publish(batch).await.map_err(SinkError::from)
    }
}

fn create_producer(cfg: &KafkaConfig) -> Result<FutureProducer, KafkaSinkError> {
    let mut client = ClientConfig::new();
    for (k, v) in cfg.producer_properties() {
        client.set(k, v);
    }
    client.create().map_err(KafkaSinkError::Create)
}

/// The records of one `publish` awaiting their delivery reports.
struct Window<'a> {
    producer: &'a FutureProducer,
    topic: &'a str,
    max: usize,
    in_flight: FuturesUnordered<DeliveryFuture>,
    delivered: u64,
}

impl Window<'_> {
    /// Queues one record, first waiting for reports while the window is full (or librdkafka's
    /// own queue is).
    async fn send(&mut self, key: &[u8], payload: &[u8]) -> Result<(), KafkaSinkError> {
        while self.in_flight.len() >= self.max {
            self.next().await?;
        }
        loop {
            let record = FutureRecord::to(self.topic).key(key).payload(payload);
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    self.in_flight.push(delivery);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if self.in_flight.is_empty() {
                        // Records of an earlier, failed attempt still fill librdkafka's queue.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    } else {
                        self.next().await?;
                    }
                }
                Err((reason, _)) => {
                    return Err(KafkaSinkError::Enqueue {
                        topic: self.topic.to_string(),
                        reason,
                    });
                }
            }
        }
    }

    /// Waits for one delivery report.
    async fn next(&mut self) -> Result<(), KafkaSinkError> {
        match self.in_flight.next().await {
            None => Ok(()),
            Some(Ok(Ok(_delivery))) => {
                self.delivered += 1;
                Ok(())
            }
            Some(Ok(Err((reason, message)))) => {
                let partition = message.partition();
                Err(KafkaSinkError::Delivery {
                    topic: message.topic().to_string(),
                    partition: if partition < 0 {
                        "unassigned".into()
                    } else {
                        partition.to_string()
                    },
                    key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
                    hint: hint(&reason),
                    reason,
                })
            }
            Some(Err(_canceled)) => Err(KafkaSinkError::Canceled {
                topic: self.topic.to_string(),
            }),
        }
    }

    /// Waits for every outstanding report.
    async fn drain(&mut self) -> Result<(), KafkaSinkError> {
        while !self.in_flight.is_empty() {
            self.next().await?;
        }
        Ok(())
    }
}

fn hint(reason: &KafkaError) -> &'static str {
    match reason.rdkafka_error_code() {
        Some(RDKafkaErrorCode::UnknownTopic | RDKafkaErrorCode::UnknownTopicOrPartition) => {
            "; the topic does not exist: create it (kafka.topic), the sink does not"
        }
        Some(RDKafkaErrorCode::MessageTimedOut) => {
            "; no broker acknowledged it within kafka.message_timeout_ms: check that kafka.brokers \
             are reachable"
        }
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed,
        ) => "; the producer lacks WRITE (and IDEMPOTENT_WRITE) permission on the topic",
        _ => "",
    }
}
