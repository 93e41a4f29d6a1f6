//! `cacheclear bench pipeline`: measured figures of the invalidation pipeline.
//!
//! Everything runs on this machine: private PostgreSQL and Redis (started from the installed
//! binaries, unless URLs are given), the pipeline in a child process, and a load generator on its own
//! connections. Figures:
//! - commit→evicted lag (ms, p50/p99): from the transaction's commit timestamp (PostgreSQL's clock,
//!   the same machine) to Redis's acknowledgement of its evictions, per row changed, at a steady
//!   1k and 10k row changes/s;
//! - bulk: one UPDATE of N rows (default 1,000,000), rows/s from its commit to the last eviction;
//! - peak RSS (VmHWM) of the pipeline alone, which runs in a child process (`bench/child.rs`):
//!   over the whole run (bulk included) and at the end of the 1k rows/s phase; and of this process
//!   (the load generator);
//! - the floor, last and alone (`bench/floor.rs`; the pipeline stopped): commit → received at 1k rows/s and the
//!   walsender's rate for the same bulk UPDATE, for a consumer that only receives; the figures
//!   above as ratios against it (`lag_1k_p99_vs_floor`, `bulk_vs_floor`); and Redis's own rate
//!   for as many fresh keys' evictions, from the sink alone (`bulk_vs_redis_floor`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cacheclear_harness::{PgInstance, RedisInstance};
use cacheclear_protocol::Sink;
use cacheclear_rules::{RuleConfig, Rules};
use cacheclear_source_postgres::{Pipeline, PostgresConfig, RunOptions};
use clap::{Args, Subcommand};

mod bus_floor;
mod child;
mod client;
mod floor;
mod kafka;
mod stages;

use stages::StageFigures;

/// Which benchmark to run.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Commit→evicted lag at steady 1k and 10k row changes/s, bulk UPDATE throughput, peak RSS.
    Pipeline(PipelineArgs),
    /// Bus mode: PostgreSQL → Kafka → invalidator → Redis lag at steady 1k and 10k row
    /// changes/s, and one invalidator process's records/s.
    Kafka(kafka::KafkaArgs),
    /// The client's hit path with and without the staleness breaker (reads/s ratio, target
    /// ≥ 0.95), through Redis and through the in-process tier.
    Client(client::ClientArgs),
    /// The pipeline of `bench pipeline`, in a child process of its own (started by it).
    #[command(hide = true)]
    PipelineChild(child::ChildArgs),
}

/// Options of `bench pipeline`.
#[derive(Args)]
pub struct PipelineArgs {
    /// Print one JSON object (fields lag_1k_p50_ms, lag_1k_p99_ms, lag_10k_p50_ms, lag_10k_p99_ms,
    /// bulk_rows, bulk_rows_per_s, peak_rss_mb, …) instead of the table.
    #[arg(long)]
    json: bool,
    /// Seconds of each steady-rate phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rows of the bulk UPDATE (and of the benchmark table).
    #[arg(long, default_value_t = 1_000_000)]
    bulk_rows: u64,
    /// Use this PostgreSQL (needs wal_level=logical) instead of a private instance. The bench
    /// creates and drops the table `cacheclear_bench_product`, the slots and publications
    /// `cacheclear_bench` and `cacheclear_bench_floor` (a failed run leaves them, slots
    /// holding WAL, until the next run drops them at its start).
    /// TLS as in `postgres.url`: `sslmode`, `sslrootcert`, `sslcert`, `sslkey` (libpq's).
    #[arg(long)]
    postgres_url: Option<String>,
    /// Use this Redis instead of a private instance (keys `{bench:…}` are written, and the
    /// namespace keys `{cacheclear.ns:cacheclear_bench}:*`: its epoch and watermark).
    #[arg(long)]
    redis_url: Option<String>,
}

/// Runs one benchmark.
pub async fn bench(which: BenchCommand) -> anyhow::Result<()> {
    match which {
        BenchCommand::Pipeline(args) => pipeline(args).await,
        BenchCommand::Kafka(args) => kafka::kafka(args).await,
        BenchCommand::Client(args) => client::client(args).await,
        BenchCommand::PipelineChild(args) => child::pipeline_child(args).await,
    }
}

#[derive(serde::Serialize)]
struct Figures {
    command: String,
    /// commit → received by a consumer that does nothing else, at 1k rows/s (the floor).
    floor_lag_1k_p50_ms: f64,
    floor_lag_1k_p99_ms: f64,
    /// The load the receive-only floor phase achieved, rows/s.
    floor_achieved_1k_rows_per_s: f64,
    /// The walsender's own rate for the bulk UPDATE, decoded and thrown away (the floor).
    floor_bulk_rows_per_s: f64,
    /// lag_1k_p99_ms / floor_lag_1k_p99_ms (issue 12: ≤ 2).
    lag_1k_p99_vs_floor: f64,
    /// lag_10k_p99_ms / floor_lag_1k_p99_ms (issue 12: ≤ 3). The floor is measured at 1k rows/s
    /// only: the ratio is against the same commit → received floor.
    lag_10k_p99_vs_floor: f64,
    /// bulk_rows_per_s / floor_bulk_rows_per_s (issue 12: ≥ 0.85).
    bulk_vs_floor: f64,
    /// commit → evicted by the chain floor at 1k rows/s: the same consumer running, per commit,
    /// only the round trips a correct eviction needs (the barrier's snapshot query, one
    /// `invalidate.lua` call), `bench/floor.rs`.
    floor_chain_lag_1k_p50_ms: f64,
    floor_chain_lag_1k_p99_ms: f64,
    /// The load the chain floor phase achieved, rows/s.
    floor_chain_achieved_1k_rows_per_s: f64,
    /// lag_1k_p99_ms / floor_chain_lag_1k_p99_ms: what the pipeline adds to the chain.
    lag_1k_p99_vs_chain_floor: f64,
    /// lag_10k_p99_ms / floor_chain_lag_1k_p99_ms (against the same 1k rows/s chain floor).
    lag_10k_p99_vs_chain_floor: f64,
    /// Redis's own rate for the bulk's evictions: as many fresh keys, evicted by the sink alone
    /// with the pipeline and PostgreSQL idle (`bench/floor.rs`, [`floor::redis_floor`]).
    floor_redis_keys_per_s: f64,
    /// The bulk's keys/s (its keys over `bulk_seconds`) / floor_redis_keys_per_s: how close the
    /// bulk came to what Redis alone can take.
    bulk_vs_redis_floor: f64,
    lag_1k_p50_ms: f64,
    lag_1k_p99_ms: f64,
    lag_1k_max_ms: f64,
    /// p99 of commit → Commit message received by the source (PostgreSQL's walsender part).
    server_lag_1k_p99_ms: f64,
    /// p99 of received → taken by the barrier stage (queueing).
    queue_1k_p99_ms: f64,
    /// p99 of taken → visible to a new snapshot (the barrier's queries).
    barrier_1k_p99_ms: f64,
    /// p99 of visible → acknowledged by Redis (includes waiting behind the previous apply).
    sink_1k_p99_ms: f64,
    achieved_1k_rows_per_s: f64,
    lag_10k_p50_ms: f64,
    lag_10k_p99_ms: f64,
    lag_10k_max_ms: f64,
    server_lag_10k_p99_ms: f64,
    queue_10k_p99_ms: f64,
    barrier_10k_p99_ms: f64,
    sink_10k_p99_ms: f64,
    achieved_10k_rows_per_s: f64,
    bulk_rows: u64,
    bulk_seconds: f64,
    /// The bulk's commit → its Commit message received by the source (streamed and decoded), s.
    bulk_receive_seconds: f64,
    /// The bulk's Commit received → its batch visible (queue and barrier), s.
    bulk_barrier_seconds: f64,
    /// The bulk's batch visible → Redis acknowledged its last eviction, s.
    bulk_redis_seconds: f64,
    bulk_rows_per_s: f64,
    /// Peak resident set (VmHWM, MB = 10^6 bytes) of the pipeline alone: it runs in a child
    /// process (`bench pipeline-child`, `bench/child.rs`) and this is the child's VmHWM from
    /// `/proc/<pid>/status` after the bulk UPDATE is applied, i.e. the peak over start-up, both
    /// steady phases and the bulk (issue 12: < 50 during the 1M-row bulk).
    pipeline_peak_rss_mb: f64,
    /// The child's VmHWM (MB) at the end of the 1k rows/s phase: the peak over start-up and that
    /// phase, an upper bound of the steady footprint (issue 12: < 20).
    pipeline_steady_rss_mb: f64,
    /// The child's RssAnon (MB) at the end of the 1k rows/s phase: its resident memory without
    /// the executable's file-backed pages (most of `pipeline_steady_rss_mb` is the binary's text,
    /// shared with every process running it).
    pipeline_steady_anon_mb: f64,
    /// Peak resident set (VmHWM, MB) of the bench process: the load generator and the figures'
    /// bookkeeping, without the pipeline (in its child since issue 12) nor the floor consumer
    /// (read before the floor phase).
    peak_rss_mb: f64,
    cores: usize,
}

/// The command line as the figures print it, every URL's password redacted
/// (`--postgres-url postgres://app:***@db/shop`).
pub(crate) fn shown_command() -> String {
    std::env::args()
        .map(|a| cacheclear_protocol::redact_url(&a))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn pipeline(args: PipelineArgs) -> anyhow::Result<()> {
    let command = shown_command();
    // Private instances unless URLs were given; they stop when dropped (end of this function).
    let instances = Instances::start(args.postgres_url.clone(), args.redis_url.clone()).await?;
    let (pg_url, redis_url) = (instances.pg_url.clone(), instances.redis_url.clone());
    let progress = |msg: &str| {
        if !args.json {
            eprintln!("bench: {msg}");
        }
    };

    progress(&format!("creating {} rows", args.bulk_rows));
    let db = create_bench_table(&pg_url, args.bulk_rows).await?;
    // The pipeline runs in a child process: its memory is read apart from the load generator's.
    let mut source = child::PipelineChild::start(&pg_url, &redis_url, args.bulk_rows).await?;

    let mut phases = Vec::new();
    let mut pipeline_steady_rss_mb = 0.0;
    let mut pipeline_steady_anon_mb = 0.0;
    for (rate, rows_per_txn) in [(1_000u64, 1u64), (10_000, 10)] {
        progress(&format!(
            "steady {rate} row changes/s ({rows_per_txn} row(s) per transaction) for {} s",
            args.seconds
        ));
        source.record().await?;
        let achieved =
            steady_load(&pg_url, rate, rows_per_txn, args.seconds, args.bulk_rows).await?;
        // Let the tail drain into the histogram.
        let target = source.applied_txns().await?;
        let drain = Instant::now();
        while drain.elapsed() < Duration::from_secs(2) && source.applied_txns().await? == target {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        phases.push((source.figures().await?, achieved));
        if rate == 1_000 {
            // The peak so far: start-up and the 1k rows/s phase.
            pipeline_steady_rss_mb = source.rss_mb()?.0;
            pipeline_steady_anon_mb = source.anon_mb()?;
        }
    }

    progress(&format!("bulk: one UPDATE of {} rows", args.bulk_rows));
    let profiler = child::BulkProfiler::start(source.pid).await?;
    db.batch_execute("UPDATE cacheclear_bench_product SET price_cents = price_cents + 1")
        .await?;
    let waited = Instant::now();
    let bulk = loop {
        if let Some(b) = source.bulk().await? {
            break b;
        }
        if waited.elapsed() > Duration::from_secs(600) {
            bail!("the bulk UPDATE was not applied within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    profiler.finish().await?;
    let secs = |from: i64, to: i64| (to - from).max(1) as f64 / 1e6;
    let bulk_seconds = secs(bulk.commit_us, bulk.applied_us);
    let pipeline_peak_rss_mb = source.rss_mb()?.0;
    source.stop().await?;
    // Before the floor phase: its consumer's buffers are not the load generator's.
    let peak_rss_mb = peak_rss_mb()?;
    let floor = measure_floor(&db, &pg_url, &redis_url, &args, &progress).await?;
    drop_bench_objects(&db).await;
    progress(&format!(
        "floor: Redis alone evicts {} fresh keys",
        bulk.keys
    ));
    let redis_floor = floor::redis_floor(
        &redis_url,
        bulk.keys,
        PostgresConfig::new(String::new()).max_batch_keys,
    )
    .await?;

    let bulk_rows_per_s = args.bulk_rows as f64 / bulk_seconds;
    let figures = Figures {
        command,
        floor_lag_1k_p50_ms: floor.lag_p50_ms,
        floor_lag_1k_p99_ms: floor.lag_p99_ms,
        floor_achieved_1k_rows_per_s: floor.achieved_rows_per_s,
        floor_bulk_rows_per_s: floor.bulk_rows_per_s,
        lag_1k_p99_vs_floor: phases[0].0.p99 / floor.lag_p99_ms,
        lag_10k_p99_vs_floor: phases[1].0.p99 / floor.lag_p99_ms,
        bulk_vs_floor: bulk_rows_per_s / floor.bulk_rows_per_s,
        floor_chain_lag_1k_p50_ms: floor.chain_p50_ms,
        floor_chain_lag_1k_p99_ms: floor.chain_p99_ms,
        floor_chain_achieved_1k_rows_per_s: floor.chain_achieved_rows_per_s,
        lag_1k_p99_vs_chain_floor: phases[0].0.p99 / floor.chain_p99_ms,
        lag_10k_p99_vs_chain_floor: phases[1].0.p99 / floor.chain_p99_ms,
        floor_redis_keys_per_s: redis_floor.keys_per_s,
        bulk_vs_redis_floor: bulk.keys as f64 / bulk_seconds / redis_floor.keys_per_s,
        lag_1k_p50_ms: phases[0].0.p50,
        lag_1k_p99_ms: phases[0].0.p99,
        lag_1k_max_ms: phases[0].0.max,
        server_lag_1k_p99_ms: phases[0].0.server_p99,
        queue_1k_p99_ms: phases[0].0.queue_p99,
        barrier_1k_p99_ms: phases[0].0.barrier_p99,
        sink_1k_p99_ms: phases[0].0.sink_p99,
        achieved_1k_rows_per_s: phases[0].1,
        lag_10k_p50_ms: phases[1].0.p50,
        lag_10k_p99_ms: phases[1].0.p99,
        lag_10k_max_ms: phases[1].0.max,
        server_lag_10k_p99_ms: phases[1].0.server_p99,
        queue_10k_p99_ms: phases[1].0.queue_p99,
        barrier_10k_p99_ms: phases[1].0.barrier_p99,
        sink_10k_p99_ms: phases[1].0.sink_p99,
        achieved_10k_rows_per_s: phases[1].1,
        bulk_rows: args.bulk_rows,
        bulk_seconds,
        bulk_receive_seconds: secs(bulk.commit_us, bulk.received_us),
        bulk_barrier_seconds: secs(bulk.received_us, bulk.visible_us),
        bulk_redis_seconds: secs(bulk.visible_us, bulk.applied_us),
        bulk_rows_per_s,
        pipeline_peak_rss_mb,
        pipeline_steady_rss_mb,
        pipeline_steady_anon_mb,
        peak_rss_mb,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
    };
    if args.json {
        println!("{}", serde_json::to_string(&figures)?);
    } else {
        print_table(&figures, &phases);
    }
    Ok(())
}

/// The floor's figures.
struct Floor {
    lag_p50_ms: f64,
    lag_p99_ms: f64,
    /// The receive-only phase's load, rows/s.
    achieved_rows_per_s: f64,
    /// The chain floor (`bench/floor.rs`, [`floor::Recording::Chain`]), commit → evicted.
    chain_p50_ms: f64,
    chain_p99_ms: f64,
    /// The chain phase's load, rows/s.
    chain_achieved_rows_per_s: f64,
    bulk_rows_per_s: f64,
}

/// Runs the floor consumer alone (no pipeline decoding): the steady 1k rows/s phase, then one
/// UPDATE of every row, each measured as the pipeline's are.
async fn measure_floor(
    db: &tokio_postgres::Client,
    pg_url: &str,
    redis_url: &str,
    args: &PipelineArgs,
    progress: &impl Fn(&str),
) -> anyhow::Result<Floor> {
    floor::create(db, "cacheclear_bench_product").await?;
    let consumer = floor::FloorConsumer::start(pg_url, args.bulk_rows, redis_url)?;
    let mut steady = Vec::new();
    for (what, name) in [
        (floor::Recording::Receive, "a consumer that only receives"),
        (
            floor::Recording::Chain,
            "the chain (receive, one snapshot query, one eviction)",
        ),
    ] {
        progress(&format!(
            "floor: {name}, 1000 row changes/s for {} s",
            args.seconds
        ));
        consumer.record(what);
        let achieved = steady_load(pg_url, 1_000, 1, args.seconds, args.bulk_rows).await?;
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        consumer.record(floor::Recording::Off);
        if consumer.is_finished() {
            // Its own error (a connection, the chain's warm-up) says more than "nothing seen".
            consumer.stop().await?;
            bail!("floor: the consumer stopped during the steady phase ({name})");
        }
        let s = consumer
            .seen
            .lock()
            .map_err(|_| anyhow::anyhow!("floor: poisoned"))?;
        let h = if what == floor::Recording::Chain {
            if s.chain_errors > 0 {
                bail!(
                    "chain floor: {} round trips failed, the first: {}",
                    s.chain_errors,
                    s.chain_error.as_deref().unwrap_or("?")
                );
            }
            &s.chain_us
        } else {
            &s.lag_us
        };
        if h.is_empty() {
            bail!("floor: no transaction recorded in the steady phase ({name})");
        }
        steady.push((
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            achieved,
        ));
    }
    progress(&format!("floor: one UPDATE of {} rows", args.bulk_rows));
    db.batch_execute("UPDATE cacheclear_bench_product SET price_cents = price_cents + 1")
        .await?;
    let waited = Instant::now();
    let bulk = loop {
        if let Some(b) = consumer.seen.lock().ok().and_then(|s| s.bulk) {
            break b;
        }
        if consumer.is_finished() || waited.elapsed() > Duration::from_secs(600) {
            consumer.stop().await?;
            bail!("floor: the bulk UPDATE was not received within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    consumer.stop().await?;
    // The slot stays active for a moment after the connection closes.
    for _ in 0..50 {
        floor::drop_floor(db).await;
        let left: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&floor::FLOOR],
            )
            .await?
            .get(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds = (bulk.2 - bulk.1).max(1) as f64 / 1e6;
    Ok(Floor {
        lag_p50_ms: steady[0].0,
        lag_p99_ms: steady[0].1,
        achieved_rows_per_s: steady[0].2,
        chain_p50_ms: steady[1].0,
        chain_p99_ms: steady[1].1,
        chain_achieved_rows_per_s: steady[1].2,
        bulk_rows_per_s: bulk.0 as f64 / seconds,
    })
}

/// The CDC source ([`Pipeline`]) on a current-thread tokio runtime of its own, as `cacheclear run`
/// runs it (see [`on_own_thread`]).
pub(crate) struct SourceOnOwnRuntime {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl SourceOnOwnRuntime {
    /// Spawns the pipeline (its sink made by `make_sink` on the new runtime) and returns once it
    /// streams.
    ///
    /// # Errors
    /// The pipeline stopped before streaming, or did not stream within 60 s.
    pub(crate) async fn start<S: Sink>(
        cfg: PostgresConfig,
        rules: Arc<Rules>,
        make_sink: impl FnOnce() -> anyhow::Result<S> + Send + 'static,
        options: RunOptions,
    ) -> anyhow::Result<SourceOnOwnRuntime> {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut task = on_own_thread(move || async move {
            let mut pipeline = Pipeline::spawn(cfg, rules, make_sink()?, options);
            pipeline.streaming().await?;
            let _ = ready_tx.send(());
            let ended = tokio::select! {
                ended = pipeline.wait() => Some(ended),
                _ = stop_rx => None,
            };
            match ended {
                Some(ended) => ended?,
                None => pipeline.stop().await?,
            }
            Ok(())
        });
        tokio::select! {
            ready = ready_rx => {
                if ready.is_err() {
                    match (&mut task).await {
                        Ok(Err(e)) => bail!("the pipeline stopped: {e:#}"),
                        Ok(Ok(())) => bail!("the pipeline stopped before streaming"),
                        Err(e) => bail!("the pipeline's thread failed: {e}"),
                    }
                }
            }
            () = tokio::time::sleep(Duration::from_secs(60)) => {
                bail!("the pipeline did not start within 60 s");
            }
        }
        Ok(SourceOnOwnRuntime { stop, task })
    }

    /// True when the pipeline stopped (by itself: an error).
    pub(crate) fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the pipeline (what it read is applied and confirmed) and waits for it.
    ///
    /// # Errors
    /// Why the pipeline had stopped, if it had.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await?
    }
}

/// Runs `make()`'s future on a tokio runtime of its own (a worker per core), on a thread of the
/// blocking pool: as in production, where the pipeline and the invalidator are processes of
/// their own, the load generator's tasks must not queue in front of them on shared worker
/// threads.
pub(crate) fn on_own_runtime<F, Fut>(make: F) -> tokio::task::JoinHandle<anyhow::Result<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    on_blocking_thread(tokio::runtime::Runtime::new, make)
}

/// As [`on_own_runtime`], on a current-thread runtime: how `cacheclear run` runs the CDC source
/// (`crates/cli/src/main.rs`), so the bench measures the same; the floor consumer runs so too.
pub(crate) fn on_own_thread<F, Fut>(make: F) -> tokio::task::JoinHandle<anyhow::Result<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    on_blocking_thread(
        || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        },
        make,
    )
}

/// Builds a runtime with `build` on a thread of the blocking pool and runs `make()` on it.
fn on_blocking_thread<F, Fut>(
    build: fn() -> std::io::Result<tokio::runtime::Runtime>,
    make: F,
) -> tokio::task::JoinHandle<anyhow::Result<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    tokio::task::spawn_blocking(move || build()?.block_on(make()))
}

/// PostgreSQL and Redis for a benchmark: the given URLs, or private instances (stopped when this
/// is dropped).
pub(crate) struct Instances {
    /// The private PostgreSQL, if no URL was given (kept alive, stopped on drop).
    _pg: Option<PgInstance>,
    /// The private Redis, if no URL was given (kept alive, stopped on drop).
    _redis: Option<RedisInstance>,
    /// PostgreSQL URL in use.
    pub pg_url: String,
    /// Redis URL in use.
    pub redis_url: String,
}

impl Instances {
    /// Starts what is not given.
    pub(crate) async fn start(
        pg_url: Option<String>,
        redis_url: Option<String>,
    ) -> anyhow::Result<Instances> {
        let pg = match &pg_url {
            Some(_) => None,
            None => Some(tokio::task::spawn_blocking(PgInstance::start).await??),
        };
        let redis = match &redis_url {
            Some(_) => None,
            None => Some(tokio::task::spawn_blocking(RedisInstance::start).await??),
        };
        let pg_url = pg_url
            .or(pg.as_ref().map(PgInstance::url))
            .context("postgres url")?;
        let redis_url = redis_url
            .or(redis.as_ref().map(RedisInstance::url))
            .context("redis url")?;
        Ok(Instances {
            _pg: pg,
            _redis: redis,
            pg_url,
            redis_url,
        })
    }
}

/// (Re)creates `cacheclear_bench_product` with `rows` rows (REPLICA IDENTITY FULL), dropping the
/// `cacheclear_bench` slot and publication left by an earlier run. Returns the connection.
pub(crate) async fn create_bench_table(
    pg_url: &str,
    rows: u64,
) -> anyhow::Result<tokio_postgres::Client> {
    let db = cacheclear_pg_tls::connect(pg_url, "--postgres-url").await?;
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS cacheclear_bench_product;
         SELECT pg_drop_replication_slot('cacheclear_bench') FROM pg_replication_slots WHERE slot_name = 'cacheclear_bench';
         DROP PUBLICATION IF EXISTS cacheclear_bench;
         CREATE TABLE cacheclear_bench_product (id int PRIMARY KEY, category_id int NOT NULL, price_cents bigint NOT NULL, name text NOT NULL);
         ALTER TABLE cacheclear_bench_product REPLICA IDENTITY FULL;
         INSERT INTO cacheclear_bench_product SELECT g, g % 1000, 1000, 'product ' || g FROM generate_series(1, {rows}) g;
         ANALYZE cacheclear_bench_product;"
    ))
    .await
    .context("creating the benchmark table")?;
    Ok(db)
}

/// The benchmark table's rules: `bench:product:{id}`, `bench:category:{category_id}:products`.
pub(crate) fn bench_rules() -> anyhow::Result<Rules> {
    Ok(Rules::compile(&[RuleConfig {
        table: "public.cacheclear_bench_product".into(),
        keys: vec![
            "bench:product:{id}".into(),
            "bench:category:{category_id}:products".into(),
        ],
    }])?)
}

/// Drops the benchmark's slot, publication and table (best effort).
pub(crate) async fn drop_bench_objects(db: &tokio_postgres::Client) {
    let _ = db
        .batch_execute(
            "SELECT pg_drop_replication_slot('cacheclear_bench') FROM pg_replication_slots WHERE slot_name = 'cacheclear_bench';
             DROP PUBLICATION IF EXISTS cacheclear_bench; DROP TABLE IF EXISTS cacheclear_bench_product;",
        )
        .await;
}

/// Prints the table; the steady-rate rows come from `phases` (1k, then 10k rows/s), the rest from
/// `f`.
fn print_table(f: &Figures, phases: &[(StageFigures, f64)]) {
    println!("$ {}", f.command);
    println!("{:<44} {:>12}", "figure", "value");
    let row = |name: &str, v: f64| println!("{name:<44} {v:>9.2} ms");
    for ((p, achieved), (rate, target)) in phases
        .iter()
        .zip([("1k", " (target < 10 ms)"), ("10k", "")])
    {
        row(&format!("lag p50 @ {rate} rows/s"), p.p50);
        row(&format!("lag p99 @ {rate} rows/s{target}"), p.p99);
        row(&format!("lag max @ {rate} rows/s"), p.max);
        row("  of which commit → received, p99", p.server_p99);
        row("  received → taken by the barrier, p99", p.queue_p99);
        row("  taken → visible (barrier queries), p99", p.barrier_p99);
        row("  visible → Redis ack, p99", p.sink_p99);
        println!("{:<44} {:>12.0}", "  achieved rows/s", achieved);
    }
    row(
        "floor: commit → received p50 @ 1k rows/s",
        f.floor_lag_1k_p50_ms,
    );
    row(
        "floor: commit → received p99 @ 1k rows/s",
        f.floor_lag_1k_p99_ms,
    );
    println!(
        "{:<44} {:>12.2}",
        "lag p99 @ 1k / floor p99 (target ≤ 2)", f.lag_1k_p99_vs_floor
    );
    println!(
        "{:<44} {:>12.2}",
        "lag p99 @ 10k / floor p99 (target ≤ 3)", f.lag_10k_p99_vs_floor
    );
    row(
        "chain floor: commit → evicted p50 @ 1k",
        f.floor_chain_lag_1k_p50_ms,
    );
    row(
        "chain floor: commit → evicted p99 @ 1k",
        f.floor_chain_lag_1k_p99_ms,
    );
    println!(
        "{:<44} {:>12.2}",
        "lag p99 @ 1k / chain floor p99", f.lag_1k_p99_vs_chain_floor
    );
    println!(
        "{:<44} {:>12.2}",
        "lag p99 @ 10k / chain floor p99", f.lag_10k_p99_vs_chain_floor
    );
    println!("{:<44} {:>12}", "bulk UPDATE rows", f.bulk_rows);
    println!(
        "{:<44} {:>10.2} s",
        "bulk commit → last eviction", f.bulk_seconds
    );
    for (name, v) in [
        (
            "  commit → Commit received (streamed)",
            f.bulk_receive_seconds,
        ),
        ("  received → visible (barrier)", f.bulk_barrier_seconds),
        ("  visible → last Redis ack", f.bulk_redis_seconds),
    ] {
        println!("{name:<44} {v:>10.2} s");
    }
    println!(
        "{:<44} {:>12.0}",
        "bulk rows/s (target ≥ 50000)", f.bulk_rows_per_s
    );
    println!(
        "{:<44} {:>12.0}",
        "floor: walsender's own bulk rows/s", f.floor_bulk_rows_per_s
    );
    println!(
        "{:<44} {:>12.2}",
        "bulk rows/s / floor (target ≥ 0.85)", f.bulk_vs_floor
    );
    println!(
        "{:<44} {:>12.0}",
        "floor: Redis alone, the bulk's keys/s", f.floor_redis_keys_per_s
    );
    println!(
        "{:<44} {:>12.2}",
        "bulk keys/s / Redis floor", f.bulk_vs_redis_floor
    );
    println!(
        "{:<44} {:>9.1} MB",
        "pipeline peak RSS, bulk included (target < 50)", f.pipeline_peak_rss_mb
    );
    println!(
        "{:<44} {:>9.1} MB",
        "pipeline peak RSS @ 1k rows/s (target < 20)", f.pipeline_steady_rss_mb
    );
    println!(
        "{:<44} {:>9.1} MB",
        "  of which anonymous (heap, stacks), now", f.pipeline_steady_anon_mb
    );
    println!(
        "{:<44} {:>9.1} MB",
        "bench process (load generator) peak RSS", f.peak_rss_mb
    );
    println!("{:<44} {:>12}", "cores", f.cores);
}

/// Peak resident set size of this process (VmHWM from /proc/self/status), in MB (10^6 bytes).
pub(crate) fn peak_rss_mb() -> anyhow::Result<f64> {
    status_mb("/proc/self/status", "VmHWM:")
}

/// A `kB` field (`VmHWM:`, `VmRSS:`) of a `/proc/<pid>/status` file, in MB (10^6 bytes).
///
/// # Errors
/// The file cannot be read, lacks the field, or its value does not parse.
pub(crate) fn status_mb(path: &str, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in {path}"))?;
    let kb: f64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{field} in {path} does not parse"))?;
    Ok(kb * 1024.0 / 1e6)
}

/// Issues `rate` row changes per second for `seconds`, as transactions of `rows_per_txn`
/// single-statement UPDATEs of random rows, from 4 connections. Returns the achieved rows/s.
pub(crate) async fn steady_load(
    url: &str,
    rate: u64,
    rows_per_txn: u64,
    seconds: u64,
    table_rows: u64,
) -> anyhow::Result<f64> {
    const WORKERS: u64 = 4;
    let txns_per_s = (rate / rows_per_txn).max(1);
    let period = Duration::from_secs_f64(WORKERS as f64 / txns_per_s as f64);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let client = cacheclear_pg_tls::connect(url, "--postgres-url").await?;
        tasks.push(tokio::spawn(async move {
            let stmt = client
                .prepare("UPDATE cacheclear_bench_product SET price_cents = price_cents + 1 WHERE id = ANY($1)")
                .await?;
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (w + 1);
            let mut rows = 0u64;
            while Instant::now() < deadline {
                tick.tick().await;
                let ids: Vec<i32> = (0..rows_per_txn)
                    .map(|_| {
                        // xorshift64: uniform ids without a dependency.
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        (1 + seed % table_rows) as i32
                    })
                    .collect();
                rows += client.execute(&stmt, &[&ids]).await?;
            }
            anyhow::Ok(rows)
        }));
    }
    let started = Instant::now();
    let mut rows = 0;
    for t in tasks {
        rows += t.await??;
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64().max(seconds as f64))
}
