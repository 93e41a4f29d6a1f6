//! `cacheclear run` survives a PostgreSQL restart: the replication stream ends, the pipeline
//! restarts from the slot, and later commits are still evicted.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_resumes_after_a_postgres_restart() {
    let mut env = Env::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cacheclear.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = \"{}\"\nstatus_interval_ms = 100\n\n[redis]\nurl = \"{}\"\n\n[metrics]\nlisten = \"\"\n\n\
             [[rules]]\ntable = \"public.product\"\nkeys = [\"product:{{id}}\", \"category:{{category_id}}:products\"]\n",
            env.pg.url(),
            env.redis.url()
        ),
    )
    .unwrap();
    let _child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_cacheclear"))
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut r = env.redis().await;
    {
        let pg = env.pg().await;
        wait_for("the slot to exist", Duration::from_secs(30), || {
            let pg = &pg;
            async move {
                pg.query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE active",
                    &[],
                )
                .await
                .map(|row| row.get::<_, i64>(0) == 1)
                .unwrap_or(false)
            }
        })
        .await;
        // The new slot's first batch evicts the whole table; wait for it so the value set next
        // can only be evicted by the UPDATE.
        tokio::time::sleep(Duration::from_millis(500)).await;
        set(&mut r, "{product:30}", "cached").await;
        pg.batch_execute("UPDATE product SET price_cents = 1 WHERE id = 30")
            .await
            .unwrap();
    }
    wait_for("the first eviction", Duration::from_secs(30), || {
        let mut r = r.clone();
        async move { !exists(&mut r, "{product:30}").await }
    })
    .await;

    tokio::task::block_in_place(|| env.pg.restart()).unwrap();

    set(&mut r, "{product:31}", "cached").await;
    let pg = env.pg().await;
    pg.batch_execute("UPDATE product SET price_cents = 2 WHERE id = 31")
        .await
        .unwrap();
    wait_for(
        "an eviction after the restart",
        Duration::from_secs(60),
        || {
            let mut r = r.clone();
            async move { !exists(&mut r, "{product:31}").await }
        },
    )
    .await;
    assert!(fence(&mut r, "product:31").await.is_some());
}
