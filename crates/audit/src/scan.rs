//! Scan mode: N cached values, each read position against its key's fence.

use std::time::Instant;

use cacheclear_protocol::KeyLayout;

use crate::report::{AuditReport, Example, WindowFigures};
use crate::{AuditError, Probe, ReadPosition, read_position};

/// Most examples kept.
pub(crate) const MAX_EXAMPLES: usize = 20;

/// Samples up to `n` value keys (`{K}`; leases and fences are skipped) with `SCAN` and checks
/// each: a fence above the value's read position means the key was invalidated after the read
/// and the value should be gone — inconsistent. Values that are not cacheclear envelopes are
/// left out; values without a read position are unverifiable.
///
/// # Errors
/// Redis failed, or it is a Cluster (scan mode reads a standalone Redis).
pub async fn scan(probe: &Probe, n: u64) -> Result<AuditReport, AuditError> {
    let started = Instant::now();
    let mut report = AuditReport {
        mode: "scan".into(),
        ..AuditReport::default()
    };
    let mut w = WindowFigures::default();
    let mut cursor = 0;
    'pages: loop {
        let (next, keys) = probe.scan_page(cursor, 1000).await?;
        for stored in keys {
            if report.sampled >= n {
                break 'pages;
            }
            // A value key is `{K}` exactly: `{K}:lease` and `{K}:fence` end after the brace.
            let Some(key) = stored.strip_prefix('{').and_then(|k| k.strip_suffix('}')) else {
                continue;
            };
            let Ok(layout) = KeyLayout::new(key) else {
                continue;
            };
            report.invalidations_seen += 1;
            let (value, fence) = probe.value_and_fence(&layout).await?;
            let Some(value) = value else { continue }; // expired or evicted meanwhile
            let position = match read_position(&value) {
                ReadPosition::NotEnvelope => continue,
                p => p,
            };
            report.sampled += 1;
            w.checked += 1;
            match position {
                ReadPosition::Known(read) => {
                    if fence.is_some_and(|f| f > read) {
                        w.inconsistent += 1;
                        if report.examples.len() < MAX_EXAMPLES {
                            report.examples.push(Example {
                                key: key.to_owned(),
                                window: "scan".into(),
                                commit_lsn: None,
                                fence: fence.map(|f| f.to_string()),
                                read_position: read.to_string(),
                            });
                        }
                    }
                }
                _ => w.unverifiable += 1,
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    w.finish();
    report.checked = w.checked;
    report.inconsistent = w.inconsistent;
    report.unverifiable = w.unverifiable;
    report.nines.insert("scan".into(), w.nines);
    report.windows.insert("scan".into(), w);
    report.duration_s = started.elapsed().as_secs_f64();
    Ok(report)
}
