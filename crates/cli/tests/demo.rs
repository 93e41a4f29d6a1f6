//! `cacheclear demo`, run as the real binary: the JSON figures, missing binaries, Ctrl-C.

use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cacheclear");

/// The demos load both cores: run them one at a time so their figures stay meaningful.
static SERIAL: Mutex<()> = Mutex::new(());

fn demo(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("demo")
        .args(args)
        .env_remove("CACHECLEAR_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run cacheclear demo")
}

fn num(v: &serde_json::Value, strategy: &str, field: &str) -> f64 {
    v["strategies"][strategy][field]
        .as_f64()
        .unwrap_or_else(|| panic!("{strategy}.{field} is not a number: {v:#}"))
}

#[test]
fn json_figures_show_stale_reads_for_ttl_only_and_bounded_staleness_for_cacheclear() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let out = demo(&[
        "--json",
        "--duration",
        "4",
        "--shoppers",
        "8",
        "--products",
        "2000",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    // Exactly one JSON object on stdout (no progress bar, no table).
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
    eprintln!("{v:#}\n(took {:.1} s)", started.elapsed().as_secs_f64());

    let scenario = &v["scenario"];
    assert_eq!(scenario["products"], 2000);
    assert_eq!(scenario["sale_items"], 200);
    assert_eq!(scenario["shoppers"], 8);
    assert_eq!(scenario["duration_s"], 4.0);
    assert_eq!(scenario["hot_keys"], 10);
    assert_eq!(scenario["postgres"], "private");

    let fields = [
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
    ];
    for s in ["ttl_only", "cacheclear"] {
        for f in fields {
            assert!(
                v["strategies"][s].get(f).is_some(),
                "{s}.{f} missing: {v:#}"
            );
        }
        assert!(num(&v, s, "reads") > 0.0, "{s}: no reads");
        assert_eq!(num(&v, s, "read_errors"), 0.0, "{s}: read errors");
        let hit = num(&v, s, "hit_rate");
        assert!((0.5..=1.0).contains(&hit), "{s}: hit rate {hit}");
        // Checkout re-reads prices in a SERIALIZABLE transaction: nothing is ever charged a
        // price that was not valid at commit, whatever the cache served.
        assert_eq!(num(&v, s, "stale_price_charges"), 0.0, "{s}: {v:#}");
        assert_eq!(num(&v, s, "stale_price_checkouts_charged"), 0.0, "{s}");
        assert!(
            num(&v, s, "checkouts_charged") > 0.0,
            "{s}: no order placed"
        );
        assert!(num(&v, s, "order_lines") > 0.0, "{s}: no order line");
    }

    // ttl-only: no invalidation, so the sale price is served long after the sale ended.
    let t = "ttl_only";
    assert!(num(&v, t, "stale_reads_after_commit") > 0.0, "{v:#}");
    assert!(num(&v, t, "max_staleness_ms") > 1000.0, "{v:#}");
    assert!(num(&v, t, "stale_price_checkouts_attempted") > 0.0, "{v:#}");
    assert!(v["strategies"][t]["invalidation_lag_p50_ms"].is_null());
    assert!(v["strategies"][t]["invalidation_lag_p99_ms"].is_null());

    // cacheclear: staleness is bounded by the pipeline's lag.
    let c = "cacheclear";
    let lag_max = num(&v, c, "invalidation_lag_max_ms");
    let evicted = num(&v, c, "sale_end_visible_to_evicted_ms");
    let p50 = num(&v, c, "invalidation_lag_p50_ms");
    let p99 = num(&v, c, "invalidation_lag_p99_ms");
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= lag_max, "{v:#}");
    let stale = num(&v, c, "stale_reads_after_commit");
    let max_staleness = num(&v, c, "max_staleness_ms");
    // A read that starts after the evictions were acknowledged cannot return the old price. The
    // margin covers a single-flight follower that joins a load begun just before the commit.
    assert!(
        stale == 0.0 || max_staleness <= lag_max.max(evicted) + 25.0,
        "cacheclear served a sale price {max_staleness} ms after the commit, longer than its \
         invalidation lag (max {lag_max} ms, visible→evicted {evicted} ms): {v:#}"
    );
    assert!(
        num(&v, t, "stale_reads_after_commit") > stale,
        "cacheclear should serve fewer stale reads than ttl-only: {v:#}"
    );
    // The stampede: every hot key is evicted once by the sale end, and read by every shopper
    // right after. Without leases every miss would load (up to one load per shopper per key);
    // with them, exactly one load per key per eviction, across all app servers.
    let evictions = num(&v, c, "hot_key_invalidations_after_commit");
    let loads = num(&v, c, "hot_key_db_loads_after_commit");
    assert_eq!(evictions, 10.0, "each hot key is evicted once: {v:#}");
    assert_eq!(
        loads, evictions,
        "hot-key loads after the commit: {loads} for {evictions} evictions: {v:#}"
    );
    assert!(
        num(&v, c, "stale_price_checkouts_attempted")
            <= num(&v, t, "stale_price_checkouts_attempted")
    );
    let total = scenario["total_s"].as_f64().expect("total_s");
    assert!(total < 60.0, "took {total} s");
}

/// `--fault pipeline-stop` and `--fault slot-lost`: the cacheclear run's pipeline goes down
/// right before the sale-end transaction. ttl-only serves the sale price for the rest of the
/// run; cacheclear's clients stop serving cached values once the watermark is older than
/// `max_staleness_ms`, so no read sees a sale price later than the bound plus the refresh
/// interval after the commit; nothing is charged a stale price.
#[test]
fn faults_keep_cacheclear_staleness_within_the_breaker_bound() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for fault in ["pipeline-stop", "slot-lost"] {
        let out = demo(&[
            "--json",
            "--duration",
            "5",
            "--shoppers",
            "8",
            "--products",
            "2000",
            "--fault",
            fault,
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "demo --fault {fault} failed: {stderr}"
        );
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
        eprintln!("--fault {fault}: {v:#}");
        assert_eq!(v["scenario"]["fault"], fault);
        let bound = v["scenario"]["max_staleness_ms"].as_f64().expect("bound");
        let refresh = v["scenario"]["staleness_refresh_ms"]
            .as_f64()
            .expect("refresh");
        assert_eq!((bound, refresh), (1000.0, 100.0));
        assert!(
            v["scenario"]["command"]
                .as_str()
                .is_some_and(|c| c.contains(&format!("--fault {fault}"))),
            "{v:#}"
        );

        let (t, c) = ("ttl_only", "cacheclear");
        // ttl-only: the sale price until the end of the run (3 s after the commit).
        assert!(num(&v, t, "max_staleness_ms") > 2000.0, "{v:#}");
        assert!(v["strategies"][t]["bypassed_reads"].is_null(), "{v:#}");
        // cacheclear: the sale-end evictions never came, and yet…
        assert!(
            v["strategies"][c]["sale_end_visible_to_evicted_ms"].is_null(),
            "the stopped pipeline cannot have evicted the sale prices: {v:#}"
        );
        assert!(num(&v, c, "pipeline_stopped_at_s") > 0.0, "{v:#}");
        let max_staleness = num(&v, c, "max_staleness_ms");
        assert!(
            max_staleness <= bound + refresh,
            "--fault {fault}: cacheclear served a sale price {max_staleness} ms after the \
             commit, beyond its bound {bound} + {refresh} ms: {v:#}"
        );
        for s in [t, c] {
            assert_eq!(num(&v, s, "stale_price_charges"), 0.0, "{s}: {v:#}");
            assert_eq!(num(&v, s, "read_errors"), 0.0, "{s}: {v:#}");
        }
        match fault {
            "pipeline-stop" => {
                assert!(v["strategies"][c]["pipeline_resumed_at_s"].is_null());
                assert!(num(&v, c, "bypassed_reads") > 0.0, "{v:#}");
                // Down for the rest of the run: the breaker stays open from the bound on.
                assert!(num(&v, c, "hit_rate") < num(&v, t, "hit_rate"), "{v:#}");
            }
            _ => {
                let resumed = num(&v, c, "pipeline_resumed_at_s");
                assert!(resumed > num(&v, c, "pipeline_stopped_at_s"), "{v:#}");
            }
        }
    }
}

#[test]
fn missing_binaries_say_what_to_install() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().to_str().expect("utf-8 path");
    let out = Command::new(BIN)
        .args(["demo", "--json"])
        .env("CACHECLEAR_PG_BIN", empty)
        .env("CACHECLEAR_REDIS_BIN", empty)
        .stdin(Stdio::null())
        .output()
        .expect("run cacheclear demo");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing on stdout");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("apt-get install postgresql"), "{stderr}");
    assert!(stderr.contains("apt-get install redis-server"), "{stderr}");
    assert!(stderr.contains(empty), "names where it searched: {stderr}");
}

/// Direct children of `pid` and their command names, from /proc.
fn children(pid: u32) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = stat[stat.find('(').map_or(0, |i| i + 1)..close].to_owned();
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            found.push((child, comm));
        }
    }
    found
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next())
                .is_some_and(|state| state != "Z")
        })
        .unwrap_or(false)
}

#[test]
fn ctrl_c_stops_the_private_servers() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = Command::new(BIN)
        .args([
            "demo",
            "--json",
            "--duration",
            "30",
            "--shoppers",
            "2",
            "--products",
            "500",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cacheclear demo");
    let pid = child.id();
    // Wait until both servers run and the scenario has started.
    let deadline = Instant::now() + Duration::from_secs(60);
    let servers = loop {
        let kids = children(pid);
        let pg = kids.iter().any(|(_, c)| c == "postgres");
        let redis = kids.iter().any(|(_, c)| c.starts_with("redis-server"));
        if pg && redis {
            std::thread::sleep(Duration::from_secs(3));
            break children(pid);
        }
        assert!(Instant::now() < deadline, "servers did not start: {kids:?}");
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "demo exited early"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let status = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill -INT");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("try_wait") {
            break exit;
        }
        assert!(Instant::now() < deadline, "demo did not stop after Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!exit.success(), "interrupted demo must fail");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(out.stdout.is_empty(), "no figures after an interrupt");
    for (server, comm) in servers {
        assert!(
            !alive(server),
            "{comm} (pid {server}) outlived the demo: {stderr}"
        );
    }
}
