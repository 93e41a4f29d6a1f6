//! Staleness stays bounded when parts fail (issue 10), on real PostgreSQL and Redis: the
//! watermark and the client's staleness breaker (pipeline killed), the epoch (slot lost, another
//! system identifier), and read-your-writes.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cacheclear_client::{Client, Config, Loaded, StalenessConfig};
use cacheclear_harness::{PgInstance, PgOptions};
use cacheclear_protocol::NamespaceLayout;
use cacheclear_source_postgres::{Pipeline, PostgresConfig};
use common::*;

const OLD: i64 = 1005;
const NEW: i64 = 1;
/// The client's bound in these tests, and its refresh interval.
const MAX_STALENESS_MS: u64 = 1_500;
const REFRESH_MS: u64 = 100;
/// How long a healthy pipeline may take to have reads served from the cache.
const CACHED_WITHIN: Duration = Duration::from_secs(30);

fn pg_config(env: &Env) -> PostgresConfig {
    let mut cfg = env.pg_config();
    cfg.watermark_interval_ms = 200;
    cfg
}

async fn client(env: &Env) -> Client {
    let config = Config::default().with_staleness(
        StalenessConfig::new("cacheclear")
            .with_max_staleness_ms(MAX_STALENESS_MS)
            .with_refresh_ms(REFRESH_MS),
    );
    Client::connect(&env.redis.url(), config)
        .await
        .expect("client")
}

/// The value envelope Redis holds for `product:5`, if any.
async fn cached(env: &Env) -> Option<String> {
    get(&mut env.redis().await, "{product:5}").await
}

async fn epoch(env: &Env) -> Option<u64> {
    let ns = NamespaceLayout::new("cacheclear").expect("namespace");
    get(&mut env.redis().await, &ns.epoch())
        .await
        .map(|e| e.parse().expect("epoch is an integer"))
}

async fn spawn(env: &Env, cfg: PostgresConfig) -> Pipeline {
    let mut pipeline = spawn_pipeline(cfg, env.redis_config(), product_rules());
    streaming(&mut pipeline).await;
    pipeline
}

/// Pipeline killed → the client stops serving cached values within `max_staleness_ms` plus its
/// refresh interval, reads the database without filling, and serves from the cache again once
/// the restarted pipeline refreshed the watermark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_killed_bypasses_within_the_bound_and_recovers() {
    let env = Env::start();
    let pg = Arc::new(env.pg().await);
    let pipeline = spawn(&env, pg_config(&env)).await;
    let client = client(&env).await;
    wait_served_from_cache(&client, &pg, OLD, CACHED_WITHIN).await;
    assert!(client.stats().fills >= 1);

    // Killed (dropped without draining), then the sale ends: nothing evicts product:5.
    drop(pipeline);
    let killed = Instant::now();
    pg.execute("UPDATE product SET price_cents = $1 WHERE id = 5", &[&NEW])
        .await
        .expect("update");
    // Upper bound: the last watermark's age reaches the bound, plus one refresh, plus slack for a
    // loaded machine.
    let bound = Duration::from_millis(MAX_STALENESS_MS + REFRESH_MS + 3_000);
    let stale_reads = std::sync::atomic::AtomicU64::new(0);
    wait_for("the breaker to open", bound, || async {
        let price = read_product_5(&client, &pg).await;
        if price == OLD {
            stale_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        price == NEW
    })
    .await;
    let stale_reads = stale_reads.into_inner();
    let opened_after = killed.elapsed();
    // Until the bound the old price may be served; after it, never.
    for _ in 0..20 {
        assert_eq!(
            read_product_5(&client, &pg).await,
            NEW,
            "the breaker stays open"
        );
    }
    let stats = client.stats();
    assert!(stats.bypassed_watermark_stale >= 21, "{stats:?}");
    // Bypassing reads do not fill: Redis still holds the old price, and it is not served.
    let held = cached(&env).await.expect("the old value is still cached");
    assert!(held.contains(&format!("\"payload\":{OLD}")), "{held}");
    eprintln!("breaker opened {opened_after:?} after the kill ({stale_reads} stale reads before)");

    // Restarted: the slot replays the UPDATE, the watermark is fresh, the cache serves again.
    let pipeline = spawn(&env, pg_config(&env)).await;
    wait_served_from_cache(&client, &pg, NEW, CACHED_WITHIN).await;
    pipeline.stop().await.expect("stop");
}

/// Slot lost while the pipeline was down (`max_slot_wal_keep_size` small, WAL churned until
/// `wal_status = lost`): with `on_slot_lost = "flush_and_recreate"` the restart bumps the epoch
/// before streaming, and the value cached before the lost change — still in Redis — is never
/// served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_lost_bumps_the_epoch_and_the_old_value_is_never_served() {
    let env = Env::start_with(
        PgOptions::default()
            .conf("max_slot_wal_keep_size = '1MB'")
            .conf("min_wal_size = '32MB'")
            .conf("max_wal_size = '64MB'"),
    );
    let pg = Arc::new(env.pg().await);
    let pipeline = spawn(&env, pg_config(&env)).await;
    let before = epoch(&env).await.expect("an epoch after the first start");
    let client = client(&env).await;
    wait_served_from_cache(&client, &pg, OLD, CACHED_WITHIN).await;
    pipeline.stop().await.expect("stop");

    pg.execute("UPDATE product SET price_cents = $1 WHERE id = 5", &[&NEW])
        .await
        .expect("update");
    wait_for("wal_status = lost", Duration::from_secs(120), || async {
        pg.batch_execute(
            "CREATE TABLE IF NOT EXISTS churn (x text);
             INSERT INTO churn SELECT repeat('x', 1000) FROM generate_series(1, 2000);
             SELECT pg_switch_wal();
             CHECKPOINT;",
        )
        .await
        .expect("churn");
        let status: Option<String> = pg
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'cacheclear'",
                &[],
            )
            .await
            .expect("slot")
            .get(0);
        status.as_deref() == Some("lost")
    })
    .await;

    let pipeline = spawn(&env, pg_config(&env)).await;
    let after = epoch(&env).await.expect("epoch");
    assert!(after > before, "epoch bumped: {before} → {after}");
    // The recreated slot also evicted every rule table (the backstop for clients without a
    // namespace); with or without it, the old value is never served: every read from now on
    // returns the new price, also once the cache serves again.
    wait_served_from_cache(&client, &pg, NEW, CACHED_WITHIN).await;
    for _ in 0..20 {
        assert_eq!(read_product_5(&client, &pg).await, NEW);
    }
    pipeline.stop().await.expect("stop");
}

/// Another system identifier under the same namespace (a new cluster where the slot exists, so
/// only the origin shows the gap) bumps the epoch before the stream starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_system_identifier_bumps_the_epoch_before_streaming() {
    let env = Env::start();
    let pg = Arc::new(env.pg().await);
    let pipeline = spawn(&env, pg_config(&env)).await;
    let client = client(&env).await;
    wait_served_from_cache(&client, &pg, OLD, CACHED_WITHIN).await;
    pipeline.stop().await.expect("stop");
    let before = epoch(&env).await.expect("epoch");

    // The new cluster: the same schema, product 5 at another price, and a slot of that name.
    let other = PgInstance::start().expect("second PostgreSQL");
    other.psql(SCHEMA).expect("schema");
    other
        .psql(&format!(
            "UPDATE product SET price_cents = {NEW} WHERE id = 5"
        ))
        .expect("update");
    other
        .psql("SELECT pg_create_logical_replication_slot('cacheclear', 'pgoutput')")
        .expect("slot");
    let mut cfg = PostgresConfig::new(other.url());
    cfg.status_interval_ms = 100;
    cfg.watermark_interval_ms = 200;
    let sysid = other
        .psql("SELECT system_identifier FROM pg_control_system()")
        .expect("sysid");
    let pipeline = spawn(&env, cfg).await;
    // Streaming implies the epoch was opened first (the bump runs before START_REPLICATION).
    let after = epoch(&env).await.expect("epoch");
    assert!(after > before, "epoch bumped: {before} → {after}");
    let ns = NamespaceLayout::new("cacheclear").expect("namespace");
    let origin = get(&mut env.redis().await, &ns.origin())
        .await
        .expect("origin");
    assert!(
        origin.starts_with(&format!("{}/", sysid.trim())),
        "{origin} vs {sysid}"
    );

    let (other_pg, conn) = tokio_postgres::connect(&other.conn_string(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let other_pg = Arc::new(other_pg);
    wait_served_from_cache(&client, &other_pg, NEW, CACHED_WITHIN).await;
    pipeline.stop().await.expect("stop");
}

/// Read-your-writes: after an UPDATE, `get_at_least` with the writer's `pg_current_wal_lsn()`
/// never returns the old value, while the cache holds it until the pipeline evicts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_never_returns_the_old_value() {
    let env = Env::start();
    let pg = Arc::new(env.pg().await);
    let pipeline = spawn(&env, pg_config(&env)).await;
    let client = client(&env).await;
    wait_served_from_cache(&client, &pg, OLD, CACHED_WITHIN).await;
    for round in 0..20i64 {
        let price = 2_000 + round;
        pg.execute(
            "UPDATE product SET price_cents = $1 WHERE id = 5",
            &[&price],
        )
        .await
        .expect("update");
        let lsn = current_lsn(&pg).await;
        let pg2 = Arc::clone(&pg);
        let got: i64 = client
            .get_at_least("product:5", lsn, || async move {
                let row = pg2
                    .query_one("SELECT price_cents FROM product WHERE id = 5", &[])
                    .await?;
                Ok::<_, tokio_postgres::Error>(Loaded::new(row.get::<_, i64>(0)))
            })
            .await
            .expect("read");
        assert_eq!(got, price, "round {round}");
    }
    let stats = client.stats();
    assert!(stats.ryw_waits >= 1, "{stats:?}");
    pipeline.stop().await.expect("stop");
}

/// A process idle for longer than the bound holds a snapshot aged by the idle time alone: a
/// burst of concurrent reads then waits for the one namespace read instead of judging that
/// snapshot, so none of them bypasses the cache while the pipeline is healthy (before, all but
/// the reader that refreshed went to the database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_after_an_idle_spell_does_not_bypass_a_healthy_pipeline() {
    let env = Env::start();
    let pg = Arc::new(env.pg().await);
    let pipeline = spawn(&env, pg_config(&env)).await;
    let client = client(&env).await;
    wait_served_from_cache(&client, &pg, OLD, CACHED_WITHIN).await;
    tokio::time::sleep(Duration::from_millis(MAX_STALENESS_MS + 500)).await;

    let before = client.stats();
    let go = Arc::new(tokio::sync::Barrier::new(32));
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (client, pg, go) = (client.clone(), Arc::clone(&pg), Arc::clone(&go));
        burst.spawn(async move {
            go.wait().await;
            read_product_5(&client, &pg).await
        });
    }
    while let Some(price) = burst.join_next().await {
        assert_eq!(price.expect("reader"), OLD);
    }
    let after = client.stats();
    assert_eq!(
        after.bypassed_watermark_stale + after.bypassed_watermark_missing,
        before.bypassed_watermark_stale + before.bypassed_watermark_missing,
        "a burst on a healthy pipeline bypassed the cache: {after:?}"
    );
    // One read from Redis; the others joined it in this process's single-flight table.
    assert_eq!(
        (after.hits + after.coalesced) - (before.hits + before.coalesced),
        32,
        "{after:?}"
    );
    assert_eq!(
        after.namespace_reads - before.namespace_reads,
        1,
        "{after:?}"
    );
    pipeline.stop().await.expect("stop");
}

/// On an idle, healthy pipeline the watermark's lag is the heartbeat's true round trip, not a
/// heartbeat interval: the heartbeat's commit can stream and be acknowledged before
/// `pg_logical_emit_message` returns its LSN to the emitter, and the publisher then has to count
/// it when it is registered (found by a fresh-user trial: 25–30 % of idle watermarks carried
/// one interval of lag).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pipeline_reports_its_true_lag() {
    let env = Env::start();
    let pipeline = spawn(&env, pg_config(&env)).await;
    let ns = NamespaceLayout::new("cacheclear").expect("namespace");
    let mut r = env.redis().await;
    // Every distinct watermark written over 8 s (40 heartbeats at 200 ms).
    let mut seen: std::collections::BTreeMap<u64, u64> = Default::default();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(8) {
        if let Some(w) = get(&mut r, &ns.watermark()).await {
            let w = cacheclear_protocol::Watermark::parse(&w).expect("watermark");
            seen.insert(w.written_ms, w.lag_ms);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lags: Vec<u64> = seen.values().copied().collect();
    let interval = pg_config(&env).watermark_interval_ms;
    let late = lags.iter().filter(|l| **l >= interval).count();
    eprintln!("{} watermarks, lags (ms): {lags:?}", lags.len());
    assert!(lags.len() >= 20, "{lags:?}");
    assert!(
        late * 10 <= lags.len(),
        "{late} of {} idle watermarks carried a heartbeat interval ({interval} ms) of lag: {lags:?}",
        lags.len()
    );
    pipeline.stop().await.expect("stop");
}

/// The epoch key lost while the pipeline runs (a Redis restart without persistence, an
/// `allkeys-*` eviction): clients bypass the cache at once, the pipeline's next watermark write
/// finds the epoch missing and bumps it in place, and the cache serves again under the new
/// epoch — the value cached under the old one is a miss, not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_epoch_key_bypasses_then_the_pipeline_bumps_it_in_place() {
    let env = Env::start();
    let pg = Arc::new(env.pg().await);
    let pipeline = spawn(&env, pg_config(&env)).await;
    let client = client(&env).await;
    wait_served_from_cache(&client, &pg, OLD, CACHED_WITHIN).await;
    let before = epoch(&env).await.expect("epoch");
    let ns = NamespaceLayout::new("cacheclear").expect("namespace");
    let _: i64 = redis::cmd("DEL")
        .arg(ns.epoch())
        .query_async(&mut env.redis().await)
        .await
        .expect("DEL epoch");

    wait_for("a new epoch", Duration::from_secs(20), || async {
        epoch(&env).await.is_some_and(|e| e > before)
    })
    .await;
    // Within one refresh interval of the bump a client may still judge by its last read
    // (the bound is max_staleness_ms + refresh_ms); after it, it knows the new epoch.
    tokio::time::sleep(Duration::from_millis(REFRESH_MS + 50)).await;
    let misses_before = client.stats().epoch_misses;
    wait_served_from_cache(&client, &pg, OLD, CACHED_WITHIN).await;
    let stats = client.stats();
    assert!(
        stats.epoch_misses > misses_before,
        "the value filled under epoch {before} must be a miss: {stats:?}"
    );
    assert!(
        !pipeline.is_finished(),
        "the pipeline bumps in place and goes on"
    );
    pipeline.stop().await.expect("stop");
}
