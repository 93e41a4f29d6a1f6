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

use std::sync::PoisonError;

use cacheclear_protocol::{
    Batch, BusControl, BusRecord, CONTROL_KEY_PREFIX, EpochOpened, Sink, SinkError, Watermark,
};
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
    /// The topic's partition count could not be read (control records go to every partition).
    #[error("kafka: cannot read the partitions of topic `{topic}`: {reason}")]
    Metadata {
        /// The topic.
        topic: String,
        /// librdkafka's error, or what the metadata lacked.
        reason: String,
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
    /// The open the control records belong to (set by [`Sink::open_epoch`]).
    control: std::sync::Mutex<Option<ControlState>>,
}

/// What the control records of the current source start carry, and when the last watermark
/// records went out.
#[derive(Debug, Clone)]
struct ControlState {
    namespace: String,
    open: u64,
    origin: String,
    /// The topic's partition count and when it was read.
    partitions: (u32, std::time::Instant),
    /// When the last watermark records were acknowledged.
    last_watermark: Option<std::time::Instant>,
}

/// Watermark records go out at most this often (each is one record per partition); a call within
/// it waits for the rest of it, and positions acknowledged meanwhile go with the next call.
const WATERMARK_MIN_INTERVAL: Duration = Duration::from_millis(100);
/// The topic's partition count is read again after this long (partitions may be added).
const PARTITIONS_REFRESH: Duration = Duration::from_secs(30);
/// Timeout of the metadata request that reads the partition count.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

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
            control: std::sync::Mutex::new(None),
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
        let (generation, producer) = self.usable_producer()?;
        let mut window = Window::new(&producer, &self.cfg);
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
        drop(window);
        self.settle(generation, producer, result.is_err());
        result
    }

    /// The producer to send with and its generation: the current one, replaced first when
    /// librdkafka reports it fatally failed.
    ///
    /// # Errors
    /// [`KafkaSinkError::Create`] when the replacement cannot be created.
    fn usable_producer(&self) -> Result<(u64, FutureProducer), KafkaSinkError> {
        let (generation, producer) = self.current_producer();
        if let Some((code, reason)) = producer.client().fatal_error() {
            tracing::warn!(?code, %reason, "kafka producer hit a fatal error; replacing it");
            self.replace_producer(generation)?;
            return Ok(self.current_producer());
        }
        Ok((generation, producer))
    }

    /// After a send with `producer` (of `generation`): when it `failed`, replaces the producer —
    /// the records will be sent again in full, so nothing the old producer still holds is
    /// needed, and its state may be what failed: a broker that lost our producer id (restarted,
    /// or expired it) answers UNKNOWN_PRODUCER_ID to every retry of an idempotent producer,
    /// forever; a fresh producer gets a new id and new connections. If the producer was replaced
    /// meanwhile (by this send or another), `producer` may be the last clone: dropping it purges
    /// the queue and may block, so not on an async thread.
    fn settle(&self, generation: u64, producer: FutureProducer, failed: bool) {
        if failed && let Err(e) = self.replace_producer(generation) {
            tracing::warn!(error = %e, "could not replace the kafka producer; keeping it");
        }
        if self.current_generation() != generation {
            drop_off_async_threads(producer);
        }
    }

    /// How many partitions the topic has (a metadata request, off the async threads).
    ///
    /// # Errors
    /// [`KafkaSinkError::Metadata`] when the brokers do not answer or the topic is unknown.
    pub async fn partition_count(&self) -> Result<u32, KafkaSinkError> {
        let (_, producer) = self.current_producer();
        let topic = self.cfg.topic.clone();
        let metadata = move || {
            let md = producer
                .client()
                .fetch_metadata(Some(&topic), METADATA_TIMEOUT)
                .map_err(|e| e.to_string())?;
            let t = md
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .ok_or_else(|| "the broker did not describe it".to_owned())?;
            if let Some(e) = t.error() {
                return Err(format!(
                    "{:?} (create the topic: the sink does not)",
                    RDKafkaErrorCode::from(e)
                ));
            }
            match t.partitions().len() {
                0 => Err("it has no partitions".to_owned()),
                n => Ok(n as u32),
            }
        };
        let topic = self.cfg.topic.clone();
        match tokio::task::spawn_blocking(metadata).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(reason)) => Err(KafkaSinkError::Metadata { topic, reason }),
            Err(e) => Err(KafkaSinkError::Metadata {
                topic,
                reason: e.to_string(),
            }),
        }
    }

    /// Sends `control` to every one of `partitions` partitions (explicit partition numbers, Kafka
    /// key `cacheclear.control:<namespace>`) and waits for every delivery report.
    async fn send_control(
        &self,
        control: &BusControl,
        partitions: u32,
    ) -> Result<(), KafkaSinkError> {
        let (generation, producer) = self.usable_producer()?;
        let key = format!("{CONTROL_KEY_PREFIX}{}", control.namespace());
        let payload = control.to_json();
        let mut window = Window::new(&producer, &self.cfg);
        let result = async {
            for p in 0..partitions {
                window
                    .send_to(key.as_bytes(), &payload, Some(p as i32))
                    .await?;
            }
            window.drain().await
        }
        .await;
        drop(window);
        self.settle(generation, producer, result.is_err());
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

    /// Bus mode has no Redis here: the epoch is opened where the records are applied. Sends a
    /// [`BusControl::Epoch`] record with a new `open` id to every partition and returns once all
    /// are acknowledged, before the stream starts; every invalidator group applies the first
    /// copy it reads (docs/architecture.md, "Watermark and epoch in bus mode").
    /// `EpochOpened::epoch` is that `open` id; `bumped` the gap the source knows of (an origin
    /// change is judged, and counted, by the invalidators).
    async fn open_epoch(
        &self,
        namespace: &str,
        origin: &str,
        gap: Option<&str>,
        continuity: bool,
    ) -> Result<Option<EpochOpened>, SinkError> {
        let open = cacheclear_protocol::now_us().max(1) as u64;
        let partitions = self.partition_count().await?;
        let record = BusControl::Epoch {
            namespace: namespace.to_owned(),
            open,
            origin: origin.to_owned(),
            gap: gap.map(str::to_owned),
            continuity,
        };
        self.send_control(&record, partitions).await?;
        *self.control.lock().unwrap_or_else(PoisonError::into_inner) = Some(ControlState {
            namespace: namespace.to_owned(),
            open,
            origin: origin.to_owned(),
            partitions: (partitions, std::time::Instant::now()),
            last_watermark: None,
        });
        Ok(Some(EpochOpened {
            epoch: open,
            bumped: gap.map(str::to_owned),
            deferred: true,
        }))
    }

    /// Sends a [`BusControl::Watermark`] record to every partition (at most one round every
    /// 100 ms: a call within that waits for the rest of it) and waits for every delivery report.
    /// Nothing is sent before [`Sink::open_epoch`].
    async fn publish_watermark(
        &self,
        namespace: &str,
        watermark: &Watermark,
    ) -> Result<(), SinkError> {
        let Some(mut state) = self
            .control
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return Ok(());
        };
        if state.namespace != namespace {
            return Ok(());
        }
        // At most one round per WATERMARK_MIN_INTERVAL: wait out the rest of it (positions
        // acknowledged meanwhile go with the next call, which the source makes at once).
        if let Some(wait) = state
            .last_watermark
            .and_then(|at| WATERMARK_MIN_INTERVAL.checked_sub(at.elapsed()))
        {
            tokio::time::sleep(wait).await;
        }
        if state.partitions.1.elapsed() >= PARTITIONS_REFRESH {
            state.partitions = (self.partition_count().await?, std::time::Instant::now());
        }
        let record = BusControl::Watermark {
            namespace: namespace.to_owned(),
            open: state.open,
            origin: state.origin.clone(),
            lsn: watermark.lsn,
            commit_time_us: watermark.commit_time_us,
            lag_ms: watermark.lag_ms,
            partitions: state.partitions.0,
        };
        self.send_control(&record, state.partitions.0).await?;
        let mut guard = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(current) = guard.as_mut().filter(|c| c.open == state.open) {
            current.partitions = state.partitions;
            current.last_watermark = Some(std::time::Instant::now());
        }
        Ok(())
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

impl<'a> Window<'a> {
    /// An empty window on `producer`, for `cfg`'s topic and `max_in_flight`.
    fn new(producer: &'a FutureProducer, cfg: &'a KafkaConfig) -> Window<'a> {
        Window {
            producer,
            topic: &cfg.topic,
            max: cfg.max_in_flight,
            in_flight: FuturesUnordered::new(),
            delivered: 0,
        }
    }

    /// Queues one record, first waiting for reports while the window is full (or librdkafka's
    /// own queue is).
    async fn send(&mut self, key: &[u8], payload: &[u8]) -> Result<(), KafkaSinkError> {
        self.send_to(key, payload, None).await
    }

    /// [`Window::send`] to an explicit partition (`None`: by the key's hash).
    async fn send_to(
        &mut self,
        key: &[u8],
        payload: &[u8],
        partition: Option<i32>,
    ) -> Result<(), KafkaSinkError> {
        while self.in_flight.len() >= self.max {
            self.next().await?;
        }
        loop {
            let mut record = FutureRecord::to(self.topic).key(key).payload(payload);
            if let Some(p) = partition {
                record = record.partition(p);
            }
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
