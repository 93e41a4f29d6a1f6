//! `cacheclear audit`: consistency nines of a live deployment (`cacheclear-audit`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cacheclear_audit::{FollowOptions, Probe};

use crate::config::{AppConfig, SinkChoice};

/// Options of `cacheclear audit`.
#[derive(clap::Args, Debug, Clone)]
pub struct AuditArgs {
    /// `run`'s TOML config file (direct mode); environment variables
    /// CACHECLEAR__<SECTION>__<FIELD> override it.
    #[arg(short, long, default_value = "cacheclear.toml")]
    pub config: PathBuf,
    /// Seconds to follow the invalidations (the 60 s window needs more than 60).
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub duration: u64,
    /// Share of invalidated keys to check, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub sample_rate: f64,
    /// Instead of following: sample N cached values and compare each one's read position with
    /// its key's fence (standalone Redis).
    #[arg(long, value_name = "N")]
    pub scan: Option<u64>,
    /// Exit 1 when any window's nines are below this (e.g. 3 = 99.9 % consistent).
    #[arg(long)]
    pub min_nines: Option<f64>,
    /// Print the figures as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Runs the audit and prints its report; `Ok(false)` when a window is below `--min-nines`.
///
/// # Errors
/// The config is invalid or not direct mode, or the audit could not run (PostgreSQL, Redis).
pub async fn audit(args: &AuditArgs) -> anyhow::Result<bool> {
    let (cfg, rules) = AppConfig::load(&args.config)?;
    let redis = match cfg.sink()? {
        SinkChoice::Redis(redis) => redis,
        SinkChoice::Kafka(_) => anyhow::bail!(
            "{}: audit needs the Redis the cache lives in: give it a direct-mode config \
             (`[redis]`, sink.kind = \"redis\") with the same [postgres] and [[rules]]",
            args.config.display()
        ),
    };
    let probe = Probe::connect(&redis).await.context("cacheclear audit")?;
    let report = match args.scan {
        Some(n) => cacheclear_audit::scan(&probe, n).await,
        None => {
            let opts = FollowOptions::new(Duration::from_secs(args.duration))
                .with_sample_rate(args.sample_rate);
            cacheclear_audit::follow(&cfg.postgres, Arc::new(rules), &probe, &opts).await
        }
    }
    .context("cacheclear audit")?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(match (args.min_nines, report.min_nines()) {
        (Some(min), Some(got)) => got >= min,
        _ => true,
    })
}
