//! Delivery (docs/architecture.md, "The delivery rule"): nothing is confirmed before the sink
//! acknowledged it, whatever fails —
//! the process killed mid-transaction, Redis down — and an idle slot does not retain WAL.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cacheclear_harness::PgOptions;
use cacheclear_protocol::Lsn;
use common::*;

const WAIT: Duration = Duration::from_secs(60);
const MB: u64 = 1 << 20;

/// The 3000 rows of [`cache_then_insert`]: their value and fence keys, and the WAL position
/// before and after the INSERT.
struct BigInsert {
    ids: Vec<i32>,
    values: Vec<String>,
    fences: Vec<String>,
    before: Lsn,
    after: Lsn,
}

impl BigInsert {
    /// Waits until at least 20 of the INSERT's fences exist.
    async fn wait_first_fences(&self, r: &redis::aio::MultiplexedConnection) {
        wait_for("the first fences of the INSERT", WAIT, || {
            let mut r = r.clone();
            async move {
                exist_many(&mut r, &self.fences)
                    .await
                    .iter()
                    .filter(|&&f| f)
                    .count()
                    >= 20
            }
        })
        .await;
    }

    /// `kill -9` of `process` once some (but not all) of the INSERT's keys were applied; returns
    /// how many fences existed right after the kill.
    async fn kill_mid_way(
        &self,
        process: &mut Process,
        r: &mut redis::aio::MultiplexedConnection,
    ) -> usize {
        self.wait_first_fences(r).await;
        process.kill();
        let applied = exist_many(r, &self.fences)
            .await
            .iter()
            .filter(|&&f| f)
            .count();
        assert!(
            applied < self.ids.len(),
            "the whole INSERT was applied before the kill ({applied} keys); the test needs a \
             slower apply"
        );
        applied
    }

    /// Waits until every value is gone and every fence exists.
    async fn wait_evicted(&self, r: &redis::aio::MultiplexedConnection) {
        wait_for("every key of the INSERT to be evicted", WAIT, || {
            let mut r = r.clone();
            async move {
                exist_many(&mut r, &self.values).await.iter().all(|&v| !v)
                    && exist_many(&mut r, &self.fences).await.iter().all(|&f| f)
            }
        })
        .await;
    }
}

/// The slot's confirmed position once the killed process's walsender released it.
async fn released_slot_confirmed(pg: &tokio_postgres::Client) -> Lsn {
    wait_for("the killed walsender to release the slot", WAIT, || async {
        slot_active(pg).await == Some(false)
    })
    .await;
    slot_confirmed(pg).await
}

/// Caches a value for products 1001..=4000, then inserts them in ONE statement, ONE transaction.
async fn cache_then_insert(
    pg: &tokio_postgres::Client,
    r: &mut redis::aio::MultiplexedConnection,
) -> BigInsert {
    let ids: Vec<i32> = (1001..=4000).collect();
    let values: Vec<String> = ids.iter().map(|i| format!("{{product:{i}}}")).collect();
    let fences: Vec<String> = ids
        .iter()
        .map(|i| format!("{{product:{i}}}:fence"))
        .collect();
    let mut pipe = redis::pipe();
    for v in &values {
        pipe.cmd("SET")
            .arg(v)
            .arg("cached")
            .arg("PX")
            .arg(600_000)
            .ignore();
    }
    pipe.query_async::<()>(r).await.unwrap();
    let before = current_lsn(pg).await;
    pg.batch_execute(
        "INSERT INTO product SELECT g, 1 + g % 10, 'product ' || g, 'product-' || g, 1000 + g, ''
           FROM generate_series(1001, 4000) g",
    )
    .await
    .unwrap();
    let after = current_lsn(pg).await;
    BigInsert {
        ids,
        values,
        fences,
        before,
        after,
    }
}

/// `kill -9` while one multi-row INSERT is being applied key by key: its commit is not confirmed,
/// and the restarted process evicts every one of its keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_transaction_replays_the_whole_transaction() {
    let env = Env::start();
    let pg = env.pg().await;
    let mut r = env.redis().await;
    let dir = tempfile::tempdir().unwrap();
    // One key per script call, one call per round trip, one round trip at a time: the INSERT's
    // 3000 product keys (and its category keys) take thousands of round trips.
    let config = write_file(
        dir.path(),
        "cacheclear.toml",
        &config_toml(
            &env,
            "",
            "keys_per_call = 1\ncalls_per_pipeline = 1\npipelines_in_flight = 1",
            "",
        ),
    );
    let log = dir.path().join("cacheclear.log");
    let mut first = Process::run(&config, &log);
    // Streaming, and the new slot's table-wide eviction is done (it would evict our values).
    wait_streaming(&pg, WAIT).await;

    let insert = cache_then_insert(&pg, &mut r).await;
    let BigInsert {
        ids,
        fences,
        before,
        after,
        ..
    } = &insert;
    let (before, after) = (*before, *after);

    // Kill as soon as some (but not all) of the INSERT's keys have been applied.
    let applied_at_kill = insert.kill_mid_way(&mut first, &mut r).await;

    // The commit's end LSN is what the fences hold.
    let fenced_id = {
        let found = exist_many(&mut r, &fences).await;
        ids[found.iter().position(|&f| f).expect("a fence")]
    };
    let commit = fence(&mut r, &format!("product:{fenced_id}"))
        .await
        .expect("fence");
    assert!(
        commit > before && commit <= after,
        "fence {commit} outside ({before}, {after}]"
    );
    // Nothing at or past the INSERT's commit is confirmed: a restart must replay it.
    let confirmed = released_slot_confirmed(&pg).await;
    eprintln!(
        "kill -9 after {applied_at_kill} of {} product keys; slot confirmed {confirmed}, INSERT commit \
         {commit} (WAL before {before}, after {after})",
        ids.len()
    );
    assert!(
        confirmed < commit,
        "the slot confirmed {confirmed}, at or past the partly applied INSERT's commit {commit}"
    );

    // Restart: the transaction is replayed from the slot and every key is evicted.
    let mut second = Process::run(&config, &log);
    insert.wait_evicted(&r).await;
    for id in [1001, 2500, 4000, fenced_id] {
        assert_eq!(
            fence(&mut r, &format!("product:{id}")).await,
            Some(commit),
            "product:{id}"
        );
    }
    // The category listings of the inserted rows too.
    for c in 1..=10 {
        assert_eq!(
            fence(&mut r, &format!("category:{c}:products")).await,
            Some(commit),
            "category:{c}:products"
        );
    }
    wait_for("the slot to confirm the INSERT's commit", WAIT, || async {
        slot_confirmed(&pg).await >= commit
    })
    .await;
    assert!(second.exited().is_none(), "the restarted process exited");
    second.kill();
}

/// A transaction larger than `max_batch_keys` is evicted in partial parts while it streams: the
/// first parts' fences are its commit record's start LSN + 1 (not yet its end LSN), nothing is
/// confirmed before its last part landed, and after a `kill -9` mid-way the restarted process
/// replays and evicts all of it, the last part's keys fenced at the commit's end LSN. A graceful
/// stop in the middle of the next one confirms nothing of it either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_transaction_is_evicted_in_parts_and_confirmed_only_whole() {
    let env = Env::start();
    let pg = env.pg().await;
    let mut r = env.redis().await;
    let dir = tempfile::tempdir().unwrap();
    // Parts of 100 keys; one key per round trip, so the 3010 keys take thousands of them.
    let listen = format!(
        "127.0.0.1:{}",
        cacheclear_harness::free_port().expect("free port")
    );
    let config = write_file(
        dir.path(),
        "cacheclear.toml",
        &config_toml(
            &env,
            "max_batch_keys = 100",
            "keys_per_call = 1\ncalls_per_pipeline = 1\npipelines_in_flight = 1",
            &listen,
        ),
    );
    let log = dir.path().join("cacheclear.log");
    let mut first = Process::run(&config, &log);
    wait_streaming(&pg, WAIT).await;

    // 3000 product keys and 10 category keys: 31 parts.
    let insert = cache_then_insert(&pg, &mut r).await;
    let (values, before, after) = (&insert.values, insert.before, insert.after);
    // product:1001 is in the first part; its fence is Begin's final LSN + 1. The confirmed
    // position is read before the kill, while later parts are still being applied.
    insert.wait_first_fences(&r).await;
    let part_fence = fence(&mut r, "product:1001").await.expect("fence");
    let confirmed_mid = slot_confirmed(&pg).await;
    insert.kill_mid_way(&mut first, &mut r).await;
    assert!(
        part_fence > before && part_fence < after,
        "part fence {part_fence} outside ({before}, {after})"
    );
    assert!(
        confirmed_mid < part_fence,
        "the slot confirmed {confirmed_mid} while only parts of the transaction at {part_fence} had landed"
    );
    let confirmed = released_slot_confirmed(&pg).await;
    assert!(
        confirmed < part_fence,
        "the slot confirmed {confirmed}, past the partly applied transaction at {part_fence}"
    );

    let mut second = Process::run(&config, &log);
    insert.wait_evicted(&r).await;
    // The replay hands over the same parts: the same fence for the first part's keys; the last
    // part (the keys after the 3000th) carries the commit's end LSN.
    assert_eq!(fence(&mut r, "product:1001").await, Some(part_fence));
    let end = fence(&mut r, "product:4000").await.expect("fence");
    assert!(
        end > part_fence && end <= after && end.0 - part_fence.0 < 8192,
        "last part's fence {end}: not the commit's end LSN (part fence {part_fence}, WAL after {after})"
    );
    wait_for(
        "the slot to confirm the transaction's commit",
        WAIT,
        || async { slot_confirmed(&pg).await >= end },
    )
    .await;
    // The replay's 30 parts of 100 keys (3000 of the 3010; the last part holds the other 10).
    let body = scrape(&listen).expect("the metrics endpoint");
    assert_eq!(
        sample(&body, "cacheclear_transaction_parts_total"),
        Some(30.0)
    );
    assert!(second.exited().is_none(), "the restarted process exited");

    // A graceful stop (SIGTERM) in the middle of the next large transaction: the parts read so
    // far are applied, its commit is not confirmed, and the next start evicts all of it.
    {
        let mut pipe = redis::pipe();
        for v in values {
            pipe.cmd("SET").arg(v).arg("cached").ignore();
        }
        pipe.query_async::<()>(&mut r).await.unwrap();
    }
    pg.batch_execute(
        "UPDATE product SET price_cents = price_cents + 1 WHERE id BETWEEN 1001 AND 4000",
    )
    .await
    .unwrap();
    wait_for("the UPDATE's first part", WAIT, || {
        let mut r = r.clone();
        async move { fence(&mut r, "product:1001").await.is_some_and(|f| f > end) }
    })
    .await;
    let update_part = fence(&mut r, "product:1001").await.expect("fence");
    let status = second.terminate();
    assert!(status.success(), "the graceful stop failed: {status}");
    assert!(
        exist_many(&mut r, values).await.iter().any(|&v| v),
        "the whole UPDATE was applied before the stop; the test needs a slower apply"
    );
    let confirmed = slot_confirmed(&pg).await;
    assert!(
        confirmed < update_part,
        "a graceful stop confirmed {confirmed}, past the partly applied UPDATE at {update_part}"
    );
    let mut third = Process::run(&config, &log);
    wait_for("every key of the UPDATE to be evicted", WAIT, || {
        let mut r = r.clone();
        async move { exist_many(&mut r, values).await.iter().all(|&v| !v) }
    })
    .await;
    third.kill();
    let log = std::fs::read_to_string(dir.path().join("cacheclear.log")).unwrap_or_default();
    assert!(
        log.contains("replayed whole on the next start"),
        "the stop's log does not say the open transaction is replayed: {:?}",
        log.lines()
            .filter(|l| l.contains("stopped"))
            .collect::<Vec<_>>()
    );
    assert!(
        !log.contains("key budget"),
        "the transaction fell back to table-wide evictions"
    );
}

/// Redis goes down in the middle of a stream of single-row UPDATEs: nothing is confirmed while it
/// is down, and once it is back every update that was not confirmed is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_during_updates_holds_confirmation_and_loses_nothing() {
    // A short wal_sender_timeout: a pipeline that stopped answering while its sink is down
    // would be disconnected by the server within the outage.
    let mut env = Env::start_with(PgOptions::default().conf("wal_sender_timeout = '4s'"));
    let pg = env.pg().await;
    // 200 products, one UPDATE transaction each: each key's fence is exactly its commit's LSN.
    pg.batch_execute(
        "INSERT INTO product SELECT g, 1 + g % 10, 'product ' || g, 'product-' || g, 1000 + g, ''
           FROM generate_series(101, 200) g",
    )
    .await
    .unwrap();
    // Tiny batches and queue: back-pressure reaches the replication stream during the outage.
    let mut pg_cfg = env.pg_config();
    pg_cfg.max_batch_keys = 4;
    pg_cfg.queue_batches = 1;
    let mut running = spawn_pipeline(pg_cfg, env.redis_config(), product_rules());
    streaming(&mut running).await;
    wait_for("the walsender to show", WAIT, || async {
        assert!(!running.is_finished(), "the pipeline stopped");
        walsender(&pg).await.is_some()
    })
    .await;
    let (walsender_pid, _) = walsender(&pg).await.expect("a walsender");

    const UPDATES: usize = 200;
    let done = Arc::new(AtomicUsize::new(0));
    let writer = env.pg().await;
    let updates = tokio::spawn({
        let done = Arc::clone(&done);
        async move {
            let mut commits = Vec::with_capacity(UPDATES);
            for id in 1..=UPDATES as i32 {
                let before = current_lsn(&writer).await;
                writer
                    .execute(
                        "UPDATE product SET price_cents = price_cents + 1 WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .unwrap();
                let after = current_lsn(&writer).await;
                commits.push((id, before, after));
                done.fetch_add(1, Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            commits
        }
    });

    wait_for("the first 50 updates", WAIT, || {
        let done = Arc::clone(&done);
        async move { done.load(Ordering::Acquire) >= 50 }
    })
    .await;
    env.redis.stop().unwrap();
    let stopped = std::time::Instant::now();
    let down_at = current_lsn(&pg).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let commits = updates.await.unwrap();
    // Every update is committed; Redis is still down. Two samples, many status intervals apart.
    let confirmed_down = slot_confirmed(&pg).await;
    let (_, reply_down) = walsender(&pg).await.expect("the walsender");
    // Down for longer than wal_sender_timeout, many status intervals after the first sample.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    if let Some(rest) = Duration::from_secs(6).checked_sub(stopped.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let confirmed_down_later = slot_confirmed(&pg).await;
    assert_eq!(
        confirmed_down, confirmed_down_later,
        "the slot's confirmed position moved while Redis was down"
    );
    // Meanwhile the same replication connection kept sending standby status updates.
    let (pid_later, reply_later) = walsender(&pg).await.expect("the walsender");
    assert_eq!(
        pid_later, walsender_pid,
        "the replication connection was replaced"
    );
    assert!(
        reply_later > reply_down,
        "no standby status update while Redis was down ({reply_down} → {reply_later})"
    );
    assert!(!running.is_finished(), "the pipeline stopped");
    assert_eq!(running.status().confirmed_lsn(), confirmed_down);
    let after_stop = commits
        .iter()
        .filter(|(_, before, _)| *before >= down_at)
        .count();
    assert!(
        after_stop >= 50,
        "only {after_stop} updates while Redis was down"
    );

    // Back, empty: the fences written after the restart are the proof of invalidation.
    env.redis.start_again().unwrap();
    let mut r = env.redis().await;
    let unconfirmed: Vec<&(i32, Lsn, Lsn)> = commits
        .iter()
        .filter(|(_, before, _)| *before >= confirmed_down)
        .collect();
    assert!(
        unconfirmed.len() >= after_stop,
        "the slot confirmed {confirmed_down} while Redis was down (since {down_at}): past updates \
         committed after it went down"
    );
    let keys: Vec<String> = unconfirmed
        .iter()
        .map(|(id, _, _)| format!("{{product:{id}}}:fence"))
        .collect();
    wait_for("every unconfirmed update's fence", WAIT, || {
        let mut r = r.clone();
        let keys = &keys;
        async move { exist_many(&mut r, keys).await.iter().all(|&f| f) }
    })
    .await;
    let mut first_after_stop = None;
    for &&(id, before, after) in &unconfirmed {
        let f = fence(&mut r, &format!("product:{id}"))
            .await
            .expect("fence");
        assert!(
            f > before && f <= after,
            "product:{id}: fence {f} outside its commit's ({before}, {after}]"
        );
        if before >= down_at && first_after_stop.is_none() {
            first_after_stop = Some(f);
        }
    }
    // No commit made while Redis was down had been confirmed.
    let first_after_stop = first_after_stop.expect("an update after the stop");
    assert!(
        confirmed_down < first_after_stop,
        "confirmed {confirmed_down} while Redis was down, past the commit {first_after_stop}"
    );
    let last = fence(&mut r, &format!("product:{UPDATES}"))
        .await
        .expect("last fence");
    wait_for("the slot to confirm the last update", WAIT, || async {
        slot_confirmed(&pg).await >= last
    })
    .await;
    eprintln!(
        "{} updates, {after_stop} while Redis was down; confirmed held at {confirmed_down}; {} \
         re-applied after the restart; last commit {last}",
        commits.len(),
        unconfirmed.len()
    );
    running.stop().await.unwrap();
}

/// The pipeline's walsender: (pid, reply_time as µs since the epoch).
async fn walsender(pg: &tokio_postgres::Client) -> Option<(i32, i64)> {
    pg.query_opt(
        "SELECT pid, (extract(epoch FROM reply_time) * 1000000)::int8
           FROM pg_stat_replication WHERE application_name = 'cacheclear'",
        &[],
    )
    .await
    .unwrap()
    .map(|row| (row.get(0), row.get::<_, Option<i64>>(1).unwrap_or(0)))
}

async fn retained(pg: &tokio_postgres::Client) -> u64 {
    let row = pg
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8
               FROM pg_replication_slots WHERE slot_name = 'cacheclear'",
            &[],
        )
        .await
        .unwrap();
    row.get::<_, i64>(0) as u64
}

/// Heavy writes to a table outside the publication, rule tables idle: the slot's confirmed
/// position follows the WAL and its retained WAL drops back to a few MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slot_retained_wal_stays_bounded() {
    let env = Env::start();
    let pg = env.pg().await;
    let running = start_pipeline(&env).await;
    pg.batch_execute("CREATE TABLE churn (id int, pad text)")
        .await
        .unwrap();

    let start = current_lsn(&pg).await;
    let retained_start = retained(&pg).await;
    for _ in 0..4 {
        pg.batch_execute(
            "INSERT INTO churn SELECT g, repeat(md5(g::text), 6) FROM generate_series(1, 100000) g;
             DELETE FROM churn;",
        )
        .await
        .unwrap();
    }
    pg.batch_execute("SELECT pg_switch_wal()").await.unwrap();
    let end = current_lsn(&pg).await;
    let churned = end.0 - start.0;
    let retained_after_churn = retained(&pg).await;
    assert!(
        churned > 50 * MB,
        "the churn wrote only {churned} bytes of WAL"
    );

    // A checkpoint logs the running transactions the slot's restart point can move to.
    let begun = std::time::Instant::now();
    let mut last_checkpoint = std::time::Instant::now();
    pg.batch_execute("CHECKPOINT").await.unwrap();
    let settled = loop {
        let now = retained(&pg).await;
        if now < 16 * MB && slot_confirmed(&pg).await >= end {
            break now;
        }
        assert!(
            begun.elapsed() < Duration::from_secs(120),
            "retained WAL still {now} bytes after {:?}",
            begun.elapsed()
        );
        if last_checkpoint.elapsed() > Duration::from_secs(5) {
            pg.batch_execute("CHECKPOINT").await.unwrap();
            last_checkpoint = std::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let confirmed = slot_confirmed(&pg).await;
    assert!(confirmed >= end, "confirmed {confirmed} < churn end {end}");
    eprintln!(
        "idle slot: churn wrote {:.1} MB of WAL to an unpublished table; retained WAL {} bytes \
         before, {} bytes right after the churn, {} bytes {:.1} s after (CHECKPOINT); confirmed \
         {confirmed} >= churn end {end}",
        churned as f64 / MB as f64,
        retained_start,
        retained_after_churn,
        settled,
        begun.elapsed().as_secs_f64(),
    );
    running.stop().await.unwrap();
}

/// PostgreSQL restarts under a running `cacheclear run`: the process reconnects and resumes from
/// the slot instead of exiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_is_survived() {
    let mut env = Env::start();
    let mut r = env.redis().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(
        dir.path(),
        "cacheclear.toml",
        &config_toml(&env, "", "", ""),
    );
    let mut process = Process::run(&config, &dir.path().join("cacheclear.log"));
    {
        let pg = env.pg().await;
        wait_streaming(&pg, WAIT).await;
    }
    tokio::task::block_in_place(|| env.pg.restart()).unwrap();
    let pg = env.pg().await;
    set(&mut r, "{product:3}", "cached").await;
    pg.batch_execute("UPDATE product SET price_cents = 3 WHERE id = 3")
        .await
        .unwrap();
    wait_for("product:3 to be evicted after the restart", WAIT, || {
        let mut r = r.clone();
        async move { !exists(&mut r, "{product:3}").await }
    })
    .await;
    assert!(
        process.exited().is_none(),
        "cacheclear exited: {}",
        process.log_text()
    );
    process.kill();
}
