//! The end-to-end watermark (docs/architecture.md, "Watermark and epoch").
//!
//! Every `watermark_interval_ms` the heartbeat task commits
//! `pg_logical_emit_message(true, 'cacheclear.watermark', '')` and remembers its LSN with the
//! instant it was emitted (this process's monotonic clock). The message's transaction travels
//! like any other: through the WAL, the slot, the walsender, the barrier and the sink. Once the
//! apply stage acknowledges a commit at or past a heartbeat's LSN, every commit before that
//! heartbeat has been applied, so the end-to-end lag is at most the time since its emission. The
//! publisher writes `{LSN, commit time, lag, epoch}` through [`Sink::publish_watermark`]; Redis
//! stamps it with its own `TIME`. A stuck walsender, a lost slot, a failing sink or a dead
//! process all stop the watermark from being renewed, and the readers' age of it grows.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cacheclear_protocol::{EpochChanged, Lsn, Sink, Watermark};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{SourceError, telemetry};

/// Heartbeats emitted and not yet seen acknowledged: `(message LSN, emitted at)`, oldest first,
/// and a wake-up for the publisher when one is added.
#[derive(Debug, Default)]
pub(crate) struct Heartbeats {
    queue: Mutex<VecDeque<(Lsn, Instant)>>,
    /// Notified after every push: the heartbeat's commit may have streamed and been acknowledged
    /// before `pg_logical_emit_message` returned its LSN to us, and the publisher must not wait
    /// for the next acknowledgement (a whole `watermark_interval_ms`) to count it.
    pushed: tokio::sync::Notify,
}

impl Heartbeats {
    fn push(&self, lsn: Lsn, at: Instant) {
        {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            // Bounded: a pipeline stuck for hours keeps at most the newest 10,000.
            if q.len() >= 10_000 {
                q.pop_front();
            }
            q.push_back((lsn, at));
        }
        self.pushed.notify_one();
    }

    /// Removes every heartbeat at or before `acked`; returns the newest one's emission instant.
    fn take_through(&self, acked: Lsn) -> Option<Instant> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let mut newest = None;
        while q.front().is_some_and(|(lsn, _)| *lsn <= acked) {
            newest = q.pop_front().map(|(_, at)| at);
        }
        newest
    }
}

/// Emits a heartbeat every `every` until aborted. Failures are logged and retried next tick.
pub(crate) async fn emit(pool: deadpool_postgres::Pool, every: Duration, beats: Arc<Heartbeats>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(client) = pool.get().await else {
            continue;
        };
        let at = Instant::now();
        match client
            .query_one(
                "SELECT pg_logical_emit_message(true, 'cacheclear.watermark', '')::text",
                &[],
            )
            .await
            .and_then(|row| row.try_get::<_, String>(0))
        {
            Ok(lsn) => match lsn.parse::<Lsn>() {
                Ok(lsn) => beats.push(lsn, at),
                Err(e) => {
                    tracing::warn!(lsn, error = %e, "watermark heartbeat returned an unparsable LSN")
                }
            },
            Err(e) => tracing::warn!(error = %e, "watermark heartbeat failed"),
        }
    }
}

/// Publishes the watermark of `namespace` under `epoch` whenever the acknowledged position
/// (`acked`: commit end LSN and commit time in µs) moves and a heartbeat has come back. Returns
/// only the error that must stop the pipeline: the namespace's epoch changed. Other sink errors
/// are retried (100 ms doubling to 2 s) with the newest values.
///
/// When Redis lost the epoch (restart without persistence) the publisher opens a new one in
/// place (`epoch_missing`) and goes on: clients bypassed the cache meanwhile (no epoch), so
/// nothing was filled under the lost one.
pub(crate) async fn publish<S: Sink>(
    sink: Arc<S>,
    namespace: String,
    origin: String,
    mut epoch: u64,
    mut acked: watch::Receiver<(Lsn, i64)>,
    beats: Arc<Heartbeats>,
) -> SourceError {
    let mut last_beat: Option<Instant> = None;
    // The acknowledged LSN of the last watermark written.
    let mut published: Option<Lsn> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        tokio::select! {
            changed = acked.changed() => {
                if changed.is_err() {
                    // The apply stage ended; the reader notices it on its own.
                    std::future::pending::<()>().await;
                }
            }
            // A heartbeat registered after its commit was already acknowledged.
            () = beats.pushed.notified() => {}
        }
        loop {
            let (lsn, commit_time_us) = *acked.borrow_and_update();
            let taken = beats.take_through(lsn);
            if taken.is_none() && published == Some(lsn) {
                // Woken by a heartbeat the acknowledgements have not reached yet: the
                // acknowledgement that reaches it publishes.
                break;
            }
            if let Some(at) = taken {
                last_beat = Some(at);
            }
            // Until a heartbeat came back the lag is unknown: publish nothing.
            let Some(beat) = last_beat else { break };
            let watermark = Watermark {
                lsn,
                commit_time_us,
                lag_ms: beat.elapsed().as_millis() as u64,
                written_ms: 0,
                epoch,
            };
            match sink.publish_watermark(&namespace, &watermark).await {
                Ok(()) => {
                    published = Some(lsn);
                    metrics::gauge!(telemetry::WATERMARK_LAG).set(watermark.lag_ms as f64);
                    backoff = Duration::from_millis(100);
                    break;
                }
                Err(e) if e.downcast_ref::<EpochChanged>().is_some_and(|c| c.missing) => {
                    tracing::warn!(%namespace, "the namespace's epoch is gone from Redis (restarted without it?); opening a new one");
                    match sink
                        .open_epoch(&namespace, &origin, Some("epoch_missing"), false)
                        .await
                    {
                        Ok(Some(opened)) => {
                            metrics::counter!(telemetry::EPOCH_BUMPS, "reason" => "epoch_missing")
                                .increment(1);
                            epoch = opened.epoch;
                        }
                        Ok(None) => return SourceError::SinkEpoch(e),
                        Err(e) => {
                            tracing::warn!(error = %e, "opening a new epoch failed; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                    }
                }
                Err(e) if e.downcast_ref::<EpochChanged>().is_some() => {
                    return SourceError::SinkEpoch(e);
                }
                // Refused credentials or a missing permission (an ACL without a command the
                // script runs): no retry can fix it.
                Err(e) if sink.is_fatal(&e) => return SourceError::Sink(e),
                Err(e) => {
                    tracing::warn!(sink = sink.name(), error = %e, retry_in_ms = backoff.as_millis() as u64,
                        "watermark write failed; retrying (clients age it meanwhile)");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_are_taken_through_the_acknowledged_lsn() {
        let beats = Heartbeats::default();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(5);
        beats.push(Lsn(10), t0);
        beats.push(Lsn(20), t1);
        assert_eq!(beats.take_through(Lsn(9)), None);
        assert_eq!(beats.take_through(Lsn(25)), Some(t1));
        assert_eq!(beats.take_through(Lsn(30)), None);
    }
}
