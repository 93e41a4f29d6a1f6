//! One strategy run of the flash sale: shoppers reading product pages through the cache, filling
//! carts and checking out; a catalog-edit job; the admin transaction that ends the sale; for
//! `cacheclear`, the invalidation pipeline in this process. Everything measured against one
//! monotonic clock ([`Instant`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cacheclear_client::{Loaded, StalenessConfig};
use cacheclear_protocol::Batch;
use cacheclear_protocol::namespace::{NamespaceLayout, Watermark};
use cacheclear_protocol::now_us;
use cacheclear_rules::{RuleConfig, Rules};
use cacheclear_sink_redis::{RedisConfig, RedisSink};
use cacheclear_source_postgres::{Pipeline, PostgresConfig, RunOptions};
use hdrhistogram::Histogram;
use tokio::task::JoinSet;

use super::Progress;
use super::catalog::{self, CheckoutEnd, Line, Product, SaleEnd, Statements};
use super::fault::{self, Fault, FaultTimes, StopRequest};
use super::report::StrategyFigures;
use super::zipf::{Rng, Zipf};

/// Which read path the shoppers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Strategy {
    /// The common answer: `GET`; on a miss read the database and `SET … EX ttl`. No invalidation
    /// pipeline, no lease, no single-flight.
    TtlOnly,
    /// The cacheclear client (`get_or_load`: lease, fenced fill, single-flight) with the
    /// invalidation pipeline running.
    Cacheclear,
}

impl Strategy {
    /// The name used in the table and the progress bar.
    pub(super) fn label(self) -> &'static str {
        match self {
            Strategy::TtlOnly => "ttl-only",
            Strategy::Cacheclear => "cacheclear",
        }
    }
}

/// The settings of a run (the same for both strategies).
#[derive(Debug, Clone)]
pub(super) struct Settings {
    /// PostgreSQL connection URL.
    pub pg_url: String,
    /// Redis URL.
    pub redis_url: String,
    /// Products in the catalog.
    pub products: u32,
    /// Products on sale: ids `1..=sale_items`, the most viewed.
    pub sale_items: u32,
    /// Concurrent shoppers.
    pub shoppers: u32,
    /// Application servers (cache clients) the shoppers are spread over.
    pub app_servers: u32,
    /// Length of the run.
    pub duration: Duration,
    /// When, from the start of the run, the sale-end transaction runs.
    pub sale_end_at: Duration,
    /// Seed of every random choice.
    pub seed: u64,
    /// Product popularity.
    pub zipf: Arc<Zipf>,
    /// Ids `1..=hot_keys` are the hot keys whose loads are counted.
    pub hot_keys: u32,
    /// Catalog edits per second (descriptions of products not on sale).
    pub edits_per_s: f64,
    /// Cache TTL, seconds, of both strategies.
    pub ttl_s: u64,
    /// What fails at the sale-end commit (cacheclear's run).
    pub fault: Fault,
    /// The cacheclear clients' staleness bound (`StalenessConfig::max_staleness_ms`), ms.
    pub max_staleness_ms: u64,
    /// How often each cacheclear client reads the watermark, and how often the pipeline's
    /// heartbeat refreshes it, ms.
    pub staleness_refresh_ms: u64,
}

/// Probability that a product view puts the product in the cart.
const ADD_TO_CART: f64 = 0.02;
/// Probability of checking out right after adding (a cart of 3 lines always checks out).
const CHECKOUT_AFTER_ADD: f64 = 0.4;
/// Cart size that triggers a checkout.
const FULL_CART: usize = 3;

/// The HTML report's time resolution: 100 ms, in ns.
const TICK_NS: u64 = 100_000_000;

/// Adds 1 to `series[ns / TICK_NS]`, growing it as needed.
fn count_at(series: &mut Vec<u64>, ns: u64) {
    let tick = (ns / TICK_NS) as usize;
    if series.len() <= tick {
        series.resize(tick + 1, 0);
    }
    series[tick] += 1;
}

/// Nanoseconds since the start of the run, shared by every task.
pub(super) struct Clock {
    t0: Instant,
    /// 1 + ns at which the sale-end `COMMIT` was about to be sent; 0 before.
    pub(super) commit_sent: AtomicU64,
}

impl Clock {
    fn ns(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.t0).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// The read path of one application server.
#[derive(Clone)]
enum Cache {
    Ttl(redis::aio::MultiplexedConnection),
    Cacheclear(cacheclear_client::Client),
}

impl Cache {
    /// Reads product `id` through the cache. Returns the product and, when this read ran a
    /// database load, when it started.
    async fn read(
        &mut self,
        db: &tokio_postgres::Client,
        st: &Statements,
        id: i32,
        ttl_s: u64,
    ) -> (anyhow::Result<Product>, Option<Instant>) {
        let key = format!("product:{id}");
        match self {
            Cache::Ttl(conn) => {
                let cached: redis::RedisResult<Option<Vec<u8>>> =
                    redis::cmd("GET").arg(&key).query_async(conn).await;
                if let Ok(Some(bytes)) = &cached
                    && let Ok(p) = serde_json::from_slice::<Product>(bytes)
                {
                    return (Ok(p), None);
                }
                let load_at = Instant::now();
                let loaded = catalog::load_product(db, st, id).await;
                if let Ok(p) = &loaded
                    && let Ok(json) = serde_json::to_vec(p)
                {
                    let _: redis::RedisResult<()> = redis::cmd("SET")
                        .arg(&key)
                        .arg(json)
                        .arg("EX")
                        .arg(ttl_s)
                        .query_async(conn)
                        .await;
                }
                (loaded, Some(load_at))
            }
            Cache::Cacheclear(client) => {
                let load_at = OnceLock::new();
                let r = client
                    .get_or_load(&key, || async {
                        let _ = load_at.set(Instant::now());
                        catalog::load_product(db, st, id).await.map(Loaded::new)
                    })
                    .await;
                (r.map_err(anyhow::Error::from), load_at.get().copied())
            }
        }
    }
}

/// A cart line and when its price was seen.
#[derive(Debug, Clone, Copy)]
struct CartLine {
    line: Line,
    /// ns of the start of the read that showed the price.
    seen_ns: u64,
    /// The price shown was a sale price.
    sale_price: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Charged,
    PriceChanged,
    Failed,
}

/// One checkout attempt: how it ended, and the latest read start among its sale-price lines.
#[derive(Debug, Clone, Copy)]
struct CheckoutRecord {
    sale_seen_ns: Option<u64>,
    outcome: Outcome,
}

/// What one shopper measured.
struct ShopperOut {
    reads: u64,
    read_errors: u64,
    loads: u64,
    latency_us: Histogram<u64>,
    /// Start ns of reads that showed a sale price and started after the sale-end COMMIT was sent.
    sale_reads_after_commit_sent: Vec<u64>,
    /// (product id, ns) of database loads of the hot keys.
    hot_loads: Vec<(i32, u64)>,
    /// Database loads per 100 ms of the run (by load start), for the HTML report's timeline.
    loads_per_tick: Vec<u64>,
    checkouts: Vec<CheckoutRecord>,
    serialization_retries: u64,
    first_error: Option<String>,
}

fn latency_histogram() -> Histogram<u64> {
    // 1 µs .. 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant histogram bounds are valid")
}

struct Shopper {
    index: u32,
    settings: Arc<Settings>,
    clock: Arc<Clock>,
    deadline: Instant,
    cache: Cache,
    db: tokio_postgres::Client,
    st: Statements,
    rng: Rng,
    cart: Vec<CartLine>,
    out: ShopperOut,
}

impl Shopper {
    async fn run(mut self) -> ShopperOut {
        let s = Arc::clone(&self.settings);
        while Instant::now() < self.deadline {
            let id = i32::try_from(s.zipf.sample(&mut self.rng)).unwrap_or(1);
            let start = Instant::now();
            let (result, load_at) = self.cache.read(&self.db, &self.st, id, s.ttl_s).await;
            let micros = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.out.reads += 1;
            self.out.latency_us.saturating_record(micros.max(1));
            if let Some(at) = load_at {
                self.out.loads += 1;
                count_at(&mut self.out.loads_per_tick, self.clock.ns(at));
                if id <= s.hot_keys as i32 {
                    self.out.hot_loads.push((id, self.clock.ns(at)));
                }
            }
            let product = match result {
                Ok(p) => p,
                Err(e) => {
                    self.out.read_errors += 1;
                    self.out.first_error.get_or_insert_with(|| format!("{e:#}"));
                    continue;
                }
            };
            let start_ns = self.clock.ns(start);
            let sale_price = product.on_sale && id <= s.sale_items as i32;
            if sale_price {
                let sent = self.clock.commit_sent.load(Ordering::SeqCst);
                if sent != 0 && start_ns + 1 >= sent {
                    self.out.sale_reads_after_commit_sent.push(start_ns);
                }
            }
            if self.rng.chance(ADD_TO_CART) {
                self.cart.push(CartLine {
                    line: Line {
                        product_id: id,
                        quantity: 1 + i32::from(self.rng.chance(0.3)),
                        price_cents: product.price_cents(),
                    },
                    seen_ns: start_ns,
                    sale_price,
                });
                if self.cart.len() >= FULL_CART || self.rng.chance(CHECKOUT_AFTER_ADD) {
                    self.check_out().await;
                }
            }
        }
        self.out
    }

    /// Checks the cart out; a cart refused for a changed price is repriced (the shopper accepts
    /// the current price) and checked out once more.
    async fn check_out(&mut self) {
        for _ in 0..2 {
            let lines: Vec<Line> = self.cart.iter().map(|c| c.line).collect();
            let sale_seen_ns = self
                .cart
                .iter()
                .filter(|c| c.sale_price)
                .map(|c| c.seen_ns)
                .max();
            let shopper = i32::try_from(self.index).unwrap_or(i32::MAX);
            let result =
                catalog::checkout(&mut self.db, &self.st, shopper, &lines, &mut self.rng).await;
            let (outcome, current) = match result {
                Ok((end, retries)) => {
                    self.out.serialization_retries += u64::from(retries);
                    match end {
                        CheckoutEnd::Charged => (Outcome::Charged, None),
                        CheckoutEnd::PriceChanged(current) => {
                            (Outcome::PriceChanged, Some(current))
                        }
                        CheckoutEnd::OutOfStock(_) => (Outcome::Failed, None),
                    }
                }
                Err(e) => {
                    self.out
                        .first_error
                        .get_or_insert_with(|| format!("checkout: {}", pg_error(&e)));
                    (Outcome::Failed, None)
                }
            };
            self.out.checkouts.push(CheckoutRecord {
                sale_seen_ns,
                outcome,
            });
            match current {
                Some(current) if Instant::now() < self.deadline => {
                    for c in &mut self.cart {
                        if let Some(&price) = current.get(&c.line.product_id)
                            && price != c.line.price_cents
                        {
                            c.line.price_cents = price;
                            c.sale_price = false;
                        }
                    }
                }
                _ => break,
            }
        }
        self.cart.clear();
    }
}

/// The pipeline's per-transaction figures, recorded by its batch observer.
pub(super) struct LagRecorder {
    lag_us: Histogram<u64>,
    txns: u64,
    /// (lag ms, acknowledged at) of the sale-end transaction.
    sale_end: Option<(f64, Instant)>,
    /// When hot-key evictions were acknowledged.
    hot_evictions: Vec<Instant>,
    /// Transactions whose partial parts were acknowledged and whose last part was not yet.
    streaming: std::collections::HashSet<u32>,
}

impl LagRecorder {
    fn new() -> LagRecorder {
        LagRecorder {
            lag_us: latency_histogram(),
            txns: 0,
            sale_end: None,
            hot_evictions: Vec::new(),
            streaming: std::collections::HashSet::new(),
        }
    }
}

/// The pipeline running in this process, reporting to the demo's lag recorder; aborted if
/// dropped before [`DemoPipeline::stop`].
pub(super) struct DemoPipeline {
    pipeline: Pipeline,
}

impl DemoPipeline {
    /// Starts the pipeline on the demo's slot (created when missing or lost) and waits until it
    /// streams (for a new slot: its eviction of everything is acknowledged) and its first
    /// watermark is in Redis. The heartbeat refreshes the watermark every
    /// `staleness_refresh_ms`.
    pub(super) async fn start(
        settings: &Settings,
        sale_xid: Arc<AtomicU64>,
        recorder: Arc<Mutex<LagRecorder>>,
    ) -> anyhow::Result<DemoPipeline> {
        let rules = Arc::new(Rules::compile(&[RuleConfig {
            table: catalog::PRODUCT_TABLE.into(),
            keys: vec!["product:{id}".into()],
        }])?);
        let mut cfg = PostgresConfig::new(settings.pg_url.clone());
        cfg.slot = catalog::SLOT.into();
        cfg.publication = catalog::SLOT.into();
        cfg.status_interval_ms = 100;
        cfg.watermark_interval_ms = settings.staleness_refresh_ms;
        let hot_keys = settings.hot_keys;
        let observer = {
            Arc::new(move |batch: &Batch| {
                let applied_us = now_us();
                let applied = Instant::now();
                let sale = sale_xid.load(Ordering::SeqCst);
                let Ok(mut r) = recorder.lock() else { return };
                for t in &batch.txns {
                    // A large transaction's partial parts come first; its last part (with or
                    // without keys) ends it.
                    let streamed = if t.partial {
                        r.streaming.insert(t.xid)
                    } else {
                        r.streaming.remove(&t.xid)
                    };
                    // The new slot's eviction of everything carries tables, not keys.
                    if t.keys.is_empty() && !streamed {
                        continue;
                    }
                    if !t.partial {
                        let lag = u64::try_from(applied_us - t.commit_time_us).unwrap_or(0);
                        r.lag_us.saturating_record(lag.max(1));
                        r.txns += 1;
                        if sale != 0 && u64::from(t.xid) == sale & 0xFFFF_FFFF {
                            r.sale_end = Some((lag as f64 / 1000.0, applied));
                        }
                    }
                    for k in t.keys.iter() {
                        if let Some(id) = k
                            .strip_prefix("product:")
                            .and_then(|s| s.parse::<u32>().ok())
                            && (1..=hot_keys).contains(&id)
                        {
                            r.hot_evictions.push(applied);
                        }
                    }
                }
            })
        };
        let options = RunOptions {
            observer: Some(observer),
            ..RunOptions::default()
        };
        let sink = RedisSink::connect(RedisConfig::new(settings.redis_url.clone()))
            .context("connecting the pipeline's Redis sink")?;
        let mut pipeline = Pipeline::spawn(cfg, rules, sink, options);
        tokio::time::timeout(Duration::from_secs(30), pipeline.streaming())
            .await
            .map_err(|_| anyhow::anyhow!("the pipeline did not start streaming within 30 s"))?
            .context("the pipeline stopped")?;
        wait_for_watermark(&settings.redis_url).await?;
        Ok(DemoPipeline { pipeline })
    }

    /// Stops the pipeline and waits for it (what it read is applied and confirmed first).
    pub(super) async fn stop(self) -> anyhow::Result<()> {
        self.pipeline.stop().await.context("the pipeline failed")
    }
}

/// Waits (at most 10 s) until the demo namespace's watermark was written under its current
/// epoch: from then on a client's staleness breaker lets reads use the cache.
async fn wait_for_watermark(redis_url: &str) -> anyhow::Result<()> {
    let layout = NamespaceLayout::new(catalog::SLOT)?;
    let mut conn =
        cacheclear_protocol::connect::client(redis_url, None, "--redis-url", "redis.tls")?
            .get_multiplexed_async_connection()
            .await
            .context("connecting to Redis")?;
    let started = Instant::now();
    loop {
        let (epoch, watermark): (Option<u64>, Option<String>) = redis::pipe()
            .get(layout.epoch())
            .get(layout.watermark())
            .query_async(&mut conn)
            .await
            .context("reading the demo namespace's epoch and watermark")?;
        let current = watermark
            .as_deref()
            .and_then(|w| Watermark::parse(w).ok())
            .is_some_and(|w| Some(w.epoch) == epoch);
        if current {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(10) {
            bail!(
                "the pipeline wrote no watermark under the current epoch within 10 s (key {})",
                layout.watermark()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A PostgreSQL error with its SQLSTATE and message (`Display` says only "db error").
fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// A connection to `url` (`--postgres-url`, libpq's TLS parameters included).
async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    Ok(cacheclear_pg_tls::connect(url, "--postgres-url").await?)
}

/// Runs the admin job on its own thread and runtime, so that the moment its `COMMIT` returns is
/// taken without waiting for a busy worker thread. `sale_xid` gets `1 << 32 | xid` before the
/// commit is sent. With `stop_first` (`--fault`), the pipeline is taken down before the
/// transaction begins: the thread asks the fault driver and waits (at most 30 s) for its answer.
fn spawn_sale_end(
    pg_url: String,
    at: Instant,
    clock: Arc<Clock>,
    sale_xid: Arc<AtomicU64>,
    stop_first: Option<tokio::sync::oneshot::Sender<StopRequest>>,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<anyhow::Result<SaleEnd>>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("demo-sale-end".into())
        .spawn(move || {
            let run = || -> anyhow::Result<SaleEnd> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("sale-end runtime")?;
                rt.block_on(async {
                    let mut db = connect(&pg_url).await?;
                    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                    if let Some(ask) = stop_first {
                        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
                        if ask.send(done_tx).is_ok() {
                            let _ = tokio::time::timeout(Duration::from_secs(30), done_rx).await;
                        }
                    }
                    catalog::end_sale(&mut db, |xid| {
                        if let Ok(x) = xid.parse::<u64>() {
                            sale_xid.store((1 << 32) | (x & 0xFFFF_FFFF), Ordering::SeqCst);
                        }
                        let sent = clock.ns(Instant::now());
                        clock.commit_sent.store(sent + 1, Ordering::SeqCst);
                    })
                    .await
                })
            };
            let _ = tx.send(run());
        })
        .context("starting the sale-end thread")?;
    Ok(rx)
}

/// The catalog-edit job: rewrites the description of a random product that is not on sale,
/// `edits_per_s` times a second, until `deadline`. Returns how many it edited.
async fn catalog_edits(settings: Arc<Settings>, deadline: Instant) -> anyhow::Result<u64> {
    let cold = settings.products.saturating_sub(settings.sale_items);
    if cold == 0 || settings.edits_per_s <= 0.0 {
        return Ok(0);
    }
    let db = connect(&settings.pg_url).await?;
    let mut rng = Rng::new(settings.seed ^ 0xED17);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / settings.edits_per_s));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut edits = 0;
    loop {
        tick.tick().await;
        if Instant::now() >= deadline {
            return Ok(edits);
        }
        let id = i32::try_from(u64::from(settings.sale_items) + 1 + rng.below(u64::from(cold)))
            .unwrap_or(i32::MAX);
        edits += catalog::edit_description(&db, id)
            .await
            .context("catalog edit")?;
    }
}

/// Runs `strategy` once from a clean state: the sale restarted, Redis flushed, and for
/// `cacheclear` a new replication slot.
///
/// # Errors
/// Setup failed (connections, the pipeline not starting), the sale-end transaction failed, or
/// every read failed.
pub(super) async fn run(
    settings: Arc<Settings>,
    strategy: Strategy,
    setup: &tokio_postgres::Client,
    progress: &Progress,
    run_index: u64,
) -> anyhow::Result<StrategyFigures> {
    let label = strategy.label();
    progress.message(format!("{label}: restarting the sale, flushing Redis"));
    catalog::reset_sale(setup).await?;
    let redis_client =
        cacheclear_protocol::connect::client(&settings.redis_url, None, "--redis-url", "redis.tls")
            .context("redis URL")?;
    let mut admin_redis = redis_client
        .get_multiplexed_async_connection()
        .await
        .context("connecting to Redis")?;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut admin_redis)
        .await
        .context("FLUSHALL")?;

    let sale_xid = Arc::new(AtomicU64::new(0));
    let recorder = Arc::new(Mutex::new(LagRecorder::new()));
    let pipeline = match strategy {
        Strategy::TtlOnly => None,
        Strategy::Cacheclear => {
            progress.message(format!("{label}: starting the invalidation pipeline"));
            catalog::drop_replication(setup).await?;
            Some(
                DemoPipeline::start(&settings, Arc::clone(&sale_xid), Arc::clone(&recorder))
                    .await?,
            )
        }
    };

    progress.message(format!(
        "{label}: connecting {} shoppers",
        settings.shoppers
    ));
    let mut caches = Vec::new();
    for _ in 0..settings.app_servers {
        caches.push(match strategy {
            Strategy::TtlOnly => Cache::Ttl(
                redis_client
                    .get_multiplexed_async_connection()
                    .await
                    .context("connecting to Redis")?,
            ),
            Strategy::Cacheclear => Cache::Cacheclear(
                cacheclear_client::Client::connect(
                    &settings.redis_url,
                    cacheclear_client::Config::default()
                        .with_ttl_base_ms(settings.ttl_s * 1000)
                        .with_staleness(
                            StalenessConfig::new(catalog::SLOT)
                                .with_max_staleness_ms(settings.max_staleness_ms)
                                .with_refresh_ms(settings.staleness_refresh_ms),
                        ),
                )
                .await?,
            ),
        });
    }
    let dbs = futures::future::try_join_all((0..settings.shoppers).map(|_| async {
        let db = connect(&settings.pg_url).await?;
        let st = Statements::prepare(&db)
            .await
            .context("preparing the shoppers' statements")?;
        anyhow::Ok((db, st))
    }))
    .await?;

    let t0 = Instant::now();
    let deadline = t0 + settings.duration;
    let clock = Arc::new(Clock {
        t0,
        commit_sent: AtomicU64::new(0),
    });
    let (stop_first, fault_driver) = match pipeline {
        Some(pipeline) if settings.fault != Fault::None => {
            let (ask, requests) = tokio::sync::oneshot::channel();
            let driver = tokio::spawn(fault::drive(
                settings.fault,
                Arc::clone(&settings),
                pipeline,
                requests,
                Arc::clone(&clock),
                Arc::clone(&sale_xid),
                Arc::clone(&recorder),
            ));
            (Some(ask), Driver::Fault(driver))
        }
        Some(pipeline) => (None, Driver::Steady(pipeline)),
        None => (None, Driver::None),
    };
    let sale_end = spawn_sale_end(
        settings.pg_url.clone(),
        t0 + settings.sale_end_at,
        Arc::clone(&clock),
        Arc::clone(&sale_xid),
        stop_first,
    )?;
    let edits = tokio::spawn(catalog_edits(Arc::clone(&settings), deadline));
    let mut shoppers = JoinSet::new();
    for (i, (db, st)) in (0..settings.shoppers).zip(dbs) {
        let shopper = Shopper {
            index: i,
            settings: Arc::clone(&settings),
            clock: Arc::clone(&clock),
            deadline,
            cache: caches[(i % settings.app_servers) as usize].clone(),
            db,
            st,
            rng: Rng::new(settings.seed ^ u64::from(i + 1).wrapping_mul(0xA076_1D64_78BD_642F)),
            cart: Vec::new(),
            out: ShopperOut {
                reads: 0,
                read_errors: 0,
                loads: 0,
                latency_us: latency_histogram(),
                sale_reads_after_commit_sent: Vec::new(),
                hot_loads: Vec::new(),
                loads_per_tick: Vec::new(),
                checkouts: Vec::new(),
                serialization_retries: 0,
                first_error: None,
            },
        };
        shoppers.spawn(shopper.run());
    }
    let ticker = {
        let progress = progress.clone();
        let tenths = settings.duration.as_millis() as u64 / 100;
        let label = label.to_owned();
        let sale_at = settings.sale_end_at;
        tokio::spawn(async move {
            loop {
                let e = t0.elapsed();
                progress.position(run_index * tenths + (e.as_millis() as u64 / 100).min(tenths));
                if e < sale_at {
                    progress.message(format!(
                        "{label}: shopping; the sale ends at {:.1} s",
                        sale_at.as_secs_f64()
                    ));
                } else {
                    progress.message(format!("{label}: the sale has ended"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let mut outs = Vec::new();
    while let Some(out) = shoppers.join_next().await {
        outs.push(out.context("a shopper task failed")?);
    }
    let mut bypassed_reads = None;
    for (i, cache) in caches.iter().enumerate() {
        if let Cache::Cacheclear(client) = cache {
            let stats = client.stats();
            tracing::debug!(app_server = i, ?stats, "cache client counters");
            *bypassed_reads.get_or_insert(0) += stats.bypassed_watermark_stale
                + stats.bypassed_watermark_missing
                + stats.bypassed_epoch_missing;
        }
    }
    ticker.abort();
    let _ = edits.await.context("the catalog-edit job failed")??;
    let sale_end = sale_end
        .await
        .context("the sale-end thread ended without an answer")??;
    if sale_end.rows != u64::from(settings.sale_items) {
        bail!(
            "the sale-end transaction took {} products off sale, expected {}",
            sale_end.rows,
            settings.sale_items
        );
    }
    progress.message(format!("{label}: auditing the orders"));
    let audit = catalog::audit_orders(setup, Some(&sale_end.xid)).await?;

    let (pipeline, fault_times) = match fault_driver {
        Driver::None => (None, None),
        Driver::Steady(p) => (Some(p), None),
        Driver::Fault(driver) => {
            let (p, times) = driver.await.context("the fault driver failed")??;
            (p, Some(times))
        }
    };
    let lag = match strategy {
        Strategy::TtlOnly => None,
        Strategy::Cacheclear => {
            if let Some(p) = pipeline {
                // Let the last catalog edits' evictions arrive before stopping.
                tokio::time::sleep(Duration::from_millis(200)).await;
                p.stop().await?;
            }
            drop_slot_when_released(setup).await;
            let r = recorder
                .lock()
                .map_err(|_| anyhow::anyhow!("the lag recorder was poisoned"))?;
            Some(LagSummary {
                p50_ms: r.lag_us.value_at_quantile(0.5) as f64 / 1000.0,
                p99_ms: r.lag_us.value_at_quantile(0.99) as f64 / 1000.0,
                max_ms: r.lag_us.max() as f64 / 1000.0,
                distribution: r
                    .lag_us
                    .iter_log(250, 2.0)
                    .map(|v| {
                        (
                            v.value_iterated_to() as f64 / 1000.0,
                            v.count_since_last_iteration(),
                        )
                    })
                    .collect(),
                txns: r.txns,
                sale_end: r.sale_end,
                hot_evictions: r.hot_evictions.clone(),
            })
        }
    };
    let (mut figures, first_error) = summarize(&settings, &clock, &sale_end, outs, lag, audit)?;
    figures.bypassed_reads = bypassed_reads;
    if let Some(times) = fault_times {
        figures.pipeline_stopped_at_s = times.stopped.map(|at| clock.ns(at) as f64 / 1e9);
        figures.pipeline_resumed_at_s = times.resumed.map(|at| clock.ns(at) as f64 / 1e9);
    }
    if let Some(e) = first_error {
        progress.suspend(|| {
            tracing::warn!(
                strategy = label,
                read_errors = figures.read_errors,
                checkouts_failed = figures.checkouts_failed,
                first_error = %e,
                "some reads or checkouts failed"
            );
        });
    }
    Ok(figures)
}

/// Who holds the cacheclear run's pipeline while the shoppers shop.
enum Driver {
    /// ttl-only: no pipeline.
    None,
    /// `--fault none`: the pipeline runs to the end.
    Steady(DemoPipeline),
    /// `--fault …`: the fault driver takes it down (and for `slot-lost` back up).
    Fault(tokio::task::JoinHandle<anyhow::Result<(Option<DemoPipeline>, FaultTimes)>>),
}

/// The slot stays active for a moment after the replication connection closes.
async fn drop_slot_when_released(setup: &tokio_postgres::Client) {
    let started = Instant::now();
    loop {
        match catalog::drop_replication(setup).await {
            Ok(()) => return,
            Err(e) if started.elapsed() > Duration::from_secs(5) => {
                tracing::warn!(error = %format!("{e:#}"), "could not drop the demo's replication slot");
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

struct LagSummary {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// (upper bound ms, transactions) per doubling bucket from 0.25 ms.
    distribution: Vec<(f64, u64)>,
    txns: u64,
    sale_end: Option<(f64, Instant)>,
    hot_evictions: Vec<Instant>,
}

fn summarize(
    settings: &Settings,
    clock: &Clock,
    sale_end: &SaleEnd,
    outs: Vec<ShopperOut>,
    lag: Option<LagSummary>,
    audit: catalog::OrderAudit,
) -> anyhow::Result<(StrategyFigures, Option<String>)> {
    const SECOND: u64 = 1_000_000_000;
    let visible = clock.ns(sale_end.visible);
    let mut f = StrategyFigures::default();
    let ticks = (settings.duration.as_nanos() as u64).div_ceil(TICK_NS) as usize;
    let timeline = &mut f.timeline;
    timeline.tick_ms = (TICK_NS / 1_000_000) as u32;
    timeline.commit_visible_s = visible as f64 / 1e9;
    timeline.stale_reads.resize(ticks, 0);
    timeline.db_loads.resize(ticks, 0);
    let mut latency = latency_histogram();
    let mut max_stale_ns = 0u64;
    let mut first_error = None;
    for o in &outs {
        f.reads += o.reads;
        f.read_errors += o.read_errors;
        f.db_loads += o.loads;
        let _ = latency.add(&o.latency_us);
        for (tick, n) in o.loads_per_tick.iter().enumerate() {
            if let Some(slot) = f.timeline.db_loads.get_mut(tick) {
                *slot += n;
            }
        }
        for &ns in &o.sale_reads_after_commit_sent {
            if ns >= visible {
                count_at(&mut f.timeline.stale_reads, ns);
                f.stale_reads_after_commit += 1;
                max_stale_ns = max_stale_ns.max(ns - visible);
            }
        }
        for &(id, ns) in &o.hot_loads {
            tracing::debug!(id, at_ms = ns as f64 / 1e6, "hot-key database load");
            if (visible..visible + SECOND).contains(&ns) {
                f.hot_key_db_loads_after_commit += 1;
            }
            if ns < SECOND {
                f.hot_key_db_loads_cold_start += 1;
            }
        }
        f.serialization_retries += o.serialization_retries;
        for c in &o.checkouts {
            f.checkouts += 1;
            let stale = c.sale_seen_ns.is_some_and(|ns| ns >= visible);
            match c.outcome {
                Outcome::Charged => f.checkouts_charged += 1,
                Outcome::PriceChanged => f.checkouts_rejected_price_changed += 1,
                Outcome::Failed => f.checkouts_failed += 1,
            }
            if stale {
                f.stale_price_checkouts_attempted += 1;
                match c.outcome {
                    Outcome::Charged => f.stale_price_checkouts_charged += 1,
                    Outcome::PriceChanged => f.stale_price_checkouts_rejected += 1,
                    Outcome::Failed => {}
                }
            }
        }
        if first_error.is_none() {
            first_error.clone_from(&o.first_error);
        }
    }
    if f.reads == 0 || f.read_errors == f.reads {
        bail!(
            "no product read succeeded{}",
            first_error.map(|e| format!(": {e}")).unwrap_or_default()
        );
    }
    f.reads_per_s = f.reads as f64 / settings.duration.as_secs_f64();
    f.hit_rate = 1.0 - f.db_loads as f64 / f.reads as f64;
    f.max_staleness_ms = max_stale_ns as f64 / 1e6;
    f.read_latency_p50_ms = latency.value_at_quantile(0.5) as f64 / 1000.0;
    f.read_latency_p99_ms = latency.value_at_quantile(0.99) as f64 / 1000.0;
    f.read_latency_max_ms = latency.max() as f64 / 1000.0;
    f.order_lines = audit.lines;
    f.stale_price_charges = audit.wrong_price_lines;
    if let Some(lag) = lag {
        f.invalidation_txns = Some(lag.txns);
        f.timeline.invalidation_lag_ms = lag.distribution;
        f.invalidation_lag_p50_ms = Some(lag.p50_ms);
        f.invalidation_lag_p99_ms = Some(lag.p99_ms);
        f.invalidation_lag_max_ms = Some(lag.max_ms);
        f.sale_end_invalidation_lag_ms = lag.sale_end.map(|(ms, _)| ms);
        f.sale_end_visible_to_evicted_ms = lag
            .sale_end
            .map(|(_, at)| at.saturating_duration_since(sale_end.visible).as_secs_f64() * 1000.0);
        f.hot_key_invalidations_after_commit = Some(
            lag.hot_evictions
                .iter()
                .filter(|&&at| (visible..visible + SECOND).contains(&clock.ns(at)))
                .count() as u64,
        );
    }
    Ok((f, first_error))
}
