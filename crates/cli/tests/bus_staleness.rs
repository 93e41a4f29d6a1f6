//! Staleness stays bounded in bus mode (issue 10): `cacheclear run` (Kafka sink, 2 partitions) →
//! tansu → `cacheclear invalidate` → Redis, read by a client with the staleness breaker on the
//! namespace. The source sends epoch and watermark control records to every partition; the
//! invalidator applies them (docs/architecture.md, "Watermark and epoch in bus mode"). Real
//! PostgreSQL, tansu and Redis, real processes killed with SIGKILL.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cacheclear_client::{Client, Config, StalenessConfig};
use cacheclear_harness::{KafkaBroker, PgInstance, RedisInstance};
use cacheclear_protocol::{NamespaceLayout, Watermark};
use common::*;

const TOPIC: &str = "cacheclear.invalidations";
const DLQ: &str = "cacheclear.dlq";
const PARTITIONS: u32 = 2;
const OLD: i64 = 1005;
const NEW: i64 = 1;
const MAX_STALENESS_MS: u64 = 1_500;
const REFRESH_MS: u64 = 100;
/// Generous: tansu has been seen taking up to a minute before a new member's first fetch
/// returns records (issue 19).
const FIRST: Duration = Duration::from_secs(180);

struct Bus {
    pg: PgInstance,
    kafka: KafkaBroker,
    redis: RedisInstance,
    dir: tempfile::TempDir,
}

impl Bus {
    fn start() -> Bus {
        let pg = PgInstance::start().expect("PostgreSQL");
        pg.psql(SCHEMA).expect("schema");
        let kafka = KafkaBroker::start().expect("tansu");
        kafka.create_topic(TOPIC, PARTITIONS).expect("topic");
        kafka.create_topic(DLQ, 1).expect("dead-letter topic");
        let redis = RedisInstance::start().expect("Redis");
        let dir = tempfile::tempdir().expect("tempdir");
        Bus {
            pg,
            kafka,
            redis,
            dir,
        }
    }

    fn source(&self) -> Process {
        let cfg = format!(
            r#"[postgres]
url = "{pg}"
status_interval_ms = 100
watermark_interval_ms = 200

[sink]
kind = "kafka"

[kafka]
brokers = "{brokers}"
topic = "{TOPIC}"
linger_ms = 1

# One record per produce batch (tansu 0.6.0 skips the rest of a batch a fetch starts inside;
# crates/invalidator/tests/common/mod.rs).
[kafka.properties]
"batch.num.messages" = "1"

[metrics]
listen = ""

[[rules]]
table = "public.product"
keys = ["product:{{id}}"]
"#,
            pg = self.pg.url(),
            brokers = self.kafka.bootstrap(),
        );
        let path = write_file(self.dir.path(), "run.toml", &cfg);
        Process::run(&path, &self.dir.path().join("run.log"))
    }

    fn invalidator(&self) -> Process {
        let cfg = format!(
            r#"[kafka]
brokers = "{brokers}"
group_id = "bus-staleness"
topics = ["{TOPIC}"]
dead_letter_topic = "{DLQ}"
instance_id = "bus-staleness-1"
commit_interval_ms = 50

[kafka.properties]
"session.timeout.ms" = "10000"
"heartbeat.interval.ms" = "500"

[redis]
url = "{redis}"

[metrics]
listen = ""
"#,
            brokers = self.kafka.bootstrap(),
            redis = self.redis.url(),
        );
        let path = write_file(self.dir.path(), "inv.toml", &cfg);
        Process::invalidate(&path, &self.dir.path().join("inv.log"))
    }

    fn invalidator_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("inv.log")).unwrap_or_default()
    }

    async fn pg(&self) -> Arc<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.pg.conn_string(), tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        Arc::new(client)
    }

    async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis_conn(&self.redis).await
    }

    async fn client(&self) -> Client {
        let config = Config::default().with_staleness(
            StalenessConfig::new("cacheclear")
                .with_max_staleness_ms(MAX_STALENESS_MS)
                .with_refresh_ms(REFRESH_MS),
        );
        Client::connect(&self.redis.url(), config)
            .await
            .expect("client")
    }

    async fn epoch(&self) -> Option<u64> {
        let ns = NamespaceLayout::new("cacheclear").expect("namespace");
        get(&mut self.redis().await, &ns.epoch())
            .await
            .map(|e| e.parse().expect("epoch is an integer"))
    }

    async fn watermark(&self) -> Option<Watermark> {
        let ns = NamespaceLayout::new("cacheclear").expect("namespace");
        get(&mut self.redis().await, &ns.watermark())
            .await
            .map(|w| Watermark::parse(&w).expect("watermark"))
    }
}

/// The invalidator keeps the namespace's watermark fresh from the bus's control records; killed,
/// the watermark ages and clients stop serving cached values within the bound; restarted, they
/// serve again. The epoch record was sent to both partitions and bumped the epoch once (new
/// slot). A lost epoch key is reopened in place by the next watermark record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invalidator_publishes_the_watermark_and_the_breaker_tracks_it() {
    let bus = Bus::start();
    let pg = bus.pg().await;
    let _source = bus.source();
    let mut invalidator = bus.invalidator();
    let client = bus.client().await;

    // Until the invalidator wrote a watermark every read bypasses; then the cache serves.
    wait_served_from_cache(&client, &pg, OLD, FIRST).await;
    let first_epoch = bus.epoch().await.expect("the epoch record opened an epoch");
    let w = bus.watermark().await.expect("a watermark");
    assert_eq!(w.epoch, first_epoch);
    // Both partitions reported.
    let ns = NamespaceLayout::new("cacheclear").expect("namespace");
    let reported: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(ns.partitions())
        .query_async(&mut bus.redis().await)
        .await
        .expect("HGETALL");
    assert_eq!(reported.len(), PARTITIONS as usize, "{reported:?}");
    let bumps = bus
        .invalidator_log()
        .matches("bumped the namespace's epoch (bus epoch record)")
        .count();
    assert_eq!(
        bumps, 1,
        "one bump for the new slot, whatever the partitions"
    );
    assert!(
        bus.invalidator_log().contains("reason=\"new_slot\"")
            || bus.invalidator_log().contains("reason=new_slot"),
        "{}",
        bus.invalidator_log()
    );
    // The watermark keeps moving while the database is idle (heartbeats through the bus).
    let written = w.written_ms;
    wait_for(
        "the watermark to be rewritten",
        Duration::from_secs(30),
        || async {
            bus.watermark()
                .await
                .is_some_and(|w| w.written_ms > written)
        },
    )
    .await;

    // The invalidator is killed, then the sale ends: nothing evicts product:5.
    invalidator.kill();
    let killed = Instant::now();
    pg.execute("UPDATE product SET price_cents = $1 WHERE id = 5", &[&NEW])
        .await
        .expect("update");
    let bound = Duration::from_millis(MAX_STALENESS_MS + REFRESH_MS + 3_000);
    wait_for("the breaker to open", bound, || async {
        read_product_5(&client, &pg).await == NEW
    })
    .await;
    eprintln!("breaker opened {:?} after the kill", killed.elapsed());
    for _ in 0..20 {
        assert_eq!(
            read_product_5(&client, &pg).await,
            NEW,
            "the breaker stays open"
        );
    }
    assert!(client.stats().bypassed_watermark_stale >= 21);
    let held = get(&mut bus.redis().await, "{product:5}")
        .await
        .expect("the old value is still cached");
    assert!(held.contains(&format!("\"payload\":{OLD}")), "{held}");

    // Restarted: it applies the UPDATE's eviction and the newer watermarks; the cache serves.
    let _invalidator = bus.invalidator();
    wait_served_from_cache(&client, &pg, NEW, FIRST).await;
    assert_eq!(
        bus.epoch().await,
        Some(first_epoch),
        "no gap: the epoch is kept"
    );

    // Redis loses the namespace's keys (a restart without persistence): clients bypass, and the
    // next watermark record opens a new epoch in place.
    let _: () = redis::cmd("DEL")
        .arg(ns.epoch())
        .arg(ns.opened())
        .query_async(&mut bus.redis().await)
        .await
        .expect("DEL");
    wait_for(
        "a new epoch opened in place",
        Duration::from_secs(30),
        || async { bus.epoch().await.is_some_and(|e| e > first_epoch) },
    )
    .await;
    // The invalidator logs the bump once its script returned: the new epoch can be in Redis a
    // moment before the line is in the log.
    wait_for(
        "the invalidator to log the reopened epoch",
        Duration::from_secs(10),
        || async { bus.invalidator_log().contains("opened a new one") },
    )
    .await;
    wait_served_from_cache(&client, &pg, NEW, Duration::from_secs(30)).await;
}

/// A new slot in bus mode (the slot dropped while the source was down, a change made meanwhile
/// and never streamed): the restarted source's epoch record bumps the epoch before any later
/// record is applied, and the value cached before is never served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_slot_bumps_the_epoch_through_the_bus() {
    let bus = Bus::start();
    let pg = bus.pg().await;
    let mut source = bus.source();
    let _invalidator = bus.invalidator();
    let client = bus.client().await;
    wait_served_from_cache(&client, &pg, OLD, FIRST).await;
    let first_epoch = bus.epoch().await.expect("epoch");

    source.kill();
    wait_for(
        "the slot to be released",
        Duration::from_secs(30),
        || async { slot_active(&pg).await == Some(false) },
    )
    .await;
    pg.execute("SELECT pg_drop_replication_slot('cacheclear')", &[])
        .await
        .expect("drop the slot");
    // Never streamed: no slot holds it.
    pg.execute("UPDATE product SET price_cents = $1 WHERE id = 5", &[&NEW])
        .await
        .expect("update");
    let _source = bus.source();
    wait_for("the epoch to be bumped", FIRST, || async {
        bus.epoch().await.is_some_and(|e| e > first_epoch)
    })
    .await;
    // From the client's next namespace refresh on, the old value is a miss, whatever Redis
    // still holds.
    tokio::time::sleep(Duration::from_millis(3 * REFRESH_MS)).await;
    for _ in 0..20 {
        assert_eq!(read_product_5(&client, &pg).await, NEW);
    }
    wait_served_from_cache(&client, &pg, NEW, Duration::from_secs(60)).await;
    assert_eq!(
        bus.invalidator_log()
            .matches("bumped the namespace's epoch (bus epoch record)")
            .count(),
        2,
        "once at the first start, once for the new slot"
    );
}
