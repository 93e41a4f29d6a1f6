//! What an audit found: the JSON `cacheclear audit --json` prints, and the text lines.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The audit's figures. JSON:
///
/// ```json
/// {"mode": "follow", "duration_s": 60.0, "invalidations_seen": 5120, "sampled": 5120,
///  "checked": 5120, "inconsistent": 0, "unverifiable": 0,
///  "nines": {"1s": 3.7, "5s": 3.7, "60s": null},
///  "windows": {"1s": {"checked": 5120, "inconsistent": 0, "unverifiable": 0, "absent": 5004,
///                     "nines": 3.7, "nines_capped": true}, ...},
///  "examples": []}
/// ```
///
/// `checked` counts sampled invalidations (follow) or values (scan) checked at least once;
/// `inconsistent` those found inconsistent in any window. A window whose checks could not all
/// run before the end of `--duration` reports the ones that did (`"60s"` needs a run of more
/// than 60 s); `nines` is `null` for a window with no check.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct AuditReport {
    /// `"follow"` or `"scan"`.
    pub mode: String,
    /// Seconds the audit ran.
    pub duration_s: f64,
    /// Follow: cache keys the tap saw invalidated (table-wide evictions are not sampled).
    /// Scan: value keys found.
    pub invalidations_seen: u64,
    /// Of those, sampled for checking.
    pub sampled: u64,
    /// Sampled invalidations (values) checked in at least one window.
    pub checked: u64,
    /// Of those, found inconsistent in at least one window.
    pub inconsistent: u64,
    /// Checks that found a value without a read position (an older client): neither counted
    /// consistent nor inconsistent.
    pub unverifiable: u64,
    /// Nines per window (`"1s"`, `"5s"`, `"60s"`; `"scan"` in scan mode).
    pub nines: BTreeMap<String, Option<f64>>,
    /// The figures per window.
    pub windows: BTreeMap<String, WindowFigures>,
    /// Up to 20 inconsistent values, first found first.
    pub examples: Vec<Example>,
}

/// One window's figures.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct WindowFigures {
    /// Checks made (absent values and unverifiable ones included).
    pub checked: u64,
    /// Values read before the invalidated change, still cached.
    pub inconsistent: u64,
    /// Values without a read position.
    pub unverifiable: u64,
    /// Checks that found no value (consistent).
    pub absent: u64,
    /// `-log10(inconsistent / verifiable checks)`; capped (see `nines_capped`) at
    /// `log10(verifiable checks)` when none was inconsistent; `null` with no verifiable check.
    pub nines: Option<f64>,
    /// True when `nines` is the cap: nothing inconsistent was found.
    pub nines_capped: bool,
}

/// An inconsistent value.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Example {
    /// The cache key (without braces).
    pub key: String,
    /// The window it was found in (`"1s"`, …, or `"scan"`).
    pub window: String,
    /// Follow: the commit LSN of the change whose invalidation it survived.
    pub commit_lsn: Option<String>,
    /// Scan: the key's fence.
    pub fence: Option<String>,
    /// The value's read position.
    pub read_position: String,
}

/// `-log10(inconsistent / checked)`, or the cap `log10(checked)` when nothing was inconsistent
/// (returned with `true`); `None` when nothing was checked.
pub fn nines(inconsistent: u64, checked: u64) -> Option<(f64, bool)> {
    if checked == 0 {
        return None;
    }
    let round = |v: f64| (v * 100.0).round() / 100.0;
    if inconsistent == 0 {
        return Some((round((checked as f64).log10()), true));
    }
    Some((
        round(-(inconsistent as f64 / checked as f64).log10()),
        false,
    ))
}

impl WindowFigures {
    /// Fills `nines` and `nines_capped` from the counts.
    pub(crate) fn finish(&mut self) {
        let verifiable = self.checked - self.unverifiable;
        match nines(self.inconsistent, verifiable) {
            Some((n, capped)) => {
                self.nines = Some(n);
                self.nines_capped = capped;
            }
            None => {
                self.nines = None;
                self.nines_capped = false;
            }
        }
    }
}

impl AuditReport {
    /// The lowest nines over the windows that have a figure; `None` if none has.
    pub fn min_nines(&self) -> Option<f64> {
        self.windows
            .values()
            .filter_map(|w| w.nines)
            .min_by(f64::total_cmp)
    }

    /// The report as text lines, for a terminal.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "audit ({}, {:.1} s): {} seen, {} sampled, {} checked, {} inconsistent, {} unverifiable",
            self.mode,
            self.duration_s,
            self.invalidations_seen,
            self.sampled,
            self.checked,
            self.inconsistent,
            self.unverifiable
        );
        for (name, w) in order(&self.windows) {
            let nines = match (w.nines, w.nines_capped) {
                (Some(n), true) => format!(">= {n:.2} nines (none inconsistent)"),
                (Some(n), false) => format!("{n:.2} nines"),
                (None, _) => "no check in this window".to_owned(),
            };
            let _ = writeln!(
                out,
                "  {name:>4}: {:>7} checked, {:>5} inconsistent, {:>5} unverifiable, {:>7} absent: {nines}",
                w.checked, w.inconsistent, w.unverifiable, w.absent
            );
        }
        for e in &self.examples {
            let _ = writeln!(
                out,
                "  inconsistent ({}): {} read at {}{}{}",
                e.window,
                e.key,
                e.read_position,
                e.commit_lsn
                    .as_ref()
                    .map(|c| format!(", invalidated by the commit at {c}"))
                    .unwrap_or_default(),
                e.fence
                    .as_ref()
                    .map(|f| format!(", fence {f}"))
                    .unwrap_or_default(),
            );
        }
        out
    }
}

/// Windows in time order ("1s" < "5s" < "60s"; "scan" alone).
fn order(windows: &BTreeMap<String, WindowFigures>) -> Vec<(&String, &WindowFigures)> {
    let mut v: Vec<_> = windows.iter().collect();
    v.sort_by_key(|(name, _)| {
        name.trim_end_matches('s')
            .parse::<u64>()
            .unwrap_or(u64::MAX)
    });
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_of_counts() {
        assert_eq!(nines(0, 0), None);
        assert_eq!(nines(0, 1000), Some((3.0, true)));
        assert_eq!(nines(1, 1000), Some((3.0, false)));
        assert_eq!(nines(1, 10), Some((1.0, false)));
        assert_eq!(nines(5, 10), Some((0.3, false)));
    }
}
