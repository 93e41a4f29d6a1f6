//! The visibility barrier (docs/architecture.md, "The visibility barrier"), reproduced with a
//! synchronous standby that never comes:
//! the UPDATE's commit record is flushed and streamed to the slot, yet other sessions still see the
//! old row until the standby requirement is lifted.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_filling_during_the_sync_wait_does_not_leave_the_old_value() {
    let env = Env::start();
    let admin = env.pg().await;
    let mut r = env.redis().await;
    let running = start_pipeline(&env).await;

    admin
        .batch_execute("ALTER SYSTEM SET synchronous_standby_names = 'nosuch'")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    // The writer's commit hangs waiting for the missing standby.
    let writer = env.pg().await;
    let update = tokio::spawn(async move {
        writer
            .batch_execute("UPDATE product SET price_cents = 999 WHERE id = 20")
            .await
    });

    // Wait until the commit record is flushed and the walsender has sent it to us.
    wait_for(
        "the walsender to send the hanging commit",
        Duration::from_secs(20),
        || {
            let admin = &admin;
            async move {
                let row = admin
                    .query_one(
                        // The pipeline's watermark heartbeat (a transactional
                        // pg_logical_emit_message) hangs on the missing standby too: count
                        // only the UPDATE.
                        "SELECT count(*) FROM pg_stat_activity
                         WHERE wait_event = 'SyncRep' AND query LIKE 'UPDATE product%'",
                        &[],
                    )
                    .await
                    .unwrap();
                let waiting: i64 = row.get(0);
                waiting == 1 && walsender_sent_everything(admin).await
            }
        },
    )
    .await;
    // Give an eager pipeline every chance to evict now (it must not).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !update.is_finished(),
        "the UPDATE should still be waiting for the standby"
    );

    // A reader misses and fills from the database: it still sees the old price.
    let reader = env.pg().await;
    let price: i64 = reader
        .query_one("SELECT price_cents FROM product WHERE id = 20", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        price, 1020,
        "the reader must see the old row during the wait"
    );
    set(&mut r, "{product:20}", &price.to_string()).await;
    let slot_before = slot_confirmed(&admin).await;

    // The eviction is being held: the old value is still there, nothing confirmed past it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&mut r, "{product:20}").await.as_deref(), Some("1020"));

    // A later transaction that does not wait for the standby is visible at once, and its batch's
    // snapshot query can pass while the held one's is still out (two run at once); it is still
    // passed on after the held batch, so nothing is confirmed past the held commit.
    set(&mut r, "{product:21}", "1021").await;
    let other = env.pg().await;
    other
        .batch_execute("SET synchronous_commit = local")
        .await
        .unwrap();
    other
        .batch_execute("UPDATE product SET price_cents = 777 WHERE id = 21")
        .await
        .unwrap();
    wait_for(
        "the walsender to send the later commit",
        Duration::from_secs(20),
        || walsender_sent_everything(&admin),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        slot_confirmed(&admin).await,
        slot_before,
        "a later commit must not be confirmed past the held one"
    );
    assert_eq!(get(&mut r, "{product:20}").await.as_deref(), Some("1020"));

    // Lift the requirement: the commit becomes visible, and only then is the key evicted.
    admin
        .batch_execute("ALTER SYSTEM RESET synchronous_standby_names")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    update.await.unwrap().unwrap();
    gone(
        &mut r,
        Duration::from_secs(20),
        "product:20",
        "the held eviction to be applied",
    )
    .await;
    let new_price: i64 = reader
        .query_one("SELECT price_cents FROM product WHERE id = 20", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(new_price, 999);
    gone(
        &mut r,
        Duration::from_secs(20),
        "product:21",
        "the later transaction's eviction",
    )
    .await;
    assert!(fence(&mut r, "product:20").await.expect("fence") > slot_before);
    running.stop().await.unwrap();
}

/// True when the pipeline's walsender has sent all WAL written so far (`sent_lsn` at
/// `pg_current_wal_lsn()`).
async fn walsender_sent_everything(admin: &tokio_postgres::Client) -> bool {
    admin
        .query_one(
            "SELECT coalesce(bool_and(sent_lsn >= pg_current_wal_lsn()), false)
             FROM pg_stat_replication WHERE application_name = 'cacheclear'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, bool>(0)
}
