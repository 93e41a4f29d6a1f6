//! `cacheclear audit` against a live deployment (real PostgreSQL, Redis, `cacheclear run`, the
//! client library): a healthy read-through workload has no inconsistent value, in both modes; a
//! value stored behind the protocol's back (a raw `SET` of an envelope read before the last
//! change, after that change's invalidation) is found, in both modes, and fails `--min-nines`.

mod common;

use std::time::{Duration, Instant};

use cacheclear_client::{Client, Config, Loaded};
use common::*;
use redis::AsyncCommands;

const WAIT: Duration = Duration::from_secs(60);

/// `SELECT price_cents` of product `id`: the loader.
async fn price(pg: &tokio_postgres::Client, id: i32) -> Result<i64, tokio_postgres::Error> {
    pg.query_one("SELECT price_cents FROM product WHERE id = $1", &[&id])
        .await?
        .try_get(0)
}

/// `cacheclear audit --config <config> <args>` to its end: (exit code, stdout JSON, stderr).
fn audit(config: &std::path::Path, args: &[&str]) -> (i32, serde_json::Value, String) {
    let mut all: Vec<&std::ffi::OsStr> =
        vec!["audit".as_ref(), "--config".as_ref(), config.as_os_str()];
    all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
    let (status, stdout, stderr) = run_to_end(command(&all), Duration::from_secs(180));
    let status = status.expect("audit ends");
    let json = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("audit printed no JSON ({e}): {stdout}\n{stderr}"));
    (status.code().unwrap_or(-1), json, stderr)
}

/// Reads products 1..=20 through the client, updating some between rounds, for `for_`.
async fn workload(env: &Env, client: &Client, for_: Duration) -> u64 {
    let pg = env.pg().await;
    let start = Instant::now();
    let mut round: i64 = 0;
    let mut reads = 0;
    while start.elapsed() < for_ {
        for id in 1..=20 {
            let v: i64 = client
                .get_or_load(&format!("product:{id}"), || async {
                    price(&pg, id).await.map(Loaded::new)
                })
                .await
                .expect("read through the cache");
            assert!(v >= 1000, "price {v}");
            reads += 1;
        }
        round += 1;
        let id = (round % 20) as i32 + 1;
        pg.execute(
            "UPDATE product SET price_cents = price_cents + 1 WHERE id = $1",
            &[&id],
        )
        .await
        .expect("update");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reads
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_finds_nothing_on_a_healthy_cache_and_finds_a_value_stored_behind_the_protocol() {
    let env = Env::start();
    let pg = env.pg().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(
        dir.path(),
        "cacheclear.toml",
        &config_toml(&env, "", "", ""),
    );
    let mut run = Process::run(&config, &dir.path().join("run.log"));
    wait_streaming(&pg, WAIT).await;
    let client = Client::connect(&env.redis.url(), Config::default())
        .await
        .expect("client");

    // 1. Healthy: the client reads through the cache while rows change; the audit follows.
    let audit_cfg = config.clone();
    let follow = std::thread::spawn(move || {
        audit(
            &audit_cfg,
            &["--duration", "9", "--json", "--min-nines", "1"],
        )
    });
    // Let the tap start streaming before the workload's changes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reads = workload(&env, &client, Duration::from_secs(5)).await;
    let (code, report, stderr) = follow.join().expect("audit thread");
    assert_eq!(code, 0, "healthy audit failed: {report}\n{stderr}");
    assert_eq!(report["mode"], "follow");
    let one = &report["windows"]["1s"];
    assert!(
        one["checked"].as_u64().unwrap_or(0) >= 20,
        "too few checks after {reads} reads: {report}"
    );
    assert_eq!(report["inconsistent"], 0, "{report}");
    assert_eq!(one["inconsistent"], 0, "{report}");
    assert_eq!(
        one["unverifiable"], 0,
        "every value records its read position: {report}"
    );
    assert_eq!(one["nines_capped"], true, "{report}");
    assert!(
        report["nines"]["1s"].as_f64().is_some_and(|n| n >= 1.0),
        "{report}"
    );
    // A 9 s run has no 60 s check.
    assert_eq!(report["nines"]["60s"], serde_json::Value::Null, "{report}");
    assert!(report["examples"].as_array().is_some_and(Vec::is_empty));
    // The audit's slot is gone.
    let slots: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'cacheclear_audit'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "the audit's slot was not dropped");

    // Scan mode on the same cache: every value is consistent.
    let (code, scan, stderr) = audit(&config, &["--scan", "100", "--json", "--min-nines", "1"]);
    assert_eq!(code, 0, "healthy scan failed: {scan}\n{stderr}");
    assert!(scan["checked"].as_u64().unwrap_or(0) >= 10, "{scan}");
    assert_eq!(scan["inconsistent"], 0, "{scan}");

    // 2. A value stored behind the protocol's back: read product 7 (its envelope), update the
    //    row, wait for the invalidation, then SET the old envelope back — what a plain
    //    cache-aside writer in another language does after a slow read.
    let mut r = env.redis().await;
    let _: i64 = client
        .get_or_load("product:7", || async {
            price(&pg, 7).await.map(Loaded::new)
        })
        .await
        .unwrap();
    let old: Vec<u8> = r.get("{product:7}").await.unwrap();
    let audit_cfg = config.clone();
    let follow = std::thread::spawn(move || {
        audit(
            &audit_cfg,
            &["--duration", "5", "--json", "--min-nines", "3"],
        )
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.execute("UPDATE product SET price_cents = 1 WHERE id = 7", &[])
        .await
        .unwrap();
    gone(&mut r, WAIT, "product:7", "product:7's invalidation").await;
    let _: () = r.set("{product:7}", &old).await.unwrap();
    let (code, report, stderr) = follow.join().expect("audit thread");
    assert_eq!(
        code, 1,
        "--min-nines 3 with an inconsistent value must fail: {report}\n{stderr}"
    );
    assert_eq!(report["inconsistent"], 1, "{report}");
    assert_eq!(report["windows"]["1s"]["inconsistent"], 1, "{report}");
    assert_eq!(report["examples"][0]["key"], "product:7", "{report}");

    let (code, scan, _) = audit(&config, &["--scan", "1000", "--json", "--min-nines", "3"]);
    assert_eq!(code, 1, "{scan}");
    assert_eq!(scan["inconsistent"], 1, "{scan}");
    assert_eq!(scan["examples"][0]["key"], "product:7", "{scan}");
    assert_eq!(scan["windows"]["scan"]["nines_capped"], false, "{scan}");

    assert!(run.exited().is_none(), "cacheclear run exited");
    run.kill();
}
