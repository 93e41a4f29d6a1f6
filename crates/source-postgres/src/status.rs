//! What a running source shows other tasks: [`SourceStatus`] (live figures) and the optional
//! hooks of [`RunOptions`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cacheclear_protocol::{Batch, Lsn};

/// Live figures of a running source, readable from other tasks (the bench, the demo, tests).
/// Every figure only grows while the process runs; a restarted [`crate::Pipeline`] sharing the
/// same `Arc` keeps counting.
#[derive(Debug, Default)]
pub struct SourceStatus {
    confirmed_lsn: AtomicU64,
    applied_keys: AtomicU64,
    applied_txns: AtomicU64,
}

impl SourceStatus {
    /// The highest LSN handed to the server as flushed (commit end LSN or idle keepalive WAL end).
    pub fn confirmed_lsn(&self) -> Lsn {
        Lsn(self.confirmed_lsn.load(Ordering::Acquire))
    }
    /// Cache keys whose eviction the sink acknowledged (table-wide evictions count 0).
    pub fn applied_keys(&self) -> u64 {
        self.applied_keys.load(Ordering::Acquire)
    }
    /// Transactions whose evictions the sink acknowledged (a transaction handed over in
    /// [`cacheclear_protocol::CommittedTxn::partial`] parts counts once, with its last part).
    pub fn applied_txns(&self) -> u64 {
        self.applied_txns.load(Ordering::Acquire)
    }

    /// Raises the confirmed LSN to `at`; true when it moved (`at` is above every earlier one).
    pub(crate) fn raise_confirmed(&self, at: Lsn) -> bool {
        self.confirmed_lsn.fetch_max(at.0, Ordering::AcqRel) < at.0
    }

    /// Counts an acknowledged batch of `txns` transactions and `keys` keys.
    pub(crate) fn add_applied(&self, txns: u64, keys: u64) {
        self.applied_keys.fetch_add(keys, Ordering::AcqRel);
        self.applied_txns.fetch_add(txns, Ordering::AcqRel);
    }
}

/// Called after each batch the sink acknowledged, with the batch, on the apply stage's task (keep
/// it short; the bench measures lag here). A panic in it stops the source. A large transaction
/// arrives in several batches: its [`cacheclear_protocol::CommittedTxn::partial`] parts, then its
/// last part (same `xid`).
pub type BatchObserver = Arc<dyn Fn(&Batch) + Send + Sync>;

/// Optional hooks of a [`crate::Pipeline`].
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Shared live figures.
    pub status: Arc<SourceStatus>,
    /// Called after each acknowledged batch.
    pub observer: Option<BatchObserver>,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("status", &self.status)
            .field("observer", &self.observer.as_ref().map(|_| "Fn(&Batch)"))
            .finish()
    }
}
