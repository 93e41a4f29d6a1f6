//! `postgres.failover_slot = true`: on PostgreSQL 17 or later the slot is created with
//! `failover` (`pg_replication_slots.failover` is true) and the pipeline streams from it; on an
//! older server `run` refuses to start with a config error naming the field. Which branch runs
//! depends on the server the harness starts: `.ci/run` runs this file against PostgreSQL 15 and,
//! with `CACHECLEAR_PG_BIN`, against PostgreSQL 17.

mod common;

use std::time::Duration;

use common::*;

async fn server_version_num(pg: &tokio_postgres::Client) -> u32 {
    let v: String = pg
        .query_one("SELECT current_setting('server_version_num')", &[])
        .await
        .expect("version")
        .get(0);
    v.parse().expect("server_version_num is a number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_slot_is_created_with_failover_on_17_and_refused_before() {
    let env = Env::start();
    let db = env.pg().await;
    let version = server_version_num(&db).await;
    let mut cfg = env.pg_config();
    cfg.failover_slot = true;
    let mut pipeline = spawn_pipeline(cfg, env.redis_config(), product_rules());
    if version < 170_000 {
        let err = tokio::time::timeout(Duration::from_secs(30), pipeline.streaming())
            .await
            .expect("refused within 30 s")
            .expect_err("failover_slot on PostgreSQL < 17 is refused");
        let text = err.to_string();
        assert!(
            text.starts_with("postgres.failover_slot: failover slots need PostgreSQL 17"),
            "{text}"
        );
        assert!(err.is_fatal(), "a config error: {text}");
        let slots: i64 = db
            .query_one("SELECT count(*) FROM pg_replication_slots", &[])
            .await
            .expect("slots")
            .get(0);
        assert_eq!(slots, 0, "no slot was created");
        return;
    }
    streaming(&mut pipeline).await;
    let failover: bool = db
        .query_one(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = 'cacheclear'",
            &[],
        )
        .await
        .expect("the slot exists")
        .get(0);
    assert!(failover, "the slot was created with failover");
    // And it streams: an UPDATE evicts.
    let mut r = env.redis().await;
    set(&mut r, "{product:3}", "cached").await;
    db.execute("UPDATE product SET price_cents = 7 WHERE id = 3", &[])
        .await
        .expect("update");
    gone(
        &mut r,
        Duration::from_secs(30),
        "product:3",
        "eviction from a failover slot",
    )
    .await;
    pipeline.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_slot_is_created_without_failover_on_every_version() {
    let env = Env::start();
    let db = env.pg().await;
    let version = server_version_num(&db).await;
    let pipeline = start_pipeline(&env).await;
    if version >= 170_000 {
        let failover: bool = db
            .query_one(
                "SELECT failover FROM pg_replication_slots WHERE slot_name = 'cacheclear'",
                &[],
            )
            .await
            .expect("the slot exists")
            .get(0);
        assert!(!failover, "failover_slot defaults to false");
    }
    let slots: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'cacheclear'",
            &[],
        )
        .await
        .expect("slots")
        .get(0);
    assert_eq!(slots, 1);
    pipeline.stop().await.expect("stop");
}
