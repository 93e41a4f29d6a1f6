//! `deploy/`: every metric the Prometheus alert rules use is one README's "Metrics" tables list
//! (so a renamed metric cannot silently disable an alert), the rules cover lag, retained WAL and
//! sink errors, and both systemd units restart always and start an existing command. The example
//! configs are parsed by the real loaders in the binary's unit tests (`config.rs`,
//! `invalidate.rs`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Metric names in README's tables: the first column's `cacheclear_…` name, labels cut off.
fn readme_metrics() -> BTreeSet<String> {
    read("README.md")
        .lines()
        .filter_map(|l| l.strip_prefix("| `cacheclear_"))
        .map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            format!("cacheclear_{name}")
        })
        .collect()
}

/// Every `cacheclear_…` identifier in `text`, with Prometheus's histogram series suffixes
/// (`_bucket`, `_sum`, `_count`) taken off where the base name is a histogram README lists.
fn referenced(text: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("cacheclear_") {
        let start = i + at;
        let before_ok =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |e| start + e);
        if before_ok {
            let name = &text[start..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| known.contains(*b)))
                .unwrap_or(name);
            out.insert(base.to_owned());
        }
        i = end;
    }
    out
}

#[test]
fn alert_rules_use_only_metrics_readme_lists() {
    let known = readme_metrics();
    assert!(
        known.contains("cacheclear_sink_errors_total") && known.len() > 30,
        "README's metric tables were found: {known:?}"
    );
    let rules = read("deploy/prometheus-alerts.yml");
    let used = referenced(&rules, &known);
    let unknown: Vec<&String> = used.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "deploy/prometheus-alerts.yml uses metrics README does not list: {unknown:?}"
    );
    for needed in [
        "cacheclear_commit_to_applied_lag_ms",
        "cacheclear_invalidator_commit_to_applied_lag_ms",
        "cacheclear_slot_retained_wal_bytes",
        "cacheclear_sink_errors_total",
    ] {
        assert!(used.contains(needed), "no alert on {needed}");
    }
    // Histograms are queried through their buckets.
    assert!(rules.contains("cacheclear_commit_to_applied_lag_ms_bucket"));
}

#[test]
fn systemd_units_restart_always_and_run_existing_commands() {
    for (unit, command) in [
        ("deploy/cacheclear-run.service", "run"),
        ("deploy/cacheclear-invalidate@.service", "invalidate"),
    ] {
        let text = read(unit);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.contains(&"Restart=always"), "{unit}: Restart=always");
        let exec = lines
            .iter()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap_or_else(|| panic!("{unit}: ExecStart"));
        let args: Vec<&str> = exec.split_whitespace().collect();
        assert_eq!(args.get(1), Some(&command), "{unit}: {exec}");
        assert_eq!(args.get(2), Some(&"--config"), "{unit}: {exec}");
        // The same arguments are accepted by the binary (`--help` after them parses them).
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cacheclear"))
            .args(&args[1..])
            .arg("--help")
            .output()
            .expect("run cacheclear");
        assert!(out.status.success(), "{unit}: `{exec} --help` is refused");
    }
}
