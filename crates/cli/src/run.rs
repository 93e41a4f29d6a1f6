//! `cacheclear run`: the pipeline, restarted after transient failures, with `/metrics`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cacheclear_sink_redis::RedisSink;
use cacheclear_source_postgres::RunOptions;

use crate::config::AppConfig;

/// Installs the Prometheus recorder and serves `GET /metrics` on `listen`.
///
/// # Errors
/// The recorder is already installed, or the address cannot be bound.
pub async fn serve_metrics(listen: &str) -> anyhow::Result<()> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_ms".into()),
            &[
                0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0,
            ],
        )
        .context("metrics buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    describe_metrics();
    if listen.is_empty() {
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("metrics.listen: cannot bind {listen}"))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    tracing::info!(%listen, "serving Prometheus metrics at /metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });
    Ok(())
}

fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "cacheclear_invalidations_applied_total",
        "Cache keys evicted (acknowledged by the sink)."
    );
    describe_counter!(
        "cacheclear_transactions_applied_total",
        "Committed transactions whose evictions were acknowledged."
    );
    describe_histogram!(
        "cacheclear_commit_to_applied_lag_ms",
        Unit::Milliseconds,
        "From a transaction's commit time to the sink's acknowledgement of its evictions."
    );
    describe_gauge!(
        "cacheclear_confirmed_lsn",
        "Flush LSN confirmed to PostgreSQL (as a number; exact below 2^53)."
    );
    describe_gauge!(
        "cacheclear_slot_retained_wal_bytes",
        Unit::Bytes,
        "pg_current_wal_lsn() - restart_lsn of the slot: WAL the server keeps for us."
    );
    describe_counter!(
        "cacheclear_sink_errors_total",
        "Failed attempts to apply a batch (Redis errors, timeouts)."
    );
    describe_counter!(
        "cacheclear_sink_retries_total",
        "Batches retried after a failed attempt."
    );
    describe_counter!(
        "cacheclear_barrier_waits_total",
        "Snapshots re-taken because a committed xid was not yet visible."
    );
    describe_counter!(
        "cacheclear_table_fallbacks_total",
        "Rows whose keys could not be computed, so their table was evicted as a whole."
    );
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// `cacheclear run --config <path>`.
pub async fn run(path: &Path) -> anyhow::Result<()> {
    let (cfg, rules) = AppConfig::load(path)?;
    serve_metrics(&cfg.metrics.listen).await?;
    let rules = Arc::new(rules);
    let options = RunOptions::default();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = std::time::Instant::now();
        let sink = RedisSink::connect(cfg.redis.clone())?;
        let result = tokio::select! {
            r = cacheclear_source_postgres::run(&cfg.postgres, Arc::clone(&rules), sink, options.clone(), std::future::pending()) => r,
            () = &mut shutdown => {
                tracing::info!("stopped; unconfirmed work will be replayed from the slot on the next start");
                return Ok(());
            }
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.is_fatal() => return Err(anyhow::Error::new(e).context("cacheclear run")),
            Err(e) => {
                if started.elapsed() > Duration::from_secs(60) {
                    // It ran fine for a while: this is a new failure, not a crash loop.
                    backoff = Duration::from_secs(1);
                }
                tracing::error!(error = %e, retry_in_s = backoff.as_secs(), "pipeline stopped; restarting from the slot");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = &mut shutdown => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}
