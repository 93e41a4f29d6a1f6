//! `cacheclear doctor` against private PostgreSQL and Redis instances, healthy and broken on
//! purpose: each broken set-up gives its check's status and fix.

mod common;

use std::time::Duration;

use cacheclear_harness::PgOptions;
use common::*;

/// Runs `cacheclear doctor --json --config <text>`: (exit success, checks).
fn doctor(dir: &std::path::Path, text: &str) -> (bool, Vec<serde_json::Value>) {
    let path = write_file(dir, "doctor.toml", text);
    let (status, out, err) = run_to_end(
        command(&[
            "doctor".as_ref(),
            "--json".as_ref(),
            "--config".as_ref(),
            path.as_os_str(),
        ]),
        Duration::from_secs(120),
    );
    let status = status.expect("doctor finishes");
    let json: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("JSON ({e}): {out}\n{err}"));
    let checks = json["checks"].as_array().expect("checks").clone();
    (status.success(), checks)
}

/// The checks with `id`.
fn with_id<'a>(checks: &'a [serde_json::Value], id: &str) -> Vec<&'a serde_json::Value> {
    checks.iter().filter(|c| c["id"] == id).collect()
}

fn statuses(checks: &[serde_json::Value]) -> Vec<(String, String)> {
    checks
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap_or("").to_owned(),
                c["status"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

#[test]
fn a_set_up_run_would_start_on_has_no_fail() {
    let env = Env::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, checks) = doctor(dir.path(), &config_toml(&env, "", "", ""));
    assert!(ok, "no fail: {:?}", statuses(&checks));
    for id in [
        "postgres.connect",
        "postgres.version",
        "postgres.wal_level",
        "postgres.replication_capacity",
        "postgres.role",
        "postgres.replica_identity",
        "postgres.synchronous_standby",
        "redis.connect",
        "redis.version",
        "redis.scripting",
    ] {
        let found = with_id(&checks, id);
        assert!(
            !found.is_empty() && found.iter().all(|c| c["status"] == "ok"),
            "{id}: {found:?}"
        );
    }
    // Not created yet, and `run` would create them: warn, with what `run` does.
    for id in ["postgres.publication", "postgres.slot"] {
        let c = with_id(&checks, id)[0];
        assert_eq!(c["status"], "warn", "{c}");
        assert!(
            c["fix"].as_str().unwrap_or("").contains("`run` creates it"),
            "{c}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_set_ups_get_their_fix() {
    // wal_level = replica, a lost slot (WAL removed under max_slot_wal_keep_size), a rule the
    // replica identity cannot serve, and Redis with noeviction under a maxmemory.
    let env = Env::start_with(
        PgOptions::default()
            .conf("max_slot_wal_keep_size = '1MB'")
            .conf("wal_keep_size = 0"),
    );
    let pg = env.pg().await;
    pg.batch_execute(
        "SELECT pg_create_logical_replication_slot('cacheclear', 'pgoutput');
         CREATE TABLE churn (id serial, pad text);",
    )
    .await
    .expect("slot");
    let start = std::time::Instant::now();
    loop {
        pg.batch_execute(
            "INSERT INTO churn (pad) SELECT repeat('x', 1000) FROM generate_series(1, 2000);
             SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .await
        .expect("churn");
        let status: String = pg
            .query_one(
                "SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = 'cacheclear'",
                &[],
            )
            .await
            .expect("slot")
            .get(0);
        if status == "lost" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the slot is not lost after 60 s of churn ({status})"
        );
    }
    let mut r = env.redis().await;
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("100mb")
        .query_async(&mut r)
        .await
        .expect("maxmemory");
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(&mut r)
        .await
        .expect("policy");
    // A value written behind the client's back, without a TTL.
    set_no_ttl(&mut r, "{product:1}").await;
    // The namespace's epoch keeps no TTL by design: not a finding.
    set_no_ttl(&mut r, "{cacheclear.ns:cacheclear}:epoch").await;
    let dir = tempfile::tempdir().expect("tempdir");
    // `category:{name}` needs `name` in old rows: category has REPLICA IDENTITY DEFAULT.
    pg.batch_execute("CREATE TABLE \"OrderItem\" (id int PRIMARY KEY, sku text)")
        .await
        .expect("mixed-case table");
    let text = config_toml(&env, "", "", "").replace(
        "[[rules]]",
        "[[rules]]\ntable = \"public.category\"\nkeys = [\"category:{name}\"]\n\n[[rules]]\ntable = 'public.\"OrderItem\"'\nkeys = [\"item:{sku}\"]\n\n[[rules]]",
    );
    let (ok, checks) = doctor(dir.path(), &text);
    assert!(!ok, "a fail exits 1: {:?}", statuses(&checks));

    let slot = with_id(&checks, "postgres.slot")[0];
    assert_eq!(slot["status"], "fail", "{slot}");
    assert!(
        slot["found"]
            .as_str()
            .unwrap_or("")
            .contains("wal_status = lost"),
        "{slot}"
    );
    assert!(
        slot["fix"]
            .as_str()
            .unwrap_or("")
            .contains("SELECT pg_drop_replication_slot('cacheclear')"),
        "{slot}"
    );
    let identity = with_id(&checks, "postgres.replica_identity");
    let category = identity
        .iter()
        .find(|c| {
            c["found"]
                .as_str()
                .unwrap_or("")
                .contains("public.category")
        })
        .expect("a finding for public.category");
    assert_eq!(category["status"], "fail");
    assert_eq!(
        category["fix"],
        "ALTER TABLE public.category REPLICA IDENTITY FULL;"
    );
    // The fix quotes what needs quoting, so it runs as printed.
    let item = identity
        .iter()
        .find(|c| c["found"].as_str().unwrap_or("").contains("OrderItem"))
        .expect("a finding for OrderItem");
    assert_eq!(
        item["fix"],
        "ALTER TABLE public.\"OrderItem\" REPLICA IDENTITY FULL;"
    );
    pg.batch_execute(item["fix"].as_str().expect("fix"))
        .await
        .expect("the printed fix runs");
    let policy = with_id(&checks, "redis.maxmemory_policy")[0];
    assert_eq!(policy["status"], "fail", "{policy}");
    assert!(
        policy["fix"]
            .as_str()
            .unwrap_or("")
            .contains("volatile-lfu")
    );
    let ttl = with_id(&checks, "redis.keys_without_ttl")[0];
    assert_eq!(ttl["status"], "warn", "{ttl}");
    assert!(
        ttl["found"].as_str().unwrap_or("").contains("{product:1}"),
        "{ttl}"
    );
    assert!(
        !ttl["found"]
            .as_str()
            .unwrap_or("")
            .contains("cacheclear.ns"),
        "{ttl}"
    );

    // wal_level = replica: restart the server with it.
    drop(pg);
    let env = Env::start_with(PgOptions::default().conf("wal_level = replica"));
    let (ok, checks) = doctor(dir.path(), &config_toml(&env, "", "", ""));
    assert!(!ok);
    let level = with_id(&checks, "postgres.wal_level")[0];
    assert_eq!(level["status"], "fail", "{level}");
    assert!(
        level["fix"]
            .as_str()
            .unwrap_or("")
            .contains("ALTER SYSTEM SET wal_level = logical"),
        "{level}"
    );
}

#[test]
fn an_unreachable_database_is_one_fail_and_the_password_stays_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = cacheclear_harness::free_port().expect("port");
    let (ok, checks) = doctor(
        dir.path(),
        &format!(
            "[postgres]\nurl = \"postgres://app:s3cret@127.0.0.1:{port}/shop\"\n\n[redis]\nurl = \"redis://:s3cret@127.0.0.1:{port}/\"\n\n[[rules]]\ntable = \"public.product\"\nkeys = [\"product:{{id}}\"]\n"
        ),
    );
    assert!(!ok);
    let text = serde_json::to_string(&checks).expect("json");
    assert!(!text.contains("s3cret"), "{text}");
    assert_eq!(with_id(&checks, "postgres.connect")[0]["status"], "fail");
    assert_eq!(with_id(&checks, "redis.connect")[0]["status"], "fail");
    assert!(with_id(&checks, "postgres.wal_level").is_empty());

    // libpq's key=value form and a `password` URL parameter: redacted as well.
    for url in [
        format!("host=127.0.0.1 port={port} user=app password=s3cret dbname=shop"),
        format!("postgres://app@127.0.0.1:{port}/shop?password=s3cret"),
    ] {
        let (_, checks) = doctor(
            dir.path(),
            &format!(
                "[postgres]\nurl = \"{url}\"\n\n[redis]\nurl = \"redis://127.0.0.1:{port}/\"\n\n[[rules]]\ntable = \"public.product\"\nkeys = [\"product:{{id}}\"]\n"
            ),
        );
        let text = serde_json::to_string(&checks).expect("json");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("password=***"), "{text}");
    }
}

async fn set_no_ttl(r: &mut redis::aio::MultiplexedConnection, key: &str) {
    let () = redis::cmd("SET")
        .arg(key)
        .arg("raw")
        .query_async(r)
        .await
        .expect("SET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidator_config_gets_its_kafka_checks() {
    let kafka = cacheclear_harness::KafkaBroker::start().expect("tansu");
    kafka.create_topic("bus", 2).expect("topic");
    let redis = cacheclear_harness::RedisInstance::start().expect("Redis");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |instance: &str, dlq: &str| {
        format!(
            "[kafka]\nbrokers = \"{}\"\ngroup_id = \"g\"\ntopics = [\"bus\"]\ndead_letter_topic = \"{dlq}\"\n{instance}\n\n[redis]\nurl = \"{}\"\n\n[metrics]\nlisten = \"\"\n",
            kafka.bootstrap(),
            redis.url()
        )
    };
    // No instance id, a dead-letter topic that does not exist, no member running.
    let (ok, checks) = doctor(dir.path(), &config("", "missing.dlq"));
    assert!(!ok, "{:?}", statuses(&checks));
    assert_eq!(with_id(&checks, "kafka.connect")[0]["status"], "ok");
    assert_eq!(with_id(&checks, "kafka.instance_id")[0]["status"], "warn");
    let topics = with_id(&checks, "kafka.topic");
    let dlq = topics
        .iter()
        .find(|c| c["found"].as_str().unwrap_or("").contains("missing.dlq"))
        .expect("the dead-letter topic's check");
    assert_eq!(dlq["status"], "fail", "{dlq}");
    assert_eq!(with_id(&checks, "kafka.group_owners")[0]["status"], "warn");

    // tansu 0.6.0 does not describe consumer groups: the owner check says it cannot tell.
    // A running member with an instance id owns both partitions.
    kafka.create_topic("cacheclear.dlq", 1).expect("topic");
    let text = config("instance_id = \"m1\"", "cacheclear.dlq");
    let path = write_file(dir.path(), "member.toml", &text);
    let log = dir.path().join("member.log");
    let member = Process::invalidate(&path, &log);
    wait_for(
        "the member's assignment",
        Duration::from_secs(60),
        || async { member.log_text().contains("partitions assigned") },
    )
    .await;
    let (ok, checks) = doctor(dir.path(), &text);
    assert!(ok, "{:?}", statuses(&checks));
    let owners = with_id(&checks, "kafka.group_owners")[0];
    assert_eq!(owners["status"], "warn", "{owners}");
    assert!(
        owners["found"]
            .as_str()
            .unwrap_or("")
            .contains("does not describe group"),
        "{owners}"
    );
    assert_eq!(with_id(&checks, "kafka.instance_id")[0]["status"], "ok");
}
