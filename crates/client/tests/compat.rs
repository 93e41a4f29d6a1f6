//! Rolling upgrades (issue 18): every value envelope shape any cacheclear version has written, as
//! stored bytes in a real Redis, read by this client with and without a staleness bound — each is
//! served correctly or is a miss, never misread — and what this client writes still reads under
//! the original format-1 reader. The promise is in docs/architecture.md ("Compatibility").

use std::time::Duration;

use cacheclear_client::{Client, Config, Loaded, StalenessConfig};
use cacheclear_harness::RedisInstance;
use cacheclear_protocol::NamespaceLayout;
use redis::aio::MultiplexedConnection;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const EPOCH: u64 = 1_800_000_000_000;
/// What the loader returns: a read that is not served from the cache returns this.
const LOADED: i64 = 9;
/// What every stored envelope carries.
const CACHED: i64 = 7;

/// Every shape written so far, by name: format 1 as first written; with `read_after` (added
/// without a format change); with `epoch` (likewise); with a field no version writes yet; and a
/// future format 2.
fn shapes(expiry_ms: u64) -> Vec<(&'static str, String)> {
    let base = format!(r#""format":1,"version":null,"delta_ms":5,"expiry_ms":{expiry_ms}"#);
    vec![
        ("format 1", format!(r#"{{{base},"payload":{CACHED}}}"#)),
        (
            "format 1 + read_after",
            format!(
                r#"{{"format":1,"version":"0/16B6C50","read_after":"0/16B6B00","delta_ms":5,"expiry_ms":{expiry_ms},"payload":{CACHED}}}"#
            ),
        ),
        (
            "format 1 + epoch",
            format!(r#"{{{base},"read_after":"0/0","payload":{CACHED},"epoch":{EPOCH}}}"#),
        ),
        (
            "format 1 + an older epoch",
            format!(r#"{{{base},"payload":{CACHED},"epoch":{}}}"#, EPOCH - 1),
        ),
        (
            "format 1 + an unknown field",
            format!(r#"{{{base},"payload":{CACHED},"epoch":{EPOCH},"shard_hint":3}}"#),
        ),
        (
            "format 2",
            format!(
                r#"{{"format":2,"version":null,"delta_ms":5,"expiry_ms":{expiry_ms},"payload":{CACHED}}}"#
            ),
        ),
    ]
}

async fn conn(redis: &RedisInstance) -> MultiplexedConnection {
    redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// Redis `TIME` in ms.
async fn redis_now_ms(r: &mut MultiplexedConnection) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(r).await.expect("TIME");
    s * 1000 + us / 1000
}

/// Stores `bytes` at `{key}` (10 min TTL).
async fn store(r: &mut MultiplexedConnection, key: &str, bytes: &str) {
    let () = redis::cmd("SET")
        .arg(format!("{{{key}}}"))
        .arg(bytes)
        .arg("PX")
        .arg(600_000)
        .query_async(r)
        .await
        .expect("SET");
}

async fn read(client: &Client, key: &str) -> i64 {
    client
        .get_or_load(key, || async {
            Ok::<_, std::convert::Infallible>(Loaded::new(LOADED))
        })
        .await
        .expect("read")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_envelope_shape_is_served_correctly_or_is_a_miss() -> TestResult {
    let redis = RedisInstance::start()?;
    let mut r = conn(&redis).await;
    let expiry_ms = redis_now_ms(&mut r).await + 600_000;
    // The namespace as a healthy pipeline keeps it: epoch EPOCH, a fresh watermark.
    let ns = NamespaceLayout::new("shop")?;
    let () = redis::cmd("SET")
        .arg(ns.epoch())
        .arg(EPOCH)
        .query_async(&mut r)
        .await?;
    let plain = Client::connect(&redis.url(), Config::default()).await?;
    let bounded = Client::connect(
        &redis.url(),
        Config::default().with_staleness(
            StalenessConfig::new("shop")
                .with_max_staleness_ms(60_000)
                .with_refresh_ms(100),
        ),
    )
    .await?;
    // (shape, served by a client without a staleness bound, served by one with it)
    let expected = [
        ("format 1", true, false),
        ("format 1 + read_after", true, false),
        ("format 1 + epoch", true, true),
        ("format 1 + an older epoch", true, false),
        ("format 1 + an unknown field", true, true),
        ("format 2", false, false),
    ];
    for (i, (name, bytes)) in shapes(expiry_ms).into_iter().enumerate() {
        let (want_name, plain_serves, bounded_serves) = expected[i];
        assert_eq!(name, want_name);
        for (who, client, serves) in [
            ("no bound", &plain, plain_serves),
            ("staleness bound", &bounded, bounded_serves),
        ] {
            let key = format!("compat:{i}:{}", who.len());
            store(&mut r, &key, &bytes).await;
            // Fresh watermark under EPOCH, written now by Redis's clock.
            let now = redis_now_ms(&mut r).await;
            let () = redis::cmd("SET")
                .arg(ns.watermark())
                .arg(format!("0000000000000010 0 0 {now} {EPOCH}"))
                .arg("PX")
                .arg(600_000)
                .query_async(&mut r)
                .await?;
            tokio::time::sleep(Duration::from_millis(250)).await;
            let got = read(client, &key).await;
            let want = if serves { CACHED } else { LOADED };
            assert_eq!(got, want, "{name}, client with {who}: served {got}");
        }
    }
    // A value this client writes keeps every field the first format-1 reader required.
    let _ = read(&bounded, "compat:written").await;
    let stored: String = redis::cmd("GET")
        .arg("{compat:written}")
        .query_async(&mut r)
        .await?;
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct FirstFormat1 {
        format: u32,
        version: Option<String>,
        delta_ms: u64,
        expiry_ms: u64,
        payload: i64,
    }
    let first: FirstFormat1 = serde_json::from_str(&stored)?;
    assert_eq!((first.format, first.payload), (1, LOADED), "{stored}");
    Ok(())
}
