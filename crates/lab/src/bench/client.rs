//! `cacheclear bench client`: the staleness breaker's cost on the client's hit path
//! (docs/architecture.md, "The staleness breaker"; issue 10 sets the target: within 5% of the
//! hit path without it).
//!
//! A private Redis (or `--redis-url`) holds `--keys` cached values; a namespace keeper in this
//! process opens an epoch and publishes a fresh watermark every 100 ms, as the pipeline's
//! heartbeat does. Two clients read the same keys with `get_or_load` (every read a hit): one
//! without a breaker (the floor), one with `StalenessConfig` on that namespace. Rounds alternate
//! the two (A B, B A, …) so that machine noise falls on both; the figure is the median over
//! rounds of (reads/s with the breaker) / (reads/s without), for the Redis hit path and for the
//! in-process tier's hit path (where no round trip hides the breaker's check).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cacheclear_client::{Client, Config, Loaded, LocalTierConfig, StalenessConfig};
use cacheclear_harness::RedisInstance;
use cacheclear_protocol::{Lsn, Sink, Watermark, now_us};
use cacheclear_sink_redis::{RedisConfig, RedisSink};
use clap::Args;
use hdrhistogram::Histogram;

use super::shown_command;

/// The namespace the bench's keeper publishes.
const NAMESPACE: &str = "cacheclear_bench_client";

/// Options of `bench client`.
#[derive(Args)]
pub struct ClientArgs {
    /// Print one JSON object (fields `redis_hit_ratio`, `local_hit_ratio`, …) instead of the
    /// table.
    #[arg(long)]
    json: bool,
    /// Reads per round and variant.
    #[arg(long, default_value_t = 100_000)]
    reads: u64,
    /// Rounds; each runs both variants, in alternating order.
    #[arg(long, default_value_t = 7)]
    rounds: u32,
    /// Concurrent readers (tasks sharing one client).
    #[arg(long, default_value_t = 16)]
    concurrency: u32,
    /// Distinct keys read (all cached before the rounds).
    #[arg(long, default_value_t = 1_000)]
    keys: u32,
    /// Use this Redis instead of a private instance (keys `{bench:…}` and the namespace
    /// `cacheclear_bench_client` are written).
    #[arg(long)]
    redis_url: Option<String>,
}

/// One hit path measured with and without the breaker.
#[derive(serde::Serialize)]
struct PathFigures {
    /// Median reads/s without the breaker.
    floor_reads_per_s: f64,
    /// Median reads/s with the breaker.
    breaker_reads_per_s: f64,
    /// Median over rounds of breaker / floor reads/s (1.0: no cost).
    ratio: f64,
    /// Read latency p50 / p99 without and with the breaker, µs (all rounds).
    floor_p50_us: u64,
    floor_p99_us: u64,
    breaker_p50_us: u64,
    breaker_p99_us: u64,
}

#[derive(serde::Serialize)]
struct Figures {
    command: String,
    reads_per_round: u64,
    rounds: u32,
    concurrency: u32,
    redis_hit: PathFigures,
    local_hit: PathFigures,
    /// Reads the breaker let through to the cache / reads it bypassed (must be 0: the keeper
    /// keeps the watermark fresh).
    breaker_bypassed: u64,
    cores: usize,
}

/// Runs `bench client`.
///
/// # Errors
/// Redis did not start or answer, or a read bypassed the cache or missed (the bench would
/// measure something else than the hit path).
pub(super) async fn client(args: ClientArgs) -> anyhow::Result<()> {
    if args.reads == 0 || args.rounds == 0 || args.concurrency == 0 || args.keys == 0 {
        bail!("--reads, --rounds, --concurrency and --keys must be at least 1");
    }
    let command = shown_command();
    let _private;
    let redis_url = match &args.redis_url {
        Some(url) => url.clone(),
        None => {
            let r = tokio::task::spawn_blocking(RedisInstance::start).await??;
            let url = r.url();
            _private = r;
            url
        }
    };
    let progress = |msg: &str| {
        if !args.json {
            eprintln!("bench: {msg}");
        }
    };

    progress("opening the namespace's epoch, publishing its watermark every 100 ms");
    let sink = Arc::new(
        RedisSink::connect(RedisConfig::new(redis_url.clone())).context("the keeper's Redis")?,
    );
    let opened = sink
        .open_epoch(NAMESPACE, "bench/1", Some("new_slot"), false)
        .await
        .map_err(|e| anyhow::anyhow!("opening the bench namespace's epoch: {e}"))?
        .context("the Redis sink keeps no epoch")?;
    let keeper = tokio::spawn({
        let sink = Arc::clone(&sink);
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut lsn = 1u64;
            loop {
                tick.tick().await;
                lsn += 1;
                let w = Watermark {
                    lsn: Lsn(lsn),
                    commit_time_us: now_us(),
                    lag_ms: 0,
                    written_ms: 0,
                    epoch: opened.epoch,
                };
                if let Err(e) = sink.publish_watermark(NAMESPACE, &w).await {
                    tracing::warn!(error = %e, "bench keeper: publishing the watermark failed");
                }
            }
        }
    });

    let staleness = StalenessConfig::new(NAMESPACE);
    let redis_floor = Client::connect(&redis_url, Config::default()).await?;
    let redis_breaker = Client::connect(
        &redis_url,
        Config::default().with_staleness(staleness.clone()),
    )
    .await?;
    let local = LocalTierConfig::new(60_000, u64::from(args.keys) * 2);
    let local_floor =
        Client::connect(&redis_url, Config::default().with_local_tier(local.clone())).await?;
    let local_breaker = Client::connect(
        &redis_url,
        Config::default()
            .with_local_tier(local)
            .with_staleness(staleness),
    )
    .await?;
    progress(&format!("filling {} keys", args.keys));
    for c in [&redis_floor, &redis_breaker, &local_floor, &local_breaker] {
        for k in 0..args.keys {
            read(c, k).await?;
        }
    }

    let redis_hit = measure(&args, &redis_floor, &redis_breaker, "Redis hit", &progress).await?;
    let local_hit = measure(&args, &local_floor, &local_breaker, "local hit", &progress).await?;
    keeper.abort();
    let mut breaker_bypassed = 0;
    for c in [&redis_breaker, &local_breaker] {
        let s = c.stats();
        breaker_bypassed +=
            s.bypassed_watermark_stale + s.bypassed_watermark_missing + s.bypassed_epoch_missing;
    }
    for c in [&redis_floor, &redis_breaker, &local_floor, &local_breaker] {
        let s = c.stats();
        if s.loads > u64::from(args.keys) {
            bail!(
                "a client loaded {} times for {} keys: the rounds did not measure the hit path",
                s.loads,
                args.keys
            );
        }
    }
    let figures = Figures {
        command,
        reads_per_round: args.reads,
        rounds: args.rounds,
        concurrency: args.concurrency,
        redis_hit,
        local_hit,
        breaker_bypassed,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
    };
    if args.json {
        println!("{}", serde_json::to_string(&figures)?);
    } else {
        print_table(&figures);
    }
    Ok(())
}

/// One read of key `k` through `client`; the loader (a constant, no database) runs only on the
/// fill before the rounds.
async fn read(client: &Client, k: u32) -> anyhow::Result<u64> {
    let key = format!("{{bench:{k}}}");
    Ok(client
        .get_or_load(&key, || async move {
            Ok::<_, std::convert::Infallible>(Loaded::new(u64::from(k)))
        })
        .await?)
}

/// Alternating rounds of `floor` and `breaker`: the median of their reads/s and of the per-round
/// ratio, and the latency percentiles.
async fn measure(
    args: &ClientArgs,
    floor: &Client,
    breaker: &Client,
    what: &str,
    progress: &impl Fn(&str),
) -> anyhow::Result<PathFigures> {
    let mut floor_rates = Vec::new();
    let mut breaker_rates = Vec::new();
    let mut ratios = Vec::new();
    let mut floor_lat = histogram();
    let mut breaker_lat = histogram();
    for round in 0..args.rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let mut rates = [0.0; 2];
        for with_breaker in order {
            let (client, lat) = if with_breaker {
                (breaker, &mut breaker_lat)
            } else {
                (floor, &mut floor_lat)
            };
            rates[usize::from(with_breaker)] = round_of(args, client, lat).await?;
        }
        progress(&format!(
            "{what} round {}/{}: {:.0} reads/s without the breaker, {:.0} with",
            round + 1,
            args.rounds,
            rates[0],
            rates[1]
        ));
        floor_rates.push(rates[0]);
        breaker_rates.push(rates[1]);
        ratios.push(rates[1] / rates[0]);
    }
    Ok(PathFigures {
        floor_reads_per_s: median(&mut floor_rates),
        breaker_reads_per_s: median(&mut breaker_rates),
        ratio: median(&mut ratios),
        floor_p50_us: floor_lat.value_at_quantile(0.5),
        floor_p99_us: floor_lat.value_at_quantile(0.99),
        breaker_p50_us: breaker_lat.value_at_quantile(0.5),
        breaker_p99_us: breaker_lat.value_at_quantile(0.99),
    })
}

/// `args.reads` reads by `args.concurrency` tasks; returns reads/s.
async fn round_of(
    args: &ClientArgs,
    client: &Client,
    latency: &mut Histogram<u64>,
) -> anyhow::Result<f64> {
    let per_task = args.reads.div_ceil(u64::from(args.concurrency));
    let keys = u64::from(args.keys);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..u64::from(args.concurrency) {
        let client = client.clone();
        tasks.spawn(async move {
            let mut lat = histogram();
            for i in 0..per_task {
                let k = u32::try_from((t * 7_919 + i * 31) % keys).unwrap_or(0);
                let at = Instant::now();
                let v = read(&client, k).await?;
                lat.saturating_record(u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX));
                if v != u64::from(k) {
                    bail!("key {k} read back {v}");
                }
            }
            anyhow::Ok(lat)
        });
    }
    while let Some(done) = tasks.join_next().await {
        latency.add(done??).context("merging latency histograms")?;
    }
    Ok((per_task * u64::from(args.concurrency)) as f64 / started.elapsed().as_secs_f64())
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn print_table(f: &Figures) {
    println!("$ {}", f.command);
    println!(
        "{} reads per round and variant, {} rounds (alternating order), {} concurrent readers, {} cores",
        f.reads_per_round, f.rounds, f.concurrency, f.cores
    );
    println!(
        "{:<12} {:>16} {:>16} {:>8} {:>18} {:>18}",
        "hit path",
        "reads/s floor",
        "reads/s breaker",
        "ratio",
        "p50/p99 µs floor",
        "p50/p99 µs brk"
    );
    for (name, p) in [("Redis", &f.redis_hit), ("local tier", &f.local_hit)] {
        println!(
            "{:<12} {:>16.0} {:>16.0} {:>8.3} {:>18} {:>18}",
            name,
            p.floor_reads_per_s,
            p.breaker_reads_per_s,
            p.ratio,
            format!("{} / {}", p.floor_p50_us, p.floor_p99_us),
            format!("{} / {}", p.breaker_p50_us, p.breaker_p99_us),
        );
    }
    println!(
        "target: ratio ≥ 0.95 (the breaker costs at most 5% of the hit path); reads bypassed: {}",
        f.breaker_bypassed
    );
}
