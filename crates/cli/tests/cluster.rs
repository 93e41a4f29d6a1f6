//! PostgreSQL → pipeline (in process) → Redis Cluster: the direct sink in cluster mode.

mod common;

use std::time::Duration;

use cacheclear_harness::fixtures::cluster_conn;
use cacheclear_harness::{PgInstance, RedisCluster};
use cacheclear_protocol::KeyLayout;
use cacheclear_sink_redis::RedisConfig;
use cacheclear_source_postgres::PostgresConfig;
use common::{
    MOVE_5_KEYS, SCHEMA, current_lsn, exists, fence, get, product_rules, set, spawn_pipeline,
    streaming, wait_for,
};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_and_truncate_evict_their_keys_in_a_redis_cluster() {
    let (pg, cluster) = tokio::task::spawn_blocking(|| {
        let pg = PgInstance::start().expect("start PostgreSQL");
        let cluster = RedisCluster::start(3, 1).expect("start the Redis Cluster");
        (pg, cluster)
    })
    .await
    .expect("join");
    pg.psql(SCHEMA).expect("schema");
    let (client, connection) = tokio_postgres::connect(&pg.conn_string(), tokio_postgres::NoTls)
        .await
        .expect("connect PostgreSQL");
    tokio::spawn(connection);
    let mut r = cluster_conn(&cluster).await;

    let mut pg_cfg = PostgresConfig::new(pg.url());
    pg_cfg.status_interval_ms = 100;
    let mut running = spawn_pipeline(
        pg_cfg,
        RedisConfig::cluster(cluster.seeds()),
        product_rules(),
    );
    streaming(&mut running).await;

    // One row: product 5 moves from category 6 to 9; its key and both listings are evicted,
    // wherever their slots live.
    for k in MOVE_5_KEYS {
        set(&mut r, k, "cached").await;
    }
    let before = current_lsn(&client).await;
    client
        .batch_execute("UPDATE product SET category_id = 9, price_cents = 1 WHERE id = 5")
        .await
        .expect("UPDATE");
    let after = current_lsn(&client).await;
    wait_for("product:5 to be evicted", WAIT, || {
        let mut r = r.clone();
        async move { !exists(&mut r, "{product:5}").await }
    })
    .await;
    for key in ["product:5", "category:6:products", "category:9:products"] {
        assert!(
            !exists(&mut r, &format!("{{{key}}}")).await,
            "{key} still cached"
        );
        let f = fence(&mut r, key).await.expect("fence written");
        assert!(
            f > before && f <= after,
            "{key}: fence {f} outside ({before}, {after}]"
        );
    }
    assert_eq!(get(&mut r, "{product:6}").await.as_deref(), Some("cached"));

    // Every product: keys over every master's slots, in one transaction.
    let slots: std::collections::BTreeSet<u16> = (1..=100)
        .map(|i| KeyLayout::new(&format!("product:{i}")).expect("key").slot())
        .collect();
    assert!(slots.len() > 90);
    for i in 1..=100 {
        set(&mut r, &format!("{{product:{i}}}"), "cached").await;
    }
    client
        .batch_execute("UPDATE product SET price_cents = price_cents + 1")
        .await
        .expect("UPDATE all");
    wait_for("every product to be evicted", WAIT, || {
        let mut r = r.clone();
        async move {
            for i in 1..=100 {
                if exists(&mut r, &format!("{{product:{i}}}")).await {
                    return false;
                }
            }
            true
        }
    })
    .await;
    for i in 1..=100 {
        assert!(fence(&mut r, &format!("product:{i}")).await.is_some());
    }

    // A failover: the pipeline keeps evicting on the new master.
    let replica = cluster.replicas().expect("replicas")[0];
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.failover(replica).expect("failover");
        cluster
    })
    .await
    .expect("join");
    for i in 1..=100 {
        set(&mut r, &format!("{{product:{i}}}"), "cached").await;
    }
    client
        .batch_execute("UPDATE product SET price_cents = price_cents + 1 WHERE id <= 50")
        .await
        .expect("UPDATE after failover");
    wait_for(
        "products 1-50 to be evicted after the failover",
        WAIT,
        || {
            let mut r = r.clone();
            async move {
                for i in 1..=50 {
                    if exists(&mut r, &format!("{{product:{i}}}")).await {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
    assert!(exists(&mut r, "{product:51}").await);

    // TRUNCATE: every key of the table on every master, leases included.
    set(&mut r, "{product:77}:lease", "cached").await;
    set(&mut r, "{category:3:products}", "cached").await;
    client
        .batch_execute("TRUNCATE product")
        .await
        .expect("TRUNCATE");
    wait_for("TRUNCATE to evict the table on every master", WAIT, || {
        let mut r = r.clone();
        async move {
            for i in 51..=100 {
                if exists(&mut r, &format!("{{product:{i}}}")).await {
                    return false;
                }
            }
            !exists(&mut r, "{product:77}:lease").await
                && !exists(&mut r, "{category:3:products}").await
        }
    })
    .await;
    let masters = cluster.masters().expect("masters");
    assert!(masters.contains(&replica));
    running.stop().await.expect("pipeline stops cleanly");
}
