//! cacheclear's invalidator: a Kafka consumer group that applies invalidation records to Redis or
//! Redis Cluster through [`cacheclear_sink_redis::RedisSink`] (the protocol's invalidation script:
//! delete value and lease, fence = max(fence, LSN)), committing offsets only after Redis
//! acknowledged them (docs/architecture.md, "Bus mode" and "The delivery rule").
//!
//! Inputs, per topic (see [`KafkaConfig`]):
//! - **bus records** ([`cacheclear_protocol::BusRecord`]) published by cacheclear's Kafka sink:
//!   one per cache key, or one per table-wide eviction;
//! - **Debezium PostgreSQL change events** (JSON), mapped to keys through the same `[[rules]]` as
//!   the pipeline, so existing Debezium deployments can adopt the invalidator alone. The mapping
//!   is documented on [`Decoder`] and in the table below.
//!
//! # Delivery
//! - Offsets are committed manually (`enable.auto.commit=false`). Per partition the committed
//!   offset is the highest contiguous offset whose record was acknowledged by Redis (or, for a
//!   malformed record, by the dead-letter topic, or refused by it permanently), plus one
//!   ([`OffsetTracker`]). A crash replays from there; replays are harmless (the script is
//!   idempotent and fences only move forward).
//! - Batching: the first record plus whatever librdkafka has already fetched (up to
//!   `batch_max_records`, at most `batch_max_wait_ms` of collecting; no waiting when nothing more
//!   is ready) are applied together (keys de-duplicated, highest LSN kept), then their offsets
//!   are committed.
//! - Rebalances: a custom [`rdkafka::consumer::ConsumerContext`] records assignments and
//!   revocations with a generation per partition ([`Ownership`]). Work received under an
//!   assignment that was revoked meanwhile is dropped, never committed: the new owner reads it
//!   again from the last commit.
//! - Redis down: the batch is retried with backoff (100 ms doubling to 5 s) until acknowledged;
//!   nothing is committed meanwhile. Past `max.poll.interval.ms` (librdkafka default 5 min) the
//!   member leaves the group and its partitions go elsewhere; a commit it then attempts covers
//!   only records it applied itself, so it can move an offset back (duplicates), never past an
//!   unapplied record.
//! - Fan-out: each consumer group receives every record, so one group per Redis deployment (one
//!   per region) keeps all of them invalidated; scale a group by starting more processes.
//!
//! # Malformed records
//! A record that is not a valid bus record / Debezium event is logged with its topic, partition
//! and offset and produced to `dead_letter_topic` with the original key and value and headers
//! `cacheclear.dlq.reason` (why, cut to [`MAX_REASON_BYTES`]), `cacheclear.dlq.topic`,
//! `cacheclear.dlq.partition`, `cacheclear.dlq.offset`, from a task of its own (`acks=all`).
//! - Its offset is committed only after the dead-letter topic acknowledged it; meanwhile the
//!   loop keeps applying and committing every other partition, and applies (without committing
//!   past it) the later records of its own partition, which is paused past 100,000 held records.
//! - Refused for its size: a bounded copy is produced instead (the first
//!   [`BOUNDED_COPY_VALUE_BYTES`] of the value and [`BOUNDED_COPY_KEY_BYTES`] of the key, headers
//!   `cacheclear.dlq.truncated`, `.truncated_because`, `.original_size`, `.sha256`,
//!   `.original_key_size`, `.key_sha256`).
//! - Refused permanently (the bounded copy too, invalid record, authorization, unknown topic or
//!   partition, invalid topic, policy violation): logged at ERROR with its coordinates, size and
//!   SHA-256, counted ([`InvalidatorStatus::records_dead_letter_refused`]) and committed. Never
//!   retried, so one record can never stall invalidation.
//! - Transient failures (broker down, timeouts) are retried with backoff (100 ms doubling to 5 s).
//!
//! At start [`run`] checks the topic with [`check_dead_letter_topic`] and returns
//! [`InvalidatorError::DeadLetterTopic`] (with the fix) when it is missing or not accessible.
//!
//! # Debezium mapping
//! Reference: Debezium connector for PostgreSQL, "Data change events"
//! (<https://debezium.io/documentation/reference/stable/connectors/postgresql.html#postgresql-events>).
//! Fence = `source.lsn`, commit time = `source.ts_ms`, table = `source.schema`.`source.table`.
//!
//! | `op` | evicts |
//! |---|---|
//! | `c` create | keys of `after` |
//! | `u` update | keys of `before` and `after`; without `before` (REPLICA IDENTITY DEFAULT) only `after` when every template column is in the message key, else table-wide |
//! | `d` delete | keys of `before`; table-wide without `before` |
//! | `r` snapshot read | keys of `after` (`debezium.evict_on_snapshot`, default true), else nothing |
//! | `t` truncate | table-wide: every key matching the table's [`cacheclear_rules::TableRules::scan_patterns`] |
//! | `m` message | nothing (acknowledged) |
//! | tombstone (null value) | nothing (acknowledged) |
//! | table without a rule | nothing (acknowledged) |
//! | anything else | dead-letter topic |
//!
//! A primary-key change arrives as a `d` (old key) and a `c` (new key) event: both keys are
//! evicted. A column holding the unavailable-value placeholder (unchanged TOAST) is never a key
//! value: the old image's value is used when it has one, else the table is evicted whole.
//!
//! Values are rendered the way PostgreSQL prints them (pgoutput's text, so keys equal those of
//! cacheclear's own source): every Debezium encoding of integers, booleans (`t`/`f`), text,
//! uuid, json, enums, numeric (`decimal.handling.mode` precise / double / string), real and
//! double precision (shortest round-trip), date, time, timestamp, timestamptz, timetz
//! (`time.precision.mode` adaptive / adaptive_time_microseconds / connect) and bytea
//! (`binary.handling.mode`), under the `DateStyle` and `TimeZone` set in [`DebeziumConfig`].
//! Encodings come from the event's schema, or, without one, from the column types declared in
//! the rule ([`InvalidatorRule::types`]) or read from `[postgres]` ([`PostgresConfig`]); when a
//! needed type is unknown the invalidator refuses to start ([`InvalidatorConfig::validate`],
//! [`Decoder::for_config`]). A value whose JSON type does not fit its column is dead-lettered;
//! only keys that truly cannot be computed evict the table (counted in
//! `cacheclear_invalidator_table_fallbacks_total{reason}`). README, "Debezium key values", has
//! the table of types.
//!
//! Debezium's `source.lsn` is the LSN of the change,
//! not of the end of its commit record: fences are exact against primary readers (the lease
//! protects them) but a read-replica reader whose version falls between a change and its commit
//! can still refill an old value; use the bus (cacheclear's own source) where replica readers
//! pass versions.
//!
//! # Example
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use cacheclear_invalidator::{InvalidatorConfig, KafkaConfig, RunOptions, run};
//! use cacheclear_sink_redis::RedisConfig;
//! let cfg = InvalidatorConfig::new(
//!     KafkaConfig::new("127.0.0.1:9092", "eu", vec!["cacheclear".into()], "cacheclear.dlq"),
//!     RedisConfig::new("redis://127.0.0.1:6379/"),
//! );
//! let rules = Arc::new(cfg.validate()?);
//! run(&cfg, rules, RunOptions::default(), async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]
// Without `kafka` (the fuzz targets' build) the consume loop and what only it uses are left out.
#![cfg_attr(not(feature = "kafka"), allow(dead_code))]

mod config;
mod decode;
#[cfg(feature = "kafka")]
mod dlq;
mod offsets;
mod pgtext;
#[cfg(feature = "kafka")]
mod run;
mod telemetry;
mod types;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cacheclear_protocol::ConfigError;
use cacheclear_rules::{RuleConfig, Rules};
use cacheclear_sink_redis::RedisConfig;

pub use config::{
    BeforeImages, BinaryHandlingMode, DebeziumConfig, DecimalHandlingMode, KafkaConfig,
    TimePrecisionMode,
};
pub use decode::{Decoded, Decoder, Evictions, Format, Malformed};
#[cfg(feature = "kafka")]
pub use dlq::{
    BOUNDED_COPY_KEY_BYTES, BOUNDED_COPY_VALUE_BYTES, DeadLetterCheckError, DeadLetterTopic,
    MAX_REASON_BYTES, check_dead_letter_topic, producer_config as dead_letter_producer_config,
};
pub use offsets::{OffsetTracker, Ownership, Tp};
#[cfg(feature = "kafka")]
pub use run::{InvalidatorError, consumer_config, run};
pub use telemetry::{describe_metrics, register_metrics};
pub use types::{InvalidatorRule, PostgresConfig};

/// The invalidator's configuration (`invalidator.toml` without the CLI's `[metrics]`).
///
/// In code, build it with [`InvalidatorConfig::new`] and the `with_*` methods, or assign the
/// public fields of a `mut` value. Struct literals are not available outside this crate
/// (`#[non_exhaustive]`: sections may be added in minor releases).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct InvalidatorConfig {
    /// `[kafka]`: group, topics, dead-letter topic, batching.
    pub kafka: KafkaConfig,
    /// `[redis]`: the Redis (or Redis Cluster) to invalidate; see [`RedisConfig`].
    pub redis: RedisConfig,
    /// `[debezium]`: how Debezium events are read (defaults suit REPLICA IDENTITY FULL tables).
    #[serde(default)]
    pub debezium: DebeziumConfig,
    /// `[postgres]` (optional): the database Debezium reads, from which the rule tables' column
    /// types and replica identities are read at start (see [`PostgresConfig`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresConfig>,
    /// `[[rules]]`: table → key templates (and optional column types), needed for Debezium
    /// topics (bus records carry keys).
    #[serde(default)]
    pub rules: Vec<InvalidatorRule>,
}

impl InvalidatorConfig {
    /// These `[kafka]` and `[redis]` sections, with the default `[debezium]` section
    /// ([`DebeziumConfig::default`]) and no `[[rules]]`.
    pub fn new(kafka: KafkaConfig, redis: RedisConfig) -> InvalidatorConfig {
        InvalidatorConfig {
            kafka,
            redis,
            debezium: DebeziumConfig::default(),
            postgres: None,
            rules: Vec::new(),
        }
    }

    /// Sets [`InvalidatorConfig::debezium`]. Default [`DebeziumConfig::default`].
    #[must_use]
    pub fn with_debezium(mut self, debezium: DebeziumConfig) -> Self {
        self.debezium = debezium;
        self
    }

    /// Sets [`InvalidatorConfig::rules`] (replacing the list): [`InvalidatorRule`]s, or the
    /// pipeline's [`RuleConfig`]s (no declared types). Default empty; Debezium topics need at
    /// least one rule.
    #[must_use]
    pub fn with_rules<R: Into<InvalidatorRule>>(
        mut self,
        rules: impl IntoIterator<Item = R>,
    ) -> Self {
        self.rules = rules.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`InvalidatorConfig::postgres`]: read the rule tables' column types from this
    /// database at start. Default none.
    #[must_use]
    pub fn with_postgres(mut self, postgres: PostgresConfig) -> Self {
        self.postgres = Some(postgres);
        self
    }

    /// Validates every section and compiles the rules. Without `[postgres]`, also checks that
    /// every template column whose type is needed (see [`DebeziumConfig::schemas_enable`]) is
    /// declared; with it, that check runs when [`run`] starts, after reading the catalog.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the field and the reason (`kafka.group_id: empty`, `rules: …`,
    /// `rules[0]: table public.sale, key template `sale:{sku}:{day}`, column `day`: its
    /// PostgreSQL type is unknown …`).
    pub fn validate(&self) -> Result<Rules, ConfigError> {
        self.kafka.validate()?;
        self.redis.validate()?;
        self.debezium.style()?;
        if !self.kafka.debezium_topics.is_empty() && self.rules.is_empty() {
            return Err(ConfigError::new(
                "rules",
                "Debezium topics need at least one [[rules]] entry (a table and its key templates)",
            ));
        }
        if self
            .postgres
            .as_ref()
            .is_some_and(|pg| pg.url.trim().is_empty())
        {
            return Err(ConfigError::new(
                "postgres.url",
                "empty (omit [postgres] instead)",
            ));
        }
        let configs: Vec<RuleConfig> = self
            .rules
            .iter()
            .map(InvalidatorRule::rule_config)
            .collect();
        let rules =
            Rules::compile(&configs).map_err(|e| ConfigError::new("rules", e.to_string()))?;
        if self.postgres.is_none() && !self.kafka.debezium_topics.is_empty() {
            types::resolve(&self.rules, &rules, &self.debezium, None)?;
        }
        Ok(rules)
    }
}

/// Live counters of a running invalidator (shared; read them from any thread).
#[derive(Debug, Default)]
pub struct InvalidatorStatus {
    records_applied: AtomicU64,
    records_skipped: AtomicU64,
    records_dead_lettered: AtomicU64,
    records_dead_letter_refused: AtomicU64,
    dead_letter_bounded_copies: AtomicU64,
    records_dropped: AtomicU64,
    keys_evicted: AtomicU64,
    batches: AtomicU64,
    commits: AtomicU64,
    assigned: AtomicU64,
}

impl InvalidatorStatus {
    /// Records whose evictions Redis acknowledged.
    pub fn records_applied(&self) -> u64 {
        self.records_applied.load(Ordering::Acquire)
    }
    /// Records acknowledged with nothing to evict (tombstones, tables without rules, messages).
    pub fn records_skipped(&self) -> u64 {
        self.records_skipped.load(Ordering::Acquire)
    }
    /// Malformed records the dead-letter topic acknowledged (as they were, or as a bounded copy).
    pub fn records_dead_lettered(&self) -> u64 {
        self.records_dead_lettered.load(Ordering::Acquire)
    }
    /// Of [`InvalidatorStatus::records_dead_lettered`], those dead-lettered as a bounded copy
    /// (the full record was refused for its size).
    pub fn dead_letter_bounded_copies(&self) -> u64 {
        self.dead_letter_bounded_copies.load(Ordering::Acquire)
    }
    /// Malformed records the dead-letter topic refused permanently, even as a bounded copy:
    /// logged with their coordinates and skipped (their offsets committed).
    pub fn records_dead_letter_refused(&self) -> u64 {
        self.records_dead_letter_refused.load(Ordering::Acquire)
    }
    /// Records dropped uncommitted because their partition was revoked.
    pub fn records_dropped(&self) -> u64 {
        self.records_dropped.load(Ordering::Acquire)
    }
    /// Cache keys sent to Redis (after de-duplication within a batch) plus keys found by
    /// table-wide evictions.
    pub fn keys_evicted(&self) -> u64 {
        self.keys_evicted.load(Ordering::Acquire)
    }
    /// Batches applied.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Acquire)
    }
    /// Offset commits issued (at most one per `kafka.commit_interval_ms`, when something moved).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Acquire)
    }
    /// Partitions assigned to this member now.
    pub fn assigned_partitions(&self) -> u64 {
        self.assigned.load(Ordering::Acquire)
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::AcqRel);
    }
}

/// One batch Redis acknowledged, as passed to a [`BatchObserver`].
#[derive(Debug)]
pub struct AppliedBatch<'a> {
    /// Commit time (µs since the Unix epoch) of every applied record of the batch, in receive
    /// order (bus `commit_time_us`, Debezium `source.ts_ms` × 1000).
    pub commit_times_us: &'a [i64],
    /// Kafka timestamp (ms since the Unix epoch; the producer's send time under the default
    /// `CreateTime`) of the same records, in the same order; `None` when the record has none.
    pub kafka_times_ms: &'a [Option<i64>],
    /// When Redis acknowledged the batch, µs since the Unix epoch.
    pub applied_at_us: i64,
    /// Distinct cache keys sent.
    pub keys: usize,
}

/// Called after each batch Redis acknowledged, before its offsets are committed (the benchmark
/// measures commit → Redis-ack lag here). Must be quick.
pub type BatchObserver = Arc<dyn Fn(&AppliedBatch<'_>) + Send + Sync>;

/// Optional hooks of [`run`].
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Shared live counters.
    pub status: Arc<InvalidatorStatus>,
    /// Called after each acknowledged batch.
    pub observer: Option<BatchObserver>,
}

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}
