//! Redis over TLS, with ACL users and passwords, and behind Redis Sentinel, against real servers
//! started by the harness (certificates made here): `cacheclear run` evicts through a TLS-only
//! standalone Redis (mutual TLS, an ACL user) and a TLS-only 3-master cluster with a password;
//! a wrong CA and a wrong password stop `run` at once with the fix and without the password;
//! the client library fills and reads over TLS; a Sentinel failover in the middle of a stream of
//! updates loses no eviction.

mod common;

use std::time::Duration;

use cacheclear_harness::fixtures::{admin_target, tls_of};
use cacheclear_harness::{
    PgInstance, RedisCluster, RedisInstance, RedisOptions, RedisSentinelSet, RedisServerTls,
    SENTINEL_MASTER, TestCertificates,
};
use cacheclear_protocol::Lsn;
use cacheclear_protocol::connect::RedisTls;
use common::*;

/// The ACL user `run` connects as: what the sink needs, and nothing like FLUSHALL.
const ACL_USER: &str = "cacheclear";
const ACL_PASSWORD: &str = "acl-Secret-4711";
const ADMIN_PASSWORD: &str = "admin-Secret-0815";

fn server_tls(certs: &TestCertificates, auth_clients: bool) -> RedisServerTls {
    RedisServerTls {
        cert_file: certs.server_cert(),
        key_file: certs.server_key(),
        ca_file: certs.ca(),
        client_cert_file: Some(certs.client_cert()),
        client_key_file: Some(certs.client_key()),
        auth_clients,
    }
}

/// PostgreSQL with the catalog, and `redis`.
fn env_with(redis: RedisInstance) -> Env {
    let pg = PgInstance::start().expect("start PostgreSQL");
    pg.psql(SCHEMA).expect("schema");
    Env { pg, redis }
}

/// `[redis.tls]` lines for `tls`.
fn tls_toml(tls: &RedisTls) -> String {
    let mut text = String::from("[redis.tls]\n");
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    if let Some(ca) = path(&tls.ca_file) {
        text.push_str(&format!("ca_file = \"{ca}\"\n"));
    }
    if let Some(crt) = path(&tls.crt_file) {
        text.push_str(&format!("crt_file = \"{crt}\"\n"));
    }
    if let Some(key) = path(&tls.key_file) {
        text.push_str(&format!("key_file = \"{key}\"\n"));
    }
    text
}

/// A `cacheclear.toml` for `env`'s PostgreSQL with `redis_section` as the whole `[redis]` part.
fn config(env: &Env, redis_section: &str) -> String {
    format!(
        r#"[postgres]
url = "{pg}"
status_interval_ms = 100

[metrics]
listen = ""

[[rules]]
table = "public.product"
keys = ["product:{{id}}", "category:{{category_id}}:products"]

{redis_section}
"#,
        pg = env.pg.url(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_evicts_through_tls_only_redis_as_an_acl_user() {
    let certs = TestCertificates::generate().expect("certificates");
    let redis = RedisInstance::start_with(
        RedisOptions::default()
            .tls(server_tls(&certs, true))
            .password(ADMIN_PASSWORD)
            .acl_user(
                ACL_USER,
                ACL_PASSWORD,
                &[
                    "~*",
                    "+@scripting",
                    "+@read",
                    "+@write",
                    "+scan",
                    "+ping",
                    "+info",
                    "+cluster",
                    "+time",
                ],
            ),
    )
    .expect("start TLS-only Redis");
    let env = env_with(redis);
    let tls = tls_of(&env.redis).expect("TLS instance");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_file(
        dir.path(),
        "c.toml",
        &config(
            &env,
            &format!(
                "[redis]\nurl = \"{}\"\n{}",
                env.redis.url_as(ACL_USER, ACL_PASSWORD),
                tls_toml(&tls)
            ),
        ),
    );
    let log = dir.path().join("run.log");
    let mut run = Process::run(&path, &log);
    let pg = env.pg().await;
    wait_streaming(&pg, Duration::from_secs(60)).await;
    let mut r = env.redis().await;
    set(&mut r, "{product:7}", "cached").await;
    pg.execute("UPDATE product SET price_cents = 1 WHERE id = 7", &[])
        .await
        .expect("update");
    gone(
        &mut r,
        Duration::from_secs(30),
        "product:7",
        "the eviction over TLS as the ACL user",
    )
    .await;
    // The eviction was done by the ACL user, over TLS (the server has no plaintext port).
    let users: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut r)
        .await
        .expect("CLIENT LIST");
    assert!(
        users.contains(&format!("user={ACL_USER}")),
        "run connects as {ACL_USER}: {users}"
    );
    assert!(run.exited().is_none(), "run keeps running");

    // `cacheclear audit` connects the way `run` does: over TLS, as the ACL user. A value the
    // client filled (an envelope) is checked against PostgreSQL.
    let client = cacheclear_client::Client::connect_to(
        &cacheclear_protocol::connect::RedisTarget::url(env.redis.url_as(ACL_USER, ACL_PASSWORD))
            .with_tls(Some(tls.clone())),
        cacheclear_client::Config::default(),
    )
    .await
    .expect("client over TLS");
    let price: i64 = client
        .get_or_load("product:8", || async {
            let row = pg
                .query_one("SELECT price_cents FROM product WHERE id = 8", &[])
                .await?;
            Ok::<_, tokio_postgres::Error>(cacheclear_client::Loaded::new(row.get::<_, i64>(0)))
        })
        .await
        .expect("fill product:8");
    assert!(price > 0);
    let (status, stdout, stderr) = run_to_end(
        command(&[
            "audit".as_ref(),
            "--config".as_ref(),
            path.as_os_str(),
            "--scan".as_ref(),
            "100".as_ref(),
            "--json".as_ref(),
        ]),
        Duration::from_secs(120),
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "audit over TLS failed: {stdout}\n{stderr}"
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("audit JSON");
    assert!(report["checked"].as_u64().unwrap_or(0) >= 1, "{report}");
    assert_eq!(report["inconsistent"], 0, "{report}");
    assert!(!stderr.contains(ACL_PASSWORD), "password printed: {stderr}");

    run.kill();
    let text = run.log_text();
    assert!(!text.contains(ACL_PASSWORD), "password in the log: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_evicts_through_a_tls_only_cluster_with_a_password() {
    let certs = TestCertificates::generate().expect("certificates");
    let cluster = RedisCluster::start_with(
        3,
        0,
        RedisOptions::default()
            .tls(server_tls(&certs, false))
            .password(ADMIN_PASSWORD),
    )
    .expect("start a TLS-only cluster");
    let pg = PgInstance::start().expect("start PostgreSQL");
    pg.psql(SCHEMA).expect("schema");
    let urls: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| format!("\"{}\"", n.url_as("", ADMIN_PASSWORD)))
        .collect();
    let tls = RedisTls::with_ca_file(certs.ca());
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        r#"[postgres]
url = "{pg}"
status_interval_ms = 100

[metrics]
listen = ""

[[rules]]
table = "public.product"
keys = ["product:{{id}}", "category:{{category_id}}:products"]

[redis]
cluster = true
urls = [{urls}]
{tls}"#,
        pg = pg.url(),
        urls = urls.join(", "),
        tls = tls_toml(&tls),
    );
    let path = write_file(dir.path(), "c.toml", &text);
    let log = dir.path().join("run.log");
    let mut run = Process::run(&path, &log);
    let (client, conn) = tokio_postgres::connect(&pg.conn_string(), tokio_postgres::NoTls)
        .await
        .expect("connect PostgreSQL");
    tokio::spawn(conn);
    wait_streaming(&client, Duration::from_secs(60)).await;
    let mut r = cacheclear_harness::fixtures::cluster_conn(&cluster).await;
    // Keys of different slots, so more than one master is written to.
    let keys: Vec<String> = (1..=20).map(|id| format!("{{product:{id}}}")).collect();
    for key in &keys {
        set(&mut r, key, "cached").await;
    }
    client
        .execute(
            "UPDATE product SET price_cents = price_cents + 1 WHERE id <= 20",
            &[],
        )
        .await
        .expect("update");
    wait_for(
        "every key evicted on the TLS cluster",
        Duration::from_secs(30),
        || {
            let mut r = r.clone();
            let keys = keys.clone();
            async move {
                // One key at a time: the keys live in different slots.
                for key in &keys {
                    if exists(&mut r, key).await {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
    assert!(run.exited().is_none(), "run keeps running");
    run.kill();
    assert!(!run.log_text().contains(ADMIN_PASSWORD));
}

/// `cacheclear run` with `[redis]` = `redis_section` exits within 60 s (does not retry) and
/// prints each of `expect` (case-insensitive) on stderr, never `secret`.
fn run_refused(env: &Env, redis_section: &str, expect: &[&str], secret: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_file(dir.path(), "c.toml", &config(env, redis_section));
    let (status, out, err) = run_to_end(
        command(&["run".as_ref(), "--config".as_ref(), path.as_os_str()]),
        Duration::from_secs(60),
    );
    let status = status.unwrap_or_else(|| panic!("`run` still retrying after 60 s: {err}"));
    assert!(!status.success(), "{err}");
    let lower = err.to_lowercase();
    for e in expect {
        assert!(lower.contains(&e.to_lowercase()), "`{e}` in: {err}");
    }
    assert!(
        !err.contains(secret) && !out.contains(secret),
        "the password is printed: {err}"
    );
}

#[test]
fn a_wrong_ca_and_a_wrong_password_stop_run_at_once() {
    let certs = TestCertificates::generate().expect("certificates");
    let redis = RedisInstance::start_with(
        RedisOptions::default()
            .tls(server_tls(&certs, false))
            .password(ADMIN_PASSWORD)
            .acl_user(ACL_USER, ACL_PASSWORD, &["~*", "&*", "+@all"]),
    )
    .expect("start TLS-only Redis");
    let env = env_with(redis);
    let wrong_ca = RedisTls::with_ca_file(certs.other_ca());
    run_refused(
        &env,
        &format!(
            "[redis]\nurl = \"{}\"\n{}",
            env.redis.url_as(ACL_USER, ACL_PASSWORD),
            tls_toml(&wrong_ca)
        ),
        &["certificate", "fix:", "redis.tls.ca_file"],
        ACL_PASSWORD,
    );
    let right_ca = RedisTls::with_ca_file(certs.ca());
    let wrong_password = "not-the-Password-123";
    run_refused(
        &env,
        &format!(
            "[redis]\nurl = \"{}\"\n{}",
            env.redis.url_as(ACL_USER, wrong_password),
            tls_toml(&right_ca)
        ),
        &["authentication failed", "fix:", "password"],
        wrong_password,
    );
    // A CA file that is not a certificate: a config error naming the field and the path.
    let junk = certs.dir().join("junk.pem");
    std::fs::write(&junk, "PRIVATE-MATERIAL-not-a-certificate").expect("write");
    run_refused(
        &env,
        &format!(
            "[redis]\nurl = \"{}\"\n[redis.tls]\nca_file = \"{}\"\n",
            env.redis.url_as(ACL_USER, ACL_PASSWORD),
            junk.display()
        ),
        &["redis.tls.ca_file", &junk.display().to_string()],
        "PRIVATE-MATERIAL",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_fills_and_reads_over_tls() {
    use cacheclear_client::{Client, Config};
    use cacheclear_protocol::connect::RedisTarget;
    let certs = TestCertificates::generate().expect("certificates");
    let redis = RedisInstance::start_with(
        RedisOptions::default()
            .tls(server_tls(&certs, true))
            .acl_user("app", "app-Secret-1", &["~*", "&*", "+@all"]),
    )
    .expect("start TLS-only Redis");
    let target = RedisTarget::url(redis.url_as("app", "app-Secret-1")).with_tls(Some(RedisTls {
        ca_file: Some(certs.ca()),
        crt_file: Some(certs.client_cert()),
        key_file: Some(certs.client_key()),
        ..RedisTls::default()
    }));
    let client = Client::connect_to(&target, Config::new())
        .await
        .expect("connect over TLS");
    let loads = std::sync::atomic::AtomicU32::new(0);
    for _ in 0..2 {
        let value: String = client
            .get_or_load("product:1", || async {
                loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(
                    "loaded".to_string(),
                ))
            })
            .await
            .expect("get_or_load");
        assert_eq!(value, "loaded");
    }
    assert_eq!(
        loads.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the second read is a hit"
    );
    let (url, tls) = admin_target(&redis);
    let mut r = cacheclear_protocol::connect::client(&url, tls.as_ref(), "url", "tls")
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    assert!(exists(&mut r, "{product:1}").await, "filled in Redis");
    // Without the CA the server's certificate is refused.
    let err = Client::connect_to(
        &RedisTarget::url(redis.url_as("app", "app-Secret-1")),
        Config::new(),
    )
    .await
    .expect_err("no CA");
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_during_a_stream_of_updates_loses_no_eviction() {
    sentinel_failover_during_updates(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_over_tls_loses_no_eviction() {
    let certs = TestCertificates::generate().expect("certificates");
    sentinel_failover_during_updates(Some(&certs)).await;
}

/// Master, replica and one sentinel (TLS-only with `certs`), `cacheclear run` in Sentinel
/// mode, rows updated in rounds, `SENTINEL FAILOVER` in the middle: every key evicted on the
/// new master, its fence past the last round.
async fn sentinel_failover_during_updates(certs: Option<&TestCertificates>) {
    let mut opts = RedisOptions::default().password(ADMIN_PASSWORD);
    if let Some(certs) = certs {
        opts = opts.tls(server_tls(certs, false));
    }
    let sentinels = RedisSentinelSet::start(opts, 1).expect("start master, replica and sentinel");
    let tls_section = match certs {
        Some(certs) => tls_toml(&RedisTls::with_ca_file(certs.ca())),
        None => String::new(),
    };
    let first_master = sentinels.master_port().expect("master");
    let master_redis = sentinels
        .nodes()
        .iter()
        .find(|n| n.port() == first_master)
        .expect("master node");
    let pg = PgInstance::start().expect("start PostgreSQL");
    pg.psql(SCHEMA).expect("schema");
    let sentinel_urls: Vec<String> = sentinels
        .sentinel_urls()
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        r#"[postgres]
url = "{pg}"
status_interval_ms = 100

[metrics]
listen = ""

[[rules]]
table = "public.product"
keys = ["product:{{id}}", "category:{{category_id}}:products"]

[redis]
sentinel = {{ master = "{SENTINEL_MASTER}", urls = [{urls}], password = "{ADMIN_PASSWORD}" }}
{tls_section}"#,
        pg = pg.url(),
        urls = sentinel_urls.join(", "),
    );
    let path = write_file(dir.path(), "c.toml", &text);
    let log = dir.path().join("run.log");
    let mut run = Process::run(&path, &log);
    let (client, conn) = tokio_postgres::connect(&pg.conn_string(), tokio_postgres::NoTls)
        .await
        .expect("connect PostgreSQL");
    tokio::spawn(conn);
    wait_streaming(&client, Duration::from_secs(60)).await;
    let keys: Vec<String> = (1..=20).map(|id| format!("{{product:{id}}}")).collect();
    let mut r = redis_conn(master_redis).await;
    for key in &keys {
        set(&mut r, key, "cached").await;
    }
    // Rows 1..=20 are updated in rounds; the failover happens after the first rounds, and every
    // row is updated again after it, so each key's last eviction goes to the new master.
    let failover = tokio::task::spawn_blocking(move || {
        let new_master = sentinels.failover().expect("failover");
        (sentinels, new_master)
    });
    let mut rounds_after = 0;
    let mut failover = Some(failover);
    let mut sentinels_and_master = None;
    let mut last_lsn = Lsn::ZERO;
    for round in 0..200 {
        if round > 0 && sentinels_and_master.is_some() {
            rounds_after += 1;
            if rounds_after > 3 {
                break;
            }
        }
        last_lsn = current_lsn(&client).await;
        for id in 1..=20 {
            client
                .execute(
                    "UPDATE product SET price_cents = price_cents + 1 WHERE id = $1",
                    &[&id],
                )
                .await
                .expect("update");
        }
        if let Some(task) = failover.take_if(|t| t.is_finished()) {
            sentinels_and_master = Some(task.await.expect("failover task"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (sentinels, new_master) =
        sentinels_and_master.expect("the failover completed while rows were updated");
    assert_ne!(new_master, first_master);
    let new_node = sentinels
        .nodes()
        .iter()
        .find(|n| n.port() == new_master)
        .expect("new master");
    let mut r = redis_conn(new_node).await;
    wait_for(
        "every updated row's key evicted on the new master",
        Duration::from_secs(60),
        || {
            let mut r = r.clone();
            let keys = keys.clone();
            async move { exist_many(&mut r, &keys).await.iter().all(|e| !e) }
        },
    )
    .await;
    // Each key's fence on the new master covers the last round's commits.
    for key in &keys {
        let cache_key = key.trim_start_matches('{').trim_end_matches('}');
        let f = fence(&mut r, cache_key).await.unwrap_or(Lsn::ZERO);
        assert!(
            f > last_lsn,
            "{key}: fence {f} after the last round's start {last_lsn}"
        );
    }
    assert!(run.exited().is_none(), "run keeps running");
    run.kill();
    let text = run.log_text();
    // Resolved through the sentinel at start, and again after the failover.
    assert!(
        text.matches("Redis Sentinel: connected to the master")
            .count()
            >= 2,
        "the sink asked the sentinel for the master again after the failover: {text}"
    );
    assert!(
        text.contains(&format!("127.0.0.1:{new_master}")),
        "the sink wrote to the new master: {text}"
    );
    assert!(!text.contains(ADMIN_PASSWORD));
}

/// The invalidator's `[redis]` is the sink's: `cacheclear doctor` reaches the master through a
/// TLS-only sentinel with an `invalidator.toml`, and `cacheclear invalidate` with a wrong master
/// password stops at start with the fix (Kafka is never reached: nothing listens on its port).
#[test]
fn the_invalidator_and_doctor_use_sentinel_over_tls() {
    let certs = TestCertificates::generate().expect("certificates");
    let sentinels = RedisSentinelSet::start(
        RedisOptions::default()
            .tls(server_tls(&certs, false))
            .password(ADMIN_PASSWORD),
        1,
    )
    .expect("start master, replica and sentinel");
    let master = sentinels.master_port().expect("master");
    let file = |password: &str| {
        format!(
            r#"[kafka]
brokers = "127.0.0.1:1"
group_id = "cacheclear-test"
topics = ["cacheclear.invalidations"]
dead_letter_topic = "cacheclear.dlq"

[redis]
sentinel = {{ master = "{SENTINEL_MASTER}", urls = ["{url}"], password = "{password}" }}
{tls}"#,
            url = sentinels.sentinel_urls()[0],
            tls = tls_toml(&RedisTls::with_ca_file(certs.ca())),
        )
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_file(dir.path(), "invalidator.toml", &file(ADMIN_PASSWORD));
    let (status, out, err) = run_to_end(
        command(&[
            "doctor".as_ref(),
            "--config".as_ref(),
            path.as_os_str(),
            "--json".as_ref(),
        ]),
        Duration::from_secs(120),
    );
    assert!(status.is_some(), "doctor finished: {err}");
    let report: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("doctor --json: {e}: {out} {err}"));
    let check = |id: &str| {
        report["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no {id} in {out}"))
    };
    let connect = check("redis.connect");
    assert_eq!(connect["status"], "ok", "{connect}");
    assert!(
        connect["found"]
            .as_str()
            .is_some_and(|f| f.contains(&format!("sentinel master `{SENTINEL_MASTER}`"))),
        "{connect}"
    );
    assert_eq!(check("redis.version")["status"], "ok", "{out}");
    assert!(!out.contains(ADMIN_PASSWORD) && !err.contains(ADMIN_PASSWORD));

    let wrong = "wrong-Master-pw-99";
    let path = write_file(dir.path(), "wrong.toml", &file(wrong));
    let (status, out, err) = run_to_end(
        command(&["invalidate".as_ref(), "--config".as_ref(), path.as_os_str()]),
        Duration::from_secs(60),
    );
    let status = status.unwrap_or_else(|| panic!("`invalidate` still retrying after 60 s: {err}"));
    assert!(!status.success(), "{err}");
    let lower = err.to_lowercase();
    assert!(
        lower.contains("authentication failed") && lower.contains("fix:"),
        "{err}"
    );
    assert!(!err.contains(wrong) && !out.contains(wrong), "{err}");
    assert!(sentinels.nodes().iter().any(|n| n.port() == master));
}

/// An ACL user without a command the scripts call (`TIME`) is refused inside the script: `run`
/// stops at once with the permission fix, instead of retrying the epoch's script forever.
#[test]
fn an_acl_user_missing_a_script_command_stops_run_at_once() {
    let redis =
        RedisInstance::start_with(RedisOptions::default().password(ADMIN_PASSWORD).acl_user(
            ACL_USER,
            ACL_PASSWORD,
            &[
                "~*",
                "+@scripting",
                "+@read",
                "+@write",
                "+scan",
                "+ping",
                "+info",
                "+cluster",
            ],
        ))
        .expect("start Redis");
    let env = env_with(redis);
    run_refused(
        &env,
        &format!(
            "[redis]\nurl = \"{}\"\n",
            env.redis.url_as(ACL_USER, ACL_PASSWORD)
        ),
        &["permission", "ACL SETUSER"],
        ACL_PASSWORD,
    );
}
