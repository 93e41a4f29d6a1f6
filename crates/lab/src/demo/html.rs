//! `cacheclear demo --report FILE`: the run as one self-contained HTML page (inline SVG charts,
//! no script, no external resource), or, for a `.svg` path, the charts alone as one SVG image.
//!
//! Charts: stale reads per 100 ms over each run with the sale-end commit marked; database loads
//! per 100 ms from 2 s before to 3 s after the commit (the stampede, or its absence); cacheclear's
//! invalidation-lag distribution; then the summary table (HTML only).

use std::fmt::Write as _;

use super::report::{Report, StrategyFigures, Timeline};

/// Width of every chart, px.
const WIDTH: f64 = 760.0;
/// Height of every chart, px.
const HEIGHT: f64 = 250.0;
/// Left, right, top, bottom margins, px.
const MARGIN: (f64, f64, f64, f64) = (56.0, 16.0, 34.0, 40.0);
/// ttl-only's colour (red) and cacheclear's (blue).
const COLOURS: [&str; 2] = ["#d62728", "#1f77b4"];
const NAMES: [&str; 2] = ["ttl-only", "cacheclear"];

/// The HTML page.
pub(super) fn html(r: &Report) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>cacheclear demo: the flash sale</title>\
         <style>body{{font-family:sans-serif;max-width:800px;margin:24px auto;color:#222}}\
         table{{border-collapse:collapse;font-size:14px}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}\
         td:first-child,th:first-child{{text-align:left}}code{{font-size:13px}}</style></head><body>\n\
         <h1>The flash sale: ttl-only cache-aside against cacheclear</h1>\n<p><code>$ {}</code></p>\n<p>{}</p>\n",
        escape(&r.scenario.command),
        escape(&summary_sentence(r)),
    );
    for chart in charts(r) {
        out.push_str(&chart);
        out.push('\n');
    }
    out.push_str(&table(r));
    out.push_str("</body></html>\n");
    out
}

/// The charts alone, stacked in one SVG image (for README).
pub(super) fn svg(r: &Report) -> String {
    let charts = charts(r);
    let total = HEIGHT * charts.len() as f64;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{total}\" \
         viewBox=\"0 0 {WIDTH} {total}\" font-family=\"sans-serif\">\n\
         <rect width=\"{WIDTH}\" height=\"{total}\" fill=\"white\"/>\n"
    );
    for (i, chart) in charts.iter().enumerate() {
        let _ = writeln!(
            out,
            "<g transform=\"translate(0,{})\">{}</g>",
            HEIGHT * i as f64,
            inner(chart)
        );
    }
    out.push_str("</svg>\n");
    out
}

fn summary_sentence(r: &Report) -> String {
    let s = &r.scenario;
    format!(
        "{} products ({} on sale), {} shoppers on {} app servers, {:.0} s per strategy; the sale \
         ends at {:.1} s with one UPDATE of {} rows{}. Stale reads: ttl-only {}, cacheclear {} \
         (its clients' staleness bound: {} ms).",
        s.products,
        s.sale_items,
        s.shoppers,
        s.app_servers,
        s.duration_s,
        s.sale_ends_at_s,
        s.sale_items,
        match s.fault.as_str() {
            "" | "none" => String::new(),
            fault => format!(" (fault in the cacheclear run: {fault})"),
        },
        r.strategies.ttl_only.stale_reads_after_commit,
        r.strategies.cacheclear.stale_reads_after_commit,
        s.max_staleness_ms,
    )
}

fn runs(r: &Report) -> [&StrategyFigures; 2] {
    [&r.strategies.ttl_only, &r.strategies.cacheclear]
}

fn charts(r: &Report) -> Vec<String> {
    let [t, c] = runs(r);
    let tick_s = f64::from(t.timeline.tick_ms.max(1)) / 1000.0;
    let series = |f: fn(&Timeline) -> &Vec<u64>, from: usize, to: usize| -> Vec<Vec<(f64, f64)>> {
        [t, c]
            .iter()
            .map(|s| {
                let v = f(&s.timeline);
                (from..to.min(v.len()))
                    .map(|i| (i as f64 * tick_s, v[i] as f64))
                    .collect()
            })
            .collect()
    };
    let commits = [t.timeline.commit_visible_s, c.timeline.commit_visible_s];
    let ticks = t
        .timeline
        .stale_reads
        .len()
        .max(c.timeline.stale_reads.len());
    let mut out = vec![line_chart(
        "Stale reads per 100 ms (reads started after the sale-end commit that returned a sale price)",
        &series(|t| &t.stale_reads, 0, ticks),
        commits,
        (0.0, ticks as f64 * tick_s),
    )];
    let commit_tick = (commits[0].min(commits[1]) / tick_s) as usize;
    let from = commit_tick.saturating_sub(20);
    let to = commit_tick + 30;
    out.push(line_chart(
        "Database loads per 100 ms around the sale-end commit (the stampede, or its absence)",
        &series(|t| &t.db_loads, from, to),
        commits,
        (from as f64 * tick_s, to as f64 * tick_s),
    ));
    out.push(bar_chart(
        "cacheclear: invalidation lag per transaction (commit → Redis acknowledged), ms",
        &c.timeline.invalidation_lag_ms,
    ));
    out
}

/// An `<svg>` element's content without the element itself.
fn inner(chart: &str) -> &str {
    let start = chart.find('>').map_or(0, |i| i + 1);
    let end = chart.rfind("</svg>").unwrap_or(chart.len());
    &chart[start..end]
}

fn open_svg(title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"11\">\
         <text x=\"{}\" y=\"18\" font-size=\"13\" font-weight=\"bold\">{}</text>",
        MARGIN.0,
        escape(title)
    )
}

/// A round step for `max / ~5` ticks: 1, 2 or 5 × 10^k.
fn step(max: f64) -> f64 {
    let raw = (max / 5.0).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

/// Axes, the y grid and labels; x ticks over `x_range` when it is given.
fn axes(out: &mut String, x_range: Option<(f64, f64)>, y_max: f64, x_label: &str) {
    let (l, r, t, b) = MARGIN;
    let (w, h) = (WIDTH - l - r, HEIGHT - t - b);
    let ys = step(y_max);
    let mut y = 0.0;
    while y <= y_max + 1e-9 {
        let py = t + h - y / y_max * h;
        let _ = write!(
            out,
            "<line x1=\"{l}\" x2=\"{}\" y1=\"{py:.1}\" y2=\"{py:.1}\" stroke=\"#e5e5e5\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            l + w,
            l - 6.0,
            py + 4.0,
            fmt_num(y)
        );
        y += ys;
    }
    let x_range = x_range.unwrap_or((0.0, -1.0));
    let span = (x_range.1 - x_range.0).max(1e-9);
    let xs = step(span);
    let mut x = (x_range.0 / xs).ceil() * xs;
    while x <= x_range.1 + 1e-9 {
        let px = l + (x - x_range.0) / span * w;
        let _ = write!(
            out,
            "<line x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"#999\"/>\
             <text x=\"{px:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            t + h,
            t + h + 4.0,
            t + h + 16.0,
            fmt_num(x)
        );
        x += xs;
    }
    let _ = write!(
        out,
        "<line x1=\"{l}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"#333\"/>\
         <line x1=\"{l}\" x2=\"{l}\" y1=\"{t}\" y2=\"{}\" stroke=\"#333\"/>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        l + w,
        t + h,
        t + h,
        t + h,
        l + w / 2.0,
        HEIGHT - 6.0,
        escape(x_label)
    );
}

fn legend(out: &mut String) {
    for (i, (name, colour)) in NAMES.iter().zip(COLOURS).enumerate() {
        let x = WIDTH - MARGIN.1 - 190.0 + 95.0 * i as f64;
        let _ = write!(
            out,
            "<rect x=\"{x}\" y=\"24\" width=\"12\" height=\"4\" fill=\"{colour}\"/>\
             <text x=\"{}\" y=\"30\">{name}</text>",
            x + 16.0
        );
    }
}

fn line_chart(
    title: &str,
    series: &[Vec<(f64, f64)>],
    commits: [f64; 2],
    x_range: (f64, f64),
) -> String {
    let (l, r, t, b) = MARGIN;
    let (w, h) = (WIDTH - l - r, HEIGHT - t - b);
    let y_top = series
        .iter()
        .flatten()
        .map(|p| p.1)
        .fold(0.0, f64::max)
        .max(1.0);
    let y_max = (y_top / step(y_top)).ceil() * step(y_top);
    let span = (x_range.1 - x_range.0).max(1e-9);
    let mut out = open_svg(title);
    axes(&mut out, Some(x_range), y_max, "seconds into the run");
    for (i, commit) in commits.iter().enumerate() {
        if (x_range.0..=x_range.1).contains(commit) {
            let px = l + (commit - x_range.0) / span * w;
            let _ = write!(
                out,
                "<line x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{t}\" y2=\"{}\" stroke=\"{}\" stroke-dasharray=\"4 3\"/>",
                t + h,
                COLOURS[i]
            );
        }
    }
    let first = commits[0].min(commits[1]);
    if (x_range.0..=x_range.1).contains(&first) {
        let _ = write!(
            out,
            "<text x=\"{:.1}\" y=\"{}\">sale-end commit</text>",
            l + (first - x_range.0) / span * w + 4.0,
            t + 12.0
        );
    }
    for (points, colour) in series.iter().zip(COLOURS) {
        if points.is_empty() {
            continue;
        }
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| {
                format!(
                    "{:.1},{:.1}",
                    l + (x - x_range.0) / span * w,
                    t + h - y / y_max * h
                )
            })
            .collect();
        let _ = write!(
            out,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.6\" points=\"{}\"/>",
            path.join(" ")
        );
    }
    legend(&mut out);
    out.push_str("</svg>");
    out
}

fn bar_chart(title: &str, buckets: &[(f64, u64)]) -> String {
    let (l, r, t, b) = MARGIN;
    let (w, h) = (WIDTH - l - r, HEIGHT - t - b);
    let mut out = open_svg(title);
    let used: Vec<&(f64, u64)> = match buckets.iter().rposition(|(_, n)| *n > 0) {
        Some(last) => buckets[..=last].iter().collect(),
        None => Vec::new(),
    };
    if used.is_empty() {
        let _ = write!(
            out,
            "<text x=\"{l}\" y=\"{}\">no transactions</text></svg>",
            t + 20.0
        );
        return out;
    }
    let n_max = used.iter().map(|(_, n)| *n).max().unwrap_or(1).max(1) as f64;
    let y_max = (n_max / step(n_max)).ceil() * step(n_max);
    // No x ticks: the buckets label themselves.
    axes(&mut out, None, y_max, "lag bucket (≤ ms)");
    let slot = w / used.len() as f64;
    for (i, (upper, n)) in used.iter().enumerate() {
        let bh = *n as f64 / y_max * h;
        let x = l + i as f64 * slot;
        let _ = write!(
            out,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            x + slot * 0.1,
            t + h - bh,
            slot * 0.8,
            COLOURS[1],
            x + slot / 2.0,
            t + h + 16.0,
            fmt_num(*upper)
        );
    }
    out.push_str("</svg>");
    out
}

/// A summary-table row: its label and how to render a strategy's figure.
type Row = (&'static str, fn(&StrategyFigures) -> String);

fn table(r: &Report) -> String {
    let rows: [Row; 13] = [
        ("reads/s", |f| format!("{:.0}", f.reads_per_s)),
        ("hit rate", |f| format!("{:.1}%", f.hit_rate * 100.0)),
        ("database loads", |f| f.db_loads.to_string()),
        ("stale reads after the commit", |f| {
            f.stale_reads_after_commit.to_string()
        }),
        ("largest staleness, ms", |f| {
            format!("{:.1}", f.max_staleness_ms)
        }),
        ("reads that bypassed the cache (breaker open)", |f| {
            f.bypassed_reads
                .map_or_else(|| "–".into(), |n| n.to_string())
        }),
        ("hot-key loads in the second after the commit", |f| {
            f.hot_key_db_loads_after_commit.to_string()
        }),
        ("invalidation lag p50 / p99, ms", |f| {
            match (f.invalidation_lag_p50_ms, f.invalidation_lag_p99_ms) {
                (Some(a), Some(b)) => format!("{a:.2} / {b:.2}"),
                _ => "–".into(),
            }
        }),
        ("checkouts charged", |f| f.checkouts_charged.to_string()),
        ("checkouts of stale carts rejected", |f| {
            f.stale_price_checkouts_rejected.to_string()
        }),
        ("stale prices charged", |f| {
            f.stale_price_charges.to_string()
        }),
        ("read latency p50 / p99, ms", |f| {
            format!(
                "{:.2} / {:.2}",
                f.read_latency_p50_ms, f.read_latency_p99_ms
            )
        }),
        ("read errors", |f| f.read_errors.to_string()),
    ];
    let [t, c] = runs(r);
    let mut out = String::from(
        "<h2>Summary</h2>\n<table><tr><th></th><th>ttl-only</th><th>cacheclear</th></tr>\n",
    );
    for (name, f) in rows {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(name),
            escape(&f(t)),
            escape(&f(c))
        );
    }
    out.push_str("</table>\n");
    out
}

fn fmt_num(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

/// Escapes text for HTML/SVG element content and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_round() {
        assert_eq!(step(10.0), 2.0);
        assert_eq!(step(1000.0), 200.0);
        assert_eq!(step(3.0), 1.0);
        assert_eq!(step(0.7), 0.2);
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("a<b & \"c\">"), "a&lt;b &amp; &quot;c&quot;&gt;");
    }
}
