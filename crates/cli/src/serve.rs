//! What both long-running commands share: the Prometheus endpoint and the stop signal.

use anyhow::Context;

/// Installs the Prometheus recorder, describes every metric of the components linked into the
/// binary, and serves `GET /metrics` on `listen` (nothing is served when `listen` is empty).
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
    describe();
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

/// Describes the metrics of every component this binary links (each crate declares its own).
fn describe() {
    cacheclear_source_postgres::describe_metrics();
    cacheclear_sink_redis::describe_metrics();
    cacheclear_sink_kafka::describe_metrics();
    cacheclear_invalidator::describe_metrics();
}
