//! The boundary between the CDC source and whatever applies its evictions.
//!
//! The source hands a [`Batch`] to a [`Sink`] and confirms the batch's last commit LSN to
//! PostgreSQL only once `apply` returned `Ok` — the sink's `Ok` is its promise that every eviction
//! in the batch is durable in its target (a Redis reply, a Kafka delivery report). An `Err` is
//! retried with backoff, forever, with the same batch; nothing after it is confirmed meanwhile —
//! unless [`Sink::is_fatal`] says no retry can fix it: then the source stops with that error.
//! Sinks must therefore be idempotent: a batch may be applied more than once (retries, restarts).
//!
//! The source keeps several batches in flight (`postgres.max_batches_in_flight`), so `apply` runs
//! concurrently and batches may land out of order; it still confirms them in commit order. That
//! is safe because every eviction commutes: deleting a value or a lease is idempotent, and a
//! fence only ever moves to `max(fence, commit LSN)` (docs/architecture.md, "The delivery rule").

use std::future::Future;

use crate::{Batch, Watermark};

/// Any error a sink reports; the source logs it and retries the batch.
pub type SinkError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Applies batches of committed evictions. See the module docs for the contract.
///
/// The epoch and watermark methods (docs/architecture.md, "Watermark and epoch") have defaults
/// for a sink without them (Kafka): no epoch, no watermark, and the source falls back to
/// table-wide evictions for a new slot.
pub trait Sink: Send + Sync + 'static {
    /// A short name for logs and metrics labels (`redis`, `kafka`).
    fn name(&self) -> &'static str;

    /// Applies every eviction of `batch`; returns `Ok` only when all are acknowledged. May be
    /// called again before an earlier call finished (see the module docs).
    fn apply(&self, batch: &Batch) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// True when `error` (returned by this sink's `apply`) is one retrying cannot fix — refused
    /// credentials, a certificate that fails verification, a missing permission. The source
    /// then stops with it instead of retrying the batch forever. Default: `false` (retry).
    fn is_fatal(&self, error: &SinkError) -> bool {
        let _ = error;
        false
    }

    /// Called once before the stream starts: opens the epoch of `namespace` for a stream from
    /// `origin` (`system_identifier/timeline`), bumping it for `gap` (a gap the source knows
    /// of) or for a gap the sink's stored state shows (see `OPEN_EPOCH_LUA`).
    /// `continuity`: the slot is shown to have survived an origin change (failover slot).
    /// `Ok(None)`: this sink keeps no epoch.
    fn open_epoch(
        &self,
        namespace: &str,
        origin: &str,
        gap: Option<&str>,
        continuity: bool,
    ) -> impl Future<Output = Result<Option<EpochOpened>, SinkError>> + Send {
        let _ = (namespace, origin, gap, continuity);
        async { Ok(None) }
    }

    /// Publishes `watermark` for `namespace`. An error is retried; a watermark refused because
    /// the namespace's epoch changed is [`EpochChanged`], and the source restarts.
    fn publish_watermark(
        &self,
        namespace: &str,
        watermark: &Watermark,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        let _ = (namespace, watermark);
        async { Ok(()) }
    }
}

/// What [`Sink::open_epoch`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochOpened {
    /// The namespace's epoch the pipeline now streams under.
    pub epoch: u64,
    /// Why it was bumped (`new_slot`, `slot_lost`, `epoch_missing`, `origin_changed`); `None`
    /// when the epoch was kept.
    pub bumped: Option<String>,
    /// Bus mode: the epoch is opened where the records are applied (the invalidators), so
    /// `epoch` is the id of this source start (`open`) and `bumped` the gap sent with it.
    pub deferred: bool,
}

/// [`Sink::publish_watermark`] refused: the namespace's epoch is no longer the one the
/// pipeline opened.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the epoch of namespace `{namespace}` is no longer {epoch} ({})", if *.missing { "Redis lost it; opening a new one" } else { "another pipeline bumped it; restarting to open a new one" })]
pub struct EpochChanged {
    /// The namespace.
    pub namespace: String,
    /// The epoch the pipeline streamed under.
    pub epoch: u64,
    /// The epoch key is absent (Redis restarted without it): the pipeline bumps in place and
    /// goes on. Otherwise another epoch is stored, and the pipeline stops.
    pub missing: bool,
}
