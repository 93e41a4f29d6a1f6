//! Bus records through a real broker (tansu) into real Redis: fences, offset commits, fan-out to
//! two Redis deployments, and a rebalance mid-stream. (Standalone Redis: the cluster harness is
//! not in the tree yet; the invalidator only calls `RedisSink`, which owns cluster routing.)

mod common;

use std::collections::HashMap;
use std::time::Duration;

use cacheclear_protocol::Lsn;
use common::*;

const TOPIC: &str = "cacheclear.invalidations";

/// `n` records over `keys` keys, each key updated several times with increasing LSNs; returns
/// the records and each key's highest LSN.
type Stream = (Vec<(String, Vec<u8>)>, HashMap<String, Lsn>);

fn stream(n: u64, keys: u64, lsn_base: u64) -> Stream {
    let mut records = Vec::with_capacity(n as usize);
    let mut max = HashMap::new();
    for i in 0..n {
        let key = format!("product:{}", i % keys);
        let lsn = lsn_base + i * 16;
        records.push((key.clone(), bus_record(&key, lsn)));
        max.insert(key, Lsn(lsn));
    }
    (records, max)
}

async fn assert_all_fenced(
    c: &mut redis::aio::MultiplexedConnection,
    expected: &HashMap<String, Lsn>,
) {
    let keys: Vec<String> = expected.keys().cloned().collect();
    let got = fences(c, &keys).await;
    let wrong: Vec<_> = keys
        .iter()
        .zip(&got)
        .filter(|(k, f)| **f != Some(expected[*k]))
        .take(5)
        .collect();
    assert!(
        wrong.is_empty(),
        "keys without their final fence (first 5): {wrong:?}"
    );
    let cached = values_exist(c, &keys).await;
    assert!(cached.iter().all(|e| !e), "a stale value survived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_redis_with_their_fences_and_offsets_are_committed() {
    let kafka = broker();
    kafka.create_topic(TOPIC, 4).unwrap();
    kafka.create_topic(DLQ, 1).unwrap();
    let redis = redis();
    let mut c = redis_conn(&redis).await;
    let (records, expected) = stream(3000, 500, 0x1_0000_0000);
    let keys: Vec<String> = expected.keys().cloned().collect();
    fill_values(&mut c, &keys, "stale").await;
    // A table-wide record evicts what its pattern matches, with its LSN.
    fill_values(&mut c, &["listing:1", "listing:2", "other:1"], "stale").await;
    let p = producer(&kafka);
    let mut ends = produce_all(&p, TOPIC, &records).await;
    let table_wide = cacheclear_protocol::BusRecord {
        key: None,
        patterns: vec!["{listing:*}*".into()],
        commit_lsn: Lsn(0x2_0000_0000),
        commit_time_us: cacheclear_invalidator::now_us(),
        xid: 9,
        table: "public.listing".into(),
        op: cacheclear_protocol::Op::Truncate,
    };
    let (part, _) = produce(
        &p,
        TOPIC,
        Some(b"public.listing"),
        Some(&table_wide.to_json()),
    )
    .await;
    merge_ends(&mut ends, [(part, 1)].into());

    let member = Member::start(config(&kafka, &redis, "g1", &[TOPIC]));
    let status = member.status.clone();
    wait_for("all records applied", Duration::from_secs(60), || async {
        status.records_applied() >= 3001
    })
    .await;
    assert_all_fenced(&mut c, &expected).await;
    let listing = fences(&mut c, &["listing:1", "listing:2", "other:1"]).await;
    assert_eq!(
        listing,
        [Some(Lsn(0x2_0000_0000)), Some(Lsn(0x2_0000_0000)), None]
    );
    assert_eq!(status.records_dead_lettered(), 0);
    member.stop().await;
    // Everything applied is committed: the group's offsets are the log ends.
    assert_eq!(committed(&kafka, "g1", TOPIC, 4), ends_vec(&ends, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_fan_out_to_two_redis_deployments() {
    let kafka = broker();
    kafka.create_topic(TOPIC, 2).unwrap();
    kafka.create_topic(DLQ, 1).unwrap();
    let (eu, us) = (redis(), redis());
    let (mut ceu, mut cus) = (redis_conn(&eu).await, redis_conn(&us).await);
    let (records, expected) = stream(1000, 300, 0x10);
    let keys: Vec<String> = expected.keys().cloned().collect();
    fill_values(&mut ceu, &keys, "stale").await;
    fill_values(&mut cus, &keys, "stale").await;
    let a = Member::start(config(&kafka, &eu, "region-eu", &[TOPIC]));
    let b = Member::start(config(&kafka, &us, "region-us", &[TOPIC]));
    produce_all(&producer(&kafka), TOPIC, &records).await;
    let (sa, sb) = (a.status.clone(), b.status.clone());
    wait_for(
        "both groups applied every record",
        Duration::from_secs(60),
        || async { sa.records_applied() >= 1000 && sb.records_applied() >= 1000 },
    )
    .await;
    assert_all_fenced(&mut ceu, &expected).await;
    assert_all_fenced(&mut cus, &expected).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_mid_stream_loses_nothing_and_leaves_nothing_stale() {
    let kafka = broker();
    kafka.create_topic(TOPIC, 4).unwrap();
    kafka.create_topic(DLQ, 1).unwrap();
    let redis = redis();
    let mut c = redis_conn(&redis).await;
    let (records, expected) = stream(12_000, 1000, 0x100);
    let keys: Vec<String> = expected.keys().cloned().collect();
    fill_values(&mut c, &keys, "stale").await;
    let mut cfg = config(&kafka, &redis, "g", &[TOPIC]);
    cfg.kafka.batch_max_records = 200;
    let a = Member::start(cfg.clone());
    let sa = a.status.clone();
    wait_for(
        "member A owns the partitions",
        Duration::from_secs(30),
        || async { sa.assigned_partitions() == 4 },
    )
    .await;
    // Stream in slices; member B joins after the first third, A leaves after the second.
    let p = producer(&kafka);
    let third = records.len() / 3;
    let mut ends = produce_all(&p, TOPIC, &records[..third]).await;
    let b = Member::start(cfg.clone());
    let sb = b.status.clone();
    merge_ends(
        &mut ends,
        produce_all(&p, TOPIC, &records[third..2 * third]).await,
    );
    wait_for(
        "the rebalance gave B partitions",
        Duration::from_secs(30),
        || async { sb.assigned_partitions() > 0 && sa.assigned_partitions() < 4 },
    )
    .await;
    merge_ends(
        &mut ends,
        produce_all(&p, TOPIC, &records[2 * third..]).await,
    );
    // A leaves mid-stream (graceful): B takes everything over.
    a.stop().await;
    wait_for("B applied the rest", Duration::from_secs(60), || async {
        let done = committed(&kafka, "g", TOPIC, 4) == ends_vec(&ends, 4);
        done && sb.assigned_partitions() == 4
    })
    .await;
    eprintln!(
        "A applied {} dropped {}; B applied {} dropped {}; committed {:?}, produced {:?}",
        sa.records_applied(),
        sa.records_dropped(),
        sb.records_applied(),
        sb.records_dropped(),
        committed(&kafka, "g", TOPIC, 4),
        ends_vec(&ends, 4)
    );
    assert_all_fenced(&mut c, &expected).await;
    assert!(
        sa.records_applied() + sb.records_applied() >= 12_000,
        "A {} + B {} applied",
        sa.records_applied(),
        sb.records_applied()
    );
    assert!(
        sb.records_applied() > 0 && sa.records_applied() > 0,
        "both members worked"
    );
    assert_all_fenced(&mut c, &expected).await;
    b.stop().await;
}

/// Offsets are committed at most every `commit_interval_ms`, and the last applied records are
/// committed by the idle timer — while the member keeps running, not only at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_rate_limited_and_an_idle_stream_still_commits() {
    const TOPIC_I: &str = "cacheclear.interval";
    let kafka = broker();
    kafka.create_topic(TOPIC_I, 4).unwrap();
    kafka.create_topic(DLQ, 1).unwrap();
    let redis = redis();
    let mut c = redis_conn(&redis).await;
    let (records, expected) = stream(3000, 300, 0x3_0000_0000);
    let ends = produce_all(&producer(&kafka), TOPIC_I, &records).await;

    let mut cfg = config(&kafka, &redis, "interval", &[TOPIC_I]);
    cfg.kafka.commit_interval_ms = 300;
    cfg.kafka.batch_max_records = 100;
    let started = std::time::Instant::now();
    let member = Member::start(cfg);
    let status = member.status.clone();
    wait_for("all records applied", Duration::from_secs(60), || async {
        status.records_applied() >= 3000
    })
    .await;
    assert_all_fenced(&mut c, &expected).await;
    // No more records arrive: the idle timer commits the rest.
    let want = ends_vec(&ends, 4);
    let kafka_ref = &kafka;
    let want_ref = &want;
    wait_for(
        "offsets committed while idle",
        Duration::from_secs(10),
        || async move { committed(kafka_ref, "interval", TOPIC_I, 4) == *want_ref },
    )
    .await;
    // At least 30 batches of 100 records, but commits at most one per 300 ms (+1 for the idle
    // timer's).
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let commits = status.commits();
    assert!(
        commits >= 1 && commits <= elapsed_ms / 300 + 2,
        "{commits} commits in {elapsed_ms} ms with a 300 ms interval"
    );
    member.stop().await;
}
