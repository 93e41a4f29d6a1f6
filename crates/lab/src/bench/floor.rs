//! The replication floor (issue 12): what PostgreSQL's walsender hands a logical-replication
//! consumer that does nothing else, measured in the same run and on the same instance as the
//! pipeline, so that the pipeline's figures read as ratios against it.
//!
//! The consumer is `pgwire-replication`'s client on a slot and publication of its own
//! (`cacheclear_bench_floor`, pgoutput), with the connection settings the source uses
//! ([`cacheclear_source_postgres::replication_config`]). It receives, counts row messages,
//! notes commit → received per transaction (PostgreSQL's commit timestamp against this
//! machine's clock, as the pipeline's lag is measured) and confirms each commit; it decodes
//! nothing else, evicts nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use cacheclear_protocol::now_us;
use cacheclear_source_postgres::PostgresConfig;
use hdrhistogram::Histogram;
use pgwire_replication::{ReplicationClient, ReplicationEvent};

/// Slot and publication of the floor consumer.
pub(crate) const FLOOR: &str = "cacheclear_bench_floor";
/// µs from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// What the consumer saw.
pub(crate) struct Seen {
    /// commit → received per transaction, µs (while recording).
    pub lag_us: Histogram<u64>,
    /// Record lag samples (the steady phase) or not (setup, bulk).
    pub recording: bool,
    /// Transactions of at least this many rows count as the bulk one.
    pub bulk_threshold: u64,
    /// (rows, commit µs, Commit received µs) of the bulk transaction.
    pub bulk: Option<(u64, i64, i64)>,
}

/// The consumer running on its own runtime ([`super::on_own_runtime`]).
pub(crate) struct FloorConsumer {
    pub seen: Arc<Mutex<Seen>>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Creates the floor's publication (for `table`) and slot, starting now.
///
/// # Errors
/// A statement failed.
pub(crate) async fn create(db: &tokio_postgres::Client, table: &str) -> anyhow::Result<()> {
    drop_floor(db).await;
    db.batch_execute(&format!("CREATE PUBLICATION {FLOOR} FOR TABLE {table}"))
        .await
        .context("creating the floor's publication")?;
    db.query_one(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&FLOOR],
    )
    .await
    .context("creating the floor's slot")?;
    Ok(())
}

/// Drops the floor's slot and publication (errors ignored: they may not exist).
pub(crate) async fn drop_floor(db: &tokio_postgres::Client) {
    let _ = db
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = '{FLOOR}' AND NOT active;
             DROP PUBLICATION IF EXISTS {FLOOR};"
        ))
        .await;
}

impl FloorConsumer {
    /// Connects to the floor's slot and streams until [`FloorConsumer::stop`].
    ///
    /// # Errors
    /// The URL is unusable.
    pub(crate) fn start(pg_url: &str, bulk_threshold: u64) -> anyhow::Result<FloorConsumer> {
        let mut cfg = PostgresConfig::new(pg_url.to_owned());
        cfg.slot = FLOOR.into();
        cfg.publication = FLOOR.into();
        cfg.status_interval_ms = 200;
        let rc = cacheclear_source_postgres::replication_config(&cfg)?;
        let seen = Arc::new(Mutex::new(Seen {
            lag_us: Histogram::new_with_bounds(1, 600_000_000, 3)
                .expect("constant histogram bounds are valid"),
            recording: false,
            bulk_threshold,
            bulk: None,
        }));
        let (stop, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = super::on_own_thread({
            let seen = Arc::clone(&seen);
            move || async move {
                let mut repl = ReplicationClient::connect(rc)
                    .await
                    .context("floor: connecting")?;
                repl.wait_started().await.context("floor: starting")?;
                let mut rows = 0u64;
                loop {
                    let event = tokio::select! {
                        _ = &mut stop_rx => break,
                        event = repl.recv() => event.context("floor: receiving")?,
                    };
                    match event {
                        None => break,
                        Some(ReplicationEvent::XLogData { data, .. }) => {
                            if matches!(data.first(), Some(b'I' | b'U' | b'D')) {
                                rows += 1;
                            }
                        }
                        Some(ReplicationEvent::Commit {
                            end_lsn,
                            commit_time_micros,
                            ..
                        }) => {
                            let received = now_us();
                            let commit = commit_time_micros.saturating_add(PG_EPOCH_OFFSET_US);
                            if let Ok(mut s) = seen.lock() {
                                if rows >= s.bulk_threshold {
                                    s.bulk = Some((rows, commit, received));
                                } else if s.recording {
                                    let lag = u64::try_from(received - commit).unwrap_or(0);
                                    s.lag_us.saturating_record(lag.max(1));
                                }
                            }
                            rows = 0;
                            repl.update_applied_lsn(end_lsn);
                        }
                        Some(_) => {}
                    }
                }
                let _ = tokio::time::timeout(Duration::from_secs(2), repl.shutdown()).await;
                Ok(())
            }
        });
        Ok(FloorConsumer { seen, stop, task })
    }

    /// Sets whether lag samples are recorded.
    pub(crate) fn record(&self, on: bool) {
        if let Ok(mut s) = self.seen.lock() {
            if on {
                s.lag_us.reset();
            }
            s.recording = on;
        }
    }

    /// True when the consumer stopped by itself (an error).
    pub(crate) fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the consumer and waits for it.
    ///
    /// # Errors
    /// Why it had stopped, if it had.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await?
    }
}

/// The Redis floor's figure.
pub(crate) struct RedisFloor {
    /// Keys evicted per second, Redis acknowledged.
    pub keys_per_s: f64,
}

/// The Redis floor (issue 12): how fast Redis alone applies the bulk's evictions — `keys` keys
/// never written before (as most of the bulk's fences are), rendered like the bulk's
/// (`bench:floor:<i>`), one LSN, handed to [`RedisSink::invalidate`] in parts of
/// `part_keys` with two parts in flight, as the pipeline's apply stage does with a large
/// transaction — run with the pipeline and PostgreSQL idle. A bulk eviction can go no faster
/// than this, whatever the walsender's rate. The keys' fences expire after the sink's
/// `fence_ttl_ms` (10 min).
///
/// [`RedisSink::invalidate`]: cacheclear_sink_redis::RedisSink::invalidate
///
/// # Errors
/// Redis refused or failed an eviction.
pub(crate) async fn redis_floor(
    redis_url: &str,
    keys: u64,
    part_keys: usize,
) -> anyhow::Result<RedisFloor> {
    use futures::{StreamExt, TryStreamExt};
    let sink = cacheclear_sink_redis::RedisSink::connect(cacheclear_sink_redis::RedisConfig::new(
        redis_url.to_owned(),
    ))?;
    let names: Vec<String> = (0..keys).map(|i| format!("bench:floor:{i}")).collect();
    let lsn = cacheclear_protocol::Lsn(1 << 40);
    // Warm the connection and the script cache, as the pipeline's are by its bulk's start.
    sink.invalidate([("bench:floor:warm-up", lsn)]).await?;
    let started = std::time::Instant::now();
    let evicted: u64 = futures::stream::iter(names.chunks(part_keys.max(1)))
        .map(|part| sink.invalidate(part.iter().map(|k| (k.as_str(), lsn))))
        .buffer_unordered(2)
        .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
        .await?;
    let seconds = started.elapsed().as_secs_f64().max(1e-6);
    if evicted != keys {
        anyhow::bail!("redis floor: {evicted} of {keys} keys acknowledged");
    }
    Ok(RedisFloor {
        keys_per_s: keys as f64 / seconds,
    })
}
