//! Bus mode (docs/architecture.md, "Bus mode" and "The delivery rule"): the pipeline publishes
//! one record per cache key to a real
//! Kafka-protocol broker (tansu), and confirms an LSN to PostgreSQL only after every record up to
//! it got a successful delivery report.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cacheclear_harness::{KafkaBroker, PgInstance};
use cacheclear_protocol::{BusControl, BusRecord, Lsn, Op};
use cacheclear_rules::Rules;
use cacheclear_sink_kafka::{KafkaConfig, KafkaSink};
use cacheclear_source_postgres::{Pipeline, PostgresConfig, RunOptions};
use common::{
    Process, SCHEMA, current_lsn, product_rules, slot_confirmed, wait_for, wait_streaming,
    write_file,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const WAIT: Duration = Duration::from_secs(60);
const TOPIC: &str = "cacheclear.invalidations";
const PARTITIONS: i32 = 3;

struct BusEnv {
    pg: PgInstance,
    kafka: KafkaBroker,
}

impl BusEnv {
    fn start() -> BusEnv {
        let pg = PgInstance::start().expect("start PostgreSQL");
        pg.psql(SCHEMA).expect("schema");
        let kafka = KafkaBroker::start().expect("start tansu");
        kafka
            .create_topic(TOPIC, PARTITIONS as u32)
            .expect("create topic");
        BusEnv { pg, kafka }
    }

    async fn pg(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.pg.conn_string(), tokio_postgres::NoTls)
            .await
            .expect("connect PostgreSQL");
        tokio::spawn(conn);
        client
    }

    fn pg_config(&self) -> PostgresConfig {
        let mut cfg = PostgresConfig::new(self.pg.url());
        cfg.status_interval_ms = 100;
        cfg
    }

    fn kafka_config(&self) -> KafkaConfig {
        KafkaConfig::new(self.kafka.bootstrap())
    }
}

/// The in-process pipeline with the Kafka sink.
fn spawn_pipeline(pg: PostgresConfig, kafka: KafkaConfig) -> Pipeline {
    let rules = Arc::new(Rules::compile(&product_rules()).expect("rules compile"));
    let sink = KafkaSink::connect(kafka).expect("sink");
    Pipeline::spawn(pg, rules, sink, RunOptions::default())
}

/// One consumed record: Kafka key, partition, value.
#[derive(Debug, Clone)]
struct Consumed {
    kafka_key: String,
    partition: i32,
    record: BusRecord,
}

/// Reads the topic from the beginning (all partitions, no consumer group offsets) until
/// `done(records so far)` holds; panics after `timeout`.
async fn consume_until(
    bootstrap: String,
    timeout: Duration,
    done: impl Fn(&[Consumed]) -> bool + Send + 'static,
) -> Vec<Consumed> {
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "cacheclear-test")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(TOPIC, p, Offset::Beginning)
                .expect("partition");
        }
        consumer.assign(&tpl).expect("assign");
        let start = Instant::now();
        let mut out = Vec::new();
        while !done(&out) {
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?}; records so far: {out:#?}"
            );
            match consumer.poll(Duration::from_millis(100)) {
                // The control records (epoch, watermark) are the bus staleness tests' business.
                Some(Ok(m)) if BusControl::is_control(m.payload().unwrap_or_default()) => {}
                Some(Ok(m)) => {
                    let kafka_key =
                        String::from_utf8(m.key().expect("key").to_vec()).expect("utf-8 Kafka key");
                    let record = BusRecord::from_json(m.payload().expect("value"))
                        .expect("a documented bus record");
                    out.push(Consumed {
                        kafka_key,
                        partition: m.partition(),
                        record,
                    });
                }
                Some(Err(e)) => eprintln!("consumer: {e}"),
                None => {}
            }
        }
        out
    })
    .await
    .expect("consumer task")
}

/// Runs `sql` in one transaction; returns its 32-bit xid and `pg_current_wal_lsn()` before it.
async fn transaction(pg: &tokio_postgres::Client, sql: &str) -> (u32, Lsn) {
    let before = current_lsn(pg).await;
    pg.batch_execute("BEGIN").await.expect("BEGIN");
    pg.batch_execute(sql).await.expect("statement");
    let xid: String = pg
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .expect("xid")
        .get(0);
    pg.batch_execute("COMMIT").await.expect("COMMIT");
    let xid: u64 = xid.parse().expect("xid8 is a number");
    ((xid & 0xFFFF_FFFF) as u32, before)
}

fn keys_at(records: &[Consumed], lsn: Lsn) -> Vec<&Consumed> {
    records
        .iter()
        .filter(|c| c.record.commit_lsn == lsn)
        .collect()
}

/// The records of the transaction that has a record for `key` after `after`.
fn txn_of(records: &[Consumed], key: &str, after: Lsn) -> Option<Lsn> {
    records
        .iter()
        .find(|c| c.record.key.as_deref() == Some(key) && c.record.commit_lsn > after)
        .map(|c| c.record.commit_lsn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_publishes_its_old_and_new_keys_with_the_commit_lsn() {
    let env = BusEnv::start();
    let pg = env.pg().await;
    let mut running = spawn_pipeline(env.pg_config(), env.kafka_config());
    tokio::time::timeout(WAIT, running.streaming())
        .await
        .expect("the pipeline streams in time")
        .expect("the pipeline streams");

    // Product 7 sits in category 1 + 7 % 10 = 8; move it to category 5.
    let (xid, before) = transaction(
        &pg,
        "UPDATE product SET category_id = 5, price_cents = 1 WHERE id = 7",
    )
    .await;
    let records = consume_until(env.kafka.bootstrap(), WAIT, move |r| {
        txn_of(r, "product:7", before).is_some_and(|lsn| keys_at(r, lsn).len() >= 3)
    })
    .await;

    // The new slot's first batch evicted the whole table: one record keyed by the table.
    let table = records
        .iter()
        .find(|c| c.kafka_key == "public.product")
        .expect("the new slot's table-wide eviction");
    assert_eq!(table.record.key, None);
    assert_eq!(table.record.op, Op::Truncate);
    assert!(!table.record.patterns.is_empty(), "{table:?}");

    let lsn = txn_of(&records, "product:7", before).expect("the update's records");
    assert!(lsn > before, "commit LSN {lsn} not after {before}");
    let mut keys: Vec<&str> = keys_at(&records, lsn)
        .iter()
        .map(|c| {
            assert_eq!(c.record.key.as_deref(), Some(c.kafka_key.as_str()), "{c:?}");
            assert_eq!(c.record.table, "public.product", "{c:?}");
            assert_eq!(c.record.op, Op::Update, "{c:?}");
            assert_eq!(c.record.xid, u64::from(xid), "{c:?}");
            assert!(c.record.patterns.is_empty(), "{c:?}");
            assert!(c.record.commit_time_us > 1_700_000_000_000_000, "{c:?}");
            c.kafka_key.as_str()
        })
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["category:5:products", "category:8:products", "product:7"],
        "old and new category keys, the product key once"
    );

    // The source confirms the commit once delivered.
    wait_for("the slot to confirm the update", WAIT, || {
        let pg = &pg;
        async move { slot_confirmed(pg).await >= lsn }
    })
    .await;

    // One cache key, one partition: a second change of product 7 lands where the first did.
    let (_, before2) = transaction(&pg, "UPDATE product SET price_cents = 2 WHERE id = 7").await;
    let records = consume_until(env.kafka.bootstrap(), WAIT, move |r| {
        txn_of(r, "product:7", before2).is_some()
    })
    .await;
    let partitions: std::collections::HashSet<i32> = records
        .iter()
        .filter(|c| c.kafka_key == "product:7")
        .map(|c| c.partition)
        .collect();
    assert_eq!(partitions.len(), 1, "{records:#?}");
    running.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_confirmed_while_the_broker_is_down() {
    let mut env = BusEnv::start();
    let pg = env.pg().await;
    let mut kafka_cfg = env.kafka_config();
    // Short, so the sink fails and the source retries the batch while the broker is down.
    kafka_cfg.message_timeout_ms = 1_500;
    let running = spawn_pipeline(env.pg_config(), kafka_cfg);
    wait_streaming(&pg, WAIT).await;

    env.kafka.stop().expect("stop the broker");
    let (_, before) = transaction(&pg, "UPDATE product SET price_cents = 7 WHERE id = 11").await;
    let (_, _) = transaction(&pg, "UPDATE product SET price_cents = 7 WHERE id = 12").await;
    let written = current_lsn(&pg).await;
    // Several delivery timeouts and retries; heartbeats and keepalives keep flowing meanwhile.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let confirmed_while_down = slot_confirmed(&pg).await;
    assert!(
        confirmed_while_down < written,
        "confirmed {confirmed_while_down} past the unpublished updates (up to {written})"
    );
    assert!(
        running.status().applied_txns() >= 1,
        "the first batch was applied before the outage"
    );

    // The broker comes back empty (memory storage); the source's retry publishes the batch.
    env.kafka.start_again().expect("restart the broker");
    let records = consume_until(env.kafka.bootstrap(), WAIT, move |r| {
        txn_of(r, "product:11", before).is_some() && txn_of(r, "product:12", before).is_some()
    })
    .await;
    let lsn11 = txn_of(&records, "product:11", before).expect("product:11");
    let lsn12 = txn_of(&records, "product:12", before).expect("product:12");
    assert!(lsn11 < lsn12);
    assert!(
        confirmed_while_down < lsn11,
        "confirmed {confirmed_while_down} before delivering the update at {lsn11}"
    );
    wait_for("the slot to confirm after delivery", WAIT, || {
        let pg = &pg;
        async move { slot_confirmed(pg).await >= lsn12 }
    })
    .await;
    running.stop().await.expect("clean stop");
}

fn bus_config(env: &BusEnv, sink: &str, extra: &str) -> String {
    format!(
        r#"[postgres]
url = "{pg}"
status_interval_ms = 100

{sink}

[metrics]
listen = ""

[[rules]]
table = "public.product"
keys = ["product:{{id}}", "category:{{category_id}}:products"]
{extra}
"#,
        pg = env.pg.url(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cacheclear_run_with_sink_kind_kafka_publishes() {
    let env = BusEnv::start();
    let pg = env.pg().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = format!(
        "[sink]\nkind = \"kafka\"\n\n[kafka]\nbrokers = \"{}\"\ntopic = \"{TOPIC}\"\nlinger_ms = 1\n\n[kafka.properties]\n\"compression.type\" = \"none\"",
        env.kafka.bootstrap()
    );
    let config = write_file(dir.path(), "cacheclear.toml", &bus_config(&env, &sink, ""));
    let log = dir.path().join("cacheclear.log");
    let process = Process::run(&config, &log);
    wait_streaming(&pg, WAIT).await;
    let (_, before) = transaction(&pg, "DELETE FROM product WHERE id = 42").await;
    let records = consume_until(env.kafka.bootstrap(), WAIT, move |r| {
        txn_of(r, "product:42", before).is_some_and(|lsn| keys_at(r, lsn).len() >= 2)
    })
    .await;
    let lsn = txn_of(&records, "product:42", before).expect("records");
    let mut keys: Vec<(&str, Op)> = keys_at(&records, lsn)
        .iter()
        .map(|c| (c.kafka_key.as_str(), c.record.op))
        .collect();
    keys.sort_unstable_by_key(|k| k.0);
    // Product 42 sat in category 1 + 42 % 10 = 3.
    assert_eq!(
        keys,
        [
            ("category:3:products", Op::Delete),
            ("product:42", Op::Delete)
        ]
    );
    wait_for("the slot to confirm the delete", WAIT, || {
        let pg = &pg;
        async move { slot_confirmed(pg).await >= lsn }
    })
    .await;
    assert!(
        process.log_text().contains("bus mode"),
        "{}",
        process.log_text()
    );
}

#[test]
fn sink_selection_errors_name_the_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = "[postgres]\nurl = \"postgres://127.0.0.1:1/x\"\n";
    let rules = "[[rules]]\ntable = \"public.product\"\nkeys = [\"product:{id}\"]\n";
    let kafka = "[kafka]\nbrokers = \"127.0.0.1:1\"\n";
    let redis = "[redis]\nurl = \"redis://127.0.0.1:1/\"\n";
    let cases: [(&str, String, &[&str]); 5] = [
        (
            "[kafka] without sink.kind",
            format!("{pg}{kafka}{rules}"),
            &[
                "[kafka] section is set",
                "sink.kind is \"redis\"",
                "kind = \"kafka\"",
            ],
        ),
        (
            "kind = kafka without [kafka]",
            format!("{pg}[sink]\nkind = \"kafka\"\n{rules}"),
            &["kafka: missing [kafka] section"],
        ),
        (
            "kind = kafka with [redis] too",
            format!("{pg}[sink]\nkind = \"kafka\"\n{kafka}{redis}{rules}"),
            &["[redis] section is set", "sink.kind is \"kafka\""],
        ),
        (
            "neither section",
            format!("{pg}{rules}"),
            &["redis: missing [redis] section"],
        ),
        (
            "an unknown kind",
            format!("{pg}[sink]\nkind = \"rabbit\"\n{kafka}{rules}"),
            &["rabbit", "redis", "kafka"],
        ),
    ];
    for (what, text, needles) in cases {
        let path = write_file(dir.path(), "cacheclear.toml", &text);
        let (status, _, stderr) = common::run_to_end(
            common::command(&["run".as_ref(), "--config".as_ref(), path.as_os_str()]),
            Duration::from_secs(30),
        );
        assert!(
            status.is_some_and(|s| !s.success()),
            "{what}: should fail at once ({status:?}): {stderr}"
        );
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{what}: no `{needle}` in:\n{stderr}"
            );
        }
    }
}
