//! Debezium PostgreSQL change events (fixtures written from the connector's documented format,
//! "Data change events") through a real broker into real Redis: each event's exact evictions.

mod common;

use std::time::Duration;

use cacheclear_invalidator::{InvalidatorRule, InvalidatorStatus};
use cacheclear_protocol::Lsn;
use common::*;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use serde_json::{Value, json};

const TOPIC: &str = "shop.public.product";
const PH: &str = "__debezium_unavailable_value";

fn payload(op: &str, before: Value, after: Value, lsn: u64) -> Value {
    json!({
        "before": before,
        "after": after,
        "source": {
            "version": "2.7.0.Final", "connector": "postgresql", "name": "shop",
            "ts_ms": 1_764_445_200_000i64, "snapshot": if op == "r" { "true" } else { "false" },
            "db": "shop", "sequence": "[null,\"24023128\"]", "schema": "public", "table": "product",
            "txId": 555, "lsn": lsn, "xmin": null
        },
        "op": op,
        "ts_ms": 1_764_445_200_100i64,
        "transaction": null
    })
}

/// With the JSON converter's schema wrapper (`value.converter.schemas.enable=true`).
fn wrapped(p: Value) -> Vec<u8> {
    let row = json!({"type": "struct", "optional": true, "name": "shop.public.product.Value", "fields": [
        {"type": "int32", "optional": false, "field": "id"},
        {"type": "int32", "optional": true, "field": "category_id"},
        {"type": "string", "optional": false, "field": "name"}]});
    let mut before = row.clone();
    before["field"] = "before".into();
    let mut after = row;
    after["field"] = "after".into();
    serde_json::to_vec(&json!({
        "schema": {"type": "struct", "optional": false, "name": "shop.public.product.Envelope",
                   "fields": [before, after,
                              {"type": "struct", "field": "source", "fields": []},
                              {"type": "string", "optional": false, "field": "op"}]},
        "payload": p
    }))
    .unwrap()
}

fn bare(p: Value) -> Vec<u8> {
    serde_json::to_vec(&p).unwrap()
}

fn key(id: i64) -> Vec<u8> {
    serde_json::to_vec(&json!({"id": id})).unwrap()
}

fn row(id: i64, category: Value) -> Value {
    json!({"id": id, "category_id": category, "name": format!("product {id}")})
}

fn total(s: &InvalidatorStatus) -> u64 {
    s.records_applied() + s.records_skipped() + s.records_dead_lettered()
}

struct Fixture {
    c: redis::aio::MultiplexedConnection,
}

impl Fixture {
    async fn fence(&mut self, k: &str) -> Option<Lsn> {
        fences(&mut self.c, &[k.to_string()]).await[0]
    }

    /// Asserts `evicted` carry fence `lsn` (and no value), and `kept` do not carry it.
    async fn check(&mut self, step: &str, lsn: u64, evicted: &[&str], kept: &[&str]) {
        for k in evicted {
            assert_eq!(
                self.fence(k).await,
                Some(Lsn(lsn)),
                "{step}: {k} evicted with fence {lsn}"
            );
            assert_eq!(
                values_exist(&mut self.c, &[k.to_string()]).await,
                [false],
                "{step}: {k} value gone"
            );
        }
        for k in kept {
            assert_ne!(
                self.fence(k).await,
                Some(Lsn(lsn)),
                "{step}: {k} must not be evicted"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_events_evict_exactly_their_keys() {
    let kafka = broker();
    kafka.create_topic(TOPIC, 1).unwrap();
    kafka.create_topic(DLQ, 1).unwrap();
    let redis = redis();
    let mut c = redis_conn(&redis).await;
    let cached: Vec<String> = [
        "product:1",
        "product:2",
        "product:3",
        "product:4",
        "product:10",
        "product:11",
        "other:1",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain((1..=9).map(|i| format!("category:{i}:products")))
    .collect();
    fill_values(&mut c, &cached, "stale").await;
    let mut f = Fixture { c };

    let mut cfg = config(&kafka, &redis, "dbz", &[]);
    cfg.kafka.topics.clear();
    cfg.kafka.debezium_topics = vec![TOPIC.into()];
    // Some events come without their schema: the template columns' types are declared.
    cfg.rules = vec![
        InvalidatorRule::new(
            "public.product",
            vec![
                "product:{id}".into(),
                "category:{category_id}:products".into(),
            ],
        )
        .with_type("id", "integer")
        .with_type("category_id", "integer"),
    ];
    let member = Member::start(cfg);
    let s = member.status.clone();
    let p = producer(&kafka);
    let mut sent = 0u64;
    macro_rules! send {
        ($key:expr, $value:expr) => {{
            produce(&p, TOPIC, $key, $value).await;
            sent += 1;
            let want = sent;
            wait_for(
                "the record to be handled",
                Duration::from_secs(60),
                || async { total(&s) >= want },
            )
            .await;
        }};
    }

    // INSERT (bare JSON): the new row's keys.
    send!(
        Some(&key(1)),
        Some(&bare(payload("c", Value::Null, row(1, 3.into()), 100)))
    );
    f.check(
        "insert",
        100,
        &["product:1", "category:3:products"],
        &["product:2", "category:4:products", "other:1"],
    )
    .await;

    // UPDATE moving product 2 from category 3 to 4 (schema wrapper): old and new keys.
    send!(
        Some(&key(2)),
        Some(&wrapped(payload(
            "u",
            row(2, 3.into()),
            row(2, 4.into()),
            200
        )))
    );
    f.check(
        "update",
        200,
        &["product:2", "category:3:products", "category:4:products"],
        &["product:1", "category:5:products"],
    )
    .await;

    // Primary-key change 10 → 11: a delete of the old key, its tombstone, a create of the new.
    send!(
        Some(&key(10)),
        Some(&wrapped(payload("d", row(10, 5.into()), Value::Null, 300)))
    );
    f.check(
        "pk change (delete)",
        300,
        &["product:10", "category:5:products"],
        &["product:11"],
    )
    .await;
    send!(Some(&key(10)), None);
    send!(
        Some(&key(11)),
        Some(&wrapped(payload("c", Value::Null, row(11, 5.into()), 301)))
    );
    f.check(
        "pk change (create)",
        301,
        &["product:11", "category:5:products"],
        &["product:10"],
    )
    .await;
    assert_eq!(
        s.records_skipped(),
        1,
        "the tombstone is acknowledged and skipped"
    );

    // DELETE + tombstone: the old row's keys.
    send!(
        Some(&key(3)),
        Some(&bare(payload("d", row(3, 6.into()), Value::Null, 400)))
    );
    send!(Some(&key(3)), None);
    f.check(
        "delete",
        400,
        &["product:3", "category:6:products"],
        &["product:4", "category:7:products"],
    )
    .await;

    // UPDATE with an unchanged TOASTed key column, old image present: the old value is used,
    // the placeholder never becomes a key.
    send!(
        Some(&key(4)),
        Some(&bare(payload(
            "u",
            row(4, 7.into()),
            row(4, PH.into()),
            450
        )))
    );
    f.check(
        "toast with old image",
        450,
        &["product:4", "category:7:products"],
        &["product:1", "category:8:products"],
    )
    .await;
    assert_eq!(f.fence(&format!("category:{PH}:products")).await, None);
    assert_eq!(
        f.fence("category:__debezium_unavailable_value:products")
            .await,
        None
    );

    // Same without an old image (REPLICA IDENTITY DEFAULT): keys unknown → table-wide eviction.
    send!(
        Some(&key(4)),
        Some(&bare(payload("u", Value::Null, row(4, PH.into()), 500)))
    );
    f.check(
        "toast without old image",
        500,
        &[
            "product:1",
            "product:2",
            "product:4",
            "category:1:products",
            "category:9:products",
        ],
        &["other:1"],
    )
    .await;

    // Snapshot read: the row's keys (debezium.evict_on_snapshot defaults to true).
    send!(
        Some(&key(20)),
        Some(&bare(payload("r", Value::Null, row(20, 9.into()), 550)))
    );
    f.check(
        "snapshot read",
        550,
        &["product:20", "category:9:products"],
        &["product:1"],
    )
    .await;

    // Malformed: an update without `after`, and bytes that are not JSON → dead-letter topic.
    let no_after = bare(payload("u", row(5, 1.into()), Value::Null, 560));
    send!(Some(&key(5)), Some(&no_after));
    send!(None, Some(b"{not json"));
    assert_eq!(s.records_dead_lettered(), 2);

    // TRUNCATE: every key of the table's templates, nothing else.
    send!(
        None,
        Some(&wrapped(payload("t", Value::Null, Value::Null, 600)))
    );
    f.check(
        "truncate",
        600,
        &[
            "product:1",
            "product:20",
            "product:11",
            "category:2:products",
            "category:9:products",
        ],
        &["other:1"],
    )
    .await;
    assert_eq!(
        values_exist(&mut f.c, &["other:1".to_string()]).await,
        [true],
        "keys of other tables are untouched"
    );

    // The dead letters carry the original record and the reason.
    let dlq: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("group.id", "dlq-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    dlq.subscribe(&[DLQ]).unwrap();
    let mut letters = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(30), dlq.recv())
            .await
            .expect("a dead letter within 30 s")
            .expect("dead letter");
        let headers = m.headers().expect("headers");
        let header = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        letters.push((
            m.payload().map(<[u8]>::to_vec),
            header("cacheclear.dlq.reason").expect("reason header"),
            header("cacheclear.dlq.topic"),
            header("cacheclear.dlq.offset"),
        ));
    }
    assert_eq!(letters[0].0.as_deref(), Some(no_after.as_slice()));
    assert!(
        letters[0].1.contains("without an `after`"),
        "{}",
        letters[0].1
    );
    assert_eq!(letters[0].2.as_deref(), Some(TOPIC));
    assert_eq!(letters[1].0.as_deref(), Some(&b"{not json"[..]));
    assert!(letters[1].1.contains("not JSON"), "{}", letters[1].1);

    member.stop().await;
    // The group committed past the malformed records (after their dead-letter produce).
    assert_eq!(committed(&kafka, "dbz", TOPIC, 1), vec![sent as i64]);
}
