//! The Rust client's runner of the language-neutral conformance suite (`conformance/`): every
//! `conformance/scenarios/*.json` against one private Redis, as conformance/README.md specifies.
//! The Python client (`clients/python`) runs the same files, so the protocol (docs/protocol.md)
//! and both clients cannot drift apart.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cacheclear_client::{
    Client, Config, Error, Loaded, Lsn, ReadPolicy, StalenessConfig, WaitTimeoutPolicy,
};
use cacheclear_harness::RedisInstance;
use cacheclear_protocol::{KeyLayout, NamespaceLayout, scripts};
use futures::future::BoxFuture;
use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

type StepResult = Result<(), String>;

fn suite_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../conformance/scenarios")
}

/// What one scenario's steps share.
struct Scenario {
    admin: MultiplexedConnection,
    url: String,
    config: Config,
    /// The client of `read` steps (built once per scenario).
    client: Client,
    /// Background `spawn` tasks, awaited at the end.
    spawned: Mutex<Vec<JoinHandle<StepResult>>>,
    /// Expectations that failed inside a loader (`during_load`).
    loader_failures: Mutex<Vec<String>>,
}

fn field_u64(obj: &Value, name: &str) -> Result<Option<u64>, String> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("`{name}` must be a non-negative integer, got {v}")),
    }
}

fn field_str<'a>(obj: &'a Value, name: &str) -> Result<Option<&'a str>, String> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(format!("`{name}` must be a string, got {v}")),
    }
}

fn parse_lsn(text: &str) -> Result<Lsn, String> {
    text.parse::<Lsn>().map_err(|e| e.to_string())
}

/// The scenario's `client` section as a [`Config`].
fn client_config(section: &Value) -> Result<Config, String> {
    let mut c = Config::default();
    if let Some(v) = field_u64(section, "lease_ms")? {
        c = c.with_lease_ms(v);
    }
    if let Some(v) = field_u64(section, "lease_wait_ms")? {
        c = c.with_lease_wait_ms(v);
    }
    if let Some(v) = field_u64(section, "backoff_initial_ms")? {
        c = c.with_backoff_initial_ms(v);
    }
    if let Some(v) = field_u64(section, "backoff_max_ms")? {
        c = c.with_backoff_max_ms(v);
    }
    if let Some(v) = field_u64(section, "ttl_base_ms")? {
        c = c.with_ttl_base_ms(v);
    }
    if let Some(v) = section.get("ttl_jitter").and_then(Value::as_f64) {
        c = c.with_ttl_jitter(v);
    }
    match field_str(section, "on_wait_timeout")? {
        None | Some("load_without_filling") => {}
        Some("error") => c = c.with_on_wait_timeout(WaitTimeoutPolicy::Error),
        Some(other) => return Err(format!("unknown on_wait_timeout `{other}`")),
    }
    if let Some(prefixes) = section.get("strict_key_prefixes").and_then(Value::as_array) {
        c = c.with_strict_key_prefixes(prefixes.iter().filter_map(Value::as_str));
    }
    if let Some(s) = section.get("staleness").filter(|s| !s.is_null()) {
        let namespace = field_str(s, "namespace")?.ok_or("staleness needs a namespace")?;
        let mut st = StalenessConfig::new(namespace);
        if let Some(v) = field_u64(s, "max_staleness_ms")? {
            st = st.with_max_staleness_ms(v);
        }
        if let Some(v) = field_u64(s, "refresh_ms")? {
            st = st.with_refresh_ms(v);
        }
        if let Some(v) = field_u64(s, "read_your_writes_wait_ms")? {
            st = st.with_read_your_writes_wait_ms(v);
        }
        if let Some(v) = field_u64(s, "max_bypass_loads")? {
            st = st.with_max_bypass_loads(usize::try_from(v).map_err(|e| e.to_string())?);
        }
        c = c.with_staleness(st);
    }
    c.validate().map_err(|e| format!("client section: {e}"))?;
    Ok(c)
}

/// A Redis reply as the JSON the scenario files write.
fn reply_json(v: &redis::Value) -> Value {
    use redis::Value as R;
    match v {
        R::Nil => Value::Null,
        R::Int(i) => json!(i),
        R::BulkString(b) => Value::String(String::from_utf8_lossy(b).into_owned()),
        R::SimpleString(s) => Value::String(s.clone()),
        R::Okay => Value::String("OK".to_owned()),
        R::Array(items) | R::Set(items) => Value::Array(items.iter().map(reply_json).collect()),
        other => Value::String(format!("{other:?}")),
    }
}

fn error_kind(e: &Error) -> &'static str {
    match e {
        Error::Loader { .. } => "loader",
        Error::LeaseWaitTimeout { .. } => "lease_wait_timeout",
        Error::InvalidKey(_) => "invalid_key",
        Error::BypassOverloaded { .. } => "bypass_overloaded",
        _ => "other",
    }
}

/// One `read` (or one reader of `concurrent`): the loader the step describes, run through
/// `client`. Returns the result and whether the loader ran.
async fn read(
    sc: &Arc<Scenario>,
    client: &Client,
    spec: &Value,
    loads: &Arc<AtomicUsize>,
) -> Result<(Result<Value, Error>, bool), String> {
    let key = field_str(spec, "key")?
        .ok_or("read needs a key")?
        .to_owned();
    let load = spec.get("load").cloned().unwrap_or(Value::Null);
    let version = field_str(spec, "version")?.map(parse_lsn).transpose()?;
    let load_ms = field_u64(spec, "load_ms")?.unwrap_or(0);
    let load_fails = spec
        .get("load_fails")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let during: Vec<Value> = spec
        .get("during_load")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let strict = spec.get("strict").and_then(Value::as_bool).unwrap_or(false);
    let at_least = field_str(spec, "at_least")?.map(parse_lsn).transpose()?;

    let ran = Arc::new(AtomicUsize::new(0));
    let loader = {
        let (sc, ran, loads) = (sc.clone(), ran.clone(), loads.clone());
        move || async move {
            ran.fetch_add(1, Ordering::SeqCst);
            loads.fetch_add(1, Ordering::SeqCst);
            if load_ms > 0 {
                tokio::time::sleep(Duration::from_millis(load_ms)).await;
            }
            if let Err(e) = run_steps(sc.clone(), during, "during_load".to_owned()).await {
                sc.loader_failures.lock().expect("lock").push(e);
            }
            if load_fails {
                return Err::<Loaded<Value>, _>("the scenario's loader fails".to_owned());
            }
            Ok(match version {
                Some(v) => Loaded::at(load, v),
                None => Loaded::new(load),
            })
        }
    };
    let result = match (at_least, strict) {
        (Some(lsn), _) => client.get_at_least(&key, lsn, loader).await,
        (None, true) => client.get_with(&key, ReadPolicy::Strict, loader).await,
        (None, false) => client.get_or_load(&key, loader).await,
    };
    Ok((result, ran.load(Ordering::SeqCst) > 0))
}

fn check_read(expect: &Value, result: &Result<Value, Error>, loaded: bool) -> StepResult {
    if let Some(want) = expect.get("loaded").and_then(Value::as_bool)
        && want != loaded
    {
        return Err(format!(
            "loaded: want {want}, the loader {} run",
            if loaded { "did" } else { "did not" }
        ));
    }
    match (expect.get("error").and_then(Value::as_str), result) {
        (Some(kind), Err(e)) if error_kind(e) == kind => Ok(()),
        (Some(kind), Err(e)) => Err(format!(
            "error: want `{kind}`, got `{}`: {e}",
            error_kind(e)
        )),
        (Some(kind), Ok(v)) => Err(format!("error: want `{kind}`, the read returned {v}")),
        (None, Err(e)) => Err(format!("the read failed: {e}")),
        (None, Ok(v)) => match expect.get("value") {
            Some(want) if want != v => Err(format!("value: want {want}, got {v}")),
            _ => Ok(()),
        },
    }
}

async fn read_step(sc: &Arc<Scenario>, spec: &Value, expect: &Value) -> StepResult {
    let loads = Arc::new(AtomicUsize::new(0));
    let (result, loaded) = read(sc, &sc.client, spec, &loads).await?;
    let failures: Vec<String> = std::mem::take(&mut *sc.loader_failures.lock().expect("lock"));
    if !failures.is_empty() {
        return Err(failures.join("; "));
    }
    check_read(expect, &result, loaded)
}

async fn concurrent_step(sc: &Arc<Scenario>, spec: &Value, expect: &Value) -> StepResult {
    let clients = field_u64(spec, "clients")?.unwrap_or(1);
    let readers = field_u64(spec, "readers")?.unwrap_or(1);
    let read_spec = spec.get("read").ok_or("concurrent needs a read")?.clone();
    if read_spec.get("during_load").is_some() {
        return Err("during_load is not allowed in concurrent".to_owned());
    }
    let total = usize::try_from(clients * readers).map_err(|e| e.to_string())?;
    let barrier = Arc::new(tokio::sync::Barrier::new(total));
    let loads = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        // Its own connection and in-process state: what another process would have.
        let client = Client::connect(&sc.url, sc.config.clone())
            .await
            .map_err(|e| format!("connect: {e}"))?;
        for _ in 0..readers {
            let (sc, client, spec, loads, barrier) = (
                sc.clone(),
                client.clone(),
                read_spec.clone(),
                loads.clone(),
                barrier.clone(),
            );
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                read(&sc, &client, &spec, &loads).await
            }));
        }
    }
    let want_value = expect.get("value");
    for (i, task) in tasks.into_iter().enumerate() {
        let (result, _) = task
            .await
            .map_err(|e| format!("reader {i} panicked: {e}"))??;
        match (result, want_value) {
            (Err(e), _) => return Err(format!("reader {i} failed: {e}")),
            (Ok(v), Some(want)) if &v != want => {
                return Err(format!("reader {i}: value {v}, want {want}"));
            }
            _ => {}
        }
    }
    let n = loads.load(Ordering::SeqCst);
    match field_u64(expect, "loads")? {
        Some(want) if usize::try_from(want).ok() != Some(n) => {
            Err(format!("loads: want {want}, the loaders ran {n} times"))
        }
        _ => Ok(()),
    }
}

async fn invalidate_step(sc: &Scenario, spec: &Value, expect: Option<&Value>) -> StepResult {
    let keys = spec
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("invalidate needs keys")?;
    let lsn = parse_lsn(field_str(spec, "lsn")?.ok_or("invalidate needs an lsn")?)?;
    let fence_ttl = field_u64(spec, "fence_ttl_ms")?.unwrap_or(600_000);
    let script = scripts::invalidate();
    let mut inv = script.prepare_invoke();
    for key in keys {
        let key = key.as_str().ok_or("keys must be strings")?;
        let layout = KeyLayout::new(key).map_err(|e| e.to_string())?;
        inv.key(layout.value())
            .key(layout.lease())
            .key(layout.fence());
    }
    inv.arg(fence_ttl);
    for _ in keys {
        inv.arg(lsn.to_fixed_hex());
    }
    let mut conn = sc.admin.clone();
    let reply: redis::Value = inv
        .invoke_async(&mut conn)
        .await
        .map_err(|e| format!("invalidate.lua: {e}"))?;
    compare_reply(expect, &reply)
}

fn compare_reply(expect: Option<&Value>, reply: &redis::Value) -> StepResult {
    let got = reply_json(reply);
    match expect {
        Some(want) if *want != got => Err(format!("reply: want {want}, got {got}")),
        _ => Ok(()),
    }
}

async fn redis_now_ms(conn: &mut MultiplexedConnection) -> Result<u64, String> {
    let (s, us): (u64, u64) = redis::cmd("TIME")
        .query_async(conn)
        .await
        .map_err(|e| format!("TIME: {e}"))?;
    Ok(s * 1000 + us / 1000)
}

async fn namespace_step(sc: &Scenario, spec: &Value) -> StepResult {
    let name = field_str(spec, "name")?.ok_or("namespace needs a name")?;
    let layout = NamespaceLayout::new(name).map_err(|e| e.to_string())?;
    let mut conn = sc.admin.clone();
    let epoch = field_u64(spec, "epoch")?;
    let mut pipe = redis::pipe();
    match epoch {
        Some(e) => pipe.cmd("SET").arg(layout.epoch()).arg(e).ignore(),
        None => pipe.cmd("DEL").arg(layout.epoch()).ignore(),
    };
    match spec.get("watermark").filter(|w| !w.is_null()) {
        None => {
            pipe.cmd("DEL").arg(layout.watermark()).ignore();
        }
        Some(w) => {
            let lsn = parse_lsn(field_str(w, "lsn")?.ok_or("watermark needs an lsn")?)?;
            let lag = field_u64(w, "lag_ms")?.unwrap_or(0);
            let age = field_u64(w, "age_ms")?.unwrap_or(0);
            let w_epoch = field_u64(w, "epoch")?.or(epoch).unwrap_or(0);
            let written = redis_now_ms(&mut conn).await?.saturating_sub(age);
            let text = format!("{} 0 {lag} {written} {w_epoch}", lsn.to_fixed_hex());
            pipe.cmd("SET")
                .arg(layout.watermark())
                .arg(text)
                .arg("PX")
                .arg(600_000)
                .ignore();
        }
    }
    pipe.query_async::<()>(&mut conn)
        .await
        .map_err(|e| format!("writing the namespace: {e}"))
}

async fn check_step(sc: &Scenario, spec: &Value) -> StepResult {
    let keys = spec.as_object().ok_or("check takes an object")?;
    let mut conn = sc.admin.clone();
    for (key, want) in keys {
        let (value, pttl): (Option<Vec<u8>>, i64) = redis::pipe()
            .cmd("GET")
            .arg(key)
            .cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("GET {key}: {e}"))?;
        let Some(want) = want.as_object() else {
            if let Some(v) = value {
                return Err(format!(
                    "`{key}`: want no key, it holds `{}`",
                    String::from_utf8_lossy(&v)
                ));
            }
            continue;
        };
        let Some(value) = value else {
            return Err(format!("`{key}`: want a value, the key does not exist"));
        };
        let text = String::from_utf8_lossy(&value);
        if let Some(eq) = want.get("equals").and_then(Value::as_str)
            && eq != text
        {
            return Err(format!("`{key}`: want `{eq}`, got `{text}`"));
        }
        if let Some(fields) = want.get("envelope").and_then(Value::as_object) {
            let env: Value = serde_json::from_str(&text)
                .map_err(|e| format!("`{key}` is not JSON ({e}): `{text}`"))?;
            for (f, want_f) in fields {
                let got = env.get(f).unwrap_or(&Value::Null);
                if got != want_f {
                    return Err(format!(
                        "`{key}` envelope field `{f}`: want {want_f}, got {got} in `{text}`"
                    ));
                }
            }
        }
        if let Some(range) = want.get("ttl_ms").and_then(Value::as_array) {
            let (lo, hi) = match (
                range.first().and_then(Value::as_i64),
                range.get(1).and_then(Value::as_i64),
            ) {
                (Some(lo), Some(hi)) => (lo, hi),
                _ => return Err(format!("`{key}`: ttl_ms must be [min, max]")),
            };
            if pttl < lo || pttl > hi {
                return Err(format!("`{key}`: PTTL {pttl} outside [{lo}, {hi}]"));
            }
        }
    }
    Ok(())
}

async fn raw_step(sc: &Scenario, spec: &Value, expect: Option<&Value>) -> StepResult {
    let args = spec.as_array().ok_or("redis takes an array of strings")?;
    let mut cmd = redis::Cmd::new();
    for a in args {
        cmd.arg(a.as_str().ok_or("redis arguments must be strings")?);
    }
    let mut conn = sc.admin.clone();
    let reply: redis::Value = cmd
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("{spec}: {e}"))?;
    compare_reply(expect, &reply)
}

/// Runs `steps` in order; an error names the step (`where_` + index).
fn run_steps(
    sc: Arc<Scenario>,
    steps: Vec<Value>,
    where_: String,
) -> BoxFuture<'static, StepResult> {
    Box::pin(async move {
        for (i, step) in steps.iter().enumerate() {
            let at = |e: String| format!("{where_} step {i} ({step}): {e}");
            let obj = step
                .as_object()
                .ok_or_else(|| at("a step is an object".into()))?;
            let expect = obj.get("expect");
            let none = Value::Null;
            let result = if let Some(spec) = obj.get("read") {
                read_step(&sc, spec, expect.unwrap_or(&none)).await
            } else if let Some(spec) = obj.get("concurrent") {
                concurrent_step(&sc, spec, expect.unwrap_or(&none)).await
            } else if let Some(spec) = obj.get("invalidate") {
                invalidate_step(&sc, spec, expect).await
            } else if let Some(spec) = obj.get("namespace") {
                namespace_step(&sc, spec).await
            } else if let Some(spec) = obj.get("redis") {
                raw_step(&sc, spec, expect).await
            } else if let Some(spec) = obj.get("check") {
                check_step(&sc, spec).await
            } else if let Some(ms) = obj.get("sleep_ms") {
                let ms = ms
                    .as_u64()
                    .ok_or_else(|| at("sleep_ms is an integer".into()))?;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(())
            } else if let Some(spec) = obj.get("spawn") {
                let after = field_u64(spec, "after_ms").map_err(at)?.unwrap_or(0);
                let inner = spec
                    .get("steps")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let (sc2, label) = (sc.clone(), format!("{where_} step {i} spawn"));
                let task = tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(after)).await;
                    run_steps(sc2, inner, label).await
                });
                sc.spawned.lock().expect("lock").push(task);
                Ok(())
            } else {
                Err("unknown step".to_owned())
            };
            result.map_err(at)?;
        }
        Ok(())
    })
}

async fn run_scenario(redis: &RedisInstance, path: &Path) -> StepResult {
    let text = std::fs::read_to_string(path).map_err(|e| format!("read: {e}"))?;
    let doc: Value = serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))?;
    let mut admin = redis::Client::open(redis.url())
        .map_err(|e| e.to_string())?
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    redis::pipe()
        .cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .cmd("FLUSHALL")
        .query_async::<()>(&mut admin)
        .await
        .map_err(|e| format!("reset: {e}"))?;
    let config = client_config(doc.get("client").unwrap_or(&Value::Null))?;
    let client = Client::connect(&redis.url(), config.clone())
        .await
        .map_err(|e| format!("connect the client: {e}"))?;
    let sc = Arc::new(Scenario {
        admin,
        url: redis.url(),
        config,
        client,
        spawned: Mutex::new(Vec::new()),
        loader_failures: Mutex::new(Vec::new()),
    });
    let steps = doc
        .get("steps")
        .and_then(Value::as_array)
        .cloned()
        .ok_or("no steps")?;
    let outcome = run_steps(sc.clone(), steps, "".to_owned()).await;
    let spawned: Vec<_> = std::mem::take(&mut *sc.spawned.lock().expect("lock"));
    for task in spawned {
        task.await
            .map_err(|e| format!("a spawned task panicked: {e}"))??;
    }
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_scenario_passes() {
    let redis = RedisInstance::start().expect("start redis");
    let mut files: Vec<PathBuf> = std::fs::read_dir(suite_dir())
        .expect("conformance/scenarios")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 15, "only {} scenario files", files.len());
    let mut failures = Vec::new();
    for path in &files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match run_scenario(&redis, path).await {
            Ok(()) => eprintln!("conformance: ok   {name}"),
            Err(e) => {
                eprintln!("conformance: FAIL {name}: {e}");
                failures.push(format!("{name}: {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} scenarios failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

/// The runner itself must be able to fail: a scenario with a wrong expectation is reported.
#[tokio::test]
async fn a_wrong_expectation_fails() {
    let redis = RedisInstance::start().expect("start redis");
    let dir = tempfile_dir();
    let path = dir.join("wrong.json");
    std::fs::write(
        &path,
        r#"{"name":"wrong","client":{},"steps":[
            {"read":{"key":"k:1","load":1},"expect":{"value":2,"loaded":true}}]}"#,
    )
    .expect("write");
    let err = run_scenario(&redis, &path).await.expect_err("must fail");
    assert!(err.contains("value: want 2, got 1"), "{err}");
    let path = dir.join("wrong_check.json");
    std::fs::write(
        &path,
        r#"{"name":"wrong","client":{},"steps":[
            {"read":{"key":"k:1","load":1},"expect":{"value":1}},
            {"check":{"{k:1}":null}}]}"#,
    )
    .expect("write");
    let err = run_scenario(&redis, &path).await.expect_err("must fail");
    assert!(err.contains("want no key"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cacheclear-conformance-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
