//! Schema migrations under a streaming pipeline never leave a stale value: a table swap, a drop
//! and re-create, a replica identity reset, a rule table renamed away, and a publication the user
//! manages (real PostgreSQL and Redis).

mod common;

use std::time::Duration;

use cacheclear_rules::RuleConfig;
use common::*;

/// The publication check interval of these tests, and what a detection may take on top: the
/// check, the eviction's trip through the WAL and the sink.
const CHECK_MS: u64 = 300;
const WAIT: Duration = Duration::from_secs(30);

const ITEM: &str = "
CREATE TABLE item (id int PRIMARY KEY, price int NOT NULL);
INSERT INTO item SELECT g, 100 + g FROM generate_series(1, 10) g;
CREATE TABLE prod (id int PRIMARY KEY, cat int NOT NULL);
ALTER TABLE prod REPLICA IDENTITY FULL;
INSERT INTO prod SELECT g, g FROM generate_series(1, 10) g;
";

fn rules() -> Vec<RuleConfig> {
    vec![
        RuleConfig {
            table: "public.item".into(),
            keys: vec!["item:{id}".into()],
        },
        RuleConfig {
            table: "public.prod".into(),
            keys: vec!["prod:{id}".into(), "cat:{cat}".into()],
        },
    ]
}

async fn start(env: &Env) -> cacheclear_source_postgres::Pipeline {
    env.pg.psql(ITEM).expect("schema");
    let mut cfg = env.pg_config();
    cfg.publication_check_interval_ms = CHECK_MS;
    let mut pipeline = spawn_pipeline(cfg, env.redis_config(), rules());
    streaming(&mut pipeline).await;
    pipeline
}

/// After the migration `sql`: the value cached before it is evicted (the table's changes since
/// it left the publication were never streamed), and an UPDATE after the detection is streamed.
async fn migration_is_followed(env: &Env, sql: &str) {
    let pg = env.pg().await;
    let mut r = env.redis().await;
    set(&mut r, "{item:1}", "cached before").await;
    pg.batch_execute(sql).await.expect("migration");
    pg.batch_execute("UPDATE item SET price = 1 WHERE id = 1")
        .await
        .expect("update");
    gone(
        &mut r,
        WAIT,
        "item:1",
        "the value cached before the migration to go",
    )
    .await;

    // Streamed again: a value cached now is evicted by the next UPDATE of its row alone.
    set(&mut r, "{item:2}", "cached after").await;
    pg.batch_execute("UPDATE item SET price = 2 WHERE id = 2")
        .await
        .expect("update");
    gone(
        &mut r,
        WAIT,
        "item:2",
        "an UPDATE after the migration to evict",
    )
    .await;
    let published: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'cacheclear' AND tablename = 'item'",
            &[],
        )
        .await
        .expect("publication")
        .get(0);
    assert_eq!(published, 1, "the new `item` is published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_swap_is_republished_and_evicted() {
    let env = Env::start();
    let pipeline = start(&env).await;
    migration_is_followed(
        &env,
        "CREATE TABLE item_new (id int PRIMARY KEY, price int NOT NULL);
         INSERT INTO item_new SELECT id, price FROM item;
         BEGIN;
         ALTER TABLE item RENAME TO item_old;
         ALTER TABLE item_new RENAME TO item;
         COMMIT;",
    )
    .await;
    pipeline.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_and_create_is_republished_and_evicted() {
    let env = Env::start();
    let pipeline = start(&env).await;
    migration_is_followed(
        &env,
        "DROP TABLE item;
         CREATE TABLE item (id int PRIMARY KEY, price int NOT NULL);
         INSERT INTO item SELECT g, 200 + g FROM generate_series(1, 10) g;",
    )
    .await;
    pipeline.stop().await.expect("stop");
}

/// `cat:{cat}` needs the old row; after `REPLICA IDENTITY DEFAULT` an UPDATE that keeps the key
/// sends no old row, so the old category's key can only be evicted table-wide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_identity_reset_evicts_the_old_rows_keys() {
    let env = Env::start();
    let pipeline = start(&env).await;
    let pg = env.pg().await;
    let mut r = env.redis().await;
    pg.batch_execute("ALTER TABLE prod REPLICA IDENTITY DEFAULT")
        .await
        .expect("alter");
    set(&mut r, "{cat:2}", "old category of prod 2").await;
    set(&mut r, "{cat:9}", "an unrelated category").await;
    pg.batch_execute("UPDATE prod SET cat = 4 WHERE id = 2")
        .await
        .expect("update");
    gone(&mut r, WAIT, "cat:2", "the old category's key to go").await;
    assert!(
        !exists(&mut r, "{cat:9}").await,
        "the fallback evicts the whole table's keys"
    );

    // Fixed: row changes map to their own keys again.
    pg.batch_execute("ALTER TABLE prod REPLICA IDENTITY FULL")
        .await
        .expect("alter");
    set(&mut r, "{cat:7}", "unrelated").await;
    set(&mut r, "{cat:3}", "prod 3").await;
    pg.batch_execute("UPDATE prod SET cat = 5 WHERE id = 3")
        .await
        .expect("update");
    gone(&mut r, WAIT, "cat:3", "the old category's key to go").await;
    assert!(
        exists(&mut r, "{cat:7}").await,
        "with FULL again only the row's keys are evicted"
    );
    pipeline.stop().await.expect("stop");
}

fn config(env: &Env, pg_extra: &str, metrics: &str) -> String {
    format!(
        r#"[postgres]
url = "{pg}"
status_interval_ms = 100
publication_check_interval_ms = {CHECK_MS}
{pg_extra}

[redis]
url = "{redis}"

[metrics]
listen = "{metrics}"

[[rules]]
table = "public.item"
keys = ["item:{{id}}"]
"#,
        pg = env.pg.url(),
        redis = env.redis.url(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_table_renamed_away_is_logged_and_counted() {
    let env = Env::start();
    env.pg.psql(ITEM).expect("schema");
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = format!(
        "127.0.0.1:{}",
        cacheclear_harness::free_port().expect("port")
    );
    let path = write_file(dir.path(), "c.toml", &config(&env, "", &addr));
    let log = dir.path().join("run.log");
    let _run = Process::run(&path, &log);
    let pg = env.pg().await;
    wait_streaming(&pg, WAIT).await;
    let mut r = env.redis().await;
    set(&mut r, "{item:1}", "cached").await;
    pg.batch_execute("ALTER TABLE item RENAME TO item_gone")
        .await
        .expect("rename");
    let body = wait_sample(
        &addr,
        r#"cacheclear_publication_drift_total{table="public.item",reason="table_missing"}"#,
        1.0,
    )
    .await;
    assert!(body.contains("cacheclear_table_fallbacks_total"), "{body}");
    gone(
        &mut r,
        WAIT,
        "item:1",
        "the renamed table's keys to be evicted",
    )
    .await;
    wait_for("the error in the log", WAIT, || async {
        _run.log_text()
            .contains("rule table no longer exists under this name")
    })
    .await;
}

/// A publication the user manages: the fix is printed, the table's keys are evicted at every
/// check while it lasts (`evict`), or the pipeline stops with the fix (`stop`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_managed_publication_gets_the_fix() {
    let env = Env::start();
    env.pg.psql(ITEM).expect("schema");
    env.pg
        .psql("CREATE PUBLICATION mine FOR TABLE item")
        .expect("publication");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_file(
        dir.path(),
        "c.toml",
        &config(
            &env,
            "publication = \"mine\"\ncreate_publication = false",
            "",
        ),
    );
    let log = dir.path().join("run.log");
    let mut run = Process::run(&path, &log);
    let pg = env.pg().await;
    wait_streaming(&pg, WAIT).await;
    let mut r = env.redis().await;
    pg.batch_execute(
        "DROP TABLE item;
         CREATE TABLE item (id int PRIMARY KEY, price int NOT NULL);
         INSERT INTO item VALUES (1, 1);",
    )
    .await
    .expect("drop and create");
    let fix = r#"ALTER PUBLICATION "mine" ADD TABLE "public"."item";"#;
    wait_for("the fix in the log", WAIT, || async {
        run.log_text().contains(fix)
    })
    .await;
    // Evicted at every check while it lasts: a value cached now goes within a check or two.
    set(&mut r, "{item:1}", "cached while unpublished").await;
    gone(
        &mut r,
        WAIT,
        "item:1",
        "the unpublished table's keys to be evicted",
    )
    .await;
    assert!(
        run.exited().is_none(),
        "on_publication_drift = evict keeps running"
    );
    run.kill();

    // With `stop`, the pipeline stops with the fix.
    let path = write_file(
        dir.path(),
        "stop.toml",
        &config(
            &env,
            "publication = \"mine\"\ncreate_publication = false\non_publication_drift = \"stop\"",
            "",
        ),
    );
    // The start-up check refuses it already (the table is not published): the same fix.
    let (status, _out, err) = run_to_end(
        command(&["run".as_ref(), "--config".as_ref(), path.as_os_str()]),
        Duration::from_secs(60),
    );
    assert!(
        status.is_some_and(|s| !s.success()),
        "exits: {status:?} {err}"
    );
    assert!(err.contains(fix), "{err}");

    pg.batch_execute(&format!("{fix}")).await.expect("fix");
    let log = dir.path().join("stop.log");
    let mut run = Process::run(&path, &log);
    wait_streaming(&pg, WAIT).await;
    pg.batch_execute(
        "DROP TABLE item;
         CREATE TABLE item (id int PRIMARY KEY, price int NOT NULL);",
    )
    .await
    .expect("drop and create");
    wait_for("the pipeline to stop", WAIT, || {
        let exited = run.exited();
        async move { exited.is_some() }
    })
    .await;
    assert!(!run.exited().expect("exited").success());
    assert!(run.log_text().contains(fix), "{}", run.log_text());
}
