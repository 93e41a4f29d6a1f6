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
//!
//! In its second mode ([`Recording::Chain`]) the same consumer is the floor of the chain every
//! correct eviction needs: per commit received, one `SELECT pg_current_snapshot()` (the
//! visibility barrier's query) and then one `invalidate.lua` call for one key
//! ([`RedisSink::invalidate`]), and it notes commit → Redis acknowledged. Nothing else (no
//! decoding, rules, batching, acknowledgement order), and the snapshot is not checked (the
//! barrier re-queries while a transaction is still in progress; a commit is almost always
//! visible at the first query): a reference for what the pipeline adds on top of the three
//! round trips its design needs. It is measured in a phase of its own after the pipeline's, so
//! like every floor here it is a same-run reference, not a bound each run stays above.
//!
//! [`RedisSink::invalidate`]: cacheclear_sink_redis::RedisSink::invalidate

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use cacheclear_protocol::{Lsn, now_us};
use cacheclear_sink_redis::{RedisConfig, RedisSink};
use cacheclear_source_postgres::PostgresConfig;
use hdrhistogram::Histogram;
use pgwire_replication::{ReplicationClient, ReplicationEvent};

/// Slot and publication of the floor consumer.
pub(crate) const FLOOR: &str = "cacheclear_bench_floor";
/// µs from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// What the consumer records per transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recording {
    /// Nothing (setup, the bulk).
    Off,
    /// commit → received ([`Seen::lag_us`]).
    Receive,
    /// Runs the barrier's query and one eviction per transaction and records commit → Redis
    /// acknowledged ([`Seen::chain_us`]).
    Chain,
}

/// What the consumer saw.
pub(crate) struct Seen {
    /// commit → received per transaction, µs (while recording [`Recording::Receive`]).
    pub lag_us: Histogram<u64>,
    /// commit → the one eviction acknowledged, µs (while recording [`Recording::Chain`]).
    pub chain_us: Histogram<u64>,
    /// Chain round trips that failed (the query or the eviction).
    pub chain_errors: u64,
    /// The first of those failures.
    pub chain_error: Option<String>,
    /// What is recorded now.
    pub recording: Recording,
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
    /// Connects to the floor's slot and streams until [`FloorConsumer::stop`]. For the chain
    /// floor (module docs) it also opens a plain connection to `pg_url` (the snapshot query) and
    /// a [`RedisSink`] of its own on `redis_url` (default settings).
    ///
    /// # Errors
    /// The URL is unusable.
    pub(crate) fn start(
        pg_url: &str,
        bulk_threshold: u64,
        redis_url: &str,
    ) -> anyhow::Result<FloorConsumer> {
        let mut cfg = PostgresConfig::new(pg_url.to_owned());
        cfg.slot = FLOOR.into();
        cfg.publication = FLOOR.into();
        cfg.status_interval_ms = 200;
        let rc = cacheclear_source_postgres::replication_config(&cfg)?;
        let seen = Arc::new(Mutex::new(Seen {
            lag_us: Histogram::new_with_bounds(1, 600_000_000, 3)
                .expect("constant histogram bounds are valid"),
            chain_us: Histogram::new_with_bounds(1, 600_000_000, 3)
                .expect("constant histogram bounds are valid"),
            chain_errors: 0,
            chain_error: None,
            recording: Recording::Off,
            bulk_threshold,
            bulk: None,
        }));
        let (stop, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = super::on_own_thread({
            let seen = Arc::clone(&seen);
            let (pg_url, redis_url) = (pg_url.to_owned(), redis_url.to_owned());
            move || async move {
                let db = cacheclear_pg_tls::connect(&pg_url, "--postgres-url")
                    .await
                    .context("chain floor: connecting to PostgreSQL")?;
                let sink = RedisSink::connect(RedisConfig::new(redis_url))?;
                // Warm the connection and the script cache, as the pipeline's are.
                sink.invalidate([("bench:chain:warm-up", Lsn(1))])
                    .await
                    .context("chain floor: the warm-up eviction in Redis")?;
                let chain = Arc::new((db, sink));
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
                            let mut run_chain = false;
                            if let Ok(mut s) = seen.lock() {
                                if rows >= s.bulk_threshold {
                                    s.bulk = Some((rows, commit, received));
                                } else if s.recording == Recording::Receive {
                                    let lag = u64::try_from(received - commit).unwrap_or(0);
                                    s.lag_us.saturating_record(lag.max(1));
                                } else if s.recording == Recording::Chain {
                                    run_chain = rows > 0;
                                }
                            }
                            if run_chain {
                                // Each commit's chain on its own task, so a slow one does not
                                // hold the next commit (the pipeline overlaps them too).
                                tokio::spawn(round_trips(
                                    Arc::clone(&chain),
                                    Arc::clone(&seen),
                                    Lsn(end_lsn.as_u64()),
                                    commit,
                                ));
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

    /// Sets what is recorded; starting a mode forgets what it recorded before.
    pub(crate) fn record(&self, what: Recording) {
        if let Ok(mut s) = self.seen.lock() {
            match what {
                Recording::Receive => s.lag_us.reset(),
                Recording::Chain => {
                    s.chain_us.reset();
                    s.chain_errors = 0;
                    s.chain_error = None;
                }
                Recording::Off => {}
            }
            s.recording = what;
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

/// The chain floor's round trips for one commit (module docs): the barrier's snapshot query on
/// `chain.0`, then one eviction (`bench:chain:<end LSN>`, fenced at the commit's end LSN) on
/// `chain.1`; records commit (µs since the Unix epoch) → Redis acknowledged in `seen`.
async fn round_trips(
    chain: Arc<(tokio_postgres::Client, RedisSink)>,
    seen: Arc<Mutex<Seen>>,
    end_lsn: Lsn,
    commit_us: i64,
) {
    let (db, sink) = &*chain;
    let key = format!("bench:chain:{}", end_lsn.0);
    let done = async {
        db.simple_query("SELECT pg_current_snapshot()::text")
            .await?;
        sink.invalidate([(key.as_str(), end_lsn)]).await?;
        anyhow::Ok(())
    }
    .await;
    let acked = now_us();
    if let Ok(mut s) = seen.lock() {
        match done {
            Ok(()) => {
                let lag = u64::try_from(acked - commit_us).unwrap_or(0);
                s.chain_us.saturating_record(lag.max(1));
            }
            Err(e) => {
                s.chain_errors += 1;
                s.chain_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
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
    let sink = RedisSink::connect(RedisConfig::new(redis_url.to_owned()))?;
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
