//! `redis.wait_replicas` on a Redis master with a replica (issue 10): an eviction Redis
//! acknowledged can vanish with its master when the replica did not have it yet; with `WAIT`
//! nothing is confirmed until a replica has it, so the replay lands on the promoted replica.
//!
//! The replica is cut off the replication stream by pointing it at a closed port (`REPLICAOF
//! 127.0.0.1 1`) rather than frozen with SIGSTOP: on one host the kernel's socket buffers would
//! still hand a frozen replica the master's last writes when it resumes, so the loss could not
//! be shown. (SIGSTOP works for the WAIT side: a frozen replica acknowledges nothing; the
//! harness offers `RedisInstance::pause`.)

mod common;

use std::time::Duration;

use cacheclear_harness::RedisInstance;
use cacheclear_harness::fixtures::redis_conn;
use common::*;

/// Starts the pipeline on the master, caches `{product:5}`, waits until the replica has it,
/// cuts the replica off the stream and ends the sale. Returns the LSN after the commit.
async fn freeze_replica_and_update(
    env: &Env,
    replica: &RedisInstance,
    redis: cacheclear_sink_redis::RedisConfig,
) -> (
    cacheclear_source_postgres::Pipeline,
    cacheclear_protocol::Lsn,
) {
    let pg = env.pg().await;
    let mut pipeline = spawn_pipeline(env.pg_config(), redis, product_rules());
    streaming(&mut pipeline).await;
    set(&mut env.redis().await, "{product:5}", "old price").await;
    let on_replica = redis_conn(replica).await;
    wait_for(
        "the replica to have the value",
        Duration::from_secs(10),
        || {
            let mut c = on_replica.clone();
            async move { get(&mut c, "{product:5}").await.as_deref() == Some("old price") }
        },
    )
    .await;
    replica
        .cli(&["REPLICAOF", "127.0.0.1", "1"])
        .expect("cut the replica off");
    pg.execute("UPDATE product SET price_cents = 1 WHERE id = 5", &[])
        .await
        .expect("update");
    let lsn = current_lsn(&pg).await;
    (pipeline, lsn)
}

/// Kills the master (SIGKILL) and promotes the replica (`REPLICAOF NO ONE`).
fn fail_over(env: &mut Env, replica: &RedisInstance) {
    env.redis.stop().expect("kill -9 the master");
    replica
        .cli(&["REPLICAOF", "NO", "ONE"])
        .expect("promote the replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_wait_an_acknowledged_eviction_dies_with_its_master() {
    let mut env = Env::start();
    let replica = RedisInstance::start_replica_of(&env.redis).expect("replica");
    let pg = env.pg().await;
    let (pipeline, lsn) = freeze_replica_and_update(&env, &replica, env.redis_config()).await;
    // The master applied the eviction and the slot confirmed the commit…
    wait_for(
        "the slot to confirm the commit",
        Duration::from_secs(30),
        || async { slot_confirmed(&pg).await >= lsn },
    )
    .await;
    assert!(!exists(&mut env.redis().await, "{product:5}").await);
    drop(pipeline);
    fail_over(&mut env, &replica);
    // …but the promoted replica never got it: the old value survives, and nothing will replay it.
    assert_eq!(
        get(&mut redis_conn(&replica).await, "{product:5}")
            .await
            .as_deref(),
        Some("old price")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_nothing_is_confirmed_and_the_replay_lands_on_the_promoted_replica() {
    let mut env = Env::start();
    let replica = RedisInstance::start_replica_of(&env.redis).expect("replica");
    let pg = env.pg().await;
    let redis = env.redis_config().with_wait_replicas(1, 200);
    let (pipeline, lsn) = freeze_replica_and_update(&env, &replica, redis).await;
    // The master ran the eviction, but WAIT finds no replica: the batch fails and is retried.
    let mut master = env.redis().await;
    gone(
        &mut master,
        Duration::from_secs(30),
        "product:5",
        "the master to run the eviction",
    )
    .await;
    // The fence holds the commit's end LSN.
    let commit = fence(&mut master, "product:5").await.expect("fence");
    assert!(commit <= lsn);
    // Several WAIT rounds (200 ms each) later, still nothing confirmed up to the commit.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        slot_confirmed(&pg).await < commit,
        "nothing confirmed while no replica has the eviction"
    );
    drop(pipeline);
    fail_over(&mut env, &replica);
    assert_eq!(
        get(&mut redis_conn(&replica).await, "{product:5}")
            .await
            .as_deref(),
        Some("old price"),
        "the promoted replica never got the eviction"
    );
    // The pipeline now writes the promoted replica (the address Sentinel or DNS would give it):
    // the slot replays the unconfirmed commit there.
    let mut pipeline = spawn_pipeline(
        env.pg_config(),
        cacheclear_sink_redis::RedisConfig::new(replica.url()),
        product_rules(),
    );
    streaming(&mut pipeline).await;
    let mut promoted = redis_conn(&replica).await;
    gone(
        &mut promoted,
        Duration::from_secs(30),
        "product:5",
        "the replay to evict on the promoted replica",
    )
    .await;
    assert!(
        fence(&mut promoted, "product:5")
            .await
            .is_some_and(|f| f >= commit)
    );
    pipeline.stop().await.expect("stop");
}
