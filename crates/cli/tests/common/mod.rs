//! Shared fixtures of the pipeline tests: private PostgreSQL + Redis, the catalog schema, and an
//! in-process pipeline.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cacheclear_harness::{PgInstance, PgOptions, RedisInstance};
use cacheclear_protocol::Lsn;
use cacheclear_rules::{RuleConfig, Rules};
use cacheclear_sink_redis::{RedisConfig, RedisSink};
use cacheclear_source_postgres::{PostgresConfig, RunOptions, SourceError, SourceStatus};

pub const SCHEMA: &str = "
CREATE TABLE category (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE product (
    id int PRIMARY KEY,
    category_id int REFERENCES category(id),
    name text NOT NULL,
    slug text NOT NULL,
    price_cents bigint NOT NULL,
    description text NOT NULL DEFAULT ''
);
ALTER TABLE product REPLICA IDENTITY FULL;
INSERT INTO category SELECT g, 'category ' || g FROM generate_series(1, 10) g;
INSERT INTO product SELECT g, 1 + g % 10, 'product ' || g, 'product-' || g, 1000 + g, ''
  FROM generate_series(1, 100) g;
";

pub fn product_rules() -> Vec<RuleConfig> {
    vec![RuleConfig {
        table: "public.product".into(),
        keys: vec![
            "product:{id}".into(),
            "category:{category_id}:products".into(),
        ],
    }]
}

pub struct Env {
    pub pg: PgInstance,
    pub redis: RedisInstance,
}

impl Env {
    pub fn start() -> Env {
        Env::start_with(PgOptions::default())
    }

    pub fn start_with(opts: PgOptions) -> Env {
        let pg = PgInstance::start_with(opts).expect("start PostgreSQL");
        let redis = RedisInstance::start().expect("start Redis");
        pg.psql(SCHEMA).expect("schema");
        Env { pg, redis }
    }

    pub async fn pg(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.pg.conn_string(), tokio_postgres::NoTls)
            .await
            .expect("connect PostgreSQL");
        tokio::spawn(conn);
        client
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect Redis")
    }

    pub fn pg_config(&self) -> PostgresConfig {
        let mut cfg = PostgresConfig::new(self.pg.url());
        cfg.status_interval_ms = 100;
        cfg
    }

    pub fn redis_config(&self) -> RedisConfig {
        RedisConfig::new(self.redis.url())
    }
}

pub struct Running {
    pub status: Arc<SourceStatus>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub handle: tokio::task::JoinHandle<Result<(), SourceError>>,
}

impl Running {
    pub async fn stop(mut self) -> Result<(), SourceError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.handle).await.expect("pipeline task")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

pub fn spawn_pipeline(pg: PostgresConfig, redis: RedisConfig, rules: Vec<RuleConfig>) -> Running {
    let rules = Arc::new(Rules::compile(&rules).expect("rules compile"));
    let sink = RedisSink::connect(redis).expect("sink");
    let options = RunOptions::default();
    let status = Arc::clone(&options.status);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        cacheclear_source_postgres::run(&pg, rules, sink, options, async {
            let _ = rx.await;
        })
        .await
    });
    Running {
        status,
        stop: Some(tx),
        handle,
    }
}

/// Starts the pipeline and waits until its first batch (the new slot's table-wide eviction) was
/// applied, so the stream is live.
pub async fn start_pipeline(env: &Env) -> Running {
    let running = spawn_pipeline(env.pg_config(), env.redis_config(), product_rules());
    let status = Arc::clone(&running.status);
    wait_for("the pipeline to start", Duration::from_secs(30), || {
        let status = Arc::clone(&status);
        async move { status.applied_txns() >= 1 }
    })
    .await;
    running
}

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

pub async fn exists(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(conn)
        .await
        .expect("EXISTS")
        == 1
}

pub async fn get(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query_async(conn)
        .await
        .expect("GET")
}

pub async fn set(conn: &mut redis::aio::MultiplexedConnection, key: &str, value: &str) {
    redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("PX")
        .arg(600_000)
        .query_async::<()>(conn)
        .await
        .expect("SET");
}

pub async fn fence(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<Lsn> {
    get(conn, &format!("{{{key}}}:fence"))
        .await
        .map(|s| Lsn::from_fixed_hex(&s).expect("fence is fixed hex"))
}

pub async fn current_lsn(pg: &tokio_postgres::Client) -> Lsn {
    let s: String = pg
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    s.parse().expect("lsn parses")
}

pub async fn slot_confirmed(pg: &tokio_postgres::Client) -> Lsn {
    let s: Option<String> = pg
        .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'cacheclear'", &[])
        .await
        .expect("slot")
        .get(0);
    s.unwrap_or_else(|| "0/0".into())
        .parse()
        .expect("lsn parses")
}
