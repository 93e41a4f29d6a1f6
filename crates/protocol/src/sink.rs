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

use crate::Batch;

/// Any error a sink reports; the source logs it and retries the batch.
pub type SinkError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Applies batches of committed evictions. See the module docs for the contract.
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
}
