//! The invalidation pipeline against real PostgreSQL and Redis (private instances).

mod common;

use std::time::Duration;

use cacheclear_rules::RuleConfig;
use common::*;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_evicts_old_and_new_keys_and_sets_fences() {
    let env = Env::start();
    let pg = env.pg().await;
    let mut r = env.redis().await;
    let running = start_pipeline(&env).await;

    // Product 5 sits in category 6. Cache its value, both listings and product 6.
    for k in MOVE_5_KEYS {
        set(&mut r, k, "cached").await;
    }
    let before = current_lsn(&pg).await;
    pg.batch_execute("UPDATE product SET category_id = 9, price_cents = 1 WHERE id = 5")
        .await
        .unwrap();
    let after = current_lsn(&pg).await;

    wait_for("product:5 to be evicted", WAIT, || {
        let mut r = r.clone();
        async move { !exists(&mut r, "{product:5}").await }
    })
    .await;
    // The old row's listing (category 6) and the new row's (category 9) are both evicted.
    assert!(!exists(&mut r, "{category:6:products}").await);
    assert!(!exists(&mut r, "{category:9:products}").await);
    // An unrelated product is untouched.
    assert_eq!(get(&mut r, "{product:6}").await.as_deref(), Some("cached"));
    // Fences hold the commit's end LSN: after the UPDATE began, at most the WAL position after it.
    for key in ["product:5", "category:6:products", "category:9:products"] {
        let f = fence(&mut r, key).await.expect("fence written");
        assert!(
            f > before && f <= after,
            "{key}: fence {f} outside ({before}, {after}]"
        );
        let ttl: i64 = redis::cmd("PTTL")
            .arg(format!("{{{key}}}:fence"))
            .query_async(&mut r)
            .await
            .unwrap();
        assert!(ttl > 0 && ttl <= 600_000, "{key}: fence TTL {ttl}");
    }
    // The slot's confirmed position reaches the commit once Redis acknowledged it.
    wait_for("the commit to be confirmed", WAIT, || {
        let status = std::sync::Arc::clone(running.status());
        async move { status.confirmed_lsn() >= f_min(before) }
    })
    .await;
    running.stop().await.unwrap();
}

fn f_min(l: cacheclear_protocol::Lsn) -> cacheclear_protocol::Lsn {
    cacheclear_protocol::Lsn(l.0 + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_key_change_insert_delete_and_truncate() {
    let env = Env::start();
    let pg = env.pg().await;
    let mut r = env.redis().await;
    let running = start_pipeline(&env).await;

    for k in [
        "{product:7}",
        "{product:700}",
        "{product:8}",
        "{product:9}",
        "{product:10}",
        "{product:10}:lease",
    ] {
        set(&mut r, k, "cached").await;
    }
    // Primary key change: both the old and the new key.
    pg.batch_execute("UPDATE product SET id = 700 WHERE id = 7")
        .await
        .unwrap();
    wait_for("both product keys of a PK change", WAIT, || {
        let mut r = r.clone();
        async move { !exists(&mut r, "{product:7}").await && !exists(&mut r, "{product:700}").await }
    })
    .await;
    // Insert and delete.
    pg.batch_execute("INSERT INTO product VALUES (101, 2, 'new', 'new', 5, '')")
        .await
        .unwrap();
    pg.batch_execute("DELETE FROM product WHERE id = 8")
        .await
        .unwrap();
    wait_for("the insert's and the delete's keys", WAIT, || {
        let mut r = r.clone();
        async move {
            fence(&mut r, "product:101").await.is_some() && !exists(&mut r, "{product:8}").await
        }
    })
    .await;
    // TRUNCATE evicts every key of the table's rules, leases included, and fences them.
    pg.batch_execute("TRUNCATE product").await.unwrap();
    wait_for("TRUNCATE to evict the table", WAIT, || {
        let mut r = r.clone();
        async move {
            !exists(&mut r, "{product:9}").await
                && !exists(&mut r, "{product:10}").await
                && !exists(&mut r, "{product:10}:lease").await
        }
    })
    .await;
    assert!(fence(&mut r, "product:9").await.is_some());
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_values_cannot_forge_keys_and_toast_is_not_null() {
    let env = Env::start();
    let pg = env.pg().await;
    let mut r = env.redis().await;
    pg.batch_execute(
        "CREATE TABLE page (id int PRIMARY KEY, slug text NOT NULL, body text NOT NULL);
         ALTER TABLE page REPLICA IDENTITY FULL;
         ALTER TABLE page ALTER COLUMN body SET STORAGE EXTERNAL;",
    )
    .await
    .unwrap();
    // A slug that tries to name another key (`page:b`) and to break the hash tag.
    let long_body: String = (0..20_000)
        .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
        .collect();
    pg.execute(
        "INSERT INTO page VALUES (1, $1, $2)",
        &[&"a}:page:b", &long_body],
    )
    .await
    .unwrap();
    let rules = vec![RuleConfig {
        table: "public.page".into(),
        keys: vec!["page:{slug}".into(), "body:{id}:{body}".into()],
    }];
    let mut running = spawn_pipeline(env.pg_config(), env.redis_config(), rules);
    streaming(&mut running).await;
    set(&mut r, "{page:b}", "victim").await;
    set(&mut r, "{page:a%7D%3Apage%3Ab}", "cached").await;
    let body_key = format!("{{body:1:{long_body}}}");
    set(&mut r, &body_key, "cached").await;

    // `body` is stored out of line and unchanged: pgoutput sends it as 'u' in the new row. Under
    // REPLICA IDENTITY FULL the old row has it, so the key is built from the real value.
    pg.batch_execute("UPDATE page SET id = 1 WHERE id = 1")
        .await
        .unwrap();
    wait_for("the escaped slug key and the TOAST key", WAIT, || {
        let mut r = r.clone();
        let body_key = body_key.clone();
        async move {
            !exists(&mut r, "{page:a%7D%3Apage%3Ab}").await && !exists(&mut r, &body_key).await
        }
    })
    .await;
    assert_eq!(
        get(&mut r, "{page:b}").await.as_deref(),
        Some("victim"),
        "a value forged another key"
    );
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_rules_the_replica_identity_cannot_serve() {
    let env = Env::start();
    env.pg
        .psql("ALTER TABLE product REPLICA IDENTITY DEFAULT")
        .unwrap();
    let running = spawn_pipeline(env.pg_config(), env.redis_config(), product_rules());
    let err = running.stop().await.expect_err("must refuse");
    let msg = err.to_string();
    assert!(err.is_fatal(), "{msg}");
    for needle in [
        "public.product",
        "category:{category_id}:products",
        "category_id",
        "REPLICA IDENTITY FULL",
    ] {
        assert!(msg.contains(needle), "error lacks `{needle}`: {msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alter_table_mid_stream_keeps_working() {
    let env = Env::start();
    let pg = env.pg().await;
    let mut r = env.redis().await;
    let running = start_pipeline(&env).await;

    // Add a column, change a type: rows after the DDL still map to keys.
    pg.batch_execute("ALTER TABLE product ADD COLUMN stock int DEFAULT 3")
        .await
        .unwrap();
    set(&mut r, "{product:11}", "cached").await;
    pg.batch_execute("UPDATE product SET stock = 4 WHERE id = 11")
        .await
        .unwrap();
    wait_for("evict after ADD COLUMN", WAIT, || {
        let mut r = r.clone();
        async move { !exists(&mut r, "{product:11}").await }
    })
    .await;
    pg.batch_execute("ALTER TABLE product ALTER COLUMN id TYPE bigint")
        .await
        .unwrap();
    set(&mut r, "{product:12}", "cached").await;
    pg.batch_execute("UPDATE product SET price_cents = 7 WHERE id = 12")
        .await
        .unwrap();
    wait_for("evict after a type change", WAIT, || {
        let mut r = r.clone();
        async move { !exists(&mut r, "{product:12}").await }
    })
    .await;
    pg.batch_execute("ALTER TABLE product DROP COLUMN description")
        .await
        .unwrap();
    set(&mut r, "{product:13}", "cached").await;
    pg.batch_execute("UPDATE product SET price_cents = 8 WHERE id = 13")
        .await
        .unwrap();
    wait_for("evict after DROP COLUMN", WAIT, || {
        let mut r = r.clone();
        async move { !exists(&mut r, "{product:13}").await }
    })
    .await;
    // Renaming a rule column: the row's keys can no longer be computed, so the whole table's keys
    // are evicted rather than none.
    pg.batch_execute("ALTER TABLE product RENAME COLUMN category_id TO cat")
        .await
        .unwrap();
    for k in ["{product:14}", "{product:50}", "{category:2:products}"] {
        set(&mut r, k, "cached").await;
    }
    pg.batch_execute("UPDATE product SET price_cents = 9 WHERE id = 14")
        .await
        .unwrap();
    wait_for(
        "table-wide eviction after renaming a rule column",
        WAIT,
        || {
            let mut r = r.clone();
            async move {
                !exists(&mut r, "{product:14}").await
                    && !exists(&mut r, "{product:50}").await
                    && !exists(&mut r, "{category:2:products}").await
            }
        },
    )
    .await;
    running.stop().await.unwrap();
}
