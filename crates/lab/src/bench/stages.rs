//! The CDC source's commit→acknowledged lag, split into its stages, as both benchmarks record it
//! from the source's batch observer.

use cacheclear_protocol::{Batch, CommittedTxn};
use hdrhistogram::Histogram;

/// Histograms (µs) of one steady-rate phase, weighted by rows changed.
pub(crate) struct SourceStages {
    /// Commit → the sink acknowledged.
    total: Histogram<u64>,
    /// Commit → the source received the Commit message (PostgreSQL's walsender part).
    server: Histogram<u64>,
    /// Received → the sink side took the batch (the decoder's queue, waiting for the previous
    /// barrier).
    queue: Histogram<u64>,
    /// Taken → the visibility barrier passed.
    barrier: Histogram<u64>,
    /// Barrier passed → the sink acknowledged (includes waiting behind the previous apply).
    sink: Histogram<u64>,
}

/// Figures of one phase, ms.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct StageFigures {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub server_p99: f64,
    pub queue_p99: f64,
    pub barrier_p99: f64,
    pub sink_p99: f64,
}

impl SourceStages {
    /// Empty histograms covering 1 µs to 1 h at 3 significant digits.
    pub(super) fn new() -> anyhow::Result<SourceStages> {
        let h = || Histogram::new_with_bounds(1, 3_600_000_000, 3);
        Ok(SourceStages {
            total: h()?,
            server: h()?,
            queue: h()?,
            barrier: h()?,
            sink: h()?,
        })
    }

    /// Forgets everything recorded.
    pub(super) fn reset(&mut self) {
        for h in [
            &mut self.total,
            &mut self.server,
            &mut self.queue,
            &mut self.barrier,
            &mut self.sink,
        ] {
            h.reset();
        }
    }

    /// Records transaction `t` of `batch`, acknowledged at `acked_us` (µs since the Unix epoch),
    /// once per changed row: every row has exactly one `bench:product:` key (category keys are
    /// de-duplicated per transaction).
    pub(super) fn record(&mut self, batch: &Batch, t: &CommittedTxn, acked_us: i64) {
        let rows = t
            .keys
            .iter()
            .filter(|k| k.starts_with("bench:product:"))
            .count() as u64;
        let n = rows.max(1);
        let span = |from: i64, to: i64| (to - from).max(1) as u64;
        // Out-of-range values are impossible with these bounds; a failed record only skips one.
        let _ = self.total.record_n(span(t.commit_time_us, acked_us), n);
        let _ = self
            .server
            .record_n(span(t.commit_time_us, t.received_us), n);
        let _ = self.queue.record_n(span(t.received_us, batch.taken_us), n);
        let _ = self
            .barrier
            .record_n(span(batch.taken_us, batch.visible_us), n);
        let _ = self.sink.record_n(span(batch.visible_us, acked_us), n);
    }

    /// p50/p99/max of the total and the p99 of each stage, ms.
    pub(super) fn figures(&self) -> StageFigures {
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        StageFigures {
            p50: ms(&self.total, 0.5),
            p99: ms(&self.total, 0.99),
            max: self.total.max() as f64 / 1000.0,
            server_p99: ms(&self.server, 0.99),
            queue_p99: ms(&self.queue, 0.99),
            barrier_p99: ms(&self.barrier, 0.99),
            sink_p99: ms(&self.sink, 0.99),
        }
    }
}
