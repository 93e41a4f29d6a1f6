//! `cacheclear demo`: the flash sale (docs/architecture.md, "The problem"), end to end, on this
//! machine, with no configuration.
//!
//! ```text
//! $ cacheclear demo            # the table; about 30 s on 2 cores
//! $ cacheclear demo --json     # the same figures as one JSON object
//! ```
//!
//! # What it does
//!
//! 1. Starts a private PostgreSQL and Redis from the installed binaries (the `cacheclear-harness`
//!    crate; a missing binary is reported with what to install), or uses `--postgres-url` /
//!    `--redis-url`.
//! 2. Creates the schema `cacheclear_demo` and a catalog of `--products` products (id, sku, name,
//!    description, category_id, list_price_cents, sale_price_cents, on_sale, updated_at), 50
//!    categories, inventory and orders. The `--sale-items` most viewed products (ids 1..=N,
//!    default 10% of the catalog) are on sale at 70% of their list price.
//! 3. Runs the same scenario twice, each from a clean state (sale restarted, restocked, orders
//!    emptied, Redis `FLUSHALL`ed):
//!    - **ttl-only**, the common answer: cache-aside with a 5-minute TTL (`GET`; on a miss read
//!      the database and `SET … EX 300`), no invalidation, no lease;
//!    - **cacheclear**: the client library (`get_or_load`: lease, fenced fill, single-flight,
//!      same 5-minute TTL ± 5%) with the invalidation pipeline (`cacheclear_source_postgres::run`
//!      with a `RedisSink`, rule `product:{id}`) running in this process on a new slot.
//!
//!    The cacheclear clients run the staleness breaker (`StalenessConfig` of the namespace
//!    `cacheclear_demo`, bound `--max-staleness-ms`, default 1 000; the pipeline's heartbeat and
//!    the clients' watermark reads every 100 ms).
//!
//!    Both runs use the same shoppers, duration and seeds. `--shoppers` shoppers, spread over up
//!    to 8 application servers (one cache client each: single-flight is per server, leases are
//!    shared), loop without pause: view a product drawn from a Zipf law (s = 1, rank = product
//!    id), put it in the cart with probability 2%, and check out after adding with probability
//!    40% (always at 3 lines). A catalog-edit job rewrites the description of a random product
//!    that is not on sale 20 times a second. At 40% of the run one admin transaction ends the
//!    sale: `UPDATE product SET on_sale = false, sale_price_cents = NULL WHERE on_sale`.
//! 4. Checkout is the reference checkout (docs/architecture.md,
//!    "Data that must never be stale"): a SERIALIZABLE transaction re-reads the prices
//!    from the database (never the cache), refuses a cart whose price changed (the shopper is shown
//!    the current price, accepts it and checks out once more), takes the stock, inserts the order
//!    lines with the charged price and the transaction's snapshot, and retries serialization
//!    failures (40001) and deadlocks (40P01) with backoff.
//!
//! # How staleness is measured
//!
//! One monotonic clock ([`std::time::Instant`]) for everything in this process. The admin job runs
//! on its own thread; the moment its `COMMIT` returns is when the new prices are visible. A read
//! is *stale* if it **started** after that moment and returned a sale price; its staleness is
//! read start − commit visible. A read that started earlier may legitimately return the old
//! price. For cacheclear, a read starting after the pipeline acknowledged the sale-end evictions
//! cannot be stale, so its largest staleness is bounded by `sale_end_visible_to_evicted_ms`.
//!
//! # Faults (`--fault`)
//!
//! `pipeline-stop` and `slot-lost` take the cacheclear run's pipeline down right before the
//! sale-end transaction (see the `fault` module): its evictions never come. ttl-only serves
//! the sale price until its TTL; cacheclear's clients see the watermark age past
//! `max_staleness_ms` and read the database without filling (`bypassed_reads`), so its largest
//! staleness stays within `max_staleness_ms + staleness_refresh_ms`; after `slot-lost`'s
//! restart the epoch is new and every value cached before it is a miss.
//!
//! # Report (`--report FILE`)
//!
//! One self-contained HTML page (no script, no external resource; charts as inline SVG, written
//! by hand in `html.rs`): stale reads per 100 ms over each run with the sale-end commit marked,
//! database loads per 100 ms from 2 s before to 3 s after the commit, cacheclear's
//! invalidation-lag distribution (doubling buckets from 0.25 ms), and the summary table. A path
//! ending in `.svg` gets the three charts stacked in one SVG image instead.
//!
//! # JSON (`--json`)
//!
//! One object on stdout; the progress bar and logs go to stderr. Fields are only ever added.
//!
//! ```json
//! {"scenario": {...}, "strategies": {"ttl_only": {...}, "cacheclear": {...}}}
//! ```
//!
//! `scenario`:
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `command` | string | the command line that reproduces the run (URLs left out) |
//! | `products`, `sale_items`, `shoppers` | integer | catalog size, products on sale (ids 1..=sale_items), concurrent shoppers |
//! | `app_servers` | integer | cache clients the shoppers are spread over |
//! | `duration_s`, `sale_ends_at_s` | number | length of each run; when, into it, the sale-end transaction commits |
//! | `ttl_s` | integer | cache TTL of both strategies (300) |
//! | `zipf_exponent`, `seed` | number, integer | product popularity; seed of every random choice |
//! | `hot_keys` | integer | the hottest products (ids 1..=hot_keys, 10) whose database loads are counted |
//! | `hot_key_read_share`, `sale_item_read_share` | number | share of reads going to them (from the Zipf law) |
//! | `catalog_edits_per_s` | number | rate of the catalog-edit job |
//! | `postgres`, `redis` | string | `"private"` (started by the demo) or `"given"` (URL flag) |
//! | `total_s` | number | wall time of the whole demo, setup included |
//! | `fault` | string | `"none"`, `"pipeline-stop"` or `"slot-lost"` (`--fault`) |
//! | `max_staleness_ms` | integer | the cacheclear clients' staleness bound (`--max-staleness-ms`); not the per-strategy `max_staleness_ms`, the largest staleness measured |
//! | `staleness_refresh_ms` | integer | watermark heartbeat and client refresh interval (100) |
//!
//! `strategies.ttl_only` and `strategies.cacheclear`, the same fields (`null` where a figure
//! does not apply to the strategy):
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `reads` | integer | product reads completed |
//! | `reads_per_s` | number | `reads` / `duration_s` |
//! | `read_errors` | integer | reads that failed |
//! | `hit_rate` | number 0..1 | share of reads answered without this read querying the database |
//! | `db_loads` | integer | database queries made by reads |
//! | `stale_reads_after_commit` | integer | reads started after the sale-end commit was visible that returned a sale price |
//! | `max_staleness_ms` | number | largest read start − commit visible among them; 0 if none |
//! | `hot_key_db_loads_after_commit` | integer | database loads of the hot keys by reads in the second after the commit was visible (the stampede) |
//! | `hot_key_invalidations_after_commit` | integer or null | hot-key evictions the pipeline acknowledged in that second (cacheclear) |
//! | `hot_key_db_loads_cold_start` | integer | database loads of the hot keys in the first second of the run, on an empty cache |
//! | `invalidation_txns` | integer or null | transactions with cache keys the pipeline acknowledged (cacheclear) |
//! | `invalidation_lag_p50_ms`, `invalidation_lag_p99_ms`, `invalidation_lag_max_ms` | number or null | pipeline lag per transaction: Redis acknowledged the evictions − commit timestamp (from the pipeline's batch observer); null for ttl-only |
//! | `sale_end_invalidation_lag_ms` | number or null | that lag for the sale-end transaction |
//! | `sale_end_visible_to_evicted_ms` | number or null | sale-end commit visible → its evictions acknowledged, by this process's clock |
//! | `checkouts` | integer | checkout attempts (a repriced cart checked out again counts twice) |
//! | `checkouts_charged`, `checkouts_rejected_price_changed`, `checkouts_failed` | integer | how they ended |
//! | `serialization_retries` | integer | serialization failures and deadlocks retried |
//! | `stale_price_checkouts_attempted` | integer | checkouts of carts holding a sale price read after the commit was visible |
//! | `stale_price_checkouts_rejected`, `stale_price_checkouts_charged` | integer | how those ended |
//! | `stale_price_charges` | integer | order lines charged a price that was not valid when they committed, audited in PostgreSQL against each checkout's snapshot (`pg_visible_in_snapshot` of the sale-end transaction) |
//! | `order_lines` | integer | order lines placed |
//! | `read_latency_p50_ms`, `read_latency_p99_ms`, `read_latency_max_ms` | number | product read latency (HdrHistogram, µs resolution) |
//! | `bypassed_reads` | integer or null | reads that bypassed the cache because the staleness breaker was open (cacheclear) |
//! | `pipeline_stopped_at_s`, `pipeline_resumed_at_s` | number or null | when `--fault` took the pipeline down and (slot-lost) when it streamed again, seconds into the run |
//!
//! # Lifetime
//!
//! The private servers are stopped and their directories deleted when the demo ends, fails or
//! is interrupted with Ctrl-C; if the process is killed outright, the harness's parent-death
//! signal stops them. With `--postgres-url`, the schema `cacheclear_demo` and the slot and
//! publication `cacheclear_demo` are dropped at the end. With `--redis-url`, that Redis is
//! flushed (`FLUSHALL`) before each run: give it a scratch instance.

mod catalog;
mod fault;
mod html;
mod report;
mod scenario;
mod zipf;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use cacheclear_harness::{PgBinaries, PgInstance, PgOptions, RedisBinaries, RedisInstance};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

pub use fault::Fault;
pub use report::{Report, Scenario, Strategies, StrategyFigures, Timeline};

use scenario::{Settings, Strategy};
use zipf::Zipf;

/// Options of `cacheclear demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Print the figures as one JSON object (documented in the demo module) instead of the
    /// table; hides the progress bar.
    #[arg(long)]
    pub json: bool,
    /// Seconds each strategy runs; the sale ends at 40% of it.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub duration: u64,
    /// Concurrent shoppers (each with its own database connection).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub shoppers: u32,
    /// Products in the catalog.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(20..=10_000_000))]
    pub products: u32,
    /// Products on sale (the most viewed ones); default 10% of --products.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub sale_items: Option<u32>,
    /// Seed of every random choice (both runs use it).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Use this PostgreSQL (wal_level=logical, a user with REPLICATION) instead of a private
    /// instance. The demo creates and drops the schema, slot and publication `cacheclear_demo`.
    /// TLS as in `postgres.url`: `sslmode`, `sslrootcert`, `sslcert`, `sslkey` (libpq's).
    #[arg(long)]
    pub postgres_url: Option<String>,
    /// Use this Redis instead of a private instance. It is FLUSHALLed before each run: give it a
    /// scratch instance.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Also write the run as a self-contained HTML page (inline SVG charts: stale reads and
    /// database loads per 100 ms around the sale-end commit, the invalidation-lag distribution,
    /// the summary table); a path ending in `.svg` gets the charts alone as one SVG image.
    #[arg(long, value_name = "FILE")]
    pub report: Option<std::path::PathBuf>,
    /// What fails at the sale-end commit in the cacheclear run: `pipeline-stop` (the pipeline
    /// is stopped right before the sale-end transaction and stays down) or `slot-lost` (stopped,
    /// the slot is lost across the commit, then the pipeline restarts; needs the private
    /// PostgreSQL). The clients' staleness breaker bounds what shoppers see.
    #[arg(long, value_enum, default_value_t = Fault::None)]
    pub fault: Fault,
    /// The cacheclear clients' staleness bound, ms (200–600000): while the pipeline's watermark
    /// is older, reads bypass the cache (database, no fill).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(200..=600_000))]
    pub max_staleness_ms: u64,
}

/// Hot keys whose database loads are counted: products 1..=10.
const HOT_KEYS: u32 = 10;
/// Application servers (cache clients) at most.
const APP_SERVERS: u32 = 8;
/// Cache TTL of both strategies, seconds.
const TTL_S: u64 = 300;
/// Zipf exponent of product popularity.
const ZIPF_S: f64 = 1.0;
/// Catalog edits per second.
const EDITS_PER_S: f64 = 20.0;
/// The sale ends at this fraction of each run.
const SALE_END_FRACTION: f64 = 0.4;
/// The cacheclear clients read the watermark, and the pipeline's heartbeat refreshes it, this
/// often (ms): a tenth of the default bound, so a healthy pipeline's watermark is never near it.
const STALENESS_REFRESH_MS: u64 = 100;

/// The progress bar on stderr (hidden with `--json`). Cheap to clone.
#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar of `len` steps, or a hidden one.
    pub fn new(hidden: bool, len: u64) -> Progress {
        if hidden {
            return Progress {
                bar: ProgressBar::hidden(),
            };
        }
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed:>3}] [{bar:32}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        Progress { bar }
    }

    /// Shows what is happening.
    pub fn message(&self, msg: impl Into<Cow<'static, str>>) {
        self.bar.set_message(msg);
    }

    /// Moves the bar.
    pub fn position(&self, pos: u64) {
        self.bar.set_position(pos);
    }

    /// Runs `f` (which prints) with the bar hidden.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// The private servers, stopped when dropped.
#[derive(Default)]
struct Servers {
    pg: Option<PgInstance>,
    redis: Option<RedisInstance>,
}

/// Runs the demo and prints the table (or the JSON object).
///
/// # Errors
/// Missing PostgreSQL or Redis binaries (the message says what to install), a server that does
/// not start, a failed step of the scenario, or Ctrl-C.
pub async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    check_binaries(&args)?;
    if args.fault == Fault::SlotLost && args.postgres_url.is_some() {
        anyhow::bail!(
            "--fault slot-lost needs the demo's private PostgreSQL (it lowers \
             max_slot_wal_keep_size and churns WAL until the slot is lost): leave out --postgres-url"
        );
    }
    let tenths = args.duration * 10;
    let progress = Progress::new(args.json, 2 * tenths);
    let mut servers = Servers::default();
    let outcome = tokio::select! {
        r = run_all(&args, &mut servers, &progress, started) => r,
        Ok(()) = tokio::signal::ctrl_c() => {
            Err(anyhow!("interrupted (Ctrl-C); the demo's PostgreSQL and Redis are stopped"))
        }
    };
    progress.finish();
    // Stopping PostgreSQL blocks (up to a few seconds): off the async worker threads.
    let _ = tokio::task::spawn_blocking(move || drop(servers)).await;
    let report = outcome?;
    if let Some(path) = &args.report {
        let page = if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("svg"))
        {
            html::svg(&report)
        } else {
            html::html(&report)
        };
        std::fs::write(path, page)
            .with_context(|| format!("--report: cannot write {}", path.display()))?;
        progress.suspend(|| eprintln!("report written to {}", path.display()));
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report::table(&report));
    }
    Ok(())
}

/// Fails before starting anything if a binary the private servers need is missing, naming
/// everything that is missing and what to install.
fn check_binaries(args: &DemoArgs) -> anyhow::Result<()> {
    let pg = match args.postgres_url {
        None => PgBinaries::discover().err(),
        Some(_) => None,
    };
    let redis = match args.redis_url {
        None => RedisBinaries::discover().err(),
        Some(_) => None,
    };
    match (pg, redis) {
        (None, None) => Ok(()),
        (Some(e), None) => Err(e.into()),
        (None, Some(e)) => Err(e.into()),
        (Some(p), Some(r)) => Err(anyhow!(
            "{p}\n{r}\n(or give --postgres-url and --redis-url to use running servers)"
        )),
    }
}

async fn run_all(
    args: &DemoArgs,
    servers: &mut Servers,
    progress: &Progress,
    started: Instant,
) -> anyhow::Result<Report> {
    progress.message("starting PostgreSQL and Redis");
    let products = args.products;
    let sale_items = args.sale_items.unwrap_or(products / 10).clamp(1, products);
    let pg_start = args.postgres_url.is_none().then(|| {
        let opts = PgOptions::default().conf(format!("max_connections = {}", args.shoppers + 40));
        tokio::task::spawn_blocking(move || PgInstance::start_with(opts))
    });
    let redis_start = args
        .redis_url
        .is_none()
        .then(|| tokio::task::spawn_blocking(RedisInstance::start));
    // Keep whichever started even if the other failed, so that it is stopped.
    let (pg, redis) = futures::join!(
        async {
            match pg_start {
                Some(h) => Some(h.await),
                None => None,
            }
        },
        async {
            match redis_start {
                Some(h) => Some(h.await),
                None => None,
            }
        }
    );
    let (pg, redis) = (pg.transpose()?, redis.transpose()?);
    let (pg, redis) = match (pg, redis) {
        (Some(Err(e)), redis) => {
            servers.redis = redis.and_then(Result::ok);
            return Err(e.into());
        }
        (pg, Some(Err(e))) => {
            servers.pg = pg.and_then(Result::ok);
            return Err(e.into());
        }
        (pg, redis) => (pg.and_then(Result::ok), redis.and_then(Result::ok)),
    };
    servers.pg = pg;
    servers.redis = redis;
    let pg_url = match (&args.postgres_url, &servers.pg) {
        (Some(url), _) => url.clone(),
        (None, Some(pg)) => pg.url(),
        (None, None) => anyhow::bail!("no PostgreSQL"),
    };
    let redis_url = match (&args.redis_url, &servers.redis) {
        (Some(url), _) => url.clone(),
        (None, Some(r)) => r.url(),
        (None, None) => anyhow::bail!("no Redis"),
    };

    progress.message(format!(
        "creating the catalog: {products} products, {sale_items} on sale"
    ));
    let setup = cacheclear_pg_tls::connect(&pg_url, "--postgres-url").await?;
    if args.postgres_url.is_some() {
        let wal_level: String = setup
            .query_one("SHOW wal_level", &[])
            .await
            .context("SHOW wal_level")?
            .try_get(0)?;
        if wal_level != "logical" {
            anyhow::bail!(
                "--postgres-url: the server's wal_level is `{wal_level}`, the invalidation pipeline \
                 needs `logical`: run `ALTER SYSTEM SET wal_level = logical` and restart PostgreSQL, \
                 or leave out --postgres-url to use a private instance"
            );
        }
    }
    catalog::create(&setup, products, sale_items).await?;

    let duration = Duration::from_secs(args.duration);
    let zipf = Arc::new(Zipf::new(products as usize, ZIPF_S));
    let settings = Arc::new(Settings {
        pg_url,
        redis_url,
        products,
        sale_items,
        shoppers: args.shoppers,
        app_servers: args.shoppers.min(APP_SERVERS),
        duration,
        sale_end_at: duration.mul_f64(SALE_END_FRACTION),
        seed: args.seed,
        zipf: Arc::clone(&zipf),
        hot_keys: HOT_KEYS.min(products),
        edits_per_s: EDITS_PER_S,
        ttl_s: TTL_S,
        fault: args.fault,
        max_staleness_ms: args.max_staleness_ms,
        staleness_refresh_ms: STALENESS_REFRESH_MS,
    });
    let ttl_only = scenario::run(
        Arc::clone(&settings),
        Strategy::TtlOnly,
        &setup,
        progress,
        0,
    )
    .await?;
    let cacheclear = scenario::run(
        Arc::clone(&settings),
        Strategy::Cacheclear,
        &setup,
        progress,
        1,
    )
    .await?;
    if args.postgres_url.is_some() {
        progress.message("dropping the demo's schema");
        catalog::drop_all(&setup).await?;
    }

    let mut command = format!(
        "cacheclear demo --duration {} --shoppers {} --products {} --sale-items {} --seed {}",
        args.duration, args.shoppers, products, sale_items, args.seed
    );
    if args.fault != Fault::None {
        command.push_str(&format!(" --fault {}", args.fault.label()));
    }
    if args.max_staleness_ms != 1_000 {
        command.push_str(&format!(" --max-staleness-ms {}", args.max_staleness_ms));
    }
    if args.json {
        command.push_str(" --json");
    }
    let given = |g: bool| if g { "given" } else { "private" }.to_owned();
    Ok(Report {
        scenario: Scenario {
            command,
            products,
            sale_items,
            shoppers: settings.shoppers,
            app_servers: settings.app_servers,
            duration_s: duration.as_secs_f64(),
            sale_ends_at_s: settings.sale_end_at.as_secs_f64(),
            ttl_s: TTL_S,
            zipf_exponent: zipf.exponent(),
            seed: args.seed,
            hot_keys: settings.hot_keys,
            hot_key_read_share: zipf.mass_of_top(settings.hot_keys as usize),
            sale_item_read_share: zipf.mass_of_top(sale_items as usize),
            catalog_edits_per_s: EDITS_PER_S,
            postgres: given(args.postgres_url.is_some()),
            redis: given(args.redis_url.is_some()),
            total_s: started.elapsed().as_secs_f64(),
            fault: args.fault.label().to_owned(),
            max_staleness_ms: args.max_staleness_ms,
            staleness_refresh_ms: STALENESS_REFRESH_MS,
        },
        strategies: Strategies {
            ttl_only,
            cacheclear,
        },
    })
}
