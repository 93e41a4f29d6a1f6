//! `cacheclear bench client`: the client library against its floors, measured in the same run
//! on the same Redis (issue 12, point 4; issue 10's breaker target).
//!
//! - **Hit path vs raw `GET`**: `get_or_load` of `--keys` cached values against a plain `GET`
//!   of the same keys, one multiplexed connection and `--concurrency` readers each. Target:
//!   `hit_vs_raw_get` ≥ 0.9.
//! - **Staleness breaker** (docs/architecture.md, "The staleness breaker"): the hit path with
//!   `StalenessConfig` on a namespace whose epoch a keeper in this process opened and whose
//!   watermark it refreshes every 100 ms (as the pipeline's heartbeat does), against the same
//!   client without it; through Redis and through the in-process tier (where no round trip
//!   hides the check). Target: ratio ≥ 0.95 (at most 5% cost).
//! - **Miss path**: lease + load + fill of keys never read before, the loader a fixed 1 ms
//!   sleep (no database).
//! - **Stampede**: `--stampede-readers` concurrent reads of one cold key spread over 8 client
//!   instances (8 connections, 8 single-flight tables, one lease): database loads (must be 1)
//!   and the time until every reader has its value.
//!
//! Paired figures run in alternating rounds (A B, B A, …) so that machine noise falls on both;
//! each ratio is the median over rounds of the per-round ratio.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cacheclear_client::{Client, Config, Loaded, LocalTierConfig, StalenessConfig};
use cacheclear_harness::RedisInstance;
use cacheclear_protocol::{KeyLayout, Lsn, Sink, Watermark, now_us};
use cacheclear_sink_redis::{RedisConfig, RedisSink};
use clap::Args;
use hdrhistogram::Histogram;

use super::shown_command;

/// The namespace the bench's keeper publishes.
const NAMESPACE: &str = "cacheclear_bench_client";
/// Client instances of the stampede (application servers).
const STAMPEDE_CLIENTS: usize = 8;
/// The miss path's loader time.
const MISS_LOADER: Duration = Duration::from_millis(1);

/// Options of `bench client`.
#[derive(Args)]
pub struct ClientArgs {
    /// Print one JSON object (`hit_ops_per_s`, `raw_get_ops_per_s`, `hit_vs_raw_get`,
    /// `breaker_hit_ratio`, `stampede_db_loads`, …) instead of the table.
    #[arg(long)]
    json: bool,
    /// Reads per round and variant.
    #[arg(long, default_value_t = 100_000)]
    reads: u64,
    /// Rounds; each runs both variants of a pair, in alternating order.
    #[arg(long, default_value_t = 7)]
    rounds: u32,
    /// Concurrent readers (tasks sharing one client or one connection).
    #[arg(long, default_value_t = 16)]
    concurrency: u32,
    /// Distinct keys read on the hit path (all cached before the rounds).
    #[arg(long, default_value_t = 1_000)]
    keys: u32,
    /// Misses of the miss path.
    #[arg(long, default_value_t = 20_000)]
    misses: u64,
    /// Concurrent readers of one cold key in the stampede, spread over 8 client instances.
    #[arg(long, default_value_t = 10_000)]
    stampede_readers: u32,
    /// Use this Redis instead of a private instance (keys `{bench:…}…` and the namespace
    /// `cacheclear_bench_client` are written).
    #[arg(long)]
    redis_url: Option<String>,
}

/// Everything `bench client` prints (`--json`: one object, these fields).
#[derive(serde::Serialize)]
struct Figures {
    command: String,
    reads_per_round: u64,
    rounds: u32,
    concurrency: u32,
    cores: usize,
    /// Client hit path, median reads/s over rounds.
    hit_ops_per_s: f64,
    /// Raw `GET` of the same keys, median reads/s.
    raw_get_ops_per_s: f64,
    /// Median over rounds of hit / raw GET reads/s (target ≥ 0.9).
    hit_vs_raw_get: f64,
    hit_p50_us: u64,
    hit_p99_us: u64,
    raw_get_p50_us: u64,
    raw_get_p99_us: u64,
    /// Client hit path with the staleness breaker, median reads/s.
    breaker_hit_ops_per_s: f64,
    /// Median over rounds of (with breaker) / (without) on the Redis hit path (target ≥ 0.95).
    breaker_hit_ratio: f64,
    breaker_hit_p50_us: u64,
    breaker_hit_p99_us: u64,
    /// In-process tier hit path without / with the breaker, median reads/s.
    local_hit_ops_per_s: f64,
    local_breaker_hit_ops_per_s: f64,
    /// Median over rounds of (with breaker) / (without) on the in-process tier's hit path.
    local_breaker_hit_ratio: f64,
    /// Reads the breaker bypassed during the rounds (0: the watermark stayed fresh).
    breaker_bypassed: u64,
    /// Miss path (lease, 1 ms loader, fill): misses/s and latency.
    miss_ops_per_s: f64,
    miss_p50_us: u64,
    miss_p99_us: u64,
    /// Stampede: readers, client instances, database loads (must be 1), and the time from the
    /// first read to the last reader having its value, ms.
    stampede_readers: u32,
    stampede_clients: usize,
    stampede_db_loads: u64,
    stampede_all_served_ms: f64,
}

/// A reader of the hit path: the client, or raw `GET` on one multiplexed connection.
#[derive(Clone)]
enum Reader {
    Client(Client),
    /// The connection and the Redis key of each cache key's value (`KeyLayout::value`).
    RawGet(redis::aio::MultiplexedConnection, Arc<Vec<String>>),
}

impl Reader {
    /// Reads key `k`; checks the value.
    async fn read(&mut self, k: u32) -> anyhow::Result<()> {
        match self {
            Reader::Client(c) => {
                let v = read(c, k).await?;
                if v != u64::from(k) {
                    bail!("key {k} read back {v}");
                }
            }
            Reader::RawGet(conn, values) => {
                let value = values
                    .get(k as usize)
                    .with_context(|| format!("no value key for {k}"))?;
                let v: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(value)
                    .query_async(conn)
                    .await
                    .with_context(|| format!("GET {value}"))?;
                if v.is_none() {
                    bail!("GET {value}: not cached");
                }
            }
        }
        Ok(())
    }
}

/// Runs `bench client`.
///
/// # Errors
/// Redis did not start or answer, a value read back wrong, or a client loaded more often than
/// it had keys (the rounds would not have measured the hit path).
pub(super) async fn client(args: ClientArgs) -> anyhow::Result<()> {
    if args.reads == 0
        || args.rounds == 0
        || args.concurrency == 0
        || args.keys == 0
        || args.misses == 0
        || args.stampede_readers == 0
    {
        bail!(
            "--reads, --rounds, --concurrency, --keys, --misses and --stampede-readers must be at least 1"
        );
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
    let keeper = Keeper::start(&redis_url).await?;

    let staleness = StalenessConfig::new(NAMESPACE);
    let plain = Client::connect(&redis_url, Config::default()).await?;
    let breaker = Client::connect(
        &redis_url,
        Config::default().with_staleness(staleness.clone()),
    )
    .await?;
    let local = LocalTierConfig::new(600_000, u64::from(args.keys) * 2);
    let local_plain =
        Client::connect(&redis_url, Config::default().with_local_tier(local.clone())).await?;
    let local_breaker = Client::connect(
        &redis_url,
        Config::default()
            .with_local_tier(local)
            .with_staleness(staleness),
    )
    .await?;
    let raw = cacheclear_protocol::connect::client(&redis_url, None, "--redis-url", "redis.tls")?
        .get_multiplexed_async_connection()
        .await
        .context("connecting to Redis")?;
    let values = Arc::new(
        (0..args.keys)
            .map(|k| Ok(KeyLayout::new(&key(k))?.value().to_owned()))
            .collect::<anyhow::Result<Vec<String>>>()?,
    );
    progress(&format!("filling {} keys", args.keys));
    let clients = [&plain, &breaker, &local_plain, &local_breaker];
    for c in clients {
        for k in 0..args.keys {
            read(c, k).await?;
        }
    }

    let raw_vs_hit = measure(
        &args,
        [Reader::RawGet(raw, values), Reader::Client(plain.clone())],
        "raw GET vs client hit",
        &progress,
    )
    .await?;
    let breaker_pair = measure(
        &args,
        [
            Reader::Client(plain.clone()),
            Reader::Client(breaker.clone()),
        ],
        "client hit without vs with the breaker",
        &progress,
    )
    .await?;
    let local_pair = measure(
        &args,
        [
            Reader::Client(local_plain.clone()),
            Reader::Client(local_breaker.clone()),
        ],
        "in-process tier hit without vs with the breaker",
        &progress,
    )
    .await?;
    keeper.stop();
    let mut breaker_bypassed = 0;
    for c in [&breaker, &local_breaker] {
        let s = c.stats();
        tracing::debug!(stats = ?s, "breaker client counters");
        breaker_bypassed +=
            s.bypassed_watermark_stale + s.bypassed_watermark_missing + s.bypassed_epoch_missing;
    }
    for c in clients {
        let s = c.stats();
        if s.loads > u64::from(args.keys) {
            bail!(
                "a client loaded {} times for {} keys: the rounds did not measure the hit path",
                s.loads,
                args.keys
            );
        }
    }

    progress(&format!(
        "miss path: {} misses, loader {} ms",
        args.misses,
        MISS_LOADER.as_millis()
    ));
    let (miss_ops_per_s, miss_lat) = misses(&args, &plain).await?;
    progress(&format!(
        "stampede: {} readers of one cold key on {STAMPEDE_CLIENTS} clients",
        args.stampede_readers
    ));
    let (stampede_db_loads, stampede_all_served_ms) =
        stampede(&redis_url, args.stampede_readers).await?;

    let figures = Figures {
        command,
        reads_per_round: args.reads,
        rounds: args.rounds,
        concurrency: args.concurrency,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        hit_ops_per_s: raw_vs_hit.rates[1],
        raw_get_ops_per_s: raw_vs_hit.rates[0],
        hit_vs_raw_get: raw_vs_hit.ratio,
        hit_p50_us: raw_vs_hit.latency[1].value_at_quantile(0.5),
        hit_p99_us: raw_vs_hit.latency[1].value_at_quantile(0.99),
        raw_get_p50_us: raw_vs_hit.latency[0].value_at_quantile(0.5),
        raw_get_p99_us: raw_vs_hit.latency[0].value_at_quantile(0.99),
        breaker_hit_ops_per_s: breaker_pair.rates[1],
        breaker_hit_ratio: breaker_pair.ratio,
        breaker_hit_p50_us: breaker_pair.latency[1].value_at_quantile(0.5),
        breaker_hit_p99_us: breaker_pair.latency[1].value_at_quantile(0.99),
        local_hit_ops_per_s: local_pair.rates[0],
        local_breaker_hit_ops_per_s: local_pair.rates[1],
        local_breaker_hit_ratio: local_pair.ratio,
        breaker_bypassed,
        miss_ops_per_s,
        miss_p50_us: miss_lat.value_at_quantile(0.5),
        miss_p99_us: miss_lat.value_at_quantile(0.99),
        stampede_readers: args.stampede_readers,
        stampede_clients: STAMPEDE_CLIENTS,
        stampede_db_loads,
        stampede_all_served_ms,
    };
    if args.json {
        println!("{}", serde_json::to_string(&figures)?);
    } else {
        print_table(&figures);
    }
    Ok(())
}

/// Opens the bench namespace's epoch and publishes a fresh watermark every 100 ms through a
/// Redis sink (the scripts the pipeline uses), until stopped.
struct Keeper {
    task: tokio::task::JoinHandle<()>,
}

impl Keeper {
    async fn start(redis_url: &str) -> anyhow::Result<Keeper> {
        let sink = RedisSink::connect(RedisConfig::new(redis_url.to_owned()))
            .context("the keeper's Redis")?;
        let opened = sink
            .open_epoch(NAMESPACE, "bench/1", Some("new_slot"), false)
            .await
            .map_err(|e| anyhow::anyhow!("opening the bench namespace's epoch: {e}"))?
            .context("the Redis sink keeps no epoch")?;
        let watermark = move |lsn: u64| Watermark {
            lsn: Lsn(lsn),
            commit_time_us: now_us(),
            lag_ms: 0,
            written_ms: 0,
            epoch: opened.epoch,
        };
        // The first one before any client reads: none of them starts with the breaker open.
        sink.publish_watermark(NAMESPACE, &watermark(1))
            .await
            .map_err(|e| anyhow::anyhow!("publishing the bench namespace's watermark: {e}"))?;
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            for lsn in 2u64.. {
                tick.tick().await;
                if let Err(e) = sink.publish_watermark(NAMESPACE, &watermark(lsn)).await {
                    tracing::warn!(error = %e, "bench keeper: publishing the watermark failed");
                }
            }
        });
        Ok(Keeper { task })
    }

    fn stop(self) {
        self.task.abort();
    }
}

/// `bench:k`.
fn key(k: u32) -> String {
    format!("bench:{k}")
}

/// One read of key `k` through `client`; the loader (a constant, no database) runs only on the
/// fill before the rounds.
async fn read(client: &Client, k: u32) -> anyhow::Result<u64> {
    Ok(client
        .get_or_load(&key(k), || async move {
            Ok::<_, std::convert::Infallible>(Loaded::new(u64::from(k)))
        })
        .await?)
}

/// A pair measured in alternating rounds.
struct Pair {
    /// Median reads/s of each.
    rates: [f64; 2],
    /// Median over rounds of rates\[1\] / rates\[0\].
    ratio: f64,
    /// Latency of each over all rounds, µs.
    latency: [Histogram<u64>; 2],
}

/// Alternating rounds of `readers[0]` and `readers[1]`.
async fn measure(
    args: &ClientArgs,
    readers: [Reader; 2],
    what: &str,
    progress: &impl Fn(&str),
) -> anyhow::Result<Pair> {
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut ratios = Vec::new();
    let mut latency = [histogram(), histogram()];
    for round in 0..args.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut this = [0.0; 2];
        for i in order {
            this[i] = round_of(args, &readers[i], &mut latency[i]).await?;
        }
        progress(&format!(
            "{what}, round {}/{}: {:.0} / {:.0} reads/s",
            round + 1,
            args.rounds,
            this[0],
            this[1]
        ));
        rates[0].push(this[0]);
        rates[1].push(this[1]);
        ratios.push(this[1] / this[0]);
    }
    Ok(Pair {
        rates: [median(&mut rates[0]), median(&mut rates[1])],
        ratio: median(&mut ratios),
        latency,
    })
}

/// `args.reads` reads by `args.concurrency` tasks; returns reads/s.
async fn round_of(
    args: &ClientArgs,
    reader: &Reader,
    latency: &mut Histogram<u64>,
) -> anyhow::Result<f64> {
    let per_task = args.reads.div_ceil(u64::from(args.concurrency));
    let keys = u64::from(args.keys);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..u64::from(args.concurrency) {
        let mut reader = reader.clone();
        tasks.spawn(async move {
            let mut lat = histogram();
            for i in 0..per_task {
                let k = u32::try_from((t * 7_919 + i * 31) % keys).unwrap_or(0);
                let at = Instant::now();
                reader.read(k).await?;
                lat.saturating_record(micros(at.elapsed()));
            }
            anyhow::Ok(lat)
        });
    }
    while let Some(done) = tasks.join_next().await {
        latency.add(done??).context("merging latency histograms")?;
    }
    Ok((per_task * u64::from(args.concurrency)) as f64 / started.elapsed().as_secs_f64())
}

/// `args.misses` reads of keys never read before, `args.concurrency` at a time, the loader a
/// 1 ms sleep. Returns misses/s and the latency histogram.
async fn misses(args: &ClientArgs, client: &Client) -> anyhow::Result<(f64, Histogram<u64>)> {
    let per_task = args.misses.div_ceil(u64::from(args.concurrency));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..u64::from(args.concurrency) {
        let client = client.clone();
        tasks.spawn(async move {
            let mut lat = histogram();
            for i in 0..per_task {
                let key = format!("bench:miss:{t}:{i}");
                let at = Instant::now();
                let v: u64 = client
                    .get_or_load(&key, || async move {
                        tokio::time::sleep(MISS_LOADER).await;
                        Ok::<_, std::convert::Infallible>(Loaded::new(i))
                    })
                    .await?;
                lat.saturating_record(micros(at.elapsed()));
                if v != i {
                    bail!("{key} read back {v}");
                }
            }
            anyhow::Ok(lat)
        });
    }
    let mut latency = histogram();
    while let Some(done) = tasks.join_next().await {
        latency.add(done??).context("merging latency histograms")?;
    }
    let n = per_task * u64::from(args.concurrency);
    Ok((n as f64 / started.elapsed().as_secs_f64(), latency))
}

/// `readers` concurrent reads of one cold key over [`STAMPEDE_CLIENTS`] clients, the loader a
/// 1 ms sleep counting its runs. Returns (loads, ms until every reader had the value).
async fn stampede(redis_url: &str, readers: u32) -> anyhow::Result<(u64, f64)> {
    let mut clients = Vec::new();
    for _ in 0..STAMPEDE_CLIENTS {
        clients.push(Client::connect(redis_url, Config::default()).await?);
    }
    let loads = Arc::new(AtomicU64::new(0));
    let go = Arc::new(tokio::sync::Barrier::new(readers as usize + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for r in 0..readers {
        let client = clients[r as usize % STAMPEDE_CLIENTS].clone();
        let (loads, go) = (Arc::clone(&loads), Arc::clone(&go));
        tasks.spawn(async move {
            go.wait().await;
            let v: u64 = client
                .get_or_load("bench:stampede", || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(MISS_LOADER).await;
                    Ok::<_, std::convert::Infallible>(Loaded::new(42u64))
                })
                .await?;
            anyhow::ensure!(v == 42, "the stampede key read back {v}");
            anyhow::Ok(())
        });
    }
    go.wait().await;
    let started = Instant::now();
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let all_served_ms = started.elapsed().as_secs_f64() * 1000.0;
    Ok((loads.load(Ordering::SeqCst), all_served_ms))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
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
        "{} reads per round and variant, {} round(s) (alternating order), {} concurrent readers, {} cores",
        f.reads_per_round, f.rounds, f.concurrency, f.cores
    );
    println!();
    println!(
        "{:<44} {:>12} {:>16} {:>8} {:>8}",
        "", "reads/s", "p50 / p99 µs", "ratio", "target"
    );
    let row = |name: &str, rate: f64, p50: u64, p99: u64, ratio: Option<(f64, &str)>| {
        let (r, t) = ratio.map_or((String::new(), String::new()), |(r, t)| {
            (format!("{r:.3}"), t.to_owned())
        });
        println!(
            "{name:<44} {rate:>12.0} {:>16} {r:>8} {t:>8}",
            format!("{p50} / {p99}")
        );
    };
    row(
        "raw GET (floor)",
        f.raw_get_ops_per_s,
        f.raw_get_p50_us,
        f.raw_get_p99_us,
        None,
    );
    row(
        "client hit path",
        f.hit_ops_per_s,
        f.hit_p50_us,
        f.hit_p99_us,
        Some((f.hit_vs_raw_get, "≥ 0.9")),
    );
    row(
        "client hit path with the staleness breaker",
        f.breaker_hit_ops_per_s,
        f.breaker_hit_p50_us,
        f.breaker_hit_p99_us,
        Some((f.breaker_hit_ratio, "≥ 0.95")),
    );
    println!(
        "{:<44} {:>12.0}",
        "in-process tier hit path", f.local_hit_ops_per_s
    );
    println!(
        "{:<44} {:>12.0} {:>16} {:>8.3} {:>8}",
        "in-process tier hit path with the breaker",
        f.local_breaker_hit_ops_per_s,
        "",
        f.local_breaker_hit_ratio,
        "≥ 0.95"
    );
    row(
        "miss path (lease, 1 ms loader, fill)",
        f.miss_ops_per_s,
        f.miss_p50_us,
        f.miss_p99_us,
        None,
    );
    println!();
    println!(
        "stampede: {} readers of one cold key on {} clients: {} database load(s) (target 1), all served in {:.1} ms",
        f.stampede_readers, f.stampede_clients, f.stampede_db_loads, f.stampede_all_served_ms
    );
    println!(
        "ratios: median over rounds of the per-round ratio to the row above's floor; reads bypassed by the breaker: {}",
        f.breaker_bypassed
    );
}
