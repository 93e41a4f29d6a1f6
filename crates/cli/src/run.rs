//! `cacheclear run`: the pipeline, restarted after transient failures, with `/metrics`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cacheclear_sink_kafka::KafkaSink;
use cacheclear_sink_redis::RedisSink;
use cacheclear_source_postgres::RunOptions;

use crate::config::{AppConfig, SinkChoice};

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
    describe_histogram!(
        "cacheclear_visibility_barrier_ms",
        Unit::Milliseconds,
        "Per batch: from the barrier taking it to every xid visible to a new snapshot (long while a commit waits for a synchronous standby)."
    );
    describe_histogram!(
        "cacheclear_sink_apply_ms",
        Unit::Milliseconds,
        "Per batch: from the first apply attempt to the sink's acknowledgement, retries included."
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
        "cacheclear_kafka_records_delivered_total",
        "Bus records the Kafka sink published and got a successful delivery report for."
    );
    describe_counter!(
        "cacheclear_sink_errors_total",
        "Failed attempts to apply a batch (Redis errors and timeouts, failed Kafka deliveries)."
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

/// `cacheclear run --config <path>`: the source, writing to the sink `[sink] kind` selects.
pub async fn run(path: &Path) -> anyhow::Result<()> {
    let (cfg, rules) = AppConfig::load(path)?;
    let sink = cfg.sink()?;
    serve_metrics(&cfg.metrics.listen).await?;
    match &sink {
        SinkChoice::Redis(redis) => tracing::info!(sink = "redis", url = %redis.url, "direct mode"),
        SinkChoice::Kafka(kafka) => {
            tracing::info!(sink = "kafka", brokers = %kafka.brokers, topic = %kafka.topic, "bus mode")
        }
    }
    let rules = Arc::new(rules);
    let options = RunOptions::default();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_secs(1);
    loop {
        let pipeline = async {
            let (pg, rules, options, stop) = (
                &cfg.postgres,
                Arc::clone(&rules),
                options.clone(),
                std::future::pending(),
            );
            anyhow::Ok(match &sink {
                SinkChoice::Redis(c) => {
                    let sink = RedisSink::connect(c.clone())?;
                    cacheclear_source_postgres::run(pg, rules, sink, options, stop).await
                }
                SinkChoice::Kafka(c) => {
                    let sink = KafkaSink::connect(c.clone())?;
                    cacheclear_source_postgres::run(pg, rules, sink, options, stop).await
                }
            })
        };
        let result = tokio::select! {
            r = pipeline => r?,
            () = &mut shutdown => {
                tracing::info!("stopped; unconfirmed work will be replayed from the slot on the next start");
                return Ok(());
            }
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.is_fatal() => return Err(anyhow::Error::new(e).context("cacheclear run")),
            Err(e) => {
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
