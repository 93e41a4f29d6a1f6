//! A rule on a partitioned table covers every partition, present and future (real PostgreSQL and
//! Redis).

mod common;

use std::time::Duration;

use cacheclear_rules::RuleConfig;
use common::*;

const WAIT: Duration = Duration::from_secs(30);

const ORDERS: &str = "
CREATE TABLE orders (id int, month date, status text, PRIMARY KEY (id, month))
  PARTITION BY RANGE (month);
CREATE TABLE orders_2026_11 PARTITION OF orders FOR VALUES FROM ('2026-11-01') TO ('2026-12-01');
CREATE TABLE orders_2026_12 PARTITION OF orders FOR VALUES FROM ('2026-12-01') TO ('2027-01-01');
ALTER TABLE orders REPLICA IDENTITY FULL;
ALTER TABLE orders_2026_11 REPLICA IDENTITY FULL;
ALTER TABLE orders_2026_12 REPLICA IDENTITY FULL;
INSERT INTO orders SELECT g, '2026-12-02', 'new' FROM generate_series(1, 10) g;
INSERT INTO orders SELECT g, '2026-11-02', 'new' FROM generate_series(11, 20) g;
";

fn rules() -> Vec<RuleConfig> {
    vec![RuleConfig {
        table: "public.orders".into(),
        keys: vec!["order:{id}".into(), "orders:{month}".into()],
    }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_on_the_parent_covers_every_partition() {
    let env = Env::start();
    env.pg.psql(ORDERS).expect("schema");
    let mut pipeline = spawn_pipeline(env.pg_config(), env.redis_config(), rules());
    streaming(&mut pipeline).await;
    let pg = env.pg().await;
    let mut r = env.redis().await;

    // UPDATE, INSERT, DELETE in a partition.
    set(&mut r, "{order:1}", "cached").await;
    set(&mut r, "{order:5}", "untouched").await;
    pg.batch_execute("UPDATE orders SET status = 'paid' WHERE id = 1")
        .await
        .expect("update");
    gone(&mut r, WAIT, "order:1", "UPDATE in a partition to evict").await;
    set(&mut r, "{order:30}", "negative cache").await;
    pg.batch_execute("INSERT INTO orders VALUES (30, '2026-12-05', 'new')")
        .await
        .expect("insert");
    gone(&mut r, WAIT, "order:30", "INSERT in a partition to evict").await;
    set(&mut r, "{order:2}", "cached").await;
    pg.batch_execute("DELETE FROM orders WHERE id = 2")
        .await
        .expect("delete");
    gone(&mut r, WAIT, "order:2", "DELETE in a partition to evict").await;
    assert!(
        exists(&mut r, "{order:5}").await,
        "row changes evict their own keys only"
    );

    // A row moving between partitions arrives as DELETE + INSERT: both months' keys go.
    set(&mut r, "{orders:2026-12-02}", "december list").await;
    set(&mut r, "{orders:2026-11-03}", "november list").await;
    pg.batch_execute("UPDATE orders SET month = '2026-11-03' WHERE id = 4")
        .await
        .expect("move");
    gone(
        &mut r,
        WAIT,
        "orders:2026-11-03",
        "the new partition's key (INSERT)",
    )
    .await;
    gone(
        &mut r,
        WAIT,
        "orders:2026-12-02",
        "the old partition's key (DELETE)",
    )
    .await;

    // A partition created while running: its rows are mapped to the rule without a restart.
    pg.batch_execute(
        "CREATE TABLE orders_2027_01 PARTITION OF orders FOR VALUES FROM ('2027-01-01') TO ('2027-02-01');
         ALTER TABLE orders_2027_01 REPLICA IDENTITY FULL;
         INSERT INTO orders VALUES (40, '2027-01-02', 'new');",
    )
    .await
    .expect("new partition");
    set(&mut r, "{order:40}", "cached").await;
    pg.batch_execute("UPDATE orders SET status = 'paid' WHERE id = 40")
        .await
        .expect("update");
    gone(
        &mut r,
        WAIT,
        "order:40",
        "UPDATE in a new partition to evict",
    )
    .await;

    // A partition attached while running.
    pg.batch_execute(
        "CREATE TABLE orders_2027_02 (id int, month date, status text, PRIMARY KEY (id, month));
         ALTER TABLE orders_2027_02 REPLICA IDENTITY FULL;
         INSERT INTO orders_2027_02 VALUES (50, '2027-02-02', 'new');
         ALTER TABLE orders ATTACH PARTITION orders_2027_02 FOR VALUES FROM ('2027-02-01') TO ('2027-03-01');",
    )
    .await
    .expect("attach");
    set(&mut r, "{order:50}", "cached").await;
    pg.batch_execute("UPDATE orders SET status = 'paid' WHERE id = 50")
        .await
        .expect("update");
    gone(
        &mut r,
        WAIT,
        "order:50",
        "UPDATE in an attached partition to evict",
    )
    .await;

    // TRUNCATE of one partition evicts every key of the rule table.
    set(&mut r, "{order:11}", "november order").await;
    set(&mut r, "{order:6}", "december order").await;
    pg.batch_execute("TRUNCATE orders_2026_11")
        .await
        .expect("truncate");
    gone(&mut r, WAIT, "order:11", "TRUNCATE of a partition to evict").await;
    assert!(
        !exists(&mut r, "{order:6}").await,
        "a partition's TRUNCATE evicts the whole rule table's keys"
    );
    pipeline.stop().await.expect("stop");
}

/// ATTACH brings rows no change event announced, DETACH takes rows away without DELETEs: the
/// publication watch evicts the rule table's keys for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_and_detach_evict_the_rule_tables_keys() {
    let env = Env::start();
    env.pg.psql(ORDERS).expect("schema");
    let mut cfg = env.pg_config();
    cfg.publication_check_interval_ms = 300;
    let mut pipeline = spawn_pipeline(cfg, env.redis_config(), rules());
    streaming(&mut pipeline).await;
    let pg = env.pg().await;
    let mut r = env.redis().await;
    pg.batch_execute(
        "CREATE TABLE orders_2027_02 (id int, month date, status text, PRIMARY KEY (id, month));
         ALTER TABLE orders_2027_02 REPLICA IDENTITY FULL;
         INSERT INTO orders_2027_02 VALUES (50, '2027-02-02', 'new');",
    )
    .await
    .expect("a table to attach");
    // Cached before the attach: "no orders that month", "order 50 not found".
    set(&mut r, "{orders:2027-02-02}", "[]").await;
    set(&mut r, "{order:50}", "not found").await;
    pg.batch_execute(
        "ALTER TABLE orders ATTACH PARTITION orders_2027_02 FOR VALUES FROM ('2027-02-01') TO ('2027-03-01')",
    )
    .await
    .expect("attach");
    gone(&mut r, WAIT, "orders:2027-02-02", "the attach to evict").await;
    gone(&mut r, WAIT, "order:50", "the attach to evict").await;

    set(&mut r, "{order:1}", "in the detached partition").await;
    pg.batch_execute("ALTER TABLE orders DETACH PARTITION orders_2026_12")
        .await
        .expect("detach");
    gone(&mut r, WAIT, "order:1", "the detach to evict").await;
    pipeline.stop().await.expect("stop");
}

/// A partition whose replica identity cannot serve the rule is refused at start, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_are_checked_and_a_publication_via_root_is_refused() {
    let env = Env::start();
    env.pg.psql(ORDERS).expect("schema");
    env.pg
        .psql("ALTER TABLE orders_2026_11 REPLICA IDENTITY DEFAULT")
        .expect("identity");
    // `status` is not in the primary key: only FULL old rows carry it.
    let by_status = vec![RuleConfig {
        table: "public.orders".into(),
        keys: vec!["orders:status:{status}".into()],
    }];
    let mut pipeline = spawn_pipeline(env.pg_config(), env.redis_config(), by_status);
    let err = tokio::time::timeout(WAIT, pipeline.streaming())
        .await
        .expect("refused in time")
        .expect_err("a partition without the rule's columns in old rows is refused");
    let text = err.to_string();
    assert!(text.contains("orders_2026_11"), "{text}");
    assert!(text.contains("REPLICA IDENTITY FULL"), "{text}");
    env.pg
        .psql("ALTER TABLE orders_2026_11 REPLICA IDENTITY FULL")
        .expect("identity");

    env.pg
        .psql(
            "CREATE PUBLICATION viaroot FOR TABLE orders WITH (publish_via_partition_root = true)",
        )
        .expect("publication");
    let mut cfg = env.pg_config();
    cfg.publication = "viaroot".into();
    cfg.create_publication = false;
    let mut pipeline = spawn_pipeline(cfg, env.redis_config(), rules());
    let err = tokio::time::timeout(WAIT, pipeline.streaming())
        .await
        .expect("refused in time")
        .expect_err("a publication via the root is refused");
    let text = err.to_string();
    assert!(
        text.contains("SET (publish_via_partition_root = false)"),
        "{text}"
    );
}
