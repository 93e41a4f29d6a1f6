//! The invalidator against a real 3-master Redis Cluster (through `RedisSink`'s cluster mode):
//! key records land on every master with their fences, a table-wide record SCANs every master,
//! and a restarted member (a new process in the same group) resumes without losing anything.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use cacheclear_harness::RedisCluster;
use cacheclear_protocol::{BusRecord, Lsn, Op};
use cacheclear_sink_redis::RedisConfig;
use common::*;
use redis::AsyncCommands;

const TOPIC: &str = "cacheclear.invalidations";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_a_redis_cluster_and_a_restart_loses_nothing() {
    let kafka = broker();
    kafka.create_topic(TOPIC, 4).unwrap();
    kafka.create_topic(DLQ, 1).unwrap();
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3, 0))
        .await
        .unwrap()
        .expect("start a 3-master Redis Cluster");
    let mut c = cluster_conn(&cluster).await;
    // Cached values on every master (keys spread over the slots), plus one other table's key.
    for i in 0..300 {
        let _: () = c
            .set_ex(format!("{{product:{i}}}"), "stale", 600)
            .await
            .unwrap();
        let _: () = c
            .set_ex(format!("{{listing:{i}}}"), "stale", 600)
            .await
            .unwrap();
    }
    let _: () = c.set_ex("{other:1}", "stale", 600).await.unwrap();

    let mut expected: HashMap<String, Lsn> = HashMap::new();
    let mut records = Vec::new();
    for i in 0..3000u64 {
        let key = format!("product:{}", i % 300);
        let lsn = Lsn(0x7_0000_0000 + i);
        records.push((key.clone(), bus_record(&key, lsn.0)));
        expected.insert(key, lsn);
    }
    let p = producer(&kafka);
    let mut cfg = config(&kafka, &cluster.nodes()[0], "g", &[TOPIC]);
    cfg.redis = RedisConfig::cluster(cluster.seeds());
    cfg.kafka.batch_max_records = 100;

    // First member: half the stream, then it stops (graceful) and a new one takes over.
    let first = Member::start(cfg.clone());
    let half = records.len() / 2;
    produce_all(&p, TOPIC, &records[..half]).await;
    let s1 = first.status.clone();
    wait_for(
        "the first half applied",
        Duration::from_secs(60),
        || async { s1.records_applied() >= half as u64 },
    )
    .await;
    first.stop().await;
    let second = Member::start(cfg);
    produce_all(&p, TOPIC, &records[half..]).await;
    let table_wide = BusRecord {
        key: None,
        patterns: vec!["{listing:*}*".into()],
        commit_lsn: Lsn(0x8_0000_0000),
        commit_time_us: cacheclear_invalidator::now_us(),
        xid: 1,
        table: "public.listing".into(),
        op: Op::Truncate,
    };
    produce(
        &p,
        TOPIC,
        Some(b"public.listing"),
        Some(&table_wide.to_json()),
    )
    .await;
    let s2 = second.status.clone();
    wait_for("the rest applied", Duration::from_secs(60), || async {
        s2.records_applied() >= (records.len() - half + 1) as u64
    })
    .await;

    for (key, lsn) in &expected {
        assert_eq!(
            fence(&mut c, key).await,
            Some(*lsn),
            "{key} has its final fence"
        );
        let cached: bool = c.exists(format!("{{{key}}}")).await.unwrap();
        assert!(!cached, "{key}: the stale value is gone");
    }
    for i in 0..300 {
        assert_eq!(
            fence(&mut c, &format!("listing:{i}")).await,
            Some(Lsn(0x8_0000_0000)),
            "listing:{i} evicted by the table-wide record on whichever master holds it"
        );
    }
    assert_eq!(fence(&mut c, "other:1").await, None);
    second.stop().await;
}
