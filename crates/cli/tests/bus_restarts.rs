//! Bus mode end to end under SIGKILL: `cacheclear run` (Kafka sink, 4 partitions) → two
//! `cacheclear invalidate` members with static group membership (`kafka.instance_id`) → Redis,
//! while rows change; members and the source are killed with SIGKILL mid-stream and restarted at
//! once, as a supervisor would. Every changed row's key must carry the fence of its last change,
//! and the group must have committed every partition to its end (real PostgreSQL, tansu, Redis).

mod common;

use std::time::{Duration, Instant};

use cacheclear_harness::fixtures::fences;
use cacheclear_harness::{KafkaBroker, PgInstance, RedisInstance};
use cacheclear_protocol::Lsn;
use common::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

const TOPIC: &str = "cacheclear.invalidations";
const DLQ: &str = "cacheclear.dlq";
const PARTITIONS: i32 = 4;
const GROUP: &str = "members";
const ROWS: i32 = 500;

fn run_config(pg: &PgInstance, kafka: &KafkaBroker) -> String {
    format!(
        r#"[postgres]
url = "{pg}"
status_interval_ms = 100

[sink]
kind = "kafka"

[kafka]
brokers = "{brokers}"
topic = "{TOPIC}"
linger_ms = 1

# One record per produce batch: tansu 0.6.0 serves a fetch that starts inside a multi-record
# batch from the next batch on, so a member resuming mid-batch after a kill would skip records
# (a broker defect; crates/invalidator/tests/common/mod.rs).
[kafka.properties]
"batch.num.messages" = "1"

[metrics]
listen = ""

[[rules]]
table = "public.product"
keys = ["product:{{id}}"]
"#,
        pg = pg.url(),
        brokers = kafka.bootstrap(),
    )
}

fn member_config(kafka: &KafkaBroker, redis: &RedisInstance, instance: &str) -> String {
    format!(
        r#"[kafka]
brokers = "{brokers}"
group_id = "{GROUP}"
topics = ["{TOPIC}"]
dead_letter_topic = "{DLQ}"
instance_id = "{instance}"
commit_interval_ms = 50

[kafka.properties]
"session.timeout.ms" = "10000"
"heartbeat.interval.ms" = "500"

[redis]
url = "{redis}"

[metrics]
listen = ""
"#,
        brokers = kafka.bootstrap(),
        redis = redis.url(),
    )
}

/// The group's committed offset and the log end offset per partition.
fn progress(kafka: &KafkaBroker) -> Vec<(i64, i64)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .create()
        .expect("consumer");
    committed(&kafka.bootstrap(), GROUP, TOPIC, PARTITIONS)
        .into_iter()
        .zip(0..)
        .map(|(at, p)| {
            let (_, high) = c
                .fetch_watermarks(TOPIC, p, Duration::from_secs(10))
                .expect("watermarks");
            (at.max(0), high)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_and_the_source_killed_mid_stream_lose_nothing() {
    let pg = PgInstance::start().expect("PostgreSQL");
    pg.psql(&format!(
        "CREATE TABLE product (id int PRIMARY KEY, price int NOT NULL);
         INSERT INTO product SELECT g, 100 FROM generate_series(1, {ROWS}) g;"
    ))
    .expect("schema");
    let kafka = KafkaBroker::start().expect("tansu");
    kafka.create_topic(TOPIC, PARTITIONS as u32).expect("topic");
    kafka.create_topic(DLQ, 1).expect("dead-letter topic");
    let redis = RedisInstance::start().expect("Redis");
    let dir = tempfile::tempdir().expect("tempdir");
    let run_cfg = write_file(dir.path(), "run.toml", &run_config(&pg, &kafka));
    let inv = [
        write_file(
            dir.path(),
            "inv1.toml",
            &member_config(&kafka, &redis, "inv1"),
        ),
        write_file(
            dir.path(),
            "inv2.toml",
            &member_config(&kafka, &redis, "inv2"),
        ),
    ];
    let logs = [
        dir.path().join("run.log"),
        dir.path().join("inv1.log"),
        dir.path().join("inv2.log"),
    ];
    let mut source = Process::run(&run_cfg, &logs[0]);
    let mut members = [
        Process::invalidate(&inv[0], &logs[1]),
        Process::invalidate(&inv[1], &logs[2]),
    ];
    let (client, conn) = tokio_postgres::connect(&pg.conn_string(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    wait_streaming(&client, Duration::from_secs(60)).await;

    // Updates at about 200 per second for 12 s; for each row, the WAL position before its last
    // update (that update's commit ends after it, so its fence must be at least this).
    let mut last_before: std::collections::HashMap<i32, Lsn> = Default::default();
    let start = Instant::now();
    let kills = [
        (1_500, "inv1"),
        (3_000, "inv2"),
        (4_000, "source"),
        (4_500, "inv1"),
        (6_000, "inv2"),
        (7_500, "inv1"),
        (8_000, "source"),
        (9_000, "inv2"),
        (10_500, "inv1"),
    ];
    let mut next_kill = 0;
    let mut i: i64 = 0;
    while start.elapsed() < Duration::from_secs(12) {
        let id = (i * 7919 % ROWS as i64) as i32 + 1;
        let before = current_lsn(&client).await;
        client
            .execute("UPDATE product SET price = price + 1 WHERE id = $1", &[&id])
            .await
            .expect("update");
        last_before.insert(id, before);
        i += 1;
        if let Some((at_ms, who)) = kills.get(next_kill)
            && start.elapsed() >= Duration::from_millis(*at_ms)
        {
            next_kill += 1;
            match *who {
                "source" => {
                    source.kill();
                    source = Process::run(&run_cfg, &logs[0]);
                }
                member => {
                    let n = if member == "inv1" { 0 } else { 1 };
                    members[n].kill();
                    members[n] = Process::invalidate(&inv[n], &logs[n + 1]);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(next_kill, kills.len(), "every kill happened");
    eprintln!(
        "{i} updates of {} rows, {} kills",
        last_before.len(),
        kills.len()
    );

    // Every changed row's key carries at least the fence of its last update.
    let mut r = redis::Client::open(redis.url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis");
    let ids: Vec<i32> = last_before.keys().copied().collect();
    let keys: Vec<String> = ids.iter().map(|id| format!("product:{id}")).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let missing: Vec<i32> = loop {
        let got = fences(&mut r, &keys).await;
        let missing: Vec<i32> = ids
            .iter()
            .zip(&got)
            .filter(|(id, f)| f.is_none_or(|f| f < last_before[*id]))
            .map(|(id, _)| *id)
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        missing.is_empty(),
        "{} of {} changed rows were never invalidated after their last change (e.g. {:?}); group progress {:?}",
        missing.len(),
        ids.len(),
        &missing[..missing.len().min(10)],
        progress(&kafka)
    );
    // And the group committed every partition to its end.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = progress(&kafka);
        if p.iter().all(|(at, high)| at >= high) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "partitions not committed to their end: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for m in &mut members {
        assert!(m.exited().is_none(), "members keep running");
    }
}
