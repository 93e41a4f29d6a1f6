//! The staleness breaker: one process's view of its namespace's watermark and epoch
//! (docs/architecture.md, "The staleness breaker"; [`crate::StalenessConfig`]).

use std::sync::RwLock;
use std::time::{Duration, Instant};

use cacheclear_protocol::connect::RedisConnection;
use cacheclear_protocol::{Lsn, NamespaceLayout, Watermark, scripts};
use redis::Script;

use crate::config::{Config, StalenessConfig};
use crate::stats::{Counter, Counters};

/// Why reads bypass the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// The watermark is older than `max_staleness_ms`.
    WatermarkStale,
    /// No (readable) watermark of the current epoch, or none read yet.
    WatermarkMissing,
    /// No epoch.
    EpochMissing,
}

impl Reason {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Reason::WatermarkStale => "watermark_stale",
            Reason::WatermarkMissing => "watermark_missing",
            Reason::EpochMissing => "epoch_missing",
        }
    }

    pub(crate) fn counter(self) -> Counter {
        match self {
            Reason::WatermarkStale => Counter::bypassed_watermark_stale,
            Reason::WatermarkMissing => Counter::bypassed_watermark_missing,
            Reason::EpochMissing => Counter::bypassed_epoch_missing,
        }
    }
}

/// The breaker's verdict for one read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Serve from the cache; values of an epoch below this one are misses, fills carry it.
    Open {
        /// The namespace's epoch.
        epoch: u64,
        /// The watermark's LSN.
        lsn: Lsn,
    },
    /// Read the database, do not fill.
    Bypass(Reason),
}

/// What the last successful read found.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    /// When the read was sent (the staleness is counted from here: conservative).
    sent: Instant,
    /// `lag_ms + (Redis now − written_ms)` at the read; `None` without a watermark.
    staleness_ms: Option<u64>,
    epoch: Option<u64>,
    lsn: Lsn,
}

pub(crate) struct Breaker {
    pub(crate) cfg: StalenessConfig,
    layout: NamespaceLayout,
    script: Script,
    snapshot: RwLock<Option<Snapshot>>,
    /// When the last read was attempted; one read at a time.
    refresh: tokio::sync::Mutex<Option<Instant>>,
    /// Database loads while the breaker is open.
    pub(crate) bypass: tokio::sync::Semaphore,
}

impl Breaker {
    /// # Errors
    /// The namespace cannot be laid out (validated with the config before).
    pub(crate) fn new(cfg: StalenessConfig) -> Result<Breaker, cacheclear_protocol::KeyError> {
        Ok(Breaker {
            layout: NamespaceLayout::new(&cfg.namespace)?,
            script: scripts::read_namespace(),
            snapshot: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(None),
            bypass: tokio::sync::Semaphore::new(cfg.max_bypass_loads),
            cfg,
        })
    }

    /// The verdict now, reading the namespace first when the last snapshot is `refresh_ms` old.
    ///
    /// The hit path (a fresh snapshot that lets reads use the cache) takes no lock: one
    /// `RwLock` read and a clock read. When a refresh is due and the snapshot still lets reads
    /// use the cache, one caller reads the namespace and the others go on with the snapshot.
    /// When the snapshot would bypass the cache (none yet, or aged past the bound), callers
    /// wait for the read in flight instead of judging it: after an idle spell longer than
    /// `max_staleness_ms`, a burst of reads would otherwise all go to the database on a
    /// snapshot that is old only because nobody read it (found by `cacheclear bench client`).
    pub(crate) async fn gate(
        &self,
        conn: &RedisConnection,
        config: &Config,
        counters: &Counters,
    ) -> Gate {
        let refresh_every = Duration::from_millis(self.cfg.refresh_ms);
        let snapshot = self.read();
        let verdict = self.verdict(snapshot);
        let open = matches!(verdict, Gate::Open { .. });
        let due = snapshot.is_none_or(|s| s.sent.elapsed() >= refresh_every);
        if open && !due {
            return verdict;
        }
        let lock = if open {
            self.refresh.try_lock().ok()
        } else {
            Some(self.refresh.lock().await)
        };
        if let Some(mut last) = lock
            && last.is_none_or(|at| at.elapsed() >= refresh_every)
        {
            let sent = Instant::now();
            *last = Some(sent);
            self.fetch(conn, config, counters, sent).await;
        }
        self.judge()
    }

    /// The last snapshot read, if any.
    fn read(&self) -> Option<Snapshot> {
        *self.snapshot.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Judges the last snapshot, aged on this process's monotonic clock.
    pub(crate) fn judge(&self) -> Gate {
        self.verdict(self.read())
    }

    /// Judges `snapshot`, aged on this process's monotonic clock.
    fn verdict(&self, snapshot: Option<Snapshot>) -> Gate {
        let Some(s) = snapshot else {
            return Gate::Bypass(Reason::WatermarkMissing);
        };
        let Some(epoch) = s.epoch else {
            return Gate::Bypass(Reason::EpochMissing);
        };
        let Some(staleness) = s.staleness_ms else {
            return Gate::Bypass(Reason::WatermarkMissing);
        };
        let now = staleness.saturating_add(s.sent.elapsed().as_millis() as u64);
        if now > self.cfg.max_staleness_ms {
            return Gate::Bypass(Reason::WatermarkStale);
        }
        Gate::Open { epoch, lsn: s.lsn }
    }

    /// One round trip: `READ_NAMESPACE_LUA`. A failure leaves the old snapshot to age.
    async fn fetch(
        &self,
        conn: &RedisConnection,
        config: &Config,
        counters: &Counters,
        sent: Instant,
    ) {
        counters.incr(Counter::namespace_reads);
        let mut conn = conn.clone();
        let reply: redis::RedisResult<(String, String, String)> = crate::client::bounded_cmd(
            config,
            self.script
                .key(self.layout.watermark())
                .key(self.layout.epoch())
                .invoke_async(&mut conn),
        )
        .await;
        let (watermark, epoch, now) = match reply {
            Ok(r) => r,
            Err(e) => {
                counters.incr(Counter::redis_errors);
                tracing::warn!(namespace = %self.cfg.namespace, error = %e, "reading the namespace's watermark failed; the last one keeps ageing");
                return;
            }
        };
        let snapshot = parse(&self.cfg.namespace, &watermark, &epoch, &now, sent);
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Some(snapshot);
    }
}

/// Builds a snapshot from the script's reply; malformed fields are logged (naming the key) and
/// count as absent.
fn parse(namespace: &str, watermark: &str, epoch: &str, now: &str, sent: Instant) -> Snapshot {
    let epoch = match epoch {
        "" => None,
        e => match e.parse::<u64>() {
            Ok(e) => Some(e),
            Err(err) => {
                tracing::error!(namespace, epoch = e, error = %err, "{{cacheclear.ns:{namespace}}}:epoch is not an integer; bypassing the cache");
                None
            }
        },
    };
    let now_ms = now.parse::<u64>().ok();
    let watermark = match watermark {
        "" => None,
        w => match Watermark::parse(w) {
            Ok(w) => Some(w),
            Err(err) => {
                tracing::error!(namespace, error = %err, "{{cacheclear.ns:{namespace}}}:watermark is malformed; bypassing the cache");
                None
            }
        },
    };
    // A watermark of another epoch describes a stream that is no longer the current one.
    let watermark = watermark.filter(|w| Some(w.epoch) == epoch);
    let staleness_ms = match (watermark, now_ms) {
        (Some(w), Some(now)) => Some(w.lag_ms.saturating_add(now.saturating_sub(w.written_ms))),
        _ => None,
    };
    Snapshot {
        sent,
        staleness_ms,
        epoch,
        lsn: watermark.map_or(Lsn::ZERO, |w| w.lsn),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_judges_the_reply() {
        let t = Instant::now();
        let s = parse("n", "0000000000000010 0 30 1000 7", "7", "1500", t);
        assert_eq!(
            (s.staleness_ms, s.epoch, s.lsn),
            (Some(530), Some(7), Lsn(16))
        );
        // A watermark of an older epoch (before a bump) counts as absent.
        let s = parse("n", "0000000000000010 0 30 1000 6", "7", "1500", t);
        assert_eq!((s.staleness_ms, s.epoch), (None, Some(7)));
        let s = parse("n", "garbage", "x", "1500", t);
        assert_eq!((s.staleness_ms, s.epoch), (None, None));
    }
}
