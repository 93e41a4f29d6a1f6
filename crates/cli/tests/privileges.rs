//! Least privilege (issue 18), on real servers. PostgreSQL: the pipeline runs as a role with
//! exactly the grants README lists — `LOGIN REPLICATION`, no superuser, no table ownership, the
//! publication made by an administrator — evicts, and keeps the namespace's watermark fresh; and
//! each missing grant stops `cacheclear run` at once with the statement that adds it. Redis: the
//! pipeline and the client library as ACL users with exactly README's command lists.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cacheclear_client::{Client, Config, Loaded, StalenessConfig};
use cacheclear_harness::fixtures::{CLIENT_ACL, PIPELINE_ACL};
use cacheclear_harness::{PgInstance, RedisInstance, RedisOptions};
use cacheclear_protocol::NamespaceLayout;
use cacheclear_sink_redis::RedisConfig;
use common::*;

/// `postgres.url` for `role` on the test server.
fn url_as(env: &Env, role: &str) -> String {
    format!(
        "postgres://{role}@127.0.0.1:{}/{}",
        env.pg.port(),
        env.pg.dbname()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_role_with_an_administrators_publication_runs_the_pipeline() {
    let env = Env::start();
    let pg = env.pg().await;
    // README's grants, exactly ("Least privilege").
    pg.batch_execute(
        "CREATE ROLE cacheclear LOGIN REPLICATION;
         CREATE PUBLICATION cacheclear FOR TABLE public.product;",
    )
    .await
    .expect("grants");
    let mut cfg = env.pg_config();
    cfg.url = url_as(&env, "cacheclear");
    cfg.create_publication = false;
    cfg.watermark_interval_ms = 200;
    let mut pipeline = spawn_pipeline(cfg, env.redis_config(), product_rules());
    streaming(&mut pipeline).await;

    let mut r = env.redis().await;
    set(&mut r, "{product:5}", "cached").await;
    pg.execute("UPDATE product SET price_cents = 1 WHERE id = 5", &[])
        .await
        .expect("update");
    gone(&mut r, Duration::from_secs(30), "product:5", "the eviction").await;
    // The heartbeat (pg_logical_emit_message) runs as that role too: the watermark appears.
    let ns = NamespaceLayout::new("cacheclear").expect("namespace");
    wait_for("the watermark", Duration::from_secs(30), || {
        let mut r = r.clone();
        let key = ns.watermark();
        async move { get(&mut r, &key).await.is_some() }
    })
    .await;
    pipeline.stop().await.expect("clean stop");
}

/// `cacheclear run` as `role` with `pg_extra` in `[postgres]`; returns (exited by itself within
/// 60 s, its stderr).
fn run_as(env: &Env, role: &str, pg_extra: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config_toml(env, pg_extra, "", "").replace(
        &format!("url = \"{}\"", env.pg.url()),
        &format!("url = \"{}\"", url_as(env, role)),
    );
    assert!(text.contains(&url_as(env, role)), "{text}");
    let cfg = write_file(dir.path(), "c.toml", &text);
    let (status, _, stderr) = run_to_end(
        command(&["run".as_ref(), "--config".as_ref(), cfg.as_os_str()]),
        Duration::from_secs(60),
    );
    (status.is_some_and(|s| !s.success()), stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_missing_grant_stops_run_with_the_statement_that_adds_it() {
    let env = Env::start();
    let pg = env.pg().await;
    pg.batch_execute(
        "CREATE ROLE plain LOGIN;
         CREATE ROLE repl LOGIN REPLICATION;",
    )
    .await
    .expect("roles");

    // No publication, and the role may not create one (it owns no rule table).
    let (failed, err) = run_as(&env, "repl", "");
    eprintln!("{err}");
    assert!(failed, "{err}");
    assert!(
        err.contains("CREATE PUBLICATION \"cacheclear\" FOR TABLE"),
        "names the statement for an owner to run: {err}"
    );
    assert!(err.contains("create_publication = false"), "{err}");

    // The publication exists; the role lacks REPLICATION.
    pg.batch_execute("CREATE PUBLICATION cacheclear FOR TABLE public.product;")
        .await
        .expect("publication");
    let (failed, err) = run_as(&env, "plain", "create_publication = false");
    eprintln!("{err}");
    assert!(failed, "{err}");
    assert!(
        err.contains("ALTER ROLE \"plain\" REPLICATION"),
        "names the grant: {err}"
    );
    assert!(err.contains("rds_replication"), "and RDS's form: {err}");
    // Nothing was created on the way.
    let slots: i64 = pg
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .expect("slots")
        .get(0);
    assert_eq!(slots, 0);
}

/// The pipeline and the client as ACL users with README's exact lists: fills, leases, fenced
/// fills, evictions (key and table-wide), the watermark and the epoch all work, and neither user
/// can do anything else (`FLUSHALL`, `CONFIG`, `KEYS`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_and_the_client_run_as_acl_users_with_readmes_lists() {
    let pg = PgInstance::start().expect("PostgreSQL");
    pg.psql(SCHEMA).expect("schema");
    let redis = RedisInstance::start_with(
        RedisOptions::default()
            .password("admin-Secret-1")
            .acl_user("pipeline", "pipeline-Secret-2", PIPELINE_ACL)
            .acl_user("app", "app-Secret-3", CLIENT_ACL),
    )
    .expect("Redis with ACL users");
    let env = Env { pg, redis };
    let pg = Arc::new(env.pg().await);
    let mut cfg = env.pg_config();
    cfg.watermark_interval_ms = 200;
    let mut pipeline = spawn_pipeline(
        cfg,
        RedisConfig::new(env.redis.url_as("pipeline", "pipeline-Secret-2")),
        product_rules(),
    );
    streaming(&mut pipeline).await;
    let client = Client::connect(
        &env.redis.url_as("app", "app-Secret-3"),
        Config::default().with_staleness(
            StalenessConfig::new("cacheclear")
                .with_max_staleness_ms(2_000)
                .with_refresh_ms(100),
        ),
    )
    .await
    .expect("client");
    let read = || {
        let pg = Arc::clone(&pg);
        client.get_or_load("product:5", move || async move {
            let row = pg
                .query_one("SELECT price_cents FROM product WHERE id = 5", &[])
                .await?;
            Ok::<_, tokio_postgres::Error>(Loaded::new(row.get::<_, i64>(0)))
        })
    };
    // Served from the cache once the watermark is fresh (a fill, then a hit).
    wait_for("a hit", Duration::from_secs(30), || async {
        let before = client.stats().hits;
        assert_eq!(read().await.expect("read"), 1005);
        client.stats().hits > before
    })
    .await;
    pg.execute("UPDATE product SET price_cents = 7 WHERE id = 5", &[])
        .await
        .expect("update");
    wait_for("the new price", Duration::from_secs(30), || async {
        read().await.expect("read") == 7
    })
    .await;
    // Table-wide eviction (SCAN) as the pipeline user.
    let mut r = env.redis().await;
    set(&mut r, "{product:9}", "cached").await;
    pg.execute("TRUNCATE product CASCADE", &[])
        .await
        .expect("truncate");
    gone(
        &mut r,
        Duration::from_secs(30),
        "product:9",
        "the TRUNCATE eviction",
    )
    .await;
    pipeline.stop().await.expect("clean stop");

    // Nothing beyond the lists.
    for (user, password) in [("pipeline", "pipeline-Secret-2"), ("app", "app-Secret-3")] {
        let mut conn = redis::Client::open(env.redis.url_as(user, password))
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        for cmd in ["FLUSHALL", "KEYS", "CONFIG"] {
            let mut c = redis::cmd(cmd);
            if cmd != "FLUSHALL" {
                c.arg(if cmd == "KEYS" { "*" } else { "GET" });
                if cmd == "CONFIG" {
                    c.arg("*");
                }
            }
            let refused: redis::RedisResult<redis::Value> = c.query_async(&mut conn).await;
            let e = refused.expect_err(&format!("{user} may not run {cmd}"));
            assert!(
                e.to_string().to_lowercase().contains("noperm"),
                "{user} {cmd}: {e}"
            );
        }
    }
}
