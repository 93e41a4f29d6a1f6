//! Follow mode: a WAL tap on a second slot; sampled invalidations checked after 1 s, 5 s, 60 s.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cacheclear_protocol::{Batch, KeyLayout, Lsn, Sink, SinkError};
use cacheclear_rules::Rules;
use cacheclear_source_postgres::{Pipeline, PostgresConfig, RunOptions};
use tokio::sync::mpsc;

use crate::report::{AuditReport, Example, WindowFigures};
use crate::scan::MAX_EXAMPLES;
use crate::{AuditError, Probe, ReadPosition, read_position};

/// Most sampled invalidations waiting for their checks; beyond it samples are dropped (and
/// counted as not sampled) so that a burst cannot grow the audit's memory without bound.
const MAX_PENDING: u64 = 1_000_000;

/// Settings of [`follow`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FollowOptions {
    /// How long to follow (from the moment the tap streams). Checks not due by then are not
    /// made.
    pub duration: Duration,
    /// Share of invalidated keys to check, 0..=1 (default 1: every one).
    pub sample_rate: f64,
    /// When to check each sampled invalidation, after the tap saw its commit (default 1 s, 5 s,
    /// 60 s).
    pub windows: Vec<Duration>,
}

impl FollowOptions {
    /// `duration` with the defaults: every key, windows 1 s, 5 s, 60 s.
    pub fn new(duration: Duration) -> FollowOptions {
        FollowOptions {
            duration,
            sample_rate: 1.0,
            windows: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(60),
            ],
        }
    }

    /// Sets [`FollowOptions::sample_rate`].
    pub fn with_sample_rate(mut self, rate: f64) -> FollowOptions {
        self.sample_rate = rate;
        self
    }

    /// Sets [`FollowOptions::windows`].
    pub fn with_windows(mut self, windows: Vec<Duration>) -> FollowOptions {
        self.windows = windows;
        self
    }
}

/// One sampled invalidation.
struct Sample {
    id: u64,
    key: String,
    commit: Lsn,
    seen: Instant,
}

/// The tap's sink: records sampled invalidations, applies nothing.
struct Tap {
    tx: mpsc::UnboundedSender<Sample>,
    rate: f64,
    next_id: AtomicU64,
    seen: Arc<AtomicU64>,
    pending: Arc<AtomicU64>,
}

impl Sink for Tap {
    fn name(&self) -> &'static str {
        "audit"
    }

    async fn apply(&self, batch: &Batch) -> Result<(), SinkError> {
        let now = Instant::now();
        for txn in &batch.txns {
            // Table-wide evictions (TRUNCATE, a new slot) name no key: nothing to sample.
            for key in txn.keys.iter() {
                self.seen.fetch_add(1, Ordering::Relaxed);
                if self.rate < 1.0 && rand::random::<f64>() >= self.rate {
                    continue;
                }
                if self.pending.load(Ordering::Relaxed) >= MAX_PENDING {
                    continue;
                }
                self.pending.fetch_add(1, Ordering::Relaxed);
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let _ = self.tx.send(Sample {
                    id,
                    key: key.to_owned(),
                    commit: txn.commit_lsn,
                    seen: now,
                });
            }
        }
        Ok(())
    }
}

/// Window label: `1s`, `5s`, `60s` (ms when not whole seconds).
fn label(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Follows the deployment's invalidations for `opts.duration` through a tap on slot
/// `<cfg.slot>_audit` (created now, dropped at the end; the publication must exist — `run`
/// creates it), checking a sample of them in Redis after each window (see the crate docs).
///
/// # Errors
/// A setting is unusable (sample rate, slot name), the tap cannot stream (no publication, no
/// free slot, a role without REPLICATION), or Redis fails.
pub async fn follow(
    cfg: &PostgresConfig,
    rules: Arc<Rules>,
    probe: &Probe,
    opts: &FollowOptions,
) -> Result<AuditReport, AuditError> {
    if !(opts.sample_rate > 0.0 && opts.sample_rate <= 1.0) {
        return Err(AuditError::Config(format!(
            "--sample-rate: {} is not in (0, 1]",
            opts.sample_rate
        )));
    }
    let mut tap_cfg = cfg.clone();
    tap_cfg.slot = format!("{}_audit", cfg.slot);
    if tap_cfg.slot.len() > 63 {
        return Err(AuditError::Config(format!(
            "postgres.slot: the audit's slot `{}` would be longer than PostgreSQL's 63 bytes; use a shorter slot name",
            tap_cfg.slot
        )));
    }
    tap_cfg.create_slot = true;
    tap_cfg.create_publication = false;
    tap_cfg.publication_check_interval_ms = 0;
    tap_cfg.watermark_interval_ms = 0;
    let slot = tap_cfg.slot.clone();
    let tap_err = |source| AuditError::Tap {
        slot: slot.clone(),
        source,
    };

    let (tx, mut rx) = mpsc::unbounded_channel();
    let seen = Arc::new(AtomicU64::new(0));
    let pending = Arc::new(AtomicU64::new(0));
    let tap = Tap {
        tx,
        rate: opts.sample_rate,
        next_id: AtomicU64::new(0),
        seen: Arc::clone(&seen),
        pending: Arc::clone(&pending),
    };
    let mut pipeline = Pipeline::spawn(tap_cfg, rules, tap, RunOptions::default());
    if let Err(e) = pipeline.streaming().await {
        drop_slot(&cfg.url, &slot).await;
        return Err(tap_err(e));
    }
    tracing::info!(slot = %slot, "audit: following the invalidations");
    let started = Instant::now();
    let end = tokio::time::Instant::from_std(started + opts.duration);

    let mut windows: Vec<(Duration, String, VecDeque<Arc<Sample>>, WindowFigures)> = opts
        .windows
        .iter()
        .map(|&d| (d, label(d), VecDeque::new(), WindowFigures::default()))
        .collect();
    let mut report = AuditReport {
        mode: "follow".into(),
        ..AuditReport::default()
    };
    let mut checked_ids = HashSet::new();
    let mut inconsistent_ids = HashSet::new();
    let outcome: Result<(), AuditError> = async {
        loop {
            let next_due = windows
                .iter()
                .filter_map(|(d, _, q, _)| q.front().map(|s| s.seen + *d))
                .min();
            let wake = next_due
                .map(tokio::time::Instant::from_std)
                .unwrap_or(end)
                .min(end);
            tokio::select! {
                sample = rx.recv() => {
                    let Some(sample) = sample else { break };
                    report.sampled += 1;
                    let sample = Arc::new(sample);
                    for (_, _, q, _) in &mut windows {
                        q.push_back(Arc::clone(&sample));
                    }
                }
                () = tokio::time::sleep_until(wake) => {
                    if tokio::time::Instant::now() >= end {
                        break;
                    }
                    let now = Instant::now();
                    for (d, name, q, w) in &mut windows {
                        while q.front().is_some_and(|s| s.seen + *d <= now) {
                            let Some(s) = q.pop_front() else { break };
                            if Arc::strong_count(&s) == 1 {
                                pending.fetch_sub(1, Ordering::Relaxed);
                            }
                            check(probe, &s, name, w, &mut report, &mut inconsistent_ids).await?;
                            checked_ids.insert(s.id);
                        }
                    }
                }
                ended = pipeline.wait() => {
                    ended.map_err(&tap_err)?;
                    break;
                }
            }
        }
        Ok(())
    }
    .await;
    let stopped = pipeline.stop().await;
    drop_slot(&cfg.url, &slot).await;
    outcome?;
    stopped.map_err(tap_err)?;

    report.duration_s = started.elapsed().as_secs_f64();
    report.invalidations_seen = seen.load(Ordering::Relaxed);
    report.checked = checked_ids.len() as u64;
    report.inconsistent = inconsistent_ids.len() as u64;
    for (_, name, _, mut w) in windows {
        w.finish();
        report.unverifiable += w.unverifiable;
        report.nines.insert(name.clone(), w.nines);
        report.windows.insert(name, w);
    }
    Ok(report)
}

/// One check of sample `s` in window `name`.
async fn check(
    probe: &Probe,
    s: &Sample,
    name: &str,
    w: &mut WindowFigures,
    report: &mut AuditReport,
    inconsistent_ids: &mut HashSet<u64>,
) -> Result<(), AuditError> {
    let Ok(layout) = KeyLayout::new(&s.key) else {
        return Ok(()); // the rules only render valid keys
    };
    w.checked += 1;
    let Some(value) = probe.value(&layout).await? else {
        w.absent += 1;
        return Ok(());
    };
    match read_position(&value) {
        ReadPosition::Known(read) if read < s.commit => {
            w.inconsistent += 1;
            if inconsistent_ids.insert(s.id) && report.examples.len() < MAX_EXAMPLES {
                report.examples.push(Example {
                    key: s.key.clone(),
                    window: name.to_owned(),
                    commit_lsn: Some(s.commit.to_string()),
                    fence: None,
                    read_position: read.to_string(),
                });
            }
        }
        ReadPosition::Known(_) => {}
        ReadPosition::Unknown | ReadPosition::NotEnvelope => w.unverifiable += 1,
    }
    Ok(())
}

/// Drops the audit's slot (retrying while its walsender lets go of it); a failure is logged.
async fn drop_slot(url: &str, slot: &str) {
    let started = Instant::now();
    loop {
        match try_drop_slot(url, slot).await {
            Ok(()) => return,
            Err(e) if started.elapsed() > Duration::from_secs(10) => {
                tracing::warn!(slot, error = %e, "could not drop the audit's slot; drop it with pg_drop_replication_slot");
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn try_drop_slot(url: &str, slot: &str) -> Result<(), AuditError> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| AuditError::Postgres(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| AuditError::Postgres(e.to_string()))?;
    Ok(())
}
