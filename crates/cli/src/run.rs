//! `cacheclear run`: the pipeline ([`cacheclear_source_postgres::Pipeline`]), restarted after
//! transient failures, with `/metrics`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cacheclear_sink_kafka::KafkaSink;
use cacheclear_sink_redis::RedisSink;
use cacheclear_source_postgres::{Pipeline, RunOptions};

use crate::config::{AppConfig, SinkChoice};
use crate::serve::{serve_metrics, shutdown_signal};

/// `cacheclear run --config <path>`: the source, writing to the sink `[sink] kind` selects.
pub async fn run(path: &Path) -> anyhow::Result<()> {
    let (cfg, rules) = AppConfig::load(path)?;
    let sink = cfg.sink()?;
    serve_metrics(&cfg.metrics.listen).await?;
    match &sink {
        SinkChoice::Redis(redis) => {
            cacheclear_source_postgres::register_metrics("redis");
            cacheclear_sink_redis::register_metrics();
            tracing::info!(sink = "redis", target = %redis.display_target(), "direct mode")
        }
        SinkChoice::Kafka(kafka) => {
            cacheclear_source_postgres::register_metrics("kafka");
            cacheclear_sink_kafka::register_metrics();
            tracing::info!(sink = "kafka", brokers = %kafka.brokers, topic = %kafka.topic, "bus mode")
        }
    }
    if let SinkChoice::Redis(c) = &sink {
        // Refused credentials or certificates stop here, not at the first eviction (a resumed
        // slot may have nothing to evict for a long time); an unreachable Redis is waited for.
        if let Err(e) = RedisSink::connect(c.clone())?.check().await {
            if e.is_fatal() {
                return Err(anyhow::Error::new(e).context("cacheclear run: Redis"));
            }
            tracing::warn!(error = %e, "Redis does not answer yet; evictions are retried until it does");
        }
    }
    let rules = Arc::new(rules);
    let options = RunOptions::default();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_secs(1);
    loop {
        let (pg, rules, options) = (cfg.postgres.clone(), Arc::clone(&rules), options.clone());
        let mut pipeline = match &sink {
            SinkChoice::Redis(c) => {
                Pipeline::spawn(pg, rules, RedisSink::connect(c.clone())?, options)
            }
            SinkChoice::Kafka(c) => {
                Pipeline::spawn(pg, rules, KafkaSink::connect(c.clone())?, options)
            }
        };
        let started = std::time::Instant::now();
        let result = tokio::select! {
            r = pipeline.wait() => r,
            () = &mut shutdown => {
                tracing::info!("stopping: applying and confirming what was read (postgres.shutdown_timeout_ms)");
                return pipeline.stop().await.map_err(|e| anyhow::Error::new(e).context("cacheclear run"));
            }
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.is_fatal() => return Err(anyhow::Error::new(e).context("cacheclear run")),
            Err(e) => {
                // A run that stayed up for a minute was healthy: start the backoff afresh.
                if started.elapsed() >= Duration::from_secs(60) {
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
