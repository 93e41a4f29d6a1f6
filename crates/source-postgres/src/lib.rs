//! cacheclear's CDC source: streams committed changes from PostgreSQL over logical replication
//! (`pgoutput`), maps rows to cache keys with the rules, and hands committed transactions to a
//! [`Sink`](cacheclear_protocol::Sink) — confirming each commit's LSN to PostgreSQL only after
//! the sink acknowledged every eviction through it.
//!
//! ```text
//!  walsender ──XLogData──► reader: pgoutput::decode ──► ChangeMapper (relation cache, rules)
//!      ▲                                                  │ sealed batches (commit order)
//!      │ standby status (flush LSN)                       ▼
//!      │                                   barrier stage: one snapshot for every queued batch
//!      │                                                  │ visible batches
//!      │                                                  ▼
//!      └── reader confirms ◄── acked LSN (in order) ◄── apply stage: Sink::apply × max_batches_in_flight
//! ```
//!
//! One file per stage, in the order of the data:
//!
//! | file | what |
//! |---|---|
//! | `connect.rs` | the query pool and the replication connection's settings; libpq-style TLS (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`) from `cacheclear-pg-tls` |
//! | `catalog.rs` | start-up: rule tables vs replica identity, the publication, the slot |
//! | `reader.rs` | the replication stream → decoder → mapper → sealed batches; confirms acked LSNs; the graceful drain |
//! | `pgoutput.rs`, `changes.rs` | the `pgoutput` decoder; rows → cache keys (relation cache, fallbacks) |
//! | `barrier.rs` | the visibility barrier stage (`pg_current_snapshot()`) |
//! | `apply.rs` | the apply stage and the in-order acknowledgement |
//! | `housekeeping.rs` | heartbeats and the retained-WAL gauge |
//! | `drift.rs` | the publication watch: rule tables that left the publication, were re-created or lost their replica identity |
//! | `pipeline.rs` | [`Pipeline`], the lifecycle handle |
//! | `error.rs`, `status.rs`, `telemetry.rs` | [`SourceError`]; [`SourceStatus`]; the metrics |
//!
//! Guarantees (docs/architecture.md, "The delivery rule"): nothing is confirmed mid-transaction
//! or before the sink's `Ok`; a restart resumes from the slot and re-applies (sinks are
//! idempotent); no transaction's evictions are applied before its xid is visible to a new
//! snapshot; a transaction of more than `max_batch_keys` keys is handed over in parts while it
//! streams (pgoutput sends it only after its commit, so each part passes the same barrier), its
//! commit confirmed only after its last part; while the sink is down the queue is bounded (about `queue_batches +
//! max_batches_in_flight + 2` batches of up to `max_batch_keys` keys) and the replication stream
//! pauses, its keepalives still answered by the replication worker; when nothing is in flight
//! the keepalive's WAL end is confirmed, and heartbeats keep an idle slot's retained WAL bounded.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use cacheclear_source_postgres::{Pipeline, PostgresConfig, RunOptions};
//! use cacheclear_sink_redis::{RedisConfig, RedisSink};
//!
//! let rules = cacheclear_rules::Rules::compile(&[cacheclear_rules::RuleConfig {
//!     table: "public.product".into(),
//!     keys: vec!["product:{id}".into()],
//! }])?;
//! let sink = RedisSink::connect(RedisConfig::new("redis://127.0.0.1:6379/"))?;
//! let mut pipeline = Pipeline::spawn(
//!     PostgresConfig::new("postgres://postgres@127.0.0.1:5432/shop"),
//!     Arc::new(rules),
//!     sink,
//!     RunOptions::default(),
//! );
//! pipeline.streaming().await?;
//! tokio::signal::ctrl_c().await?;
//! pipeline.stop().await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod apply;
mod barrier;
mod catalog;
mod changes;
mod config;
mod connect;
pub mod doctor;
mod drift;
mod error;
mod housekeeping;
mod pgoutput;
mod pipeline;
mod reader;
mod status;
mod telemetry;
mod watermark;

pub use config::{DriftPolicy, PostgresConfig, SlotLostPolicy};

/// Entry points of the fuzz targets (`fuzz/`, feature `fuzzing`); not a stable API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// Decodes one pgoutput message (the payload of an `XLogData`) as the reader does: `Ok` with
    /// the decoded message's `Debug` text, `Err` with the decoder's error text (message type,
    /// byte offset, problem). Never panics, whatever `payload` holds.
    ///
    /// # Errors
    /// The decoder's error, as text.
    pub fn decode_pgoutput(payload: &[u8]) -> Result<String, String> {
        let buf = bytes::Bytes::copy_from_slice(payload);
        crate::pgoutput::decode(&buf)
            .map(|m| format!("{m:?}"))
            .map_err(|e| e.to_string())
    }
}
pub use error::{Ended, SourceError};

/// The replication connection's settings for `cfg` exactly as the source opens it (host, user,
/// password, TLS from `postgres.url`; `cfg.slot`, `cfg.publication`; start LSN 0: the slot's
/// confirmed position), for tools that read a slot themselves: `cacheclear bench pipeline`'s
/// floor, a consumer that receives and throws away.
///
/// # Errors
/// [`SourceError::Config`] (`postgres.url`) when the URL does not parse or names no user.
pub fn replication_config(
    cfg: &PostgresConfig,
) -> Result<pgwire_replication::ReplicationConfig, SourceError> {
    connect::replication_config(cfg)
}
pub use pipeline::Pipeline;
pub use status::{BatchObserver, RunOptions, SourceStatus};
pub use telemetry::{describe_metrics, register_metrics};
