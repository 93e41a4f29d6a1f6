//! The Redis sink in cluster mode against real Redis Clusters (private instances).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cacheclear_harness::RedisCluster;
use cacheclear_harness::fixtures::{cluster_conn, fill_pipeline};
use cacheclear_protocol::{KeyLayout, Lsn};
use cacheclear_sink_redis::{RedisConfig, RedisSink};
use futures::StreamExt;
use redis::cluster_async::ClusterConnection;

async fn start(masters: usize, replicas: usize) -> RedisCluster {
    tokio::task::spawn_blocking(move || RedisCluster::start(masters, replicas))
        .await
        .expect("join")
        .expect("start the Redis Cluster")
}

fn sink(cluster: &RedisCluster) -> RedisSink {
    RedisSink::connect(RedisConfig::cluster(cluster.seeds())).expect("cluster sink")
}

/// Cache keys grouped by slot, so one `MGET`/`DEL`/... per slot (no CROSSSLOT).
fn by_slot(keys: &[String]) -> BTreeMap<u16, Vec<&str>> {
    let mut map: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
    for k in keys {
        let slot = KeyLayout::new(k).expect("layout").slot();
        map.entry(slot).or_default().push(k);
    }
    map
}

/// Writes `{K}` and `{K}:lease` for every key (one pipeline per slot).
async fn fill(conn: &ClusterConnection, keys: &[String]) {
    let groups = by_slot(keys);
    futures::stream::iter(groups.into_values().map(|keys| {
        let mut conn = conn.clone();
        async move {
            fill_pipeline(&keys, "cached", true)
                .query_async::<()>(&mut conn)
                .await
                .expect("fill");
        }
    }))
    .buffer_unordered(64)
    .collect::<Vec<()>>()
    .await;
}

/// Value exists, lease exists, fence.
type KeyState = (bool, bool, Option<String>);

/// For every key: (value exists, lease exists, fence).
async fn state(conn: &ClusterConnection, keys: &[String]) -> BTreeMap<String, KeyState> {
    let groups = by_slot(keys);
    let results: Vec<Vec<(String, KeyState)>> =
        futures::stream::iter(groups.into_values().map(|keys| {
            let mut conn = conn.clone();
            async move {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.cmd("EXISTS").arg(format!("{{{k}}}"));
                    pipe.cmd("EXISTS").arg(format!("{{{k}}}:lease"));
                    pipe.cmd("GET").arg(format!("{{{k}}}:fence"));
                }
                let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await.expect("read");
                keys.iter()
                    .zip(replies.chunks(3))
                    .map(|(k, r)| {
                        let value = r[0] == redis::Value::Int(1);
                        let lease = r[1] == redis::Value::Int(1);
                        let fence = match &r[2] {
                            redis::Value::BulkString(b) => {
                                Some(String::from_utf8(b.clone()).expect("utf8"))
                            }
                            _ => None,
                        };
                        ((*k).to_string(), (value, lease, fence))
                    })
                    .collect()
            }
        }))
        .buffer_unordered(64)
        .collect()
        .await;
    results.into_iter().flatten().collect()
}

/// Asserts every key is evicted (value and lease gone) and fenced at `want(key)`.
async fn assert_applied(conn: &ClusterConnection, keys: &[String], want: impl Fn(&str) -> Lsn) {
    let st = state(conn, keys).await;
    assert_eq!(st.len(), keys.len(), "duplicate keys in the test");
    let mut bad = Vec::new();
    for (k, (value, lease, fence)) in &st {
        let expected = want(k).to_fixed_hex();
        if *value || *lease || fence.as_deref() != Some(expected.as_str()) {
            bad.push(format!(
                "{k}: value {value} lease {lease} fence {fence:?} (want {expected})"
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} keys not applied, e.g. {:?}",
        bad.len(),
        keys.len(),
        &bad[..bad.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidates_keys_of_every_slot_with_one_slot_per_call() {
    let cluster = start(3, 0).await;
    let conn = cluster_conn(&cluster).await;
    let keys: Vec<String> = (0..10_000).map(|i| format!("product:{i}")).collect();
    let slots = by_slot(&keys).len();
    assert!(slots > 7_000, "keys cover only {slots} slots");
    fill(&conn, &keys).await;
    // Some fences are newer than what we send: the script keeps the maximum.
    let newer = Lsn(u64::MAX - 1);
    let mut c = conn.clone();
    for i in (0..10_000).step_by(97) {
        redis::cmd("SET")
            .arg(format!("{{product:{i}}}:fence"))
            .arg(newer.to_fixed_hex())
            .query_async::<()>(&mut c)
            .await
            .expect("SET fence");
    }
    let sink = sink(&cluster);
    assert!(sink.is_cluster());
    let lsn_of = |k: &str| -> Lsn {
        let i: u64 = k.trim_start_matches("product:").parse().expect("n");
        if i.is_multiple_of(97) {
            newer
        } else {
            Lsn(0x1_0000_0000 + i)
        }
    };
    // Each key carries its own LSN, as keys of many transactions do in one batch.
    let input: Vec<(&str, Lsn)> = keys
        .iter()
        .map(|k| {
            let i: u64 = k.trim_start_matches("product:").parse().expect("n");
            (k.as_str(), Lsn(0x1_0000_0000 + i))
        })
        .collect();
    let acked = sink
        .invalidate(input.iter().copied())
        .await
        .expect("invalidate");
    assert_eq!(acked, 10_000);
    assert_applied(&conn, &keys, lsn_of).await;
    // Every master took part.
    for m in cluster.masters().expect("masters") {
        let n: usize = cluster
            .cli(m, &["DBSIZE"])
            .expect("DBSIZE")
            .parse()
            .expect("n");
        assert!(n > 1_000, "master {m} holds {n} keys");
    }
    // Replays are harmless; a key with a brace is refused before anything is sent.
    assert_eq!(
        sink.invalidate(input.iter().copied())
            .await
            .expect("replay"),
        10_000
    );
    assert_applied(&conn, &keys, lsn_of).await;
    let err = sink
        .invalidate([("bad}key", Lsn(1))])
        .await
        .expect_err("brace");
    assert!(err.to_string().contains("hash tag"), "{err}");
    // Small keys_per_call / calls_per_pipeline: many calls and pipelines, same result.
    let mut cfg = RedisConfig::cluster(cluster.seeds());
    cfg.keys_per_call = 3;
    cfg.calls_per_pipeline = 2;
    cfg.pipelines_in_flight = 1;
    let small = RedisSink::connect(cfg).expect("sink");
    fill(&conn, &keys[..2_000]).await;
    let later = |k: &str| lsn_of(k).max(Lsn(0x2_0000_0000));
    let input: Vec<(&str, Lsn)> = keys[..2_000]
        .iter()
        .map(|k| (k.as_str(), Lsn(0x2_0000_0000)))
        .collect();
    assert_eq!(
        small.invalidate(input).await.expect("small pipelines"),
        2_000
    );
    assert_applied(&conn, &keys[..2_000], later).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_wide_eviction_scans_every_master() {
    let cluster = start(3, 0).await;
    let conn = cluster_conn(&cluster).await;
    let products: Vec<String> = (0..3_000).map(|i| format!("product:{i}")).collect();
    let others: Vec<String> = (0..500).map(|i| format!("order:{i}")).collect();
    fill(&conn, &products).await;
    fill(&conn, &others).await;
    // A lease left without a value (a loader in flight) is found too.
    let mut c = conn.clone();
    redis::cmd("SET")
        .arg("{product:lonely}:lease")
        .arg("t")
        .query_async::<()>(&mut c)
        .await
        .expect("SET");
    let sink = sink(&cluster);
    let lsn = Lsn(0xABCD_0000);
    let found = sink
        .invalidate_matching(&["{product:*}*".to_string()], lsn)
        .await
        .expect("table-wide eviction");
    assert!(found >= 3_001, "found {found}");
    let mut all = products.clone();
    all.push("product:lonely".into());
    assert_applied(&conn, &all, |_| lsn).await;
    // Other tables' keys are untouched.
    let st = state(&conn, &others).await;
    assert!(st.values().all(|(v, l, f)| *v && *l && f.is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failovers_during_invalidation_lose_nothing() {
    let cluster = Arc::new(start(3, 1).await);
    let conn = cluster_conn(&cluster).await;
    let sink = sink(&cluster);
    // One long invalidation (200k keys) while every shard fails over in turn, then batches that
    // keep coming during and after it.
    let big: Vec<String> = (0..200_000).map(|i| format!("item:{i}")).collect();
    let big_lsn = Lsn(0x5_0000_0000);
    let done = Arc::new(AtomicBool::new(false));
    let failovers = {
        let cluster = Arc::clone(&cluster);
        let done = Arc::clone(&done);
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(200));
            let replicas = cluster.replicas().expect("replicas");
            let mut promoted = Vec::new();
            for r in replicas {
                let started = Instant::now();
                cluster.failover(r).expect("failover");
                promoted.push((r, started.elapsed()));
            }
            done.store(true, Ordering::SeqCst);
            promoted
        })
    };
    let started = Instant::now();
    let acked = sink
        .invalidate(big.iter().map(|k| (k.as_str(), big_lsn)))
        .await
        .expect("the long invalidation survives the failovers");
    assert_eq!(acked, 200_000);
    let big_took = started.elapsed();
    // Batches of 5k keys until the failovers are over, and two more.
    let mut batches: Vec<(Vec<String>, Lsn)> = Vec::new();
    let mut after = 0;
    while after < 2 {
        if done.load(Ordering::SeqCst) {
            after += 1;
        }
        let n = batches.len();
        let keys: Vec<String> = (0..5_000).map(|i| format!("batch{n}:{i}")).collect();
        let lsn = Lsn(0x6_0000_0000 + n as u64);
        let acked = sink
            .invalidate(keys.iter().map(|k| (k.as_str(), lsn)))
            .await
            .unwrap_or_else(|e| panic!("batch {n} failed: {e}"));
        assert_eq!(acked, 5_000);
        batches.push((keys, lsn));
    }
    let promoted = failovers.await.expect("failovers");
    eprintln!(
        "200k keys in {big_took:?}; failovers {promoted:?}; {} batches",
        batches.len()
    );
    // The replicas are the masters now.
    let masters = cluster.masters().expect("masters");
    for (r, _) in &promoted {
        assert!(masters.contains(r), "{r} not promoted: {masters:?}");
    }
    // The sink's writes really met the failovers: the demoted masters answered some of them
    // with MOVED (the redirections were followed).
    let mut moved = 0u64;
    for port in cluster.replicas().expect("replicas") {
        let stats = cluster.cli(port, &["INFO", "errorstats"]).expect("INFO");
        moved += stats
            .lines()
            .find_map(|l| l.trim().strip_prefix("errorstat_MOVED:count="))
            .and_then(|n| n.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0);
    }
    eprintln!("MOVED replies from the demoted masters: {moved}");
    assert!(
        moved > 0,
        "no write reached a demoted master: the failovers did not overlap"
    );
    // Everything is on the new masters, fenced at its LSN.
    let conn = {
        drop(conn);
        cluster_conn(&cluster).await
    };
    assert_applied(&conn, &big, |_| big_lsn).await;
    for (keys, lsn) in &batches {
        assert_applied(&conn, keys, |_| *lsn).await;
    }
    // Table-wide eviction after the failovers scans the new masters.
    let found = sink
        .invalidate_matching(&["{batch0:*}*".to_string()], Lsn(0x7_0000_0000))
        .await
        .expect("scan after failover");
    assert!(found >= 5_000, "found {found}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_fails_the_batch_and_recovers() {
    let mut cluster = start(3, 0).await;
    let mut cfg = RedisConfig::cluster(cluster.seeds());
    cfg.cluster_retries = 1;
    cfg.response_timeout_ms = 1_000;
    let sink = RedisSink::connect(cfg).expect("sink");
    assert_eq!(sink.invalidate([("k:1", Lsn(1))]).await.expect("up"), 1);
    // One master down, no replica: its slots are not served; the batch fails (and the source
    // would retry it), it does not hang.
    let victim = cluster.masters().expect("masters")[0];
    cluster
        .node_mut(victim)
        .expect("node")
        .stop()
        .expect("stop");
    let keys: Vec<String> = (0..3_000).map(|i| format!("k:{i}")).collect();
    let started = Instant::now();
    let err = sink
        .invalidate(keys.iter().map(|k| (k.as_str(), Lsn(2))))
        .await
        .expect_err("a master is down");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    eprintln!("with a master down: {err}");
    // It comes back (empty, same identity): the same batch now succeeds.
    let node = cluster.node_mut(victim).expect("node");
    tokio::task::block_in_place(|| node.start_again()).expect("start again");
    tokio::task::block_in_place(|| cluster.wait_ok(Duration::from_secs(30))).expect("ok");
    let mut acked = None;
    for _ in 0..50 {
        match sink
            .invalidate(keys.iter().map(|k| (k.as_str(), Lsn(2))))
            .await
        {
            Ok(n) => {
                acked = Some(n);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    assert_eq!(acked, Some(3_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_node_cluster_works_too() {
    let cluster = start(1, 0).await;
    let conn = cluster_conn(&cluster).await;
    let keys: Vec<String> = (0..1_000).map(|i| format!("p:{i}")).collect();
    fill(&conn, &keys).await;
    let sink = sink(&cluster);
    let acked = sink
        .invalidate(keys.iter().map(|k| (k.as_str(), Lsn(9))))
        .await
        .expect("invalidate");
    assert_eq!(acked, 1_000);
    assert_applied(&conn, &keys, |_| Lsn(9)).await;
    fill(&conn, &keys).await;
    let found = sink
        .invalidate_matching(&["{p:*}*".to_string()], Lsn(10))
        .await
        .expect("scan");
    assert!(found >= 1_000, "found {found}");
    assert_applied(&conn, &keys, |_| Lsn(10)).await;
}
