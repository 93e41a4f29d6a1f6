//! The visibility barrier stage (docs/architecture.md, "The visibility barrier").
//!
//! Logical decoding can hand us a commit before other sessions can see it: with synchronous
//! replication the committing backend flushes its commit record, then waits for the standby, and
//! for that whole wait new snapshots still treat the transaction as in progress. An eviction
//! applied in that window lets a reader refill the old row, and nothing evicts it again.
//!
//! So before a batch is applied, every transaction id in it must be visible to a new snapshot:
//! one `SELECT pg_current_snapshot()` per batch, evaluated here, repeated with backoff while any
//! is still in progress. pgoutput's Begin carries a 32-bit xid; it is widened to the 64-bit xid8
//! with the epoch of the snapshot's `xmax` (a committed xid is always below `xmax`).

use std::str::FromStr;
use std::time::{Duration, Instant};

use cacheclear_protocol::{Batch, now_us};
use tokio::sync::mpsc;

use crate::error::describe_pool;
use crate::telemetry;

/// A parsed `pg_snapshot` (`xmin:xmax:xip_list`), see PostgreSQL 15 docs §9.27 Table 9.79
/// "Snapshot Information Functions".
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    /// Earliest transaction id still active; all below are finished.
    pub xmin: u64,
    /// First as-yet-unassigned transaction id; all at or above are not yet started.
    pub xmax: u64,
    /// Transaction ids in progress at the time (all in `xmin..xmax`).
    pub xip: Vec<u64>,
}

/// Text that is not a `pg_snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a pg_snapshot (expected `xmin:xmax:xip,...`)")]
pub struct SnapshotParseError(pub String);

impl FromStr for Snapshot {
    type Err = SnapshotParseError;
    fn from_str(s: &str) -> Result<Snapshot, SnapshotParseError> {
        let err = || SnapshotParseError(s.to_owned());
        let mut parts = s.trim().splitn(3, ':');
        let xmin = parts.next().and_then(|p| p.parse().ok()).ok_or_else(err)?;
        let xmax = parts.next().and_then(|p| p.parse().ok()).ok_or_else(err)?;
        let xip = match parts.next() {
            None | Some("") => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|x| x.parse().map_err(|_| err()))
                .collect::<Result<_, _>>()?,
        };
        Ok(Snapshot { xmin, xmax, xip })
    }
}

impl Snapshot {
    /// Widens a 32-bit xid (as pgoutput's Begin carries it) to xid8, taking the epoch from
    /// `xmax`; an xid numerically above `xmax`'s low half belongs to the previous epoch.
    pub(crate) fn widen(&self, xid: u32) -> u64 {
        let full = (self.xmax & !0xFFFF_FFFF) | u64::from(xid);
        if full >= self.xmax && full >= 1 << 32 {
            full - (1 << 32)
        } else {
            full
        }
    }

    /// True when a transaction with this xid8 is visible to the snapshot as committed-or-aborted
    /// (i.e. no longer in progress). Same rule as `pg_visible_in_snapshot`.
    pub(crate) fn is_finished(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }
}

/// Waits until every xid in `xids` is finished in a new snapshot. Returns how many snapshots were
/// taken beyond the first (0 when everything was already visible).
///
/// Backoff between snapshots: 0.2 ms doubling to 20 ms. There is no deadline: a commit waiting for
/// a synchronous standby is waited for, however long (that is the point); the wait is logged every
/// 10 s with the xids still in progress.
///
/// # Errors
/// The query's error, or a snapshot that does not parse.
pub(crate) async fn wait_visible(
    client: &tokio_postgres::Client,
    xids: &[u32],
) -> Result<u32, BarrierError> {
    if xids.is_empty() {
        return Ok(0);
    }
    let started = Instant::now();
    let mut last_log = started;
    // A commit usually becomes visible within microseconds of the walsender sending it (the
    // backend leaves the proc array right after its commit record is flushed), so the first
    // re-check comes quickly; long waits (a synchronous standby) settle at 20 ms polls.
    let mut backoff = Duration::from_micros(200);
    let mut retries = 0u32;
    loop {
        // The simple query protocol: one round trip (an unnamed prepared statement takes two).
        let messages = client
            .simple_query("SELECT pg_current_snapshot()::text")
            .await?;
        let text = messages
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0),
                _ => None,
            })
            .ok_or_else(|| SnapshotParseError("(no row)".into()))?;
        let snapshot: Snapshot = text.parse()?;
        let pending: Vec<u32> = xids
            .iter()
            .copied()
            .filter(|&x| !snapshot.is_finished(snapshot.widen(x)))
            .collect();
        if pending.is_empty() {
            return Ok(retries);
        }
        if last_log.elapsed() >= Duration::from_secs(10) {
            tracing::warn!(
                ?pending,
                waited_ms = started.elapsed().as_millis() as u64,
                "committed transactions are not yet visible (waiting for a synchronous standby?); holding their invalidations"
            );
            last_log = Instant::now();
        }
        retries += 1;
        metrics::counter!(telemetry::BARRIER_WAITS).increment(1);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(20));
    }
}

/// The visibility check failed.
#[derive(Debug, thiserror::Error)]
pub enum BarrierError {
    /// The snapshot query failed.
    #[error("visibility barrier: snapshot query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    /// The server returned something that is not a snapshot.
    #[error("visibility barrier: {0}")]
    Parse(#[from] SnapshotParseError),
}

/// Snapshot queries the barrier stage runs at once ([`stage`]).
pub(crate) const BARRIERS_IN_FLIGHT: usize = 2;

/// The barrier stage: takes every batch the reader has sealed so far (up to `max_keys` keys),
/// merges them into one, waits until all their xids are visible to a new snapshot, and passes
/// the merged batch on, in the order taken. Up to [`BARRIERS_IN_FLIGHT`] batches are checked at
/// once (each on its own pooled connection), so a commit arriving while the previous batch's
/// snapshot query is out starts its own at once instead of waiting a round trip for it; with both
/// out, queued batches merge into the next. It runs while the sink applies earlier batches, so
/// under load a transaction waits for one snapshot query and one sink round trip, not for a queue
/// of them.
///
/// A failed snapshot query is retried with backoff (100 ms doubling to 5 s), forever: nothing
/// behind the batch is confirmed meanwhile. Returns when `sealed` closes and every batch taken was
/// passed on, or when `visible` is dropped.
pub(crate) async fn stage(
    pool: deadpool_postgres::Pool,
    mut sealed: mpsc::Receiver<Batch>,
    visible: mpsc::Sender<Batch>,
    max_keys: usize,
) {
    use futures::StreamExt;
    let mut in_flight = futures::stream::FuturesOrdered::new();
    let mut open = true;
    loop {
        tokio::select! {
            biased;
            Some(batch) = in_flight.next(), if !in_flight.is_empty() => {
                if visible.send(batch).await.is_err() {
                    return;
                }
            }
            batch = sealed.recv(), if open && in_flight.len() < BARRIERS_IN_FLIGHT => match batch {
                Some(mut batch) => {
                    let mut keys = batch.key_count();
                    while keys < max_keys {
                        let Ok(more) = sealed.try_recv() else { break };
                        keys += more.key_count();
                        batch.txns.extend(more.txns);
                    }
                    in_flight.push_back(pass(&pool, batch));
                }
                None => open = false,
            },
            else => return,
        }
    }
}

/// Waits until every xid in `batch` is visible to a new snapshot (retrying a failed query
/// forever, 100 ms doubling to 5 s) and returns it with `taken_us` and `visible_us` set.
async fn pass(pool: &deadpool_postgres::Pool, mut batch: Batch) -> Batch {
    batch.taken_us = now_us();
    // xid 0 (InvalidTransactionId) marks the synthetic eviction of a new slot.
    let xids: Vec<u32> = batch
        .txns
        .iter()
        .filter(|t| t.xid != 0 && (!t.keys.is_empty() || !t.tables.is_empty()))
        .map(|t| t.xid)
        .collect();
    let mut backoff = Duration::from_millis(100);
    loop {
        let barrier = async {
            let client = pool.get().await.map_err(|e| describe_pool(&e))?;
            wait_visible(&client, &xids)
                .await
                .map_err(|e| e.to_string())
        };
        match barrier.await {
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                    "visibility barrier failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    batch.visible_us = now_us();
    metrics::histogram!(telemetry::VISIBILITY_BARRIER)
        .record((batch.visible_us - batch.taken_us).max(0) as f64 / 1000.0);
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks_visibility() {
        let s: Snapshot = "100:105:101,103".parse().unwrap();
        assert_eq!(s.xip, vec![101, 103]);
        assert!(s.is_finished(99));
        assert!(s.is_finished(100));
        assert!(!s.is_finished(101));
        assert!(s.is_finished(102));
        assert!(!s.is_finished(105));
        let empty: Snapshot = "7:7:".parse().unwrap();
        assert!(empty.xip.is_empty() && empty.is_finished(6) && !empty.is_finished(7));
        assert!("7:x:".parse::<Snapshot>().is_err());
    }

    #[test]
    fn widens_across_the_epoch() {
        let s = Snapshot {
            xmin: (3 << 32) + 10,
            xmax: (3 << 32) + 20,
            xip: vec![],
        };
        assert_eq!(s.widen(15), (3 << 32) + 15);
        // An xid above xmax's low half was assigned in the previous epoch.
        assert_eq!(s.widen(u32::MAX - 5), (2 << 32) + u64::from(u32::MAX - 5));
        let first_epoch = Snapshot {
            xmin: 700,
            xmax: 800,
            xip: vec![],
        };
        assert_eq!(first_epoch.widen(750), 750);
    }
}
