//! Hot-path throughput of `TableRules::keys_for`: row images per second for a product table with
//! two templates, and the startup cost of compiling 1000 rules.
//!
//! `cargo run --release -p cacheclear-rules --example throughput [rows]`

use std::time::Instant;

use cacheclear_rules::{RuleConfig, Rules};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(2_000_000);
    let rules = Rules::compile(&[RuleConfig {
        table: "public.product".into(),
        keys: vec![
            "product:{id}".into(),
            "category:{category_id}:products".into(),
        ],
    }])?;
    let table = rules
        .table("public", "product")
        .ok_or("product not configured")?;

    // Pre-rendered column values, as a source would hold them after decoding a tuple.
    let ids: Vec<String> = (0..1024).map(|i| (100_000 + i).to_string()).collect();
    let names: Vec<String> = (0..1024)
        .map(|i| format!("Product name #{i}: ümlaut"))
        .collect();
    let mut keys = Vec::with_capacity(8);
    let mut total_keys = 0usize;
    let start = Instant::now();
    for i in 0..rows {
        let row = [
            ("id", Some(ids[i % 1024].as_str())),
            ("sku", Some("SKU-0001")),
            ("name", Some(names[i % 1024].as_str())),
            ("price", Some("19.99")),
            ("stock", Some("7")),
            ("updated_at", Some("2026-11-29 19:51:35.123456+00")),
            ("description", None),
            ("category_id", Some(ids[(i / 7) % 1024].as_str())),
        ];
        keys.clear();
        table.keys_for(&row, &mut keys)?;
        total_keys += keys.len();
    }
    let elapsed = start.elapsed();
    println!(
        "{rows} row images, {total_keys} keys in {:.3} s: {:.0} row images/s, {:.0} ns per row image",
        elapsed.as_secs_f64(),
        rows as f64 / elapsed.as_secs_f64(),
        elapsed.as_nanos() as f64 / rows as f64,
    );

    // Startup cost: compiling (and overlap-checking) a large rule set.
    let configs: Vec<RuleConfig> = (0..1000)
        .map(|i| RuleConfig {
            table: format!("shop.t{i}"),
            keys: vec![
                format!("t{i}:{{id}}"),
                format!("t{i}:{{id}}:by:{{owner_id}}"),
            ],
        })
        .collect();
    let start = Instant::now();
    let big = Rules::compile(&configs)?;
    println!(
        "compiled {} tables / {} templates in {:.1} ms",
        big.len(),
        big.tables().map(|t| t.templates().len()).sum::<usize>(),
        start.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}
