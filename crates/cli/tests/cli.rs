//! The `cacheclear` binary: its `/metrics` endpoint against real PostgreSQL and Redis, its
//! configuration errors, its help.

mod common;

use std::ffi::OsStr;
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_reports_the_pipeline() {
    let mut env = Env::start();
    let pg = env.pg().await;
    let mut r = env.redis().await;
    let dir = tempfile::tempdir().unwrap();
    let addr = format!(
        "127.0.0.1:{}",
        cacheclear_harness::free_port().expect("free port")
    );
    let config = write_file(
        dir.path(),
        "cacheclear.toml",
        &config_toml(&env, "", "", &addr),
    );
    let log = dir.path().join("cacheclear.log");
    let mut process = Process::run(&config, &log);
    wait_streaming(&pg, WAIT).await;

    // Before any event, every counter and gauge is exported at zero (dashboards and alert rules
    // see the series from the start).
    let body = wait_sample(&addr, "cacheclear_slot_retained_wal_bytes", 0.0).await;
    // (The new slot's eviction of every rule table may already be counted as applied.)
    for series in [
        "cacheclear_invalidations_applied_total",
        "cacheclear_transactions_applied_total",
        "cacheclear_barrier_waits_total",
    ] {
        assert!(
            sample(&body, series).is_some(),
            "{series} at start:\n{body}"
        );
    }
    for series in [
        "cacheclear_sink_errors_total{sink=\"redis\"}",
        "cacheclear_sink_retries_total{sink=\"redis\"}",
        "cacheclear_table_fallbacks_total{reason=\"replica_identity\"}",
        "cacheclear_redis_cluster_retries_total",
    ] {
        assert_eq!(
            sample(&body, series),
            Some(0.0),
            "{series} at start:\n{body}"
        );
    }
    assert!(
        sample(&body, "cacheclear_confirmed_lsn").is_some(),
        "no confirmed-LSN gauge at start:\n{body}"
    );
    // stderr is a file, not a terminal: no ANSI colour codes in the log.
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("streaming"), "log: {text}");
    assert!(
        !text.contains('\u{1b}'),
        "ANSI escape codes in a log file: {text}"
    );

    set(&mut r, "{product:5}", "cached").await;
    pg.batch_execute("UPDATE product SET price_cents = 1 WHERE id = 5")
        .await
        .unwrap();
    wait_for("product:5 to be evicted", WAIT, || {
        let mut r = r.clone();
        async move { !exists(&mut r, "{product:5}").await }
    })
    .await;

    // The UPDATE evicted product:5 and category:6:products.
    let body = wait_sample(&addr, "cacheclear_invalidations_applied_total", 2.0).await;
    assert!(sample(&body, "cacheclear_transactions_applied_total").is_some_and(|v| v >= 1.0));
    let count = sample(&body, "cacheclear_commit_to_applied_lag_ms_count").expect("lag count");
    assert!(count >= 1.0, "lag histogram count {count}");
    assert!(
        sample(
            &body,
            "cacheclear_commit_to_applied_lag_ms_bucket{le=\"+Inf\"}"
        )
        .is_some_and(|v| v == count),
        "lag histogram buckets:\n{body}"
    );
    assert!(sample(&body, "cacheclear_commit_to_applied_lag_ms_sum").is_some());
    // The stage histograms saw the batch too.
    assert!(
        sample(&body, "cacheclear_visibility_barrier_ms_count").is_some_and(|v| v >= 1.0),
        "barrier histogram:\n{body}"
    );
    assert!(
        sample(&body, "cacheclear_sink_apply_ms_count{sink=\"redis\"}").is_some_and(|v| v >= 1.0),
        "sink apply histogram:\n{body}"
    );
    assert!(
        body.contains("# HELP cacheclear_commit_to_applied_lag_ms"),
        "no HELP for the lag:\n{body}"
    );
    // The confirmed LSN gauge reaches the UPDATE's commit.
    let commit = fence(&mut r, "product:5").await.expect("fence").0 as f64;
    wait_sample(&addr, "cacheclear_confirmed_lsn", commit).await;
    // The retained-WAL gauge (housekeeping, every <= 5 s): a real figure from the slot.
    let body = wait_sample(&addr, "cacheclear_slot_retained_wal_bytes", 1.0).await;
    let retained = sample(&body, "cacheclear_slot_retained_wal_bytes").unwrap();
    assert!(
        retained > 0.0 && retained < (1u64 << 30) as f64,
        "retained {retained}"
    );

    // Redis down: failed attempts are counted; once it is back the retried batch is applied.
    env.redis.stop().unwrap();
    pg.batch_execute("UPDATE product SET price_cents = 2 WHERE id = 6")
        .await
        .unwrap();
    wait_sample(&addr, "cacheclear_sink_errors_total{sink=\"redis\"}", 1.0).await;
    env.redis.start_again().unwrap();
    let r = env.redis().await;
    wait_for("product:6's eviction after Redis is back", WAIT, || {
        let mut r = r.clone();
        async move { fence(&mut r, "product:6").await.is_some() }
    })
    .await;
    assert!(process.exited().is_none(), "cacheclear exited");
    process.kill();
}

/// A config dir with `cacheclear.toml` = `text`; runs `cacheclear run --config` on it with `env`
/// and expects a quick failure: returns stderr.
fn run_failing(text: &str, env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "cacheclear.toml", text);
    let mut cmd = command(&["run".as_ref(), "--config".as_ref(), path.as_os_str()]);
    cmd.envs(env.iter().copied());
    let (status, _, stderr) = run_to_end(cmd, Duration::from_secs(30));
    let status = status.expect("cacheclear should exit on a configuration error, not hang");
    assert!(!status.success(), "cacheclear succeeded: {stderr}");
    assert!(
        stderr.contains(&path.display().to_string()),
        "the error does not name the file: {stderr}"
    );
    stderr
}

/// A valid configuration pointing at ports nothing listens on (errors come before connecting).
fn valid_config(pg_extra: &str, rules: &str) -> String {
    format!(
        r#"{top}
[postgres]
url = "postgres://postgres@127.0.0.1:1/postgres"
{pg_extra}

[redis]
url = "redis://127.0.0.1:1/"

[metrics]
listen = ""

{rules}
"#,
        // A top-level key (`rules = []`) must come before the first table.
        top = if rules.starts_with("[[") { "" } else { rules },
        rules = if rules.starts_with("[[") { rules } else { "" },
    )
}

const RULES: &str = r#"[[rules]]
table = "public.product"
keys = ["product:{id}"]
"#;

fn assert_mentions(stderr: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "the error lacks `{needle}`:\n{stderr}"
        );
    }
}

#[test]
fn config_errors_name_the_file_and_the_field() {
    // A missing file.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let (status, _, stderr) = run_to_end(
        command(&["run".as_ref(), "--config".as_ref(), missing.as_os_str()]),
        Duration::from_secs(30),
    );
    assert!(!status.expect("exits").success());
    assert_mentions(&stderr, &[&missing.display().to_string(), "does not exist"]);

    // An unknown field (a typo must not fall back to the default).
    let stderr = run_failing(&valid_config("slott = \"x\"", RULES), &[]);
    assert_mentions(&stderr, &["unknown field `slott`", "postgres"]);

    // An invalid slot name.
    let stderr = run_failing(&valid_config("slot = \"Bad-Name\"", RULES), &[]);
    assert_mentions(&stderr, &["postgres.slot", "Bad-Name"]);

    // An empty rules list.
    let stderr = run_failing(&valid_config("", "rules = []"), &[]);
    assert_mentions(&stderr, &["rules: at least one [[rules]] entry is needed"]);
    // No rules at all.
    let stderr = run_failing(&valid_config("", ""), &[]);
    assert_mentions(&stderr, &["missing", "\"rules\""]);

    // A brace in a template's literal text.
    let stderr = run_failing(
        &valid_config(
            "",
            "[[rules]]\ntable = \"public.product\"\nkeys = [\"prod}uct:{id}\"]\n",
        ),
        &[],
    );
    assert_mentions(
        &stderr,
        &[
            "rules[0]",
            "public.product",
            "prod}uct:{id}",
            "`}` in literal text",
        ],
    );

    // The environment overrides the file: the file's slot is fine, the variable's is not.
    let stderr = run_failing(
        &valid_config("slot = \"fine\"", RULES),
        &[("CACHECLEAR__POSTGRES__SLOT", "Bad-Name")],
    );
    assert_mentions(&stderr, &["postgres.slot", "Bad-Name"]);
    // …and a valid override of an invalid file value is accepted by validation: the process then
    // gets as far as connecting (nothing listens on port 1), which it retries instead of exiting.
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "cacheclear.toml",
        &valid_config("slot = \"Bad-Name\"", RULES),
    );
    let mut cmd = command(&["run".as_ref(), "--config".as_ref(), path.as_os_str()]);
    cmd.env("CACHECLEAR__POSTGRES__SLOT", "good_name")
        .env("CACHECLEAR_LOG", "info");
    let (status, _, stderr) = run_to_end(cmd, Duration::from_secs(3));
    assert!(
        status.is_none(),
        "with a valid slot from the environment cacheclear should keep retrying the connection, \
         but it exited ({status:?}): {stderr}"
    );
    assert!(
        !stderr.contains("Bad-Name"),
        "the file's value was used: {stderr}"
    );
}

#[test]
fn help_for_every_command() {
    for (args, needles) in [
        (&["--help"][..], &["run", "bench", "Usage"][..]),
        (&["run", "--help"], &["--config", "cacheclear.toml"]),
        (&["bench", "--help"], &["pipeline"]),
        (&["bench", "pipeline", "--help"], &["--json"]),
    ] {
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let (status, stdout, stderr) = run_to_end(command(&args), Duration::from_secs(30));
        assert!(
            status.expect("exits").success(),
            "cacheclear {args:?} failed: {stderr}"
        );
        for needle in needles {
            assert!(
                stdout.contains(needle),
                "cacheclear {args:?}: help lacks `{needle}`:\n{stdout}"
            );
        }
    }
}
