//! The demo's figures: the JSON object `--json` prints (field by field in the
//! [module docs](super)) and the side-by-side table printed otherwise.

use std::fmt::Write as _;

/// Everything the demo measured: `{"scenario": {...}, "strategies": {"ttl_only": {...},
/// "cacheclear": {...}}}`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// The settings both runs used.
    pub scenario: Scenario,
    /// The two runs.
    pub strategies: Strategies,
}

/// The two strategy runs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Strategies {
    /// Cache-aside with a 5-minute TTL, no invalidation pipeline, no lease.
    pub ttl_only: StrategyFigures,
    /// The cacheclear client (lease, fenced fill, single-flight) with the invalidation pipeline.
    pub cacheclear: StrategyFigures,
}

/// The scenario's settings (the same for both runs).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Scenario {
    /// The command line that reproduces the run (database URLs left out).
    pub command: String,
    /// Products in the catalog.
    pub products: u32,
    /// Products on sale (the most viewed ones, ids 1..=sale_items).
    pub sale_items: u32,
    /// Concurrent shoppers.
    pub shoppers: u32,
    /// Application servers the shoppers are spread over (one cache client and one Redis
    /// connection each; the single-flight table is per server, the lease is shared).
    pub app_servers: u32,
    /// Seconds each strategy runs.
    pub duration_s: f64,
    /// Seconds into each run at which the sale-end transaction commits.
    pub sale_ends_at_s: f64,
    /// Cache TTL of both strategies, seconds.
    pub ttl_s: u64,
    /// Zipf exponent of product popularity.
    pub zipf_exponent: f64,
    /// Seed of every random choice (the same for both runs).
    pub seed: u64,
    /// The hottest products whose database loads are counted (ids 1..=hot_keys).
    pub hot_keys: u32,
    /// Share of all reads that go to the hot keys (from the Zipf law).
    pub hot_key_read_share: f64,
    /// Share of all reads that go to sale items (from the Zipf law).
    pub sale_item_read_share: f64,
    /// Rate of the background catalog-edit job (one product description per transaction).
    pub catalog_edits_per_s: f64,
    /// `"private"` (started by the demo) or `"given"` (`--postgres-url`).
    pub postgres: String,
    /// `"private"` or `"given"` (`--redis-url`).
    pub redis: String,
    /// Seconds from the start to the last figure, both runs and setup included.
    pub total_s: f64,
    /// What failed at the sale-end commit in the cacheclear run: `"none"`, `"pipeline-stop"`
    /// or `"slot-lost"` (`--fault`).
    #[serde(default)]
    pub fault: String,
    /// The cacheclear clients' staleness bound, ms (`--max-staleness-ms`): with the watermark
    /// older than that, reads bypass the cache.
    #[serde(default)]
    pub max_staleness_ms: u64,
    /// How often the clients read the watermark and the pipeline's heartbeat refreshes it, ms.
    /// A served value is at most `max_staleness_ms` + this behind its commit.
    #[serde(default)]
    pub staleness_refresh_ms: u64,
}

/// The figures of one strategy run. `None` (JSON `null`) where a figure does not apply.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StrategyFigures {
    /// Product reads completed.
    pub reads: u64,
    /// Reads per second of the run.
    pub reads_per_s: f64,
    /// Reads that failed (counted, not retried).
    pub read_errors: u64,
    /// Share of reads answered without this read querying the database.
    pub hit_rate: f64,
    /// Database loads made by reads (cache misses, including concurrent misses of one key).
    pub db_loads: u64,
    /// Reads that started after the sale-end commit was visible and returned a sale price.
    pub stale_reads_after_commit: u64,
    /// The largest (read start − commit visible) of those, ms; 0 when there were none.
    pub max_staleness_ms: f64,
    /// Database loads of the hot keys by reads in the second after the sale-end commit.
    pub hot_key_db_loads_after_commit: u64,
    /// Hot-key evictions the pipeline applied in that second (cacheclear only).
    pub hot_key_invalidations_after_commit: Option<u64>,
    /// Database loads of the hot keys in the run's first second, on a cold cache.
    pub hot_key_db_loads_cold_start: u64,
    /// Pipeline transactions observed during the run (cacheclear only).
    pub invalidation_txns: Option<u64>,
    /// Invalidation lag (applied − commit time), median, ms (cacheclear only).
    pub invalidation_lag_p50_ms: Option<f64>,
    /// Invalidation lag, 99th percentile, ms (cacheclear only).
    pub invalidation_lag_p99_ms: Option<f64>,
    /// Invalidation lag, maximum, ms (cacheclear only).
    pub invalidation_lag_max_ms: Option<f64>,
    /// The sale-end transaction's invalidation lag, ms (cacheclear only).
    pub sale_end_invalidation_lag_ms: Option<f64>,
    /// From the sale-end commit being visible to its evictions being acknowledged, ms, by this
    /// process's clock (cacheclear only): no read starting later can be stale.
    pub sale_end_visible_to_evicted_ms: Option<f64>,
    /// Checkout attempts (a rejected cart shown the new price and checked out again counts twice).
    pub checkouts: u64,
    /// Checkouts that placed an order.
    pub checkouts_charged: u64,
    /// Checkouts refused because a price had changed (the shopper got the current price).
    pub checkouts_rejected_price_changed: u64,
    /// Checkouts that failed (database error, or serialization failures past the retry limit).
    pub checkouts_failed: u64,
    /// Serialization failures (40001) and deadlocks (40P01) retried by checkouts.
    pub serialization_retries: u64,
    /// Checkouts of carts holding a sale price read after the sale-end commit was visible.
    pub stale_price_checkouts_attempted: u64,
    /// Of those, rejected with the current price.
    pub stale_price_checkouts_rejected: u64,
    /// Of those, charged (necessarily at the database's price: see `stale_price_charges`).
    pub stale_price_checkouts_charged: u64,
    /// Order lines charged a price that was not valid when their transaction committed
    /// (audited in the database against each checkout's snapshot).
    pub stale_price_charges: u64,
    /// Order lines placed.
    pub order_lines: u64,
    /// Read latency, median, ms.
    pub read_latency_p50_ms: f64,
    /// Read latency, 99th percentile, ms.
    pub read_latency_p99_ms: f64,
    /// Read latency, maximum, ms.
    pub read_latency_max_ms: f64,
    /// Reads that bypassed the cache because the staleness breaker was open (watermark too
    /// old or missing, epoch missing): the loader ran and nothing was filled (cacheclear only).
    #[serde(default)]
    pub bypassed_reads: Option<u64>,
    /// When the fault took the pipeline down, seconds into the run (`--fault`, cacheclear only).
    #[serde(default)]
    pub pipeline_stopped_at_s: Option<f64>,
    /// When the restarted pipeline streamed again, seconds into the run (`--fault slot-lost`).
    #[serde(default)]
    pub pipeline_resumed_at_s: Option<f64>,
    /// The run's time series, for `--report` (not part of the JSON).
    #[serde(skip)]
    pub timeline: Timeline,
}

/// One strategy run over time, at [`Timeline::tick_ms`] resolution (the HTML report's charts).
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// Width of one tick, ms (100).
    pub tick_ms: u32,
    /// When the sale-end commit became visible, seconds into the run.
    pub commit_visible_s: f64,
    /// Stale reads (started after the commit was visible, returned a sale price) per tick, by
    /// read start.
    pub stale_reads: Vec<u64>,
    /// Database loads by reads per tick, by load start.
    pub db_loads: Vec<u64>,
    /// Invalidation lag distribution: (bucket upper bound ms, transactions), buckets doubling
    /// from 0.25 ms; empty for ttl-only.
    pub invalidation_lag_ms: Vec<(f64, u64)>,
}

/// The side-by-side table.
pub(super) fn table(r: &Report) -> String {
    let s = &r.scenario;
    let (t, c) = (&r.strategies.ttl_only, &r.strategies.cacheclear);
    let mut out = String::new();
    let _ = writeln!(out, "$ {}", s.command);
    let _ = writeln!(
        out,
        "flash sale: {} products ({} on sale), {} shoppers on {} app servers, Zipf s={}, {:.0} s per strategy, \
         the sale ends at {:.1} s (one UPDATE of {} rows)",
        s.products,
        s.sale_items,
        s.shoppers,
        s.app_servers,
        s.zipf_exponent,
        s.duration_s,
        s.sale_ends_at_s,
        s.sale_items
    );
    if s.fault != "none" && !s.fault.is_empty() {
        let _ = writeln!(
            out,
            "fault in the cacheclear run: {} at {}{}",
            s.fault,
            c.pipeline_stopped_at_s.map_or_else(
                || "-".to_owned(),
                |at| format!("{at:.2} s (pipeline stopped)")
            ),
            c.pipeline_resumed_at_s
                .map(|at| format!(", slot lost, pipeline streaming again at {at:.2} s"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(
        out,
        "cacheclear clients: staleness bound {} ms, watermark refreshed every {} ms",
        s.max_staleness_ms, s.staleness_refresh_ms
    );
    let _ = writeln!(out);
    let rows: Vec<(String, String, String)> = vec![
        (
            "reads/s".into(),
            format!("{:.0}", t.reads_per_s),
            format!("{:.0}", c.reads_per_s),
        ),
        ("hit rate".into(), pct(t.hit_rate), pct(c.hit_rate)),
        (
            "stale reads after the sale-end commit".into(),
            t.stale_reads_after_commit.to_string(),
            c.stale_reads_after_commit.to_string(),
        ),
        (
            "  largest staleness".into(),
            ms(t.max_staleness_ms),
            ms(c.max_staleness_ms),
        ),
        (
            "reads that bypassed the cache (breaker open)".into(),
            opt_count(t.bypassed_reads),
            opt_count(c.bypassed_reads),
        ),
        (
            format!("DB loads of the {} hottest keys, 1 s after", s.hot_keys),
            t.hot_key_db_loads_after_commit.to_string(),
            c.hot_key_db_loads_after_commit.to_string(),
        ),
        (
            "  hot-key evictions in that second".into(),
            opt_count(t.hot_key_invalidations_after_commit),
            opt_count(c.hot_key_invalidations_after_commit),
        ),
        (
            format!("DB loads of the {} hottest keys, cold start", s.hot_keys),
            t.hot_key_db_loads_cold_start.to_string(),
            c.hot_key_db_loads_cold_start.to_string(),
        ),
        (
            "invalidation lag p50 / p99".into(),
            pair(t.invalidation_lag_p50_ms, t.invalidation_lag_p99_ms),
            pair(c.invalidation_lag_p50_ms, c.invalidation_lag_p99_ms),
        ),
        (
            "  sale-end commit visible → evicted".into(),
            opt_ms(t.sale_end_visible_to_evicted_ms),
            opt_ms(c.sale_end_visible_to_evicted_ms),
        ),
        (
            "checkouts at a stale price".into(),
            t.stale_price_checkouts_attempted.to_string(),
            c.stale_price_checkouts_attempted.to_string(),
        ),
        (
            "  rejected with the current price".into(),
            t.stale_price_checkouts_rejected.to_string(),
            c.stale_price_checkouts_rejected.to_string(),
        ),
        (
            "  charged".into(),
            t.stale_price_checkouts_charged.to_string(),
            c.stale_price_checkouts_charged.to_string(),
        ),
        (
            "orders charged a price not valid at commit".into(),
            t.stale_price_charges.to_string(),
            c.stale_price_charges.to_string(),
        ),
        (
            "checkouts: charged / price changed / failed".into(),
            format!(
                "{} / {} / {}",
                t.checkouts_charged, t.checkouts_rejected_price_changed, t.checkouts_failed
            ),
            format!(
                "{} / {} / {}",
                c.checkouts_charged, c.checkouts_rejected_price_changed, c.checkouts_failed
            ),
        ),
        (
            "  serialization failures retried".into(),
            t.serialization_retries.to_string(),
            c.serialization_retries.to_string(),
        ),
        (
            "read latency p50 / p99".into(),
            pair(Some(t.read_latency_p50_ms), Some(t.read_latency_p99_ms)),
            pair(Some(c.read_latency_p50_ms), Some(c.read_latency_p99_ms)),
        ),
    ];
    let w0 = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let w1 = rows
        .iter()
        .map(|r| r.1.chars().count())
        .chain([8])
        .max()
        .unwrap_or(0);
    let w2 = rows
        .iter()
        .map(|r| r.2.chars().count())
        .chain([10])
        .max()
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "{:<w0$}  {:>w1$}  {:>w2$}",
        "", "ttl-only", "cacheclear"
    );
    for (label, a, b) in &rows {
        let _ = writeln!(out, "{label:<w0$}  {a:>w1$}  {b:>w2$}");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "ttl-only: cache-aside, GET / on a miss read the database / SET EX {}; no invalidation, no lease.",
        s.ttl_s
    );
    let _ = writeln!(
        out,
        "cacheclear: the client library (lease, fenced fill, single-flight, TTL {} s ± 5%) and the \
         invalidation pipeline.",
        s.ttl_s
    );
    let _ = writeln!(
        out,
        "A stale read started after the sale-end COMMIT returned and still showed a sale price. \
         Checkout re-reads prices in a SERIALIZABLE transaction, so neither strategy charges one."
    );
    let _ = writeln!(
        out,
        "total {:.1} s; `cacheclear demo --json` prints these figures as JSON.",
        s.total_s
    );
    out
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn ms(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0} ms")
    } else {
        format!("{x:.2} ms")
    }
}

fn opt_ms(x: Option<f64>) -> String {
    x.map_or_else(|| "n/a".into(), ms)
}

fn opt_count(x: Option<u64>) -> String {
    x.map_or_else(|| "n/a".into(), |n| n.to_string())
}

fn pair(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{a:.2} / {b:.2} ms"),
        _ => "n/a".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let scenario = Scenario {
            command: "cacheclear demo --duration 12".into(),
            products: 10_000,
            sale_items: 1_000,
            shoppers: 32,
            app_servers: 8,
            duration_s: 12.0,
            sale_ends_at_s: 4.8,
            ttl_s: 300,
            zipf_exponent: 1.0,
            seed: 42,
            hot_keys: 10,
            hot_key_read_share: 0.3,
            sale_item_read_share: 0.76,
            catalog_edits_per_s: 20.0,
            postgres: "private".into(),
            redis: "private".into(),
            total_s: 31.5,
            fault: "pipeline-stop".into(),
            max_staleness_ms: 1_000,
            staleness_refresh_ms: 100,
        };
        let ttl = StrategyFigures {
            reads: 120_000,
            reads_per_s: 10_000.0,
            hit_rate: 0.991,
            stale_reads_after_commit: 54_321,
            max_staleness_ms: 7_190.4,
            hot_key_db_loads_cold_start: 87,
            stale_price_checkouts_attempted: 120,
            stale_price_checkouts_rejected: 120,
            read_latency_p50_ms: 0.31,
            read_latency_p99_ms: 2.5,
            ..StrategyFigures::default()
        };
        let cc = StrategyFigures {
            reads: 118_000,
            reads_per_s: 9_833.0,
            hit_rate: 0.987,
            stale_reads_after_commit: 3,
            max_staleness_ms: 1.234,
            hot_key_db_loads_after_commit: 10,
            hot_key_invalidations_after_commit: Some(10),
            hot_key_db_loads_cold_start: 10,
            invalidation_lag_p50_ms: Some(1.5),
            invalidation_lag_p99_ms: Some(4.25),
            invalidation_lag_max_ms: Some(9.0),
            sale_end_visible_to_evicted_ms: Some(2.0),
            bypassed_reads: Some(4_321),
            pipeline_stopped_at_s: Some(4.79),
            ..StrategyFigures::default()
        };
        Report {
            scenario,
            strategies: Strategies {
                ttl_only: ttl,
                cacheclear: cc,
            },
        }
    }

    #[test]
    fn table_lines_up_and_says_n_a_where_a_figure_does_not_apply() {
        let text = table(&sample());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "$ cacheclear demo --duration 12");
        let header = lines
            .iter()
            .position(|l| l.split_whitespace().eq(["ttl-only", "cacheclear"]))
            .expect("header");
        let width = lines[header].chars().count();
        let body: Vec<&str> = lines[header + 1..]
            .iter()
            .take_while(|l| !l.is_empty())
            .copied()
            .collect();
        assert!(body.len() >= 14, "{text}");
        for l in &body {
            assert_eq!(l.chars().count(), width, "misaligned: {l:?}\n{text}");
        }
        let row = |label: &str| {
            body.iter()
                .find(|l| l.starts_with(label))
                .unwrap_or_else(|| panic!("no row {label}:\n{text}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert!(row("reads/s").ends_with("10000 9833"), "{text}");
        assert!(row("hit rate").ends_with("99.1% 98.7%"), "{text}");
        assert!(
            row("  largest staleness").ends_with("7190 ms 1.23 ms"),
            "{text}"
        );
        assert!(
            row("invalidation lag p50 / p99").ends_with("n/a 1.50 / 4.25 ms"),
            "{text}"
        );
        assert!(row("  hot-key evictions").ends_with("n/a 10"), "{text}");
        assert!(row("reads that bypassed").ends_with("n/a 4321"), "{text}");
        assert!(
            text.contains(
                "fault in the cacheclear run: pipeline-stop at 4.79 s (pipeline stopped)"
            ),
            "{text}"
        );
        assert!(text.contains("staleness bound 1000 ms"), "{text}");
    }

    #[test]
    fn json_has_the_documented_shape() {
        let v = serde_json::to_value(sample()).expect("serializes");
        for s in ["ttl_only", "cacheclear"] {
            let f = &v["strategies"][s];
            for field in [
                "reads",
                "reads_per_s",
                "hit_rate",
                "stale_reads_after_commit",
                "max_staleness_ms",
                "hot_key_db_loads_after_commit",
                "invalidation_lag_p50_ms",
                "invalidation_lag_p99_ms",
                "stale_price_checkouts_attempted",
                "stale_price_charges",
                "read_latency_p50_ms",
                "read_latency_p99_ms",
            ] {
                assert!(f.get(field).is_some(), "{s}.{field} missing");
            }
        }
        assert!(v["strategies"]["ttl_only"]["invalidation_lag_p50_ms"].is_null());
        assert_eq!(
            v["strategies"]["cacheclear"]["invalidation_lag_p99_ms"],
            4.25
        );
        assert_eq!(v["scenario"]["products"], 10_000);
        assert_eq!(v["scenario"]["fault"], "pipeline-stop");
        assert_eq!(v["scenario"]["max_staleness_ms"], 1_000);
        assert!(v["strategies"]["ttl_only"]["bypassed_reads"].is_null());
        assert_eq!(v["strategies"]["cacheclear"]["bypassed_reads"], 4_321);
    }
}
