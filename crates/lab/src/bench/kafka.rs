//! `cacheclear bench kafka`: bus mode end to end — PostgreSQL → cacheclear source → Kafka sink →
//! topic → invalidator (consumer group) → Redis — and the invalidator's own throughput.
//!
//! Everything runs on this machine: private PostgreSQL, Redis (standalone, or a Redis Cluster
//! with `--redis-cluster-masters N`; `redis_mode` in the output says which) and Kafka-protocol
//! broker (tansu, in-memory), unless URLs are given; the source and the invalidator run in this
//! process. Figures:
//! - lag (ms, p50/p99/max) per bus record, from the transaction's commit time (PostgreSQL's clock,
//!   the same machine) to Redis's acknowledgement in the invalidator, at a steady 1k and 10k row
//!   changes/s (each row change publishes a product-key record; category keys are de-duplicated
//!   per transaction);
//! - the bus floor (`bench/bus_floor.rs`), alone after the lag phases: the broker's own
//!   produce → consume round trip at 1k records/s with the sink's and the invalidator's client
//!   settings, and the 1k lag p99 as a ratio against it (`bus_lag_1k_p99_vs_floor`);
//! - invalidator throughput: records/s one invalidator process applies from a pre-filled topic
//!   (`--throughput-records` records, one distinct key each: no de-duplication helps), from its
//!   partition assignment to the last Redis acknowledgement.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cacheclear_harness::{KafkaBroker, RedisCluster};
use cacheclear_invalidator::{AppliedBatch, InvalidatorConfig, KafkaConfig, RunOptions};
use cacheclear_protocol::{BusRecord, Lsn, Op};
use cacheclear_sink_kafka::KafkaSink;
use cacheclear_sink_redis::RedisConfig;
use cacheclear_source_postgres::PostgresConfig;
use clap::Args;
use hdrhistogram::Histogram;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::bus_floor;
use super::stages::{SourceStages, StageFigures};
use super::{
    Instances, SourceOnOwnRuntime, bench_rules, create_bench_table, drop_bench_objects,
    on_own_runtime, peak_rss_mb, steady_load,
};

const TOPIC: &str = "cacheclear.bench.invalidations";
const THROUGHPUT_TOPIC: &str = "cacheclear.bench.throughput";
const DLQ: &str = "cacheclear.bench.dlq";
const BUS_FLOOR_TOPIC: &str = "cacheclear.bench.floor";

/// Options of `bench kafka`.
#[derive(Args)]
pub struct KafkaArgs {
    /// Print one JSON object (fields lag_1k_p50_ms, lag_1k_p99_ms, lag_10k_p50_ms,
    /// lag_10k_p99_ms, invalidator_records_per_s, redis_mode, …) instead of the table.
    #[arg(long)]
    json: bool,
    /// Seconds of each steady-rate phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rows of the benchmark table.
    #[arg(long, default_value_t = 100_000)]
    rows: u64,
    /// Records pre-filled into a topic for the throughput figure.
    #[arg(long, default_value_t = 500_000)]
    throughput_records: u64,
    /// The invalidator's `fetch.wait.max.ms`. tansu 0.6.0 holds every fetch for this long even
    /// when records are waiting (tansu-storage `service/fetch.rs` sleeps out the remaining wait
    /// before answering), so on tansu the consume side adds about twice this to the lag; Apache
    /// Kafka answers as soon as `fetch.min.bytes` are there (the invalidator's own default, 10,
    /// suits it). 3 here: the lowest that does not turn tansu's fetch loop into busy polling.
    #[arg(long, default_value_t = 3)]
    fetch_wait_max_ms: u64,
    /// The invalidator's `batch_max_wait_ms`.
    #[arg(long, default_value_t = 5)]
    batch_max_wait_ms: u64,
    /// Partitions of the bench topics.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Use this PostgreSQL (needs wal_level=logical) instead of a private instance (creates and
    /// drops `cacheclear_bench_product`, slot and publication `cacheclear_bench`).
    /// TLS as in `postgres.url`: `sslmode`, `sslrootcert`, `sslcert`, `sslkey` (libpq's).
    #[arg(long)]
    postgres_url: Option<String>,
    /// Use this Redis instead of a private instance (keys `{bench:…}` are written).
    #[arg(long)]
    redis_url: Option<String>,
    /// Invalidate a private Redis Cluster of this many masters instead of a standalone Redis
    /// (0: standalone).
    #[arg(long, default_value_t = 0)]
    redis_cluster_masters: usize,
}

#[derive(serde::Serialize)]
struct Figures {
    command: String,
    /// The bus floor (`bench/bus_floor.rs`), measured last among the lag phases and alone:
    /// produce → consume through the broker at 1k records/s with the Kafka sink's producer
    /// properties and the invalidator's consumer properties, ms.
    floor_bus_lag_1k_p50_ms: f64,
    floor_bus_lag_1k_p99_ms: f64,
    floor_bus_lag_1k_max_ms: f64,
    /// Records the floor's consumer received in its measured phase.
    floor_bus_records: u64,
    /// lag_1k_p99_ms / floor_bus_lag_1k_p99_ms.
    bus_lag_1k_p99_vs_floor: f64,
    /// kafka_to_redis_1k_p99_ms / floor_bus_lag_1k_p99_ms: the invalidator's part against the
    /// broker's round trip.
    kafka_to_redis_1k_p99_vs_floor: f64,
    lag_1k_p50_ms: f64,
    lag_1k_p99_ms: f64,
    lag_1k_max_ms: f64,
    achieved_1k_rows_per_s: f64,
    /// Commit → Kafka acknowledgement (the source's share), p50/p99, and the p99 of its stages.
    source_lag_1k_p50_ms: f64,
    source_lag_1k_p99_ms: f64,
    source_server_1k_p99_ms: f64,
    source_queue_1k_p99_ms: f64,
    source_barrier_1k_p99_ms: f64,
    source_sink_1k_p99_ms: f64,
    /// Kafka record timestamp → Redis acknowledgement (broker transit + invalidator), p50/p99.
    kafka_to_redis_1k_p50_ms: f64,
    kafka_to_redis_1k_p99_ms: f64,
    lag_10k_p50_ms: f64,
    lag_10k_p99_ms: f64,
    lag_10k_max_ms: f64,
    achieved_10k_rows_per_s: f64,
    source_lag_10k_p50_ms: f64,
    source_lag_10k_p99_ms: f64,
    source_server_10k_p99_ms: f64,
    source_queue_10k_p99_ms: f64,
    source_barrier_10k_p99_ms: f64,
    source_sink_10k_p99_ms: f64,
    kafka_to_redis_10k_p50_ms: f64,
    kafka_to_redis_10k_p99_ms: f64,
    invalidator_records_per_s: f64,
    throughput_records: u64,
    throughput_seconds: f64,
    partitions: u32,
    redis_mode: String,
    broker: &'static str,
    peak_rss_mb: f64,
    cores: usize,
}

/// One steady-rate phase's figures (ms; `achieved` in rows/s).
struct Phase {
    p50: f64,
    p99: f64,
    max: f64,
    achieved: f64,
    source: StageFigures,
    kafka_p50: f64,
    kafka_p99: f64,
}

struct Lag {
    hist: Histogram<u64>,
    /// Kafka timestamp → Redis ack (broker transit + invalidator), µs.
    kafka_hist: Histogram<u64>,
    recording: bool,
}

/// `cacheclear bench kafka`.
pub(super) async fn kafka(args: KafkaArgs) -> anyhow::Result<()> {
    let command = super::shown_command();
    let progress = |msg: &str| {
        if !args.json {
            eprintln!("bench: {msg}");
        }
    };
    // A cluster replaces the standalone Redis (whose URL is then unused).
    let cluster = match args.redis_cluster_masters {
        0 => None,
        n => Some(tokio::task::spawn_blocking(move || RedisCluster::start(n, 0)).await??),
    };
    let redis_url = match &cluster {
        Some(_) => Some(String::new()),
        None => args.redis_url.clone(),
    };
    let instances = Instances::start(args.postgres_url.clone(), redis_url).await?;
    let (redis_cfg, redis_mode) = match &cluster {
        Some(c) => (
            RedisConfig::cluster(c.seeds()),
            format!("cluster, {} masters", args.redis_cluster_masters),
        ),
        None => (
            RedisConfig::new(instances.redis_url.clone()),
            "standalone".to_string(),
        ),
    };
    let broker = tokio::task::spawn_blocking(KafkaBroker::start).await??;
    let partitions = args.partitions;
    // create_topic blocks briefly (a tansu CLI call); fine at setup.
    for (topic, n) in [
        (TOPIC, partitions),
        (THROUGHPUT_TOPIC, partitions),
        (BUS_FLOOR_TOPIC, partitions),
        (DLQ, 1),
    ] {
        broker
            .create_topic(topic, n)
            .with_context(|| format!("creating topic {topic}"))?;
    }
    progress(&format!("creating {} rows", args.rows));
    let db = create_bench_table(&instances.pg_url, args.rows).await?;
    let rules = Arc::new(bench_rules()?);

    // The source publishes to Kafka.
    let mut pg_cfg = PostgresConfig::new(instances.pg_url.clone());
    pg_cfg.slot = "cacheclear_bench".into();
    pg_cfg.publication = "cacheclear_bench".into();
    pg_cfg.status_interval_ms = 200;
    let mut sink_cfg = cacheclear_sink_kafka::KafkaConfig::new(broker.bootstrap());
    sink_cfg.topic = TOPIC.into();
    // The bus floor's producer gets the sink's properties.
    let floor_producer = {
        let mut c = sink_cfg.clone();
        c.topic = BUS_FLOOR_TOPIC.into();
        c.producer_properties()
    };
    let sink = KafkaSink::connect(sink_cfg)?;
    // Commit → Kafka acknowledgement, per row changed: the source's share of the lag.
    let source_lag = Arc::new(Mutex::new((SourceStages::new()?, false)));
    let source_observer = {
        let source_lag = Arc::clone(&source_lag);
        Arc::new(move |batch: &cacheclear_protocol::Batch| {
            let acked = cacheclear_invalidator::now_us();
            let Ok(mut l) = source_lag.lock() else { return };
            let (stages, recording) = &mut *l;
            if !*recording {
                return;
            }
            for t in batch
                .txns
                .iter()
                .filter(|t| !t.partial && !t.keys.is_empty())
            {
                stages.record(batch, t, acked);
            }
        })
    };
    let source_options = cacheclear_source_postgres::RunOptions {
        observer: Some(source_observer),
        ..Default::default()
    };
    let source_status = Arc::clone(&source_options.status);
    // The source and the invalidator each get a runtime of their own (as processes would).
    let source =
        SourceOnOwnRuntime::start(pg_cfg, Arc::clone(&rules), move || Ok(sink), source_options)
            .await?;

    // The invalidator applies them to Redis; its observer measures commit → Redis-ack lag.
    let lag = Arc::new(Mutex::new(Lag {
        hist: Histogram::new_with_bounds(1, 3_600_000_000, 3)?,
        kafka_hist: Histogram::new_with_bounds(1, 3_600_000_000, 3)?,
        recording: false,
    }));
    let observer = {
        let lag = Arc::clone(&lag);
        Arc::new(move |b: &AppliedBatch<'_>| {
            let Ok(mut l) = lag.lock() else { return };
            if !l.recording {
                return;
            }
            for t in b.commit_times_us {
                let _ = l.hist.record((b.applied_at_us - t).max(1) as u64);
            }
            for t in b.kafka_times_ms.iter().flatten() {
                let _ = l
                    .kafka_hist
                    .record((b.applied_at_us - t * 1000).max(1) as u64);
            }
        })
    };
    let mut inv_cfg = InvalidatorConfig::new(
        KafkaConfig::new(
            broker.bootstrap(),
            "cacheclear-bench",
            vec![TOPIC.into()],
            DLQ,
        ),
        redis_cfg,
    );
    inv_cfg.kafka.batch_max_wait_ms = args.batch_max_wait_ms;
    inv_cfg.kafka.properties.insert(
        "fetch.wait.max.ms".into(),
        args.fetch_wait_max_ms.to_string(),
    );
    let inv_options = RunOptions {
        observer: Some(observer),
        ..RunOptions::default()
    };
    let inv_status = Arc::clone(&inv_options.status);
    let (stop_inv, inv_stop) = tokio::sync::oneshot::channel::<()>();
    let invalidator = on_own_runtime({
        let cfg = inv_cfg.clone();
        move || async move {
            cacheclear_invalidator::run(&cfg, Arc::new(Default::default()), inv_options, async {
                let _ = inv_stop.await;
            })
            .await?;
            Ok(())
        }
    });

    // Warm up: the first transaction goes all the way through.
    db.batch_execute(
        "UPDATE cacheclear_bench_product SET price_cents = price_cents + 1 WHERE id = 1",
    )
    .await?;
    let started = Instant::now();
    while inv_status.records_applied() < 1 {
        if source.is_finished() {
            bail!("the source stopped: {:?}", source.stop().await);
        }
        if invalidator.is_finished() {
            bail!("the invalidator stopped: {:?}", invalidator.await);
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "nothing reached Redis within 60 s (source applied {} transactions)",
                source_status.applied_txns()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut phases = Vec::new();
    for (rate, rows_per_txn) in [(1_000u64, 1u64), (10_000, 10)] {
        progress(&format!(
            "steady {rate} row changes/s ({rows_per_txn} row(s) per transaction) for {} s",
            args.seconds
        ));
        if let Ok(mut l) = lag.lock() {
            l.hist.reset();
            l.kafka_hist.reset();
            l.recording = true;
        }
        if let Ok(mut l) = source_lag.lock() {
            l.0.reset();
            l.1 = true;
        }
        let achieved = steady_load(
            &instances.pg_url,
            rate,
            rows_per_txn,
            args.seconds,
            args.rows,
        )
        .await?;
        // Let the tail drain: wait until the invalidator has been idle for 500 ms.
        let mut last = inv_status.records_applied();
        let drain = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = inv_status.records_applied();
            if now == last || drain.elapsed() > Duration::from_secs(30) {
                break;
            }
            last = now;
        }
        let Ok(mut l) = lag.lock() else {
            bail!("lag recorder poisoned")
        };
        l.recording = false;
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let Ok(mut sl) = source_lag.lock() else {
            bail!("lag recorder poisoned")
        };
        sl.1 = false;
        phases.push(Phase {
            p50: ms(&l.hist, 0.5),
            p99: ms(&l.hist, 0.99),
            max: l.hist.max() as f64 / 1000.0,
            achieved,
            source: sl.0.figures(),
            kafka_p50: ms(&l.kafka_hist, 0.5),
            kafka_p99: ms(&l.kafka_hist, 0.99),
        });
    }
    source.stop().await?;
    let _ = stop_inv.send(());
    let _ = invalidator.await;
    drop_bench_objects(&db).await;

    // The floor, alone (source and invalidator stopped): the broker's own round trip.
    progress(&format!(
        "bus floor: produce → consume, 1000 records/s for {} s",
        args.seconds
    ));
    let floor = bus_floor::measure(
        BUS_FLOOR_TOPIC,
        &floor_producer,
        &inv_cfg.kafka,
        args.seconds,
    )
    .await?;

    // Throughput: a pre-filled topic, one fresh invalidator.
    progress(&format!(
        "throughput: producing {} records to {THROUGHPUT_TOPIC}",
        args.throughput_records
    ));
    produce_records(&broker.bootstrap(), args.throughput_records).await?;
    progress("throughput: one invalidator applies them");
    let mut cfg = inv_cfg.clone();
    cfg.kafka.group_id = "cacheclear-bench-throughput".into();
    cfg.kafka.topics = vec![THROUGHPUT_TOPIC.into()];
    let options = RunOptions::default();
    let status = Arc::clone(&options.status);
    let (stop_tp, tp_stop) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        cacheclear_invalidator::run(&cfg, Arc::new(Default::default()), options, async {
            let _ = tp_stop.await;
        })
        .await
    });
    let wait = Instant::now();
    while status.assigned_partitions() < u64::from(partitions) {
        if wait.elapsed() > Duration::from_secs(60) || task.is_finished() {
            bail!("the throughput invalidator got no partitions within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let t0 = Instant::now();
    while status.records_applied() < args.throughput_records {
        if t0.elapsed() > Duration::from_secs(600) || task.is_finished() {
            bail!(
                "the invalidator applied {} of {} records within 600 s",
                status.records_applied(),
                args.throughput_records
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let throughput_seconds = t0.elapsed().as_secs_f64();
    let _ = stop_tp.send(());
    let _ = task.await;

    let figures = Figures {
        command,
        floor_bus_lag_1k_p50_ms: floor.p50_ms,
        floor_bus_lag_1k_p99_ms: floor.p99_ms,
        floor_bus_lag_1k_max_ms: floor.max_ms,
        floor_bus_records: floor.records,
        bus_lag_1k_p99_vs_floor: phases[0].p99 / floor.p99_ms,
        kafka_to_redis_1k_p99_vs_floor: phases[0].kafka_p99 / floor.p99_ms,
        lag_1k_p50_ms: phases[0].p50,
        lag_1k_p99_ms: phases[0].p99,
        lag_1k_max_ms: phases[0].max,
        achieved_1k_rows_per_s: phases[0].achieved,
        source_lag_1k_p50_ms: phases[0].source.p50,
        source_lag_1k_p99_ms: phases[0].source.p99,
        source_server_1k_p99_ms: phases[0].source.server_p99,
        source_queue_1k_p99_ms: phases[0].source.queue_p99,
        source_barrier_1k_p99_ms: phases[0].source.barrier_p99,
        source_sink_1k_p99_ms: phases[0].source.sink_p99,
        kafka_to_redis_1k_p50_ms: phases[0].kafka_p50,
        kafka_to_redis_1k_p99_ms: phases[0].kafka_p99,
        lag_10k_p50_ms: phases[1].p50,
        lag_10k_p99_ms: phases[1].p99,
        lag_10k_max_ms: phases[1].max,
        achieved_10k_rows_per_s: phases[1].achieved,
        source_lag_10k_p50_ms: phases[1].source.p50,
        source_lag_10k_p99_ms: phases[1].source.p99,
        source_server_10k_p99_ms: phases[1].source.server_p99,
        source_queue_10k_p99_ms: phases[1].source.queue_p99,
        source_barrier_10k_p99_ms: phases[1].source.barrier_p99,
        source_sink_10k_p99_ms: phases[1].source.sink_p99,
        kafka_to_redis_10k_p50_ms: phases[1].kafka_p50,
        kafka_to_redis_10k_p99_ms: phases[1].kafka_p99,
        invalidator_records_per_s: args.throughput_records as f64 / throughput_seconds,
        throughput_records: args.throughput_records,
        throughput_seconds,
        partitions,
        redis_mode,
        broker: "tansu (in-memory)",
        peak_rss_mb: peak_rss_mb()?,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
    };
    if args.json {
        println!("{}", serde_json::to_string(&figures)?);
    } else {
        print_table(&figures, &phases);
    }
    Ok(())
}

/// Produces `n` bus records with distinct keys to the throughput topic.
async fn produce_records(bootstrap: &str, n: u64) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .create()
        .context("bench producer")?;
    let now = cacheclear_invalidator::now_us();
    let mut i = 0u64;
    while i < n {
        let end = (i + 20_000).min(n);
        let mut deliveries = Vec::with_capacity((end - i) as usize);
        for j in i..end {
            let key = format!("bench:tp:{j}");
            let value = BusRecord {
                key: Some(key.clone()),
                patterns: vec![],
                commit_lsn: Lsn(0x1_0000_0000 + j),
                commit_time_us: now,
                xid: j,
                table: "public.cacheclear_bench_product".into(),
                op: Op::Update,
            }
            .to_json();
            let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(THROUGHPUT_TOPIC)
                .key(key.as_str())
                .payload(value.as_slice());
            deliveries.push(
                producer
                    .send_result(record)
                    .map_err(|(e, _)| anyhow::anyhow!("queueing a bench record: {e}"))?,
            );
        }
        for d in deliveries {
            d.await
                .context("delivery report")?
                .map_err(|(e, _)| anyhow::anyhow!("producing a bench record: {e}"))?;
        }
        i = end;
    }
    Ok(())
}

/// Prints the table; the steady-rate rows come from `phases` (1k, then 10k rows/s), the rest from
/// `f`.
fn print_table(f: &Figures, phases: &[Phase]) {
    println!("$ {}", f.command);
    println!(
        "(PostgreSQL → Kafka [{}, {} partitions] → invalidator → Redis [{}], {} cores)",
        f.broker, f.partitions, f.redis_mode, f.cores
    );
    println!("{:<48} {:>12}", "figure", "value");
    let row = |name: &str, v: f64| println!("{name:<48} {v:>9.2} ms");
    for (p, (rate, target)) in phases
        .iter()
        .zip([("1k", " (target < 25 ms)"), ("10k", "")])
    {
        row(&format!("lag p50 @ {rate} rows/s"), p.p50);
        row(&format!("lag p99 @ {rate} rows/s{target}"), p.p99);
        row(&format!("lag max @ {rate} rows/s"), p.max);
        println!("{:<48} {:>12.0}", "  achieved rows/s", p.achieved);
        row("  commit → Kafka ack p50 (source)", p.source.p50);
        row("  commit → Kafka ack p99 (source)", p.source.p99);
        row("    commit → received p99", p.source.server_p99);
        row(
            "    received → taken by the barrier p99",
            p.source.queue_p99,
        );
        row(
            "    taken → visible (barrier queries) p99",
            p.source.barrier_p99,
        );
        row("    visible → Kafka ack p99", p.source.sink_p99);
        row(
            "  Kafka timestamp → Redis ack p50 (invalidator)",
            p.kafka_p50,
        );
        row(
            "  Kafka timestamp → Redis ack p99 (invalidator)",
            p.kafka_p99,
        );
    }
    row(
        "bus floor: produce → consume p50 @ 1k/s",
        f.floor_bus_lag_1k_p50_ms,
    );
    row(
        "bus floor: produce → consume p99 @ 1k/s",
        f.floor_bus_lag_1k_p99_ms,
    );
    println!(
        "{:<48} {:>12.2}",
        "lag p99 @ 1k / bus floor p99", f.bus_lag_1k_p99_vs_floor
    );
    println!(
        "{:<48} {:>12.2}",
        "  Kafka timestamp → Redis ack p99 / floor p99", f.kafka_to_redis_1k_p99_vs_floor
    );
    println!(
        "{:<48} {:>12.0}",
        "invalidator records/s, 1 process (target ≥ 50000)", f.invalidator_records_per_s
    );
    println!(
        "{:<48} {:>12}",
        "  records (distinct keys)", f.throughput_records
    );
    println!(
        "{:<48} {:>9.1} MB",
        "peak RSS of the bench process", f.peak_rss_mb
    );
}
