//! Fixtures of the invalidator tests: a real Kafka-protocol broker (tansu), real Redis, a
//! producer and an in-process invalidator; the workspace's shared test kit
//! (`cacheclear_harness::fixtures`: rules, `wait_for`, Redis helpers) is re-exported.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

// The shared test kit; not every test uses all of it.
#[allow(unused_imports)]
pub use cacheclear_harness::fixtures::{
    cluster_conn, fence, fences, fill_values, product_rules, redis_conn, values_exist, wait_for,
};
use cacheclear_harness::{KafkaBroker, RedisInstance};
use cacheclear_invalidator::{
    InvalidatorConfig, InvalidatorError, InvalidatorStatus, KafkaConfig, RunOptions,
};
use cacheclear_protocol::{BusRecord, Lsn, Op};
use cacheclear_rules::Rules;
use cacheclear_sink_redis::RedisConfig;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

pub const DLQ: &str = "cacheclear.dlq";

pub fn broker() -> KafkaBroker {
    KafkaBroker::start().expect("start the Kafka broker (tansu)")
}

pub fn redis() -> RedisInstance {
    RedisInstance::start().expect("start Redis")
}

pub fn config(
    kafka: &KafkaBroker,
    redis: &RedisInstance,
    group: &str,
    topics: &[&str],
) -> InvalidatorConfig {
    let mut k = KafkaConfig::new(
        kafka.bootstrap(),
        group,
        topics.iter().map(|t| t.to_string()).collect(),
        DLQ,
    );
    // Quick rebalances in tests.
    k.properties
        .insert("session.timeout.ms".into(), "6000".into());
    k.properties
        .insert("heartbeat.interval.ms".into(), "500".into());
    InvalidatorConfig::new(k, RedisConfig::new(redis.url())).with_rules(product_rules())
}

/// A producer sending every record as its own record batch. tansu 0.6.0 serves a fetch that
/// starts inside a multi-record batch from the *next* batch on (checked: 1000 records produced in
/// batches, a fetch from offset 300 returns offsets 562…), so a consumer resuming from a committed
/// offset in mid-batch would never see the rest of that batch. Real Kafka returns the whole batch
/// and the client skips the records before the offset. One record per batch keeps every offset a
/// batch boundary, so the tests measure the invalidator, not that broker defect.
pub fn producer(kafka: &KafkaBroker) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("acks", "all")
        .set("batch.num.messages", "1")
        .set("linger.ms", "0")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer")
}

/// Produces one record; returns `(partition, offset)` from its delivery report (tansu's offsets
/// there are not reliable: count records instead).
pub async fn produce(
    p: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> (i32, i64) {
    let mut r: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
    if let Some(k) = key {
        r = r.key(k);
    }
    if let Some(v) = value {
        r = r.payload(v);
    }
    let d = p
        .send(r, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
    (d.partition, d.offset)
}

/// Produces many records, up to 1000 in flight (per-key order does not matter: fences take the
/// max).
/// Returns the number of records per partition they went to (the log end on a fresh topic).
pub async fn produce_all(
    p: &FutureProducer,
    topic: &str,
    records: &[(String, Vec<u8>)],
) -> HashMap<i32, i64> {
    let mut ends = HashMap::new();
    for chunk in records.chunks(1000) {
        let mut deliveries = Vec::with_capacity(chunk.len());
        for (k, v) in chunk {
            let r: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic)
                .key(k.as_str())
                .payload(v.as_slice());
            deliveries.push(p.send_result(r).map_err(|(e, _)| e).expect("enqueue"));
        }
        for d in deliveries {
            let d = d
                .await
                .expect("delivery future")
                .map_err(|(e, _)| e)
                .expect("produce");
            // Count, not offset: on a fresh topic offsets run 0, 1, 2… per partition, so the log
            // end is the count (tansu's reported offsets are not reliable).
            *ends.entry(d.partition).or_insert(0) += 1;
        }
    }
    ends
}

pub fn bus_record(key: &str, lsn: u64) -> Vec<u8> {
    BusRecord {
        key: Some(key.into()),
        patterns: vec![],
        commit_lsn: Lsn(lsn),
        commit_time_us: cacheclear_invalidator::now_us(),
        xid: 1,
        table: "public.product".into(),
        op: Op::Update,
    }
    .to_json()
}

/// A running in-process invalidator; stopped gracefully with [`Member::stop`], or abandoned
/// (task aborted: like a crash, nothing more is committed) when dropped.
pub struct Member {
    pub status: Arc<InvalidatorStatus>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), InvalidatorError>>>,
}

impl Member {
    pub fn start(cfg: InvalidatorConfig) -> Member {
        let rules = Arc::new(cfg.validate().expect("valid config"));
        let options = RunOptions::default();
        let status = Arc::clone(&options.status);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            cacheclear_invalidator::run(&cfg, rules, options, async {
                let _ = rx.await;
            })
            .await
        });
        Member {
            status,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("invalidator stops within 30 s")
                .expect("task")
                .expect("invalidator ran without error");
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The group's committed offset per partition of `topic` (`-1001` = none).
pub fn committed(kafka: &KafkaBroker, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    cacheclear_harness::fixtures::committed_offsets(&kafka.bootstrap(), group, topic, partitions)
        .into_iter()
        .map(|o| o.unwrap_or(-1001))
        .collect()
}

/// Log ends per partition (`0..partitions`) from delivery reports gathered by the tests (tansu's
/// in-memory storage does not report high watermarks that match the offsets it assigns).
pub fn ends_vec(ends: &HashMap<i32, i64>, partitions: i32) -> Vec<i64> {
    (0..partitions)
        .map(|p| ends.get(&p).copied().unwrap_or(-1001))
        .collect()
}

/// Adds the counts `more` to `ends`.
pub fn merge_ends(ends: &mut HashMap<i32, i64>, more: HashMap<i32, i64>) {
    for (p, n) in more {
        *ends.entry(p).or_insert(0) += n;
    }
}

/// Compiled product rules (for expected keys).
pub fn rules() -> Rules {
    Rules::compile(&product_rules()).expect("rules")
}
