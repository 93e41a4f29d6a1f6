//! Secrets never printed: every command of the binary (`run`, `invalidate`, `doctor`,
//! `doctor --json`, each `--help`) runs with configurations that carry secrets — passwords in the
//! PostgreSQL and Redis URLs, a libpq `password=`, `sasl.password` in `[kafka.properties]`, a
//! key file whose contents are secret — on working and failing paths (servers up, unreachable
//! servers, a wrong password, bad config), and none of the secrets may appear in anything it
//! printed, nor in `/metrics` scraped while `run` streams. The `Debug` output of every config
//! section (what a panic or a debug log line would print) is checked too.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const PG_SECRET: &str = "PgS3cretQ7xv";
const LIBPQ_SECRET: &str = "LibpqS3cretW2";
const REDIS_SECRET: &str = "RedisS3cretK9";
const SASL_SECRET: &str = "SaslS3cretM4";
const KEY_SECRET: &str = "KeyF1leS3cretZ8";
const SECRETS: [&str; 5] = [
    PG_SECRET,
    LIBPQ_SECRET,
    REDIS_SECRET,
    SASL_SECRET,
    KEY_SECRET,
];

/// Fails naming the secret and where it was printed.
fn assert_clean(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(
            !text.contains(secret),
            "{what} printed the secret {secret}:\n{text}"
        );
    }
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    cacheclear_harness::free_port().expect("free port")
}

/// Runs `cacheclear args…` to its end (60 s at most), checks nothing it printed holds a
/// secret, and returns (exit success, stdout + stderr).
fn run_clean(what: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let os: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let mut cmd = command(&os);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (status, out, err) = run_to_end(cmd, Duration::from_secs(60));
    let status = status.unwrap_or_else(|| panic!("{what}: still running after 60 s: {err}"));
    let text = format!("{out}{err}");
    assert_clean(what, &text);
    (status.success(), text)
}

/// Starts `cacheclear <sub> --config <config>`, waits until its log contains `until` (60 s at
/// most), kills it and checks its whole output.
async fn run_until(what: &str, sub: &str, config: &Path, dir: &Path, until: &str) -> String {
    let log = dir.join(format!("{sub}-{}.log", what.replace(' ', "-")));
    let mut p = Process::start(sub, config, &log);
    let start = Instant::now();
    loop {
        let text = p.log_text();
        if text.contains(until) {
            break;
        }
        if let Some(status) = p.exited() {
            panic!("{what}: exited ({status}) before printing `{until}`:\n{text}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what}: `{until}` not printed within 60 s:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.kill();
    let text = p.log_text();
    assert_clean(what, &text);
    text
}

/// `pg_hba.conf` asking for a password over TCP (scram-sha-256) and `postgres`'s password set;
/// local socket connections (the harness's psql) stay trusted.
fn require_password(env: &Env, password: &str) {
    env.pg
        .psql(&format!("ALTER USER postgres PASSWORD '{password}'"))
        .expect("set password");
    std::fs::write(
        env.pg.data_dir().join("pg_hba.conf"),
        "local all         all                trust\n\
         local replication all                trust\n\
         host  all         all  127.0.0.1/32  scram-sha-256\n\
         host  replication all  127.0.0.1/32  scram-sha-256\n",
    )
    .expect("pg_hba.conf");
    env.pg.psql("SELECT pg_reload_conf()").expect("reload");
}

/// The test's own connection, with the password [`require_password`] set.
async fn pg_client(env: &Env) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(
        &format!("{} password={PG_SECRET}", env.pg.conn_string()),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect PostgreSQL with the password");
    tokio::spawn(conn);
    client
}

fn pg_url(env: &Env, password: &str) -> String {
    format!(
        "postgres://postgres:{password}@127.0.0.1:{}/postgres",
        env.pg.port()
    )
}

fn redis_url(port: u16, password: &str) -> String {
    format!("redis://default:{password}@127.0.0.1:{port}/")
}

fn run_config(pg: &str, redis: &str, metrics: &str, extra_pg: &str) -> String {
    format!(
        r#"[postgres]
url = "{pg}"
status_interval_ms = 100
{extra_pg}

[redis]
url = "{redis}"

[metrics]
listen = "{metrics}"

[[rules]]
table = "public.product"
keys = ["product:{{id}}", "category:{{category_id}}:products"]
"#
    )
}

fn kafka_properties() -> String {
    format!(
        "[kafka.properties]\n\"security.protocol\" = \"SASL_PLAINTEXT\"\n\
         \"sasl.mechanisms\" = \"SCRAM-SHA-512\"\n\"sasl.username\" = \"cacheclear\"\n\
         \"sasl.password\" = \"{SASL_SECRET}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_prints_a_secret() {
    let env = Env::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // Redis with a password: the harness's connections are made before it is set.
    let mut admin = env.redis().await;
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(REDIS_SECRET)
        .query_async::<()>(&mut admin)
        .await
        .expect("requirepass");
    require_password(&env, PG_SECRET);
    let redis_ok = redis_url(env.redis.port(), REDIS_SECRET);

    // `--help` of every command, with secret-bearing overrides in the environment.
    let secret_env = [
        ("CACHECLEAR__POSTGRES__URL", pg_url(&env, PG_SECRET)),
        ("CACHECLEAR__REDIS__URL", redis_ok.clone()),
    ];
    let secret_env: Vec<(&str, &str)> = secret_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for sub in [
        &["--help"][..],
        &["run", "--help"],
        &["invalidate", "--help"],
        &["doctor", "--help"],
        &["demo", "--help"],
        &["bench", "pipeline", "--help"],
        &["bench", "kafka", "--help"],
    ] {
        let (ok, text) = run_clean(&format!("{sub:?}"), sub, &secret_env);
        assert!(ok, "{sub:?}: {text}");
        assert!(text.contains("Usage"), "{sub:?}: {text}");
    }

    // `run`, streaming, with passwords in both URLs; `/metrics` scraped while it runs.
    let metrics = format!("127.0.0.1:{}", closed_port());
    let good = write_file(
        dir.path(),
        "good.toml",
        &run_config(&pg_url(&env, PG_SECRET), &redis_ok, &metrics, ""),
    );
    {
        let log = dir.path().join("run-good.log");
        let mut p = Process::run(&good, &log);
        let db = pg_client(&env).await;
        wait_streaming(&db, Duration::from_secs(60)).await;
        let mut r = redis::Client::open(redis_ok.as_str())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis with its password");
        set(&mut r, "{product:4}", "cached").await;
        db.execute("UPDATE product SET price_cents = 3 WHERE id = 4", &[])
            .await
            .expect("update");
        gone(&mut r, Duration::from_secs(30), "product:4", "the eviction").await;
        let body = wait_sample(&metrics, "cacheclear_invalidations_applied_total", 1.0).await;
        assert_clean("/metrics", &body);
        assert!(p.exited().is_none(), "run keeps running: {}", p.log_text());
        p.kill();
        let text = p.log_text();
        assert!(text.contains("direct mode"), "{text}");
        assert_clean("run (streaming)", &text);
    }

    // `doctor` and `doctor --json` on the working config.
    for args in [
        &["doctor", "--config"][..],
        &["doctor", "--json", "--config"],
    ] {
        let mut a = args.to_vec();
        let path = good.display().to_string();
        a.push(&path);
        let (_, text) = run_clean(&format!("{args:?} (servers up)"), &a, &[]);
        assert!(text.contains("redis.connect"), "{text}");
    }

    // A wrong PostgreSQL password: `run` stops at once; doctor reports it.
    let wrong_pg = write_file(
        dir.path(),
        "wrong-pg.toml",
        &run_config(&pg_url(&env, LIBPQ_SECRET), &redis_ok, "", ""),
    );
    let path = wrong_pg.display().to_string();
    let (ok, text) = run_clean(
        "run (wrong PostgreSQL password)",
        &["run", "--config", &path],
        &[],
    );
    assert!(
        !ok && text.contains("password authentication failed"),
        "{text}"
    );
    for args in [
        &["doctor", "--config", &path][..],
        &["doctor", "--json", "--config", &path],
    ] {
        let (ok, text) = run_clean(&format!("{args:?} (wrong password)"), args, &[]);
        assert!(!ok, "{text}");
    }

    // A wrong Redis password, and an unreachable Redis: `run` retries; killed once it said so.
    let wrong_redis = write_file(
        dir.path(),
        "wrong-redis.toml",
        &run_config(
            &pg_url(&env, PG_SECRET),
            &redis_url(env.redis.port(), SASL_SECRET),
            "",
            "slot = \"s_wrong_redis\"",
        ),
    );
    // A refused password stops `run` (retrying cannot fix it).
    let path = wrong_redis.display().to_string();
    let (ok, text) = run_clean(
        "run (wrong Redis password)",
        &["run", "--config", &path],
        &[],
    );
    assert!(!ok && text.to_lowercase().contains("redis"), "{text}");
    let down_redis = write_file(
        dir.path(),
        "down-redis.toml",
        &run_config(
            &pg_url(&env, PG_SECRET),
            &redis_url(closed_port(), REDIS_SECRET),
            "",
            "slot = \"s_down_redis\"",
        ),
    );
    run_until(
        "run (Redis unreachable)",
        "run",
        &down_redis,
        dir.path(),
        // Opening the namespace's epoch is the first Redis step: it fails and the pipeline
        // restarts, printing the sink's error.
        "pipeline stopped; restarting from the slot",
    )
    .await;
    let path = down_redis.display().to_string();
    let (ok, _) = run_clean(
        "doctor (Redis unreachable)",
        &["doctor", "--config", &path],
        &[],
    );
    assert!(!ok);

    // Unreachable PostgreSQL given as a libpq key=value string with password=.
    let libpq = format!(
        "host=127.0.0.1 port={} user=postgres password={LIBPQ_SECRET} dbname=postgres",
        closed_port()
    );
    let down_pg = write_file(
        dir.path(),
        "down-pg.toml",
        &run_config(&libpq, &redis_ok, "", ""),
    );
    let path = down_pg.display().to_string();
    for args in [
        &["doctor", "--config", &path][..],
        &["doctor", "--json", "--config", &path],
    ] {
        let (ok, _) = run_clean(&format!("{args:?} (PostgreSQL unreachable)"), args, &[]);
        assert!(!ok);
    }
    run_until(
        "run (PostgreSQL unreachable)",
        "run",
        &down_pg,
        dir.path(),
        "pipeline stopped",
    )
    .await;

    // A client key whose contents are secret, but not a usable PEM key.
    let key = dir.path().join("client.key");
    std::fs::write(&key, format!("-----BEGIN {KEY_SECRET}\n{KEY_SECRET}\n")).expect("key");
    let cert = dir.path().join("client.crt");
    std::fs::write(&cert, "").expect("cert");
    let with_key = format!(
        "{}?sslmode=require&sslcert={}&sslkey={}",
        pg_url(&env, PG_SECRET),
        cert.display(),
        key.display()
    );
    let bad_key = write_file(
        dir.path(),
        "bad-key.toml",
        &run_config(&with_key, &redis_ok, "", ""),
    );
    let path = bad_key.display().to_string();
    let (ok, text) = run_clean("run (unusable key file)", &["run", "--config", &path], &[]);
    assert!(!ok && text.contains("sslkey"), "{text}");
    let (ok, _) = run_clean(
        "doctor (unusable key file)",
        &["doctor", "--config", &path],
        &[],
    );
    assert!(!ok);

    // Bad config: an unknown field next to the secrets; an invalid sslmode.
    let bad = write_file(
        dir.path(),
        "bad.toml",
        &run_config(&pg_url(&env, PG_SECRET), &redis_ok, "", "slots = 3"),
    );
    let path = bad.display().to_string();
    let (ok, text) = run_clean("run (unknown field)", &["run", "--config", &path], &[]);
    assert!(!ok && text.contains("slots"), "{text}");
    let (ok, _) = run_clean(
        "doctor (unknown field)",
        &["doctor", "--config", &path],
        &[],
    );
    assert!(!ok);
    let bad_mode = write_file(
        dir.path(),
        "bad-mode.toml",
        &run_config(
            &format!("{}?sslmode=sometimes", pg_url(&env, PG_SECRET)),
            &redis_ok,
            "",
            "",
        ),
    );
    let path = bad_mode.display().to_string();
    let (ok, text) = run_clean("run (bad sslmode)", &["run", "--config", &path], &[]);
    assert!(!ok && text.contains("sslmode"), "{text}");

    // Bus mode: `sasl.password` in [kafka.properties], brokers unreachable.
    let bus = write_file(
        dir.path(),
        "bus.toml",
        &format!(
            "[postgres]\nurl = \"{pg}\"\nslot = \"s_bus\"\n\n[sink]\nkind = \"kafka\"\n\n[kafka]\n\
             brokers = \"127.0.0.1:{port}\"\nmessage_timeout_ms = 1000\nlinger_ms = 1\n{props}\n\
             [metrics]\nlisten = \"\"\n\n[[rules]]\ntable = \"public.product\"\nkeys = [\"product:{{id}}\"]\n",
            pg = pg_url(&env, PG_SECRET),
            port = closed_port(),
            props = kafka_properties(),
        ),
    );
    let path = bus.display().to_string();
    let (ok, _) = run_clean(
        "doctor (bus, Kafka unreachable)",
        &["doctor", "--config", &path],
        &[],
    );
    assert!(!ok);
    run_until(
        "run (bus, Kafka unreachable)",
        "run",
        &bus,
        dir.path(),
        // The epoch records go to every partition before streaming: reading the topic's
        // partitions is the first thing that fails.
        "cannot read the partitions of topic",
    )
    .await;

    // The invalidator: libpq password= in [postgres], Redis password, sasl.password.
    let libpq_up = format!(
        "host=127.0.0.1 port={} user=postgres password={PG_SECRET} dbname=postgres",
        env.pg.port()
    );
    let inv = write_file(
        dir.path(),
        "invalidator.toml",
        &format!(
            "[kafka]\nbrokers = \"127.0.0.1:{port}\"\ngroup_id = \"g\"\n\
             debezium_topics = [\"shop.public.product\"]\ndead_letter_topic = \"dlq\"\n{props}\n\
             [redis]\nurl = \"{redis}\"\n\n[postgres]\nurl = \"{libpq_up}\"\n\n[metrics]\nlisten = \"\"\n\n\
             [[rules]]\ntable = \"public.product\"\nkeys = [\"product:{{id}}\"]\n",
            port = closed_port(),
            props = kafka_properties(),
            redis = redis_ok,
        ),
    );
    let text = run_until(
        "invalidate (Kafka unreachable)",
        "invalidate",
        &inv,
        dir.path(),
        "brokers unreachable",
    )
    .await;
    assert!(text.contains("dead-letter topic"), "{text}");
    let path = inv.display().to_string();
    for args in [
        &["doctor", "--config", &path][..],
        &["doctor", "--json", "--config", &path],
    ] {
        let (ok, _) = run_clean(
            &format!("{args:?} (invalidator, Kafka unreachable)"),
            args,
            &[],
        );
        assert!(!ok);
    }
    // The invalidator with a wrong libpq password: refused at start.
    let inv_wrong = write_file(
        dir.path(),
        "invalidator-wrong.toml",
        &std::fs::read_to_string(&inv)
            .expect("read")
            .replace(PG_SECRET, LIBPQ_SECRET),
    );
    let path = inv_wrong.display().to_string();
    let (ok, text) = run_clean(
        "invalidate (wrong PostgreSQL password)",
        &["invalidate", "--config", &path],
        &[],
    );
    assert!(
        !ok && text.contains("password authentication failed"),
        "{text}"
    );
}

/// What a panic or `{:?}` of a config section prints.
#[test]
fn config_debug_output_hides_secrets() {
    let pg: cacheclear_source_postgres::PostgresConfig =
        toml::from_str(&format!("url = \"postgres://app:{PG_SECRET}@db/shop\"")).expect("pg");
    let redis: cacheclear_sink_redis::RedisConfig = toml::from_str(&format!(
        "url = \"rediss://default:{REDIS_SECRET}@cache:6380/\""
    ))
    .expect("redis");
    let cluster: cacheclear_sink_redis::RedisConfig = toml::from_str(&format!(
        "cluster = true\nurls = [\"redis://u:{REDIS_SECRET}@a:6379/\"]"
    ))
    .expect("cluster");
    let sentinel: cacheclear_sink_redis::RedisConfig = toml::from_str(&format!(
        "sentinel = {{ master = \"mymaster\", urls = [\"redis://:{REDIS_SECRET}@s:26379/\"], password = \"{SASL_SECRET}\" }}"
    ))
    .expect("sentinel");
    let kafka: cacheclear_sink_kafka::KafkaConfig = toml::from_str(&format!(
        "brokers = \"k:9096\"\n[properties]\n\"sasl.password\" = \"{SASL_SECRET}\"\n\"ssl.key.password\" = \"{KEY_SECRET}\""
    ))
    .expect("kafka");
    let inv_kafka: cacheclear_invalidator::KafkaConfig = toml::from_str(&format!(
        "brokers = \"k:9096\"\ngroup_id = \"g\"\ntopics = [\"t\"]\ndead_letter_topic = \"d\"\n[properties]\n\"sasl.password\" = \"{SASL_SECRET}\""
    ))
    .expect("invalidator kafka");
    let inv_pg: cacheclear_invalidator::PostgresConfig = toml::from_str(&format!(
        "url = \"host=db user=app password={LIBPQ_SECRET}\""
    ))
    .expect("invalidator pg");
    for (what, text) in [
        ("PostgresConfig", format!("{pg:?}")),
        ("RedisConfig", format!("{redis:?}")),
        ("RedisConfig (cluster)", format!("{cluster:?}")),
        ("RedisConfig (sentinel)", format!("{sentinel:?}")),
        ("sink KafkaConfig", format!("{kafka:?}")),
        ("invalidator KafkaConfig", format!("{inv_kafka:?}")),
        ("invalidator PostgresConfig", format!("{inv_pg:?}")),
    ] {
        assert_clean(what, &text);
        assert!(
            text.contains("***"),
            "{what} shows where the secret was: {text}"
        );
    }
    // What is not secret stays visible.
    assert!(format!("{kafka:?}").contains("k:9096"));
    assert!(format!("{pg:?}").contains("app:***@db"));
}
