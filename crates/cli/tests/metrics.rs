//! Every metric emitted anywhere in the workspace is described by the crate that emits it
//! (`describe_metrics()`) and listed in README's Metrics tables.
//!
//! Emission sites are found in the sources: `metrics::counter!(…)`, `metrics::gauge!(…)` and
//! `metrics::histogram!(…)` whose name is a string literal or a constant of the crate's
//! `telemetry.rs`. Any other name expression fails the test, so a new metric cannot hide from it
//! (the client's counters, named by its `counters!` macro, are taken from its description).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// Collects the names passed to `describe_*`.
#[derive(Default)]
struct Descriptions(Arc<Mutex<BTreeSet<String>>>);

impl Descriptions {
    fn add(&self, key: &KeyName) {
        if let Ok(mut names) = self.0.lock() {
            names.insert(key.as_str().to_owned());
        }
    }
}

impl Recorder for Descriptions {
    fn describe_counter(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.add(&key);
    }
    fn describe_gauge(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.add(&key);
    }
    fn describe_histogram(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.add(&key);
    }
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `const NAME: &str = "value";` pairs of a `telemetry.rs`.
fn constants(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("pub(crate) const ")?;
            let (name, value) = rest.split_once(": &str = ")?;
            let value = value.trim_end_matches(';').trim_matches('"');
            Some((name.to_owned(), value.to_owned()))
        })
        .collect()
}

/// The first argument of every `metrics::{counter,gauge,histogram}!(` in `text`.
fn emitted_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for mac in [
        "metrics::counter!(",
        "metrics::gauge!(",
        "metrics::histogram!(",
    ] {
        let mut rest = text;
        while let Some(at) = rest.find(mac) {
            rest = &rest[at + mac.len()..];
            let end = rest.find([',', ')']).unwrap_or(rest.len());
            names.push(rest[..end].trim().to_owned());
        }
    }
    names
}

#[test]
fn every_emitted_metric_is_described_and_in_readme() {
    let root = workspace();
    let described = Descriptions::default();
    let names = Arc::clone(&described.0);
    metrics::with_local_recorder(&described, || {
        cacheclear_source_postgres::describe_metrics();
        cacheclear_sink_redis::describe_metrics();
        cacheclear_sink_kafka::describe_metrics();
        cacheclear_invalidator::describe_metrics();
        cacheclear_client::describe_metrics();
    });
    let described = names.lock().expect("names").clone();
    assert!(described.len() > 30, "too few descriptions: {described:?}");

    let mut emitted = BTreeSet::new();
    let mut problems = Vec::new();
    let mut crates: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
        .expect("crates/")
        .flatten()
        .map(|e| e.path())
        .collect();
    crates.sort();
    for krate in crates {
        let src = krate.join("src");
        if !src.is_dir() {
            continue;
        }
        let telemetry = std::fs::read_to_string(src.join("telemetry.rs"))
            .map(|t| constants(&t))
            .unwrap_or_default();
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        for file in files {
            let text = std::fs::read_to_string(&file).expect("read source");
            for arg in emitted_names(&text) {
                let constant = arg
                    .strip_prefix("crate::telemetry::")
                    .or_else(|| arg.strip_prefix("telemetry::"))
                    .or_else(|| file.ends_with("telemetry.rs").then_some(arg.as_str()));
                if let Some(value) = arg.strip_prefix('"').and_then(|a| a.strip_suffix('"')) {
                    emitted.insert(value.to_owned());
                } else if let Some(value) = constant.and_then(|c| telemetry.get(c)) {
                    emitted.insert(value.clone());
                } else if arg.starts_with("c.metric_name(") && file.ends_with("client/src/stats.rs")
                {
                    // The client's counters: named and described by one macro.
                } else {
                    problems.push(format!(
                        "{}: metric name `{arg}` is neither a literal nor a constant of telemetry.rs",
                        file.display()
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(emitted.len() > 20, "too few emission sites: {emitted:?}");

    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    for name in &emitted {
        if !described.contains(name) {
            problems.push(format!("`{name}` is emitted but not described"));
        }
    }
    for name in emitted.iter().chain(&described) {
        if !readme.contains(&format!("`{name}`")) && !readme.contains(&format!("`{name}{{")) {
            problems.push(format!("`{name}` is missing from README's Metrics tables"));
        }
    }
    problems.dedup();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Every `cacheclear_*` metric a file in `deploy/` refers to (Grafana dashboard, alert rules) is
/// one README's Metrics tables list — a renamed metric cannot leave a dashboard panel or an alert
/// silently empty.
#[test]
fn deploy_files_refer_only_to_listed_metrics() {
    let root = workspace();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("deploy"))
        .expect("deploy/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "json" || e == "yml" || e == "yaml")
        })
        .collect();
    files.sort();
    assert!(
        files.iter().any(|f| f.ends_with("grafana-dashboard.json")),
        "no dashboard in deploy/: {files:?}"
    );
    let mut problems = Vec::new();
    let mut seen = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read deploy file");
        let bytes = text.as_bytes();
        let mut at = 0;
        while let Some(found) = text[at..].find("cacheclear_") {
            let start = at + found;
            let end = start
                + text[start..]
                    .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                    .unwrap_or(text.len() - start);
            at = end;
            // A metric name, not part of a longer identifier (`job="cacheclear_run"` is fine
            // only if it is listed; there is none such).
            if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
                continue;
            }
            let name = &text[start..end];
            if name.ends_with('_') {
                continue; // a prefix in a regex, such as `cacheclear_.*`
            }
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            seen += 1;
            if !readme.contains(&format!("`{base}`")) && !readme.contains(&format!("`{base}{{")) {
                problems.push(format!(
                    "{}: `{name}` is not in README's Metrics tables",
                    file.display()
                ));
            }
        }
    }
    assert!(seen > 20, "too few metric references in deploy/: {seen}");
    problems.dedup();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
