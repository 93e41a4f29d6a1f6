//! The Kafka sink against a real Kafka-protocol broker (tansu, from cacheclear-harness).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cacheclear_harness::KafkaBroker;
use cacheclear_protocol::{Batch, BusRecord, CommittedTxn, KeyArena, Lsn, Op, Sink, TableEviction};
use cacheclear_sink_kafka::{KafkaConfig, KafkaSink};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Reads `n` records (Kafka key, partition, value) of `topic` from the beginning of its
/// `partitions` partitions; panics after `timeout`.
fn consume(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    n: usize,
    timeout: Duration,
) -> Vec<(String, i32, BusRecord)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "sink-test")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            start.elapsed() < timeout,
            "got {} of {n} records within {timeout:?}",
            out.len()
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let key = String::from_utf8(m.key().expect("key").to_vec()).expect("utf-8 key");
                let record = BusRecord::from_json(m.payload().expect("value")).expect("record");
                out.push((key, m.partition(), record));
            }
            Some(Err(e)) => eprintln!("consumer: {e}"),
            None => {}
        }
    }
    out
}

fn txn(
    xid: u32,
    lsn: u64,
    keys: &[(&Arc<str>, Op, &str)],
    tables: Vec<TableEviction>,
) -> CommittedTxn {
    let mut arena = KeyArena::default();
    for (table, op, key) in keys {
        assert!(arena.push(table, *op, key));
    }
    CommittedTxn {
        xid,
        commit_lsn: Lsn(lsn),
        commit_time_us: 1_764_445_200_000_000 + i64::from(xid),
        received_us: 1_764_445_200_000_000 + i64::from(xid),
        keys: arena,
        tables,
        partial: false,
    }
}

fn sink(kafka: &KafkaBroker, topic: &str) -> KafkaSink {
    let mut cfg = KafkaConfig::new(kafka.bootstrap());
    cfg.topic = topic.into();
    cfg.message_timeout_ms = 5_000;
    KafkaSink::connect(cfg).expect("sink")
}

#[tokio::test]
async fn every_key_and_table_eviction_becomes_one_record() {
    let kafka = KafkaBroker::start().expect("start tansu");
    kafka.create_topic("inv", 4).expect("topic");
    let product: Arc<str> = Arc::from("public.product");
    let order: Arc<str> = Arc::from("public.order");
    let batch = Batch {
        txns: vec![
            txn(
                750,
                0x16B_6C50,
                &[
                    (&product, Op::Update, "product:1"),
                    (&product, Op::Update, "category:3:products"),
                    (&order, Op::Insert, "order:9"),
                ],
                vec![],
            ),
            txn(
                751,
                0x16B_6D00,
                &[(&product, Op::Delete, "product:1")],
                vec![TableEviction {
                    table: Arc::clone(&order),
                    op: Op::Truncate,
                    patterns: vec!["{order:*}*".into()],
                }],
            ),
        ],
        ..Batch::default()
    };
    let sink = sink(&kafka, "inv");
    assert_eq!(sink.name(), "kafka");
    sink.apply(&batch).await.expect("apply");
    let bootstrap = kafka.bootstrap();
    let got = tokio::task::spawn_blocking(move || {
        consume(&bootstrap, "inv", 4, 5, Duration::from_secs(30))
    })
    .await
    .expect("consumer task");
    let find = |key: &str, lsn: u64| {
        got.iter()
            .find(|(k, _, r)| k == key && r.commit_lsn == Lsn(lsn))
            .unwrap_or_else(|| panic!("no record for {key} at {lsn:X}: {got:?}"))
    };
    let (_, p1, r) = find("product:1", 0x16B_6C50);
    assert_eq!(r.key.as_deref(), Some("product:1"));
    assert_eq!(
        (r.xid, r.table.as_str(), r.op),
        (750, "public.product", Op::Update)
    );
    assert_eq!(r.commit_time_us, 1_764_445_200_000_750);
    let (_, _, r) = find("category:3:products", 0x16B_6C50);
    assert_eq!((r.table.as_str(), r.op), ("public.product", Op::Update));
    let (_, _, r) = find("order:9", 0x16B_6C50);
    assert_eq!((r.table.as_str(), r.op), ("public.order", Op::Insert));
    let (_, p2, r) = find("product:1", 0x16B_6D00);
    assert_eq!((r.xid, r.op), (751, Op::Delete));
    assert_eq!(p1, p2, "one cache key, one partition");
    let (_, _, r) = find("public.order", 0x16B_6D00);
    assert_eq!(r.key, None);
    assert_eq!(r.patterns, ["{order:*}*"]);
    assert_eq!(r.op, Op::Truncate);
    assert_eq!(got.len(), 5);
}

#[tokio::test]
async fn a_big_transaction_streams_through_a_bounded_window() {
    let kafka = KafkaBroker::start().expect("start tansu");
    kafka.create_topic("bulk", 2).expect("topic");
    let product: Arc<str> = Arc::from("public.product");
    let keys: Vec<String> = (0..20_000).map(|i| format!("product:{i}")).collect();
    let refs: Vec<(&Arc<str>, Op, &str)> = keys
        .iter()
        .map(|k| (&product, Op::Update, k.as_str()))
        .collect();
    let batch = Batch {
        txns: vec![txn(9, 0x100, &refs, vec![])],
        ..Batch::default()
    };
    let mut cfg = KafkaConfig::new(kafka.bootstrap());
    cfg.topic = "bulk".into();
    cfg.max_in_flight = 256;
    let sink = KafkaSink::connect(cfg).expect("sink");
    let started = Instant::now();
    sink.apply(&batch).await.expect("apply");
    eprintln!("20000 records acknowledged in {:?}", started.elapsed());
    let bootstrap = kafka.bootstrap();
    let got = tokio::task::spawn_blocking(move || {
        consume(&bootstrap, "bulk", 2, 20_000, Duration::from_secs(60))
    })
    .await
    .expect("consumer task");
    let distinct: std::collections::HashSet<&str> =
        got.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(distinct.len(), 20_000);
}

#[tokio::test]
async fn a_missing_topic_fails_the_batch_naming_it() {
    let kafka = KafkaBroker::start().expect("start tansu");
    let product: Arc<str> = Arc::from("public.product");
    let batch = Batch {
        txns: vec![txn(1, 0x10, &[(&product, Op::Insert, "product:1")], vec![])],
        ..Batch::default()
    };
    let sink = sink(&kafka, "nosuch");
    let err = tokio::time::timeout(Duration::from_secs(60), sink.apply(&batch))
        .await
        .expect("fails within the message timeout")
        .expect_err("no topic");
    let msg = err.to_string();
    assert!(msg.contains("topic `nosuch`"), "{msg}");
}

#[tokio::test]
async fn a_stopped_broker_fails_the_batch_and_a_restarted_one_takes_it() {
    let mut kafka = KafkaBroker::start().expect("start tansu");
    kafka.create_topic("inv", 1).expect("topic");
    let product: Arc<str> = Arc::from("public.product");
    let batch = Batch {
        txns: vec![txn(1, 0x10, &[(&product, Op::Update, "product:1")], vec![])],
        ..Batch::default()
    };
    let sink = sink(&kafka, "inv");
    sink.apply(&batch).await.expect("first apply");
    kafka.stop().expect("stop");
    let err = tokio::time::timeout(Duration::from_secs(60), sink.apply(&batch))
        .await
        .expect("fails within the message timeout")
        .expect_err("broker down");
    let msg = err.to_string();
    assert!(msg.contains("topic `inv`"), "{msg}");
    kafka.start_again().expect("start again");
    // The new broker has no producer state for us (memory storage): retry like the source does.
    let started = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), sink.apply(&batch)).await {
            Ok(Ok(())) => break,
            Ok(Err(e)) => eprintln!("retrying after: {e}"),
            Err(_) => eprintln!("retrying after a timeout"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "never recovered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let bootstrap = kafka.bootstrap();
    let got = tokio::task::spawn_blocking(move || {
        consume(&bootstrap, "inv", 1, 1, Duration::from_secs(30))
    })
    .await
    .expect("consumer task");
    assert_eq!(got[0].0, "product:1");
}
