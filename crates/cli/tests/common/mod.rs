//! Shared fixtures of the pipeline tests: private PostgreSQL + Redis, the catalog schema, and an
//! in-process pipeline; the workspace's shared test kit (`cacheclear_harness::fixtures`: rules,
//! `wait_for`, Redis helpers) is re-exported.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

// The shared test kit; not every test uses all of it.
#[allow(unused_imports)]
pub use cacheclear_harness::fixtures::{
    exist_many, exists, fence, get, product_rules, redis_conn, set, wait_for,
};
use cacheclear_harness::{PgInstance, PgOptions, RedisInstance};
use cacheclear_protocol::Lsn;
use cacheclear_rules::{RuleConfig, Rules};
use cacheclear_sink_redis::{RedisConfig, RedisSink};
use cacheclear_source_postgres::{Pipeline, PostgresConfig, RunOptions};

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

/// The cached keys of the "product 5 moves from category 6 to 9" scenario: its value, both
/// listings (product 5 sits in category 6: 1 + 5 % 10) and its neighbour product 6, which stays.
pub const MOVE_5_KEYS: [&str; 4] = [
    "{product:5}",
    "{category:6:products}",
    "{category:9:products}",
    "{product:6}",
];

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
        redis_conn(&self.redis).await
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

/// Spawns the pipeline (Redis sink) in this process; see [`start_pipeline`] to wait until it
/// streams.
pub fn spawn_pipeline(pg: PostgresConfig, redis: RedisConfig, rules: Vec<RuleConfig>) -> Pipeline {
    let rules = Arc::new(Rules::compile(&rules).expect("rules compile"));
    let sink = RedisSink::connect(redis).expect("sink");
    Pipeline::spawn(pg, rules, sink, RunOptions::default())
}

/// Waits (30 s at most) until `pipeline` streams: every commit from now on is evicted, and a new
/// slot's table-wide eviction is behind us.
pub async fn streaming(pipeline: &mut Pipeline) {
    tokio::time::timeout(Duration::from_secs(30), pipeline.streaming())
        .await
        .expect("the pipeline streams within 30 s")
        .expect("the pipeline streams");
}

/// Starts the pipeline with the product rules and waits until it streams.
pub async fn start_pipeline(env: &Env) -> Pipeline {
    let mut pipeline = spawn_pipeline(env.pg_config(), env.redis_config(), product_rules());
    streaming(&mut pipeline).await;
    pipeline
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

// ---- The real binary (`cacheclear run --config …`) ----

/// Path of the `cacheclear` binary built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_cacheclear");

/// A `cacheclear.toml` for `env` with the product rules. `redis_extra` lines go into `[redis]`,
/// `pg_extra` lines into `[postgres]`; `metrics_listen` is `[metrics] listen` (empty disables).
pub fn config_toml(env: &Env, pg_extra: &str, redis_extra: &str, metrics_listen: &str) -> String {
    format!(
        r#"[postgres]
url = "{pg}"
status_interval_ms = 100
{pg_extra}

[redis]
url = "{redis}"
{redis_extra}

[metrics]
listen = "{metrics_listen}"

[[rules]]
table = "public.product"
keys = ["product:{{id}}", "category:{{category_id}}:products"]
"#,
        pg = env.pg.url(),
        redis = env.redis.url(),
    )
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write_file(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// A `cacheclear` command with no inherited `CACHECLEAR__*` overrides.
pub fn command(args: &[&std::ffi::OsStr]) -> std::process::Command {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CACHECLEAR__") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// A running `cacheclear run --config <path>`, its stderr in a log file. Killed (SIGKILL) when
/// dropped — also when a test fails — and, through the parent-death signal, if the test process
/// dies; its log is printed when dropped during a panic.
pub struct Process {
    child: Option<std::process::Child>,
    log: std::path::PathBuf,
}

impl Process {
    pub fn run(config: &std::path::Path, log: &std::path::Path) -> Process {
        Process::start("run", config, log)
    }

    /// `cacheclear invalidate --config <config>`, its stderr appended to `log`.
    pub fn invalidate(config: &std::path::Path, log: &std::path::Path) -> Process {
        Process::start("invalidate", config, log)
    }

    /// `cacheclear <subcommand> --config <config>`, its stderr appended to `log`.
    pub fn start(subcommand: &str, config: &std::path::Path, log: &std::path::Path) -> Process {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let mut cmd = command(&[subcommand.as_ref(), "--config".as_ref(), config.as_os_str()]);
        cmd.env("CACHECLEAR_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        cacheclear_harness::kill_on_parent_exit(&mut cmd, 9);
        let child = cacheclear_harness::spawn_tied_to_process(cmd).expect("spawn cacheclear");
        Process {
            child: Some(child),
            log: log.to_owned(),
        }
    }

    /// SIGKILL (`kill -9`) and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (a graceful stop) and wait for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(sent.success(), "kill -TERM failed");
        child.wait().expect("wait")
    }

    /// `None` while running, else the exit status.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().expect("try_wait")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- cacheclear log (last 40 lines) ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Runs a `cacheclear` command to completion (killed after `timeout`): (exit success, stdout,
/// stderr).
pub fn run_to_end(
    mut cmd: std::process::Command,
    timeout: Duration,
) -> (Option<std::process::ExitStatus>, String, String) {
    use std::io::Read;
    let dir = tempfile::tempdir().expect("tempdir");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"));
    let mut child = cmd.spawn().expect("spawn cacheclear");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &std::path::Path| {
        let mut s = String::new();
        let _ = std::fs::File::open(p).and_then(|mut f| f.read_to_string(&mut s));
        s
    };
    (status, read(&out_path), read(&err_path))
}

/// Whether the `cacheclear` slot is held by a walsender.
pub async fn slot_active(pg: &tokio_postgres::Client) -> Option<bool> {
    pg.query_opt(
        "SELECT active FROM pg_replication_slots WHERE slot_name = 'cacheclear'",
        &[],
    )
    .await
    .expect("slot")
    .map(|row| row.get(0))
}

/// Waits until a pipeline streams from the `cacheclear` slot and has applied everything it had
/// (its first batch included): the slot exists, is held, and its confirmed position passes a point
/// taken after that (non-transactional messages give the stream something to confirm).
pub async fn wait_streaming(pg: &tokio_postgres::Client, timeout: Duration) {
    wait_for("the slot to be streamed", timeout, || async {
        slot_active(pg).await == Some(true)
    })
    .await;
    let mark = current_lsn(pg).await;
    let start = Instant::now();
    loop {
        pg.batch_execute("SELECT pg_logical_emit_message(false, 'cacheclear.test', '')")
            .await
            .expect("emit message");
        if slot_confirmed(pg).await > mark {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for the slot to confirm past {mark}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---- The binary's `/metrics` endpoint ----

/// `GET /metrics` over plain HTTP/1.0; `None` while nothing answers.
pub fn scrape(addr: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "unexpected response: {head}"
    );
    Some(body.to_owned())
}

/// The value of the sample line `name` (exactly, labels included), e.g.
/// `cacheclear_sink_errors_total{sink="redis"}`.
pub fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Scrapes `addr` until sample `name` is at least `min` (60 s at most); returns that scrape.
pub async fn wait_sample(addr: &str, name: &str, min: f64) -> String {
    let mut last = String::new();
    let start = Instant::now();
    loop {
        if let Some(body) = scrape(addr) {
            if sample(&body, name).is_some_and(|v| v >= min) {
                return body;
            }
            last = body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {name} >= {min}; last scrape:\n{last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (`timeout` at most) until the value of cache key `key` (`{key}` in Redis) is gone;
/// `what` names the wait in the failure message.
pub async fn gone(
    r: &mut redis::aio::MultiplexedConnection,
    timeout: Duration,
    key: &str,
    what: &str,
) {
    let value = format!("{{{key}}}");
    wait_for(what, timeout, || {
        let value = value.clone();
        let mut r = r.clone();
        async move { !exists(&mut r, &value).await }
    })
    .await;
}

/// The consumer group's committed offset per partition `0..partitions` of `topic` on the broker
/// at `bootstrap` (-1 where nothing is committed).
pub fn committed(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    cacheclear_harness::fixtures::committed_offsets(bootstrap, group, topic, partitions)
        .into_iter()
        .map(|o| o.unwrap_or(-1))
        .collect()
}

// ---- Reads through the client library (the staleness tests) ----

/// Reads `product:5`'s price through `client`'s cache (the loader reads PostgreSQL).
pub async fn read_product_5(
    client: &cacheclear_client::Client,
    pg: &Arc<tokio_postgres::Client>,
) -> i64 {
    let pg = Arc::clone(pg);
    client
        .get_or_load("product:5", || async move {
            let row = pg
                .query_one("SELECT price_cents FROM product WHERE id = 5", &[])
                .await?;
            Ok::<_, tokio_postgres::Error>(cacheclear_client::Loaded::new(row.get::<_, i64>(0)))
        })
        .await
        .expect("read product:5")
}

/// Waits (`timeout` at most) until reads of `product:5` are served from Redis (the breaker is
/// closed and the value cached), asserting that every read meanwhile returns `expected`.
pub async fn wait_served_from_cache(
    client: &cacheclear_client::Client,
    pg: &Arc<tokio_postgres::Client>,
    expected: i64,
    timeout: Duration,
) {
    wait_for("reads served from the cache", timeout, || async {
        let before = client.stats().hits;
        assert_eq!(read_product_5(client, pg).await, expected);
        client.stats().hits > before
    })
    .await;
}
