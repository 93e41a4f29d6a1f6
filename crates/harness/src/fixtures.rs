//! The test kit of the workspace's integration tests (feature `fixtures`): the product rules
//! they all use, polling with a deadline, connections to the private Redis servers, and Redis
//! readers and writers for cached values and fences, and a consumer group's committed offsets.
//!
//! Every helper panics with a message saying what failed: they are for tests, where a panic is
//! the failure report. The Redis helpers take any async connection
//! ([`redis::aio::ConnectionLike`]): a standalone server's
//! [`MultiplexedConnection`] or a cluster's [`ClusterConnection`]; the pipelined ones
//! ([`fences`], [`exist_many`], [`values_exist`], [`fill_values`]) send one pipeline per 1000
//! keys, which a Redis Cluster only accepts when the keys share a slot.
//!
//! ```no_run
//! use std::time::Duration;
//! use cacheclear_harness::RedisInstance;
//! use cacheclear_harness::fixtures::{fence, redis_conn, set, wait_for};
//! # async fn demo() {
//! let redis = RedisInstance::start().expect("start Redis");
//! let mut conn = redis_conn(&redis).await;
//! set(&mut conn, "{product:1}", "cached").await;
//! wait_for("product:1 to be fenced", Duration::from_secs(30), || {
//!     let mut conn = conn.clone();
//!     async move { fence(&mut conn, "product:1").await.is_some() }
//! })
//! .await;
//! # }
//! ```

use std::future::Future;
use std::time::{Duration, Instant};

use cacheclear_protocol::Lsn;
use cacheclear_protocol::connect::RedisTls;
use cacheclear_rules::RuleConfig;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;

use crate::{RedisCluster, RedisInstance};

/// How long the cached values written by [`set`] and [`fill_values`] live, in milliseconds.
pub const VALUE_TTL_MS: u64 = 600_000;

/// Keys per pipeline of the pipelined helpers.
const PIPELINE_KEYS: usize = 1000;

/// README's Redis ACL rules ("Least privilege") for `cacheclear run` in direct mode on a
/// standalone Redis without `wait_replicas`; the tests run the pipeline as a user with exactly
/// these, so README and the tests cannot drift.
pub const PIPELINE_ACL: &[&str] = &[
    "~*",
    "+evalsha",
    "+eval",
    "+script|load",
    "+get",
    "+set",
    "+del",
    "+time",
    "+scan",
    "+ping",
];

/// What README adds to [`PIPELINE_ACL`] for `cacheclear invalidate` (the bus watermark's hash).
pub const INVALIDATOR_ACL_EXTRA: &[&str] = &["+hget", "+hset"];

/// What README adds on a Redis Cluster (the slot map).
pub const CLUSTER_ACL_EXTRA: &[&str] = &["+cluster|slots"];

/// README's Redis ACL rules for the client library.
pub const CLIENT_ACL: &[&str] = &[
    "~*",
    "+evalsha",
    "+eval",
    "+script|load",
    "+get",
    "+set",
    "+del",
    "+time",
    "+ping",
];

/// The rules of the tests' catalog: `public.product` rows map to `product:{id}` and
/// `category:{category_id}:products`.
pub fn product_rules() -> Vec<RuleConfig> {
    vec![RuleConfig {
        table: "public.product".into(),
        keys: vec![
            "product:{id}".into(),
            "category:{category_id}:products".into(),
        ],
    }]
}

/// Polls `check` every 20 ms until it returns true.
///
/// # Panics
/// When `timeout` passes first: "timed out after {timeout} waiting for {what}".
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The URL (with the instance's password, as `default`) and the `[redis.tls]` table (its CA and
/// client certificate) that reach `redis` as an administrator.
pub fn admin_target(redis: &RedisInstance) -> (String, Option<RedisTls>) {
    let url = match &redis.options().password {
        Some(password) => redis.url_as("", password),
        None => redis.url(),
    };
    (url, tls_of(redis))
}

/// The `[redis.tls]` table that trusts `redis`'s CA and presents its client certificate (for a
/// TLS instance), `None` for a plaintext one.
pub fn tls_of(redis: &RedisInstance) -> Option<RedisTls> {
    redis.options().tls.as_ref().map(|tls| RedisTls {
        ca_file: Some(tls.ca_file.clone()),
        crt_file: tls.client_cert_file.clone(),
        key_file: tls.client_key_file.clone(),
        ..RedisTls::default()
    })
}

/// A connection to the private Redis server `redis` (over TLS and with its password when it has
/// them: see [`admin_target`]).
///
/// # Panics
/// When Redis cannot be reached.
pub async fn redis_conn(redis: &RedisInstance) -> MultiplexedConnection {
    let (url, tls) = admin_target(redis);
    cacheclear_protocol::connect::client(&url, tls.as_ref(), "redis.url", "redis.tls")
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect Redis")
}

/// A cluster connection to the private Redis Cluster `cluster` (every node as a seed; TLS and
/// password as its nodes have them).
///
/// # Panics
/// When the cluster cannot be reached.
pub async fn cluster_conn(cluster: &RedisCluster) -> ClusterConnection {
    let first = &cluster.nodes()[0];
    let seeds: Vec<String> = match &first.options().password {
        Some(password) => cluster
            .nodes()
            .iter()
            .map(|n| n.url_as("", password))
            .collect(),
        None => cluster.seeds(),
    };
    cacheclear_protocol::connect::cluster_client_builder(
        &seeds,
        tls_of(first).as_ref(),
        "redis.urls",
        "redis.tls",
    )
    .expect("cluster seeds")
    .build()
    .expect("cluster client")
    .get_async_connection()
    .await
    .expect("connect to the cluster")
}

/// Whether `key` exists (the key as given: a cached value is `{K}`).
///
/// # Panics
/// When Redis fails the command.
pub async fn exists(conn: &mut impl ConnectionLike, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(conn)
        .await
        .expect("EXISTS")
        == 1
}

/// The string at `key` (the key as given), `None` when absent.
///
/// # Panics
/// When Redis fails the command or the value is not a string.
pub async fn get(conn: &mut impl ConnectionLike, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query_async(conn)
        .await
        .expect("GET")
}

/// Sets `key` (the key as given) to `value` for [`VALUE_TTL_MS`].
///
/// # Panics
/// When Redis fails the command.
pub async fn set(conn: &mut impl ConnectionLike, key: &str, value: &str) {
    redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("PX")
        .arg(VALUE_TTL_MS)
        .query_async::<()>(conn)
        .await
        .expect("SET");
}

/// The fence of cache key `key` (`{key}:fence`), parsed; `None` when absent.
///
/// # Panics
/// When Redis fails the command or the fence is not fixed hex.
pub async fn fence(conn: &mut impl ConnectionLike, key: &str) -> Option<Lsn> {
    get(conn, &format!("{{{key}}}:fence"))
        .await
        .map(|s| Lsn::from_fixed_hex(&s).expect("fence is fixed hex"))
}

/// The fence of every cache key in `keys`, in order, pipelined (see the module docs).
///
/// # Panics
/// As [`fence`].
pub async fn fences(conn: &mut impl ConnectionLike, keys: &[impl AsRef<str>]) -> Vec<Option<Lsn>> {
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(PIPELINE_KEYS) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.cmd("GET").arg(format!("{{{}}}:fence", k.as_ref()));
        }
        let got: Vec<Option<String>> = pipe.query_async(conn).await.expect("GET fences");
        out.extend(
            got.into_iter()
                .map(|f| f.map(|s| Lsn::from_fixed_hex(&s).expect("fence is fixed hex"))),
        );
    }
    out
}

/// `EXISTS` of every key in `keys` (the keys as given), in order, pipelined (see the module
/// docs).
///
/// # Panics
/// When Redis fails a command.
pub async fn exist_many(conn: &mut impl ConnectionLike, keys: &[impl AsRef<str>]) -> Vec<bool> {
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(PIPELINE_KEYS) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.cmd("EXISTS").arg(k.as_ref());
        }
        let got: Vec<i64> = pipe.query_async(conn).await.expect("EXISTS pipeline");
        out.extend(got.into_iter().map(|n| n == 1));
    }
    out
}

/// Whether the cached value `{K}` of every cache key `K` in `keys` exists, in order.
///
/// # Panics
/// As [`exist_many`].
pub async fn values_exist(conn: &mut impl ConnectionLike, keys: &[impl AsRef<str>]) -> Vec<bool> {
    let values: Vec<String> = keys.iter().map(|k| format!("{{{}}}", k.as_ref())).collect();
    exist_many(conn, &values).await
}

/// A pipeline caching `value` at `{K}` for every cache key `K` in `keys` (and, with `lease`, a
/// lease `{K}:lease`), each for [`VALUE_TTL_MS`], replies ignored.
pub fn fill_pipeline(keys: &[impl AsRef<str>], value: &str, lease: bool) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for k in keys {
        let k = k.as_ref();
        pipe.cmd("SET")
            .arg(format!("{{{k}}}"))
            .arg(value)
            .arg("PX")
            .arg(VALUE_TTL_MS)
            .ignore();
        if lease {
            pipe.cmd("SET")
                .arg(format!("{{{k}}}:lease"))
                .arg("token")
                .arg("PX")
                .arg(VALUE_TTL_MS)
                .ignore();
        }
    }
    pipe
}

/// Caches `value` at `{K}` for every cache key `K` in `keys` ([`fill_pipeline`], no leases),
/// pipelined (see the module docs).
///
/// # Panics
/// When Redis fails a command.
pub async fn fill_values(conn: &mut impl ConnectionLike, keys: &[impl AsRef<str>], value: &str) {
    for chunk in keys.chunks(PIPELINE_KEYS) {
        fill_pipeline(chunk, value, false)
            .query_async::<()>(conn)
            .await
            .expect("SET values");
    }
}

/// The consumer group `group`'s committed offset per partition `0..partitions` of `topic` on the
/// broker at `bootstrap`; `None` where nothing is committed. One metadata round trip (10 s
/// timeout).
pub fn committed_offsets(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Vec<Option<i64>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut list = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let got = c
        .committed_offsets(list, Duration::from_secs(10))
        .expect("committed offsets");
    (0..partitions)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(rdkafka::Offset::Offset(o)) => Some(o),
            _ => None,
        })
        .collect()
}
