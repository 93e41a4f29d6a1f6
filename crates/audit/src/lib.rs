//! `cacheclear audit`: measures, on a live deployment, what share of cached values are
//! consistent with PostgreSQL — the question lag metrics do not answer (Meta's Polaris, Uber's
//! Cache Inspector).
//!
//! # Follow mode ([`follow`])
//!
//! A tap of the WAL: a pipeline of its own (`cacheclear_source_postgres::Pipeline`) on a second
//! slot, `<postgres.slot>_audit`, over the deployment's publication, with the deployment's rules,
//! whose sink records invalidations instead of applying them. A sample of the cache keys each
//! committed change invalidates (`--sample-rate`) is checked at 1 s, 5 s and 60 s after the tap
//! saw the commit (after its visibility barrier, as the deployment's pipeline sees it): `GET {K}`.
//! A value still cached for that key whose *read position* is before the change's commit LSN is
//! **inconsistent**: it was read before the change and survived its invalidation by that long.
//! An absent value, or one read at or after the commit, is consistent.
//!
//! The read position of a value is the envelope's `version` (the replica's replay LSN before a
//! replica read) when set, else its `read_after` (the key's fence when the filling process took
//! the lease: an invalidation after that would have deleted the lease and refused the fill).
//! Values written by a client without `read_after` are **unverifiable** and counted apart.
//!
//! # Scan mode ([`scan`])
//!
//! `SCAN`s for value keys (`{K}`), takes N, and compares each one's read position with its
//! key's fence `{K}:fence`: a fence above the read position means the key was invalidated after
//! the read, and the value should not be there.
//!
//! # Figures
//!
//! Per window, checked and inconsistent counts and the *nines*,
//! `-log10(inconsistent / checked)` — 99.9 % consistent is 3 nines. With nothing inconsistent
//! the figure is capped at `log10(checked)` ("at least", `nines_capped`), the most a sample of
//! that size can show. See [`AuditReport`].
//!
//! The tap costs one replication connection and a slot while it runs; the slot is dropped at
//! the end (after a kill -9, drop it by hand: `SELECT pg_drop_replication_slot('<slot>_audit')`).

#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod follow;
mod position;
mod probe;
mod report;
mod scan;

pub use follow::{FollowOptions, follow};
pub use position::{ReadPosition, read_position};
pub use probe::Probe;
pub use report::{AuditReport, Example, WindowFigures, nines};
pub use scan::scan;

/// Why an audit could not run (not: what it found).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A setting is unusable; the message names it.
    #[error("{0}")]
    Config(String),
    /// A Redis command failed.
    #[error("Redis ({what}): {source}")]
    Redis {
        /// The step: `GET`, `SCAN`, `connect`.
        what: &'static str,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
    /// The WAL tap stopped.
    #[error("the WAL tap (slot `{slot}`) stopped: {source}")]
    Tap {
        /// The audit's slot.
        slot: String,
        /// Why.
        #[source]
        source: cacheclear_source_postgres::SourceError,
    },
    /// A query on PostgreSQL failed (dropping the audit's slot).
    #[error("PostgreSQL: {0}")]
    Postgres(String),
}
