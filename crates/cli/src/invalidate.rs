//! `cacheclear invalidate --config invalidator.toml`: the Kafka → Redis invalidator
//! ([`cacheclear_invalidator`]), with `/metrics`.
//!
//! ```toml
//! [kafka]
//! brokers = "127.0.0.1:9092"
//! group_id = "cacheclear-eu-west"            # one group per Redis deployment
//! topics = ["cacheclear.invalidations"]      # bus records from `cacheclear run` (Kafka sink)
//! debezium_topics = ["shop.public.product"]  # and/or Debezium PostgreSQL change events
//! dead_letter_topic = "cacheclear.invalidator.dlq"
//! # batch_max_records = 10000
//! # batch_max_wait_ms = 5
//! # [kafka.properties]                       # librdkafka settings, verbatim
//! # "session.timeout.ms" = "10000"
//!
//! [redis]
//! url = "redis://127.0.0.1:6379/"
//!
//! # [debezium]                               # only for debezium_topics
//! # before_images = "full"                   # "default" for REPLICA IDENTITY DEFAULT tables
//! # unavailable_value_placeholder = "__debezium_unavailable_value"
//! # evict_on_snapshot = true
//!
//! [metrics]
//! listen = "127.0.0.1:9188"                  # default; empty disables
//!
//! [[rules]]                                  # only for debezium_topics
//! table = "public.product"
//! keys = ["product:{id}", "category:{category_id}:products"]
//! ```
//!
//! Environment variables `CACHECLEAR__<SECTION>__<FIELD>` override the file, as for `run`
//! (`CACHECLEAR__KAFKA__GROUP_ID`, `CACHECLEAR__REDIS__URL`, …).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use cacheclear_invalidator::{DebeziumConfig, InvalidatorConfig, KafkaConfig, RunOptions};
use cacheclear_rules::{RuleConfig, Rules};
use cacheclear_sink_redis::RedisConfig;

use crate::run::{serve_metrics, shutdown_signal};

/// `invalidator.toml`: the invalidator's sections plus `[metrics]`.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct InvalidateFile {
    /// `[kafka]`.
    pub kafka: KafkaConfig,
    /// `[redis]`.
    pub redis: RedisConfig,
    /// `[debezium]`.
    #[serde(default)]
    pub debezium: DebeziumConfig,
    /// `[metrics]`.
    #[serde(default)]
    pub metrics: InvalidateMetrics,
    /// `[[rules]]`.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

/// `[metrics]` of the invalidator: `listen`, default `127.0.0.1:9188` (next to `run`'s 9187).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct InvalidateMetrics {
    /// Listen address of `GET /metrics`; empty disables it.
    #[serde(default = "default_listen")]
    pub listen: String,
}

fn default_listen() -> String {
    "127.0.0.1:9188".into()
}

impl Default for InvalidateMetrics {
    fn default() -> Self {
        InvalidateMetrics {
            listen: default_listen(),
        }
    }
}

impl InvalidateFile {
    /// Reads `path` and the `CACHECLEAR__*` environment, then validates every section.
    ///
    /// # Errors
    /// The file is missing or does not parse, a field is missing, unknown or invalid; the message
    /// names the file and the field.
    pub fn load(path: &Path) -> anyhow::Result<(InvalidatorConfig, String, Rules)> {
        let file: InvalidateFile = crate::config::read_toml_with_env(
            path,
            std::env::vars(),
            "README.md, section Scale out (invalidator.toml)",
        )?;
        let cfg = InvalidatorConfig {
            kafka: file.kafka,
            redis: file.redis,
            debezium: file.debezium,
            rules: file.rules,
        };
        let rules = cfg
            .validate()
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("invalid config file {}", path.display()))?;
        if !file.metrics.listen.is_empty() {
            file.metrics
                .listen
                .parse::<std::net::SocketAddr>()
                .map_err(|e| {
                    anyhow::anyhow!(
                        "invalid config file {}: metrics.listen: `{}` is not host:port: {e}",
                        path.display(),
                        file.metrics.listen
                    )
                })?;
        }
        Ok((cfg, file.metrics.listen, rules))
    }
}

fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "cacheclear_invalidator_records_total",
        "Records by outcome: applied (Redis acknowledged), skipped (nothing to evict), dead_lettered, dropped_revoked (partition revoked before commit)."
    );
    describe_counter!(
        "cacheclear_invalidator_keys_evicted_total",
        "Cache keys invalidated (distinct per batch, plus keys found by table-wide evictions)."
    );
    describe_histogram!(
        "cacheclear_invalidator_commit_to_applied_lag_ms",
        Unit::Milliseconds,
        "From a record's commit time to Redis's acknowledgement of its evictions."
    );
    describe_counter!(
        "cacheclear_invalidator_redis_errors_total",
        "Failed attempts to apply a batch to Redis (retried)."
    );
    describe_counter!(
        "cacheclear_invalidator_dlq_errors_total",
        "Failed dead-letter produces (retried)."
    );
    describe_counter!(
        "cacheclear_invalidator_commit_errors_total",
        "Offset commits the group coordinator refused."
    );
    describe_counter!(
        "cacheclear_invalidator_kafka_errors_total",
        "Consumer errors reported by librdkafka (retried by it)."
    );
    describe_counter!(
        "cacheclear_invalidator_rebalances_total",
        "Rebalance callbacks by kind (assign, revoke)."
    );
    describe_gauge!(
        "cacheclear_invalidator_assigned_partitions",
        "Partitions assigned to this process."
    );
}

/// `cacheclear invalidate --config <path>`.
pub async fn invalidate(path: &Path) -> anyhow::Result<()> {
    let (cfg, listen, rules) = InvalidateFile::load(path)?;
    serve_metrics(&listen).await?;
    describe_metrics();
    let options = RunOptions::default();
    let status = Arc::clone(&options.status);
    let gauge = tokio::spawn(async move {
        loop {
            metrics::gauge!("cacheclear_invalidator_assigned_partitions")
                .set(status.assigned_partitions() as f64);
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    });
    let result = cacheclear_invalidator::run(&cfg, Arc::new(rules), options, shutdown_signal())
        .await
        .context("cacheclear invalidate");
    gauge.abort();
    result
}
