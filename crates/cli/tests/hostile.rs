//! Hostile records against a running `cacheclear invalidate` (the binary) on a real broker
//! (tansu) and real Redis: random bytes, truncated JSON, 5,000-deep nesting, wrong types, forged
//! fields, braces in keys, LSNs wider than 64 bits, a BOM, NUL and bidi characters, and one record
//! of 2 MB — larger than the dead-letter producer's `message.max.bytes` (librdkafka's default
//! 1,000,000 bytes) — on a bus topic and a Debezium topic, then valid bus records. Every malformed
//! record is accounted for (dead-lettered, or refused by the dead-letter topic and counted), every
//! skippable one is counted, the process never exits, and every valid record after them is
//! applied; both topics are committed to their ends.
//!
//! Two runs over the same records: the default configuration (the 2 MB record is dead-lettered as
//! a bounded copy), and one whose dead-letter producer takes at most 1,000 bytes
//! (`message.max.bytes = "1000"`, librdkafka's minimum), which refuses even the bounded copy: the
//! permanent refusal is logged, counted and committed instead of stalling.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cacheclear_harness::fixtures::{fences, redis_conn};
use cacheclear_harness::{KafkaBroker, RedisInstance};
use cacheclear_protocol::{BusRecord, Lsn, Op};
use common::{committed, sample, scrape, wait_for};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_cacheclear");
const BUS: &str = "cacheclear.invalidations";
const DBZ: &str = "shop.public.product";
const DLQ: &str = "cacheclear.dlq";
const BIG: usize = 2_000_000;

/// What the invalidator must do with a record.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// Not a record: dead-lettered (or refused by the dead-letter topic, counted).
    Malformed,
    /// Nothing to evict (tombstone, table without a rule, logical message): counted, skipped.
    Skipped,
    /// A valid record, odd as it looks: these keys get this fence.
    Applied(Vec<String>, Lsn),
}

struct Record {
    topic: &'static str,
    kind: &'static str,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    expect: Expect,
}

fn bus_json(key: &str, lsn: Lsn) -> Value {
    json!({"key": key, "commit_lsn": lsn.to_string(), "commit_time_us": 1_764_445_200_000_000i64,
           "xid": 7, "table": "public.product", "op": "update"})
}

fn dbz_event(op: &str, after: Value, lsn: Value) -> Value {
    json!({
        "before": null, "after": after, "op": op, "ts_ms": 1_764_445_200_100i64,
        "source": {"version": "2.7.0.Final", "connector": "postgresql", "name": "shop",
                   "ts_ms": 1_764_445_200_000i64, "db": "shop", "schema": "public",
                   "table": "product", "txId": 555, "lsn": lsn}
    })
}

/// A deterministic xorshift byte stream (no seed from the clock: the same records every run).
fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The hostile records: every kind, `rounds` times each (with the round in it), on both topics.
fn hostile(rounds: u64) -> Vec<Record> {
    let mut out = Vec::new();
    let mut push = |topic, kind, key: Option<Vec<u8>>, value: Option<Vec<u8>>, expect| {
        out.push(Record {
            topic,
            kind,
            key,
            value,
            expect,
        })
    };
    let to_vec = |v: &Value| serde_json::to_vec(v).expect("json");
    for i in 0..rounds {
        let k = Some(format!("hostile-{i}").into_bytes());
        let lsn = Lsn(0x10_0000_0000 + i);
        for topic in [BUS, DBZ] {
            // 1. random bytes (never JSON: the first byte is forced to a non-JSON start).
            let mut r = random_bytes(i * 2 + u64::from(topic == DBZ), 64 + (i as usize % 200));
            r[0] = b'\x07';
            push(topic, "random bytes", k.clone(), Some(r), Expect::Malformed);
            // 2. truncated JSON.
            let whole = if topic == BUS {
                to_vec(&bus_json(&format!("t:{i}"), lsn))
            } else {
                to_vec(&dbz_event(
                    "c",
                    json!({"id": i, "category_id": 1}),
                    json!(lsn.0),
                ))
            };
            let cut = whole[..whole.len() * (i as usize % 9 + 1) / 10].to_vec();
            push(
                topic,
                "truncated JSON",
                k.clone(),
                Some(cut),
                Expect::Malformed,
            );
            // 3. 5,000-deep nesting, arrays and objects.
            let deep = if i % 2 == 0 {
                format!("{}{}", "[".repeat(5000), "]".repeat(5000))
            } else {
                format!("{}1{}", "{\"a\":".repeat(5000), "}".repeat(5000))
            };
            push(
                topic,
                "5,000-deep nesting",
                k.clone(),
                Some(deep.into_bytes()),
                Expect::Malformed,
            );
            // 4. a BOM before valid JSON.
            let mut bom = b"\xEF\xBB\xBF".to_vec();
            bom.extend_from_slice(&whole);
            push(topic, "BOM", k.clone(), Some(bom), Expect::Malformed);
            // 5. a tombstone (null value): nothing to do.
            push(topic, "tombstone", k.clone(), None, Expect::Skipped);
        }
        // Bus topic only.
        let mut wrong = bus_json("w:1", lsn);
        match i % 4 {
            0 => wrong["key"] = json!(42),
            1 => wrong["xid"] = json!("7"),
            2 => wrong["op"] = json!("upsert"),
            _ => wrong["commit_time_us"] = json!(1.5),
        }
        push(
            BUS,
            "wrong types",
            k.clone(),
            Some(to_vec(&wrong)),
            Expect::Malformed,
        );
        let mut forged = bus_json("f:1", lsn);
        match i % 3 {
            0 => forged["admin"] = json!(true),
            1 => forged["patterns"] = json!(["{f:*}*"]),
            _ => {
                forged.as_object_mut().expect("object").remove("key");
                forged["patterns"] = json!([""]);
            }
        }
        push(
            BUS,
            "forged fields",
            k.clone(),
            Some(to_vec(&forged)),
            Expect::Malformed,
        );
        let brace = bus_json(&format!("a}}b{{{i}"), lsn);
        push(
            BUS,
            "braces in keys",
            k.clone(),
            Some(to_vec(&brace)),
            Expect::Malformed,
        );
        let mut wide = bus_json("wide:1", lsn);
        wide["commit_lsn"] =
            json!(["1FFFFFFFF/0", "0/1FFFFFFFF", "18446744073709551616", "-1/0"][i as usize % 4]);
        push(
            BUS,
            "LSN wider than 64 bits",
            k.clone(),
            Some(to_vec(&wide)),
            Expect::Malformed,
        );
        // NUL and bidi characters in a key are valid (Redis keys are binary-safe): applied.
        let odd = format!("odd:{i}\u{0}\u{202E}\u{FEFF}");
        push(
            BUS,
            "NUL and bidi characters",
            Some(odd.clone().into_bytes()),
            Some(to_vec(&bus_json(&odd, lsn))),
            Expect::Applied(vec![odd], lsn),
        );

        // Debezium topic only.
        let mut wrong = dbz_event("c", json!({"id": i, "category_id": 1}), json!(lsn.0));
        match i % 3 {
            0 => wrong["op"] = json!(7),
            1 => wrong["after"] = json!("x"),
            _ => wrong["source"] = json!([]),
        }
        push(
            DBZ,
            "wrong types",
            k.clone(),
            Some(to_vec(&wrong)),
            Expect::Malformed,
        );
        let mut forged = dbz_event("c", json!({"id": i, "category_id": 1}), json!(lsn.0));
        forged["op"] = json!(["x", "delete", "cc"][i as usize % 3]);
        push(
            DBZ,
            "forged fields",
            k.clone(),
            Some(to_vec(&forged)),
            Expect::Malformed,
        );
        let mut other = dbz_event("c", json!({"id": i}), json!(lsn.0));
        other["source"]["table"] = json!("not_a_rule_table");
        push(
            DBZ,
            "forged table",
            k.clone(),
            Some(to_vec(&other)),
            Expect::Skipped,
        );
        // 2^64 + i does not fit serde_json's Value: written as text into the event.
        let wide = dbz_event("c", json!({"id": i, "category_id": 1}), json!("@LSN@"));
        let lsn_text = [
            (u128::from(u64::MAX) + 1 + u128::from(i)).to_string(),
            "\"1FFFFFFFF/0\"".to_owned(),
            "-5".to_owned(),
        ][i as usize % 3]
            .clone();
        let wide = String::from_utf8(to_vec(&wide))
            .expect("utf-8")
            .replace("\"@LSN@\"", &lsn_text);
        push(
            DBZ,
            "LSN wider than 64 bits",
            k.clone(),
            Some(wide.into_bytes()),
            Expect::Malformed,
        );
        // Braces, NUL and bidi characters in column values are escaped into the key: applied.
        let id = format!("}}{{*{i}\u{0}\u{202E}");
        let braces = dbz_event("c", json!({"id": id, "category_id": null}), json!(lsn.0));
        let mut enc = String::from("product:");
        cacheclear_rules::encode_value(&id, &mut enc);
        push(
            DBZ,
            "braces, NUL and bidi in values",
            k.clone(),
            Some(to_vec(&braces)),
            Expect::Applied(vec![enc], lsn),
        );
    }
    // One record of 2 MB: over the dead-letter producer's message.max.bytes.
    let mut big = br#"{"key":""#.to_vec();
    big.extend(std::iter::repeat_n(b'}', BIG));
    big.extend_from_slice(
        br#"","commit_lsn":"0/1","commit_time_us":1,"xid":1,"table":"t","op":"insert"}"#,
    );
    push(
        BUS,
        "2 MB record",
        Some(b"big".to_vec()),
        Some(big),
        Expect::Malformed,
    );
    out
}

/// `cacheclear invalidate --config <path>`, stderr to `log`; SIGKILLed when dropped (the log
/// tail is printed when the test fails).
struct Invalidator {
    child: Child,
    log: PathBuf,
}

impl Invalidator {
    fn start(config: &Path, log: &Path) -> Invalidator {
        let file = std::fs::File::create(log).expect("log file");
        let mut cmd = Command::new(BIN);
        cmd.args(["invalidate", "--config"]).arg(config);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CACHECLEAR__") {
                cmd.env_remove(k);
            }
        }
        cmd.env("CACHECLEAR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        cacheclear_harness::kill_on_parent_exit(&mut cmd, 9);
        let child = cacheclear_harness::spawn_tied_to_process(cmd).expect("spawn cacheclear");
        Invalidator {
            child,
            log: log.to_owned(),
        }
    }

    fn assert_running(&mut self) {
        let exited = self.child.try_wait().expect("try_wait");
        assert!(exited.is_none(), "cacheclear invalidate exited: {exited:?}");
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(sent.success());
        self.child.wait().expect("wait")
    }
}

impl Drop for Invalidator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- cacheclear invalidate log (last 40 lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{}", &l[..l.len().min(600)]);
            }
        }
    }
}

fn config_toml(
    kafka: &KafkaBroker,
    redis: &RedisInstance,
    group: &str,
    listen: &str,
    extra: &str,
) -> String {
    format!(
        r#"[kafka]
brokers = "{brokers}"
group_id = "{group}"
topics = ["{BUS}"]
debezium_topics = ["{DBZ}"]
dead_letter_topic = "{DLQ}"
commit_interval_ms = 0

[kafka.properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
{extra}

[redis]
url = "{redis}"

[metrics]
listen = "{listen}"

[[rules]]
table = "public.product"
keys = ["product:{{id}}", "category:{{category_id}}:products"]

# The Debezium events here carry no schema: the invalidator must know the key columns' types
# (`id` is text so that braces, NUL and bidi characters can be carried in it).
[rules.types]
id = "text"
category_id = "integer"
"#,
        brokers = kafka.bootstrap(),
        redis = redis.url(),
    )
}

fn records_total(body: &str, outcome: &str) -> u64 {
    sample(
        body,
        &format!("cacheclear_invalidator_records_total{{outcome=\"{outcome}\"}}"),
    )
    .unwrap_or(0.0) as u64
}

/// Every dead letter on the topic: (headers, key length, value length).
async fn read_dead_letters(kafka: &KafkaBroker, n: usize) -> Vec<(HashMap<String, String>, usize)> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("group.id", "dlq-reader")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    c.subscribe(&[DLQ]).expect("subscribe");
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(30), c.recv())
            .await
            .expect("a dead letter within 30 s")
            .expect("dead letter");
        let mut headers = HashMap::new();
        if let Some(h) = m.headers() {
            for h in h.iter() {
                let v = h.value.map(|v| String::from_utf8_lossy(v).into_owned());
                headers.insert(h.key.to_owned(), v.unwrap_or_default());
            }
        }
        out.push((headers, m.payload().map_or(0, <[u8]>::len)));
    }
    out
}

struct Expected {
    malformed: u64,
    skipped: u64,
    applied: u64,
    fences: Vec<(String, Lsn)>,
    ends: HashMap<(&'static str, i32), i64>,
}

async fn produce_everything(kafka: &KafkaBroker) -> Expected {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("acks", "all")
        // One record per batch (tansu 0.6.0 serves a fetch starting inside a batch from the next
        // batch on; see crates/invalidator/tests/common/mod.rs), and room for the 2 MB record.
        .set("batch.num.messages", "1")
        .set("linger.ms", "0")
        .set("message.max.bytes", "3000000")
        .create()
        .expect("producer");
    let mut records = hostile(40);
    // Then 50 valid bus records.
    for i in 0..50u64 {
        let key = format!("product:{}", 9000 + i);
        let lsn = Lsn(0x20_0000_0000 + i);
        records.push(Record {
            topic: BUS,
            kind: "valid",
            key: Some(key.clone().into_bytes()),
            value: Some(
                BusRecord {
                    key: Some(key.clone()),
                    patterns: vec![],
                    commit_lsn: lsn,
                    commit_time_us: 1,
                    xid: 1,
                    table: "public.product".into(),
                    op: Op::Update,
                }
                .to_json(),
            ),
            expect: Expect::Applied(vec![key], lsn),
        });
    }
    let mut kinds: Vec<&str> = records.iter().map(|r| r.kind).collect();
    kinds.dedup();
    kinds.sort_unstable();
    kinds.dedup();
    eprintln!(
        "{} records of {} kinds: {kinds:?}",
        records.len(),
        kinds.len()
    );
    let mut e = Expected {
        malformed: 0,
        skipped: 0,
        applied: 0,
        fences: Vec::new(),
        ends: HashMap::new(),
    };
    for r in &records {
        let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(r.topic);
        if let Some(k) = &r.key {
            fr = fr.key(k);
        }
        if let Some(v) = &r.value {
            fr = fr.payload(v);
        }
        let d = p
            .send(fr, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .unwrap_or_else(|e| panic!("produce a {} record: {e}", r.kind));
        *e.ends.entry((r.topic, d.partition)).or_insert(0) += 1;
        match &r.expect {
            Expect::Malformed => e.malformed += 1,
            Expect::Skipped => e.skipped += 1,
            Expect::Applied(keys, lsn) => {
                e.applied += 1;
                e.fences.extend(keys.iter().map(|k| (k.clone(), *lsn)));
            }
        }
    }
    e
}

/// Runs one invalidator over everything; returns its final scrape.
async fn run_once(
    kafka: &KafkaBroker,
    redis: &RedisInstance,
    expected: &Expected,
    group: &str,
    extra: &str,
) -> String {
    let listen = format!(
        "127.0.0.1:{}",
        cacheclear_harness::free_port().expect("free port")
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("invalidator.toml");
    std::fs::write(&config, config_toml(kafka, redis, group, &listen, extra)).expect("config");
    let mut inv = Invalidator::start(&config, &dir.path().join("invalidator.log"));

    // Every record accounted for: malformed ones dead-lettered or refused, the rest skipped or
    // applied.
    let accounted = |body: &str| {
        records_total(body, "dead_lettered") + records_total(body, "dead_letter_refused")
            == expected.malformed
            && records_total(body, "skipped") == expected.skipped
            && records_total(body, "applied") == expected.applied
    };
    let mut last = String::new();
    let start = std::time::Instant::now();
    loop {
        inv.assert_running();
        if let Some(body) = scrape(&listen) {
            if accounted(&body) {
                last = body;
                break;
            }
            last = body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "not every record accounted for within 120 s: expected {} malformed, {} skipped, {} applied; scrape:\n{}",
            expected.malformed,
            expected.skipped,
            expected.applied,
            last.lines()
                .filter(|l| l.starts_with("cacheclear_invalidator_records_total")
                    || l.starts_with("cacheclear_invalidator_dlq"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every valid record is applied with its fence.
    let mut c = redis_conn(redis).await;
    let keys: Vec<&str> = expected.fences.iter().map(|(k, _)| k.as_str()).collect();
    let got = fences(&mut c, &keys).await;
    for ((k, want), got) in expected.fences.iter().zip(got) {
        assert_eq!(got, Some(*want), "{k:?} carries its record's fence");
    }

    // Both topics are committed to their ends: nothing is waiting, nothing will be replayed.
    wait_for(
        "both topics committed to their ends",
        Duration::from_secs(60),
        || {
            let done = [(BUS, 2), (DBZ, 1)].iter().all(|(topic, n)| {
                let got = committed(&kafka.bootstrap(), group, topic, *n);
                (0..*n).all(|p| {
                    got[p as usize] == expected.ends.get(&(*topic, p)).copied().unwrap_or(-1)
                })
            });
            async move { done }
        },
    )
    .await;
    inv.assert_running();
    let status = inv.terminate();
    assert!(status.success(), "graceful stop: {status:?}");
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_records_never_stall_invalidation() {
    let kafka = KafkaBroker::start().expect("Kafka broker (tansu)");
    kafka.create_topic(BUS, 2).unwrap();
    kafka.create_topic(DBZ, 1).unwrap();
    kafka.create_topic(DLQ, 1).unwrap();
    let redis = RedisInstance::start().unwrap();
    let expected = produce_everything(&kafka).await;
    eprintln!(
        "expecting {} malformed, {} skipped, {} applied",
        expected.malformed, expected.skipped, expected.applied
    );

    // 1. Default configuration: the 2 MB record is over the dead-letter producer's
    //    message.max.bytes (1,000,000), so it is dead-lettered as a bounded copy.
    let body = run_once(&kafka, &redis, &expected, "hostile-1", "").await;
    let dead_lettered = records_total(&body, "dead_lettered");
    assert_eq!(dead_lettered, expected.malformed, "all dead-lettered");
    // Every label value of the fallback counter is exported, from the start, at zero or more.
    for reason in [
        "unavailable_value",
        "no_before_image",
        "column_absent",
        "unsupported_type",
        "out_of_range",
    ] {
        let series = format!("cacheclear_invalidator_table_fallbacks_total{{reason=\"{reason}\"}}");
        assert!(sample(&body, &series).is_some(), "{series} not exported");
    }
    assert_eq!(
        sample(&body, "cacheclear_invalidator_dlq_bounded_copies_total"),
        Some(1.0)
    );
    let letters = read_dead_letters(&kafka, dead_lettered as usize).await;
    let copies: Vec<_> = letters
        .iter()
        .filter(|(h, _)| h.get("cacheclear.dlq.truncated").map(String::as_str) == Some("true"))
        .collect();
    assert_eq!(copies.len(), 1, "one bounded copy");
    let (h, len) = copies[0];
    let mut big = br#"{"key":""#.to_vec();
    big.extend(std::iter::repeat_n(b'}', BIG));
    big.extend_from_slice(
        br#"","commit_lsn":"0/1","commit_time_us":1,"xid":1,"table":"t","op":"insert"}"#,
    );
    assert_eq!(*len, cacheclear_invalidator::BOUNDED_COPY_VALUE_BYTES);
    assert_eq!(h["cacheclear.dlq.original_size"], big.len().to_string());
    use sha2::Digest;
    let sha: String = sha2::Sha256::digest(&big)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(h["cacheclear.dlq.sha256"], sha);
    assert_eq!(h["cacheclear.dlq.topic"], BUS);
    assert!(
        h["cacheclear.dlq.reason"].starts_with("bus record: cache key `}}}"),
        "{h:?}"
    );
    assert!(
        h["cacheclear.dlq.reason"].len() < 1024,
        "the reason is bounded"
    );
    assert!(
        h["cacheclear.dlq.truncated_because"].contains("too large"),
        "{h:?}"
    );
    assert!(h.contains_key("cacheclear.dlq.offset") && h.contains_key("cacheclear.dlq.partition"));
    // Every other dead letter carries a reason and the source coordinates.
    for (h, _) in &letters {
        assert!(!h["cacheclear.dlq.reason"].is_empty());
        assert!(
            [BUS, DBZ].contains(&h["cacheclear.dlq.topic"].as_str()),
            "{h:?}"
        );
    }

    // 2. A dead-letter producer taking at most 1,000 bytes: the bounded copy is refused too (and
    //    so is every malformed record above that size). Refusals are permanent: logged, counted,
    //    committed; nothing stalls.
    let body = run_once(
        &kafka,
        &redis,
        &expected,
        "hostile-2",
        r#""message.max.bytes" = "1000""#,
    )
    .await;
    let refused = records_total(&body, "dead_letter_refused");
    eprintln!(
        "message.max.bytes = 1000: {} dead-lettered, {refused} refused (permanent), of {} malformed",
        records_total(&body, "dead_lettered"),
        expected.malformed
    );
    // At least the 2 MB record and the 5,000-deep ones (10 KB and more) are refused.
    assert!(refused > 40, "refused {refused}");
    assert!(
        sample(
            &body,
            "cacheclear_invalidator_dlq_errors_total{kind=\"permanent\"}"
        )
        .is_some_and(|n| n >= refused as f64),
        "permanent produce errors counted"
    );
}
