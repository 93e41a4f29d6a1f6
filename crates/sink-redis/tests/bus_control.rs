//! The bus control records' scripts (`OPEN_EPOCH_LUA` with an `open` id, `BUS_WATERMARK_LUA`)
//! as the invalidator applies them, on a real 3-master Redis Cluster: the namespace's keys share
//! one slot, the epoch opens once per `open` whatever the number of copies, the watermark waits
//! for every partition and takes the smallest LSN, records of an earlier open are ignored, and a
//! lost epoch is reopened in place.

use cacheclear_harness::RedisCluster;
use cacheclear_harness::fixtures::{self, cluster_conn};
use cacheclear_protocol::{Lsn, NamespaceLayout, Watermark};
use cacheclear_sink_redis::{BusWatermark, BusWatermarkOutcome, RedisConfig, RedisSink};

const NS: &str = "shop";
const ORIGIN: &str = "7301/00000001";

fn record(open: u64, lsn: u64, commit_time_us: i64) -> BusWatermark<'static> {
    BusWatermark {
        open,
        origin: ORIGIN,
        lsn: Lsn(lsn),
        commit_time_us,
        lag_ms: 3,
        partitions: 2,
    }
}

fn now_us() -> i64 {
    cacheclear_protocol::now_us()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_records_open_once_and_the_watermark_takes_the_smallest_partition() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3, 0))
        .await
        .expect("join")
        .expect("start the Redis Cluster");
    let sink = RedisSink::connect(RedisConfig::cluster(cluster.seeds())).expect("cluster sink");
    let conn = cluster_conn(&cluster).await;
    let ns = NamespaceLayout::new(NS).expect("namespace");
    let get = |key: String| {
        let mut conn = conn.clone();
        async move { fixtures::get(&mut conn, &key).await }
    };

    // The epoch record of open 100 (new slot) arrives on both partitions: one bump.
    let first = sink
        .apply_bus_epoch(NS, ORIGIN, Some("new_slot"), false, 100)
        .await
        .expect("epoch record, partition 0");
    assert_eq!(first.bumped.as_deref(), Some("new_slot"));
    let copy = sink
        .apply_bus_epoch(NS, ORIGIN, Some("new_slot"), false, 100)
        .await
        .expect("epoch record, partition 1");
    assert_eq!(
        copy.bumped, None,
        "the copy on the other partition changes nothing"
    );
    assert_eq!(copy.epoch, first.epoch);
    assert_eq!(get(ns.opened()).await.as_deref(), Some("100"));

    // Partition 0 reports first: nothing written until partition 1 has reported too.
    let t = now_us();
    let p0 = sink
        .apply_bus_watermark(NS, &record(100, 0x30, t), 0)
        .await
        .expect("watermark, partition 0");
    assert_eq!(p0.outcome, BusWatermarkOutcome::Pending);
    assert_eq!(get(ns.watermark()).await, None);
    let p1 = sink
        .apply_bus_watermark(NS, &record(100, 0x20, t - 5_000_000), 1)
        .await
        .expect("watermark, partition 1");
    // The smaller LSN wins, with its commit time: 5 s behind Redis's clock.
    let BusWatermarkOutcome::Written { lag_ms } = p1.outcome else {
        panic!("{p1:?}")
    };
    assert!((4_900..60_000).contains(&lag_ms), "lag {lag_ms} ms");
    let w = Watermark::parse(&get(ns.watermark()).await.expect("watermark")).expect("parse");
    assert_eq!((w.lsn, w.epoch, w.lag_ms), (Lsn(0x20), first.epoch, lag_ms));
    assert_eq!(w.commit_time_us, t - 5_000_000);

    // Partition 1 catches up: the watermark moves to partition 0's LSN; the source's own lag
    // counts when the commit is fresh.
    let p1 = sink
        .apply_bus_watermark(NS, &record(100, 0x40, now_us()), 1)
        .await
        .expect("watermark");
    assert!(matches!(
        p1.outcome,
        BusWatermarkOutcome::Written { lag_ms } if lag_ms < 4_900
    ));
    let w = Watermark::parse(&get(ns.watermark()).await.expect("watermark")).expect("parse");
    assert_eq!(w.lsn, Lsn(0x30));

    // The source restarts without a gap (open 200): no bump, the progress starts afresh, and a
    // lagging partition's record of open 100 is ignored.
    let reopened = sink
        .apply_bus_epoch(NS, ORIGIN, None, false, 200)
        .await
        .expect("epoch record of open 200");
    assert_eq!((reopened.epoch, reopened.bumped), (first.epoch, None));
    let late = sink
        .apply_bus_watermark(NS, &record(100, 0x50, now_us()), 0)
        .await
        .expect("late record");
    assert_eq!(late.outcome, BusWatermarkOutcome::EarlierOpen);
    let p0 = sink
        .apply_bus_watermark(NS, &record(200, 0x28, now_us()), 0)
        .await
        .expect("watermark of open 200");
    assert_eq!(p0.outcome, BusWatermarkOutcome::Pending);

    // Another origin without continuity bumps; a stale open's epoch record does not either way.
    let moved = sink
        .apply_bus_epoch(NS, "9999/00000002", None, false, 300)
        .await
        .expect("epoch record, another origin");
    assert_eq!(moved.bumped.as_deref(), Some("origin_changed"));
    assert!(moved.epoch > first.epoch);
    assert_eq!(
        get(ns.watermark()).await,
        None,
        "a bump deletes the watermark"
    );

    // Redis loses the epoch: the next watermark record reopens it in place (at Redis TIME in
    // ms, so past every earlier epoch once a millisecond has passed).
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let _: () = redis::cmd("DEL")
        .arg(ns.epoch())
        .query_async(&mut conn.clone())
        .await
        .expect("DEL");
    let reopened = sink
        .apply_bus_watermark(NS, &record(300, 0x60, now_us()), 0)
        .await
        .expect("watermark after the loss");
    assert_eq!(reopened.bumped.as_deref(), Some("epoch_missing"));
    assert_eq!(reopened.outcome, BusWatermarkOutcome::Pending);
    let epoch: u64 = get(ns.epoch())
        .await
        .expect("a new epoch")
        .parse()
        .expect("integer");
    assert!(epoch > moved.epoch, "{epoch} after {}", moved.epoch);

    // Interleaved starts on another namespace: start 500 (a new slot) and start 600 (a plain
    // restart) each send a copy per partition; partition 1 lags. Partition 0 delivers 500 then
    // 600; partition 1's late copy of 500 is covered by the bump already made for it: one bump.
    let ns2 = "shop2";
    let a = sink
        .apply_bus_epoch(ns2, ORIGIN, Some("new_slot"), false, 500)
        .await
        .expect("500 on p0");
    assert_eq!(a.bumped.as_deref(), Some("new_slot"));
    let b = sink
        .apply_bus_epoch(ns2, ORIGIN, None, false, 600)
        .await
        .expect("600 on p0");
    assert_eq!(b.bumped, None);
    let late = sink
        .apply_bus_epoch(ns2, ORIGIN, Some("new_slot"), false, 500)
        .await
        .expect("500 on p1");
    assert_eq!(
        (late.epoch, late.bumped),
        (a.epoch, None),
        "a gap already covered is not bumped again"
    );
    let opened = NamespaceLayout::new(ns2).expect("namespace").opened();
    assert_eq!(get(opened.clone()).await.as_deref(), Some("600"));
    // Partition 0 delivers start 800 (plain) before partition 1 delivers start 700 (a lost
    // slot): 700's gap is not covered by any bump, so it bumps — without taking `opened` back.
    let c = sink
        .apply_bus_epoch(ns2, ORIGIN, None, false, 800)
        .await
        .expect("800 on p0");
    assert_eq!(c.bumped, None);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let d = sink
        .apply_bus_epoch(ns2, ORIGIN, Some("slot_lost"), false, 700)
        .await
        .expect("700 on p1");
    assert_eq!(d.bumped.as_deref(), Some("slot_lost"));
    assert!(d.epoch > c.epoch);
    assert_eq!(get(opened.clone()).await.as_deref(), Some("800"));
    let again = sink
        .apply_bus_epoch(ns2, ORIGIN, Some("slot_lost"), false, 700)
        .await
        .expect("700 on p0");
    assert_eq!(again.bumped, None, "bumped once for 700");
}

/// Everything the invalidator asks of Redis — the start-up check, the bus epoch and watermark
/// records, key evictions and table-wide (SCAN) evictions on every master — as an ACL user with
/// exactly README's rules, on a 3-master cluster; and nothing more is allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invalidators_acl_rules_suffice_on_a_cluster() {
    use cacheclear_harness::RedisOptions;
    use cacheclear_harness::fixtures::{CLUSTER_ACL_EXTRA, INVALIDATOR_ACL_EXTRA, PIPELINE_ACL};
    // README's rules for `cacheclear invalidate`, with its Redis Cluster addition.
    let rules = [PIPELINE_ACL, INVALIDATOR_ACL_EXTRA, CLUSTER_ACL_EXTRA].concat();
    let cluster = tokio::task::spawn_blocking(move || {
        RedisCluster::start_with(
            3,
            0,
            RedisOptions::default().password("admin-Secret-1").acl_user(
                "invalidator",
                "inv-Secret-2",
                &rules,
            ),
        )
    })
    .await
    .expect("join")
    .expect("start the Redis Cluster with an ACL user");
    let seeds: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| n.url_as("invalidator", "inv-Secret-2"))
        .collect();
    let sink = RedisSink::connect(RedisConfig::cluster(seeds.clone())).expect("cluster sink");
    sink.check()
        .await
        .expect("the start-up check as the ACL user");
    let admin = cluster_conn(&cluster).await;
    let get = |key: String| {
        let mut conn = admin.clone();
        async move { fixtures::get(&mut conn, &key).await }
    };
    let ns = NamespaceLayout::new(NS).expect("namespace");

    let opened = sink
        .apply_bus_epoch(NS, ORIGIN, Some("new_slot"), false, 100)
        .await
        .expect("the epoch record as the ACL user");
    assert_eq!(opened.bumped.as_deref(), Some("new_slot"));
    for partition in [0, 1] {
        sink.apply_bus_watermark(NS, &record(100, 0x30, now_us()), partition)
            .await
            .expect("a watermark record as the ACL user");
    }
    let w = Watermark::parse(&get(ns.watermark()).await.expect("watermark")).expect("parse");
    assert_eq!((w.lsn, w.epoch), (Lsn(0x30), opened.epoch));

    // Values on every master (keys spread over the slots), evicted by key and by pattern.
    let mut conn = admin.clone();
    let keys: Vec<String> = (0..30).map(|i| format!("product:{i}")).collect();
    for key in &keys {
        let _: () = redis::cmd("SET")
            .arg(format!("{{{key}}}"))
            .arg("cached")
            .query_async(&mut conn)
            .await
            .expect("SET");
    }
    let n = sink
        .invalidate(keys[..10].iter().map(|k| (k.as_str(), Lsn(0x31))))
        .await
        .expect("key evictions as the ACL user");
    assert_eq!(n, 10);
    sink.invalidate_matching(&["{product:*}*".to_owned()], Lsn(0x32))
        .await
        .expect("table-wide eviction (SCAN on every master) as the ACL user");
    for key in &keys {
        assert_eq!(get(format!("{{{key}}}")).await, None, "{key} evicted");
    }
    assert_eq!(
        get("{product:20}:fence".to_owned()).await.as_deref(),
        Some(Lsn(0x32).to_fixed_hex().as_str())
    );

    // Nothing beyond the list.
    let mut user = redis::Client::open(seeds[0].as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect as the ACL user");
    for args in [
        &["FLUSHALL"][..],
        &["CLUSTER", "INFO"],
        &["CONFIG", "GET", "*"],
        &["KEYS", "*"],
    ] {
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        let e = c
            .query_async::<redis::Value>(&mut user)
            .await
            .expect_err("refused");
        assert!(
            e.to_string().to_lowercase().contains("noperm"),
            "{args:?}: {e}"
        );
    }
}
