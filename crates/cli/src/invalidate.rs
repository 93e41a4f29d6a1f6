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
//! # schemas_enable = true                    # the connector's value.converter.schemas.enable
//! # decimal_handling_mode = "precise"        # | "double" | "string"
//! # time_precision_mode = "adaptive"         # | "adaptive_time_microseconds" | "connect"
//! # binary_handling_mode = "bytes"           # | "base64" | "base64-url-safe" | "hex"
//! # date_style = "ISO, MDY"                  # DateStyle the application's keys use
//! # time_zone = "UTC"                        # TimeZone the application's keys use
//!
//! # [postgres]                               # optional: column types read at start
//! # url = "postgres://reader@db:5432/shop"
//!
//! [metrics]
//! listen = "127.0.0.1:9188"                  # default; empty disables
//!
//! [[rules]]                                  # only for debezium_topics
//! table = "public.product"
//! keys = ["product:{id}", "category:{category_id}:products"]
//! # [rules.types]                            # needed without schemas unless [postgres] is set
//! # id = "integer"
//! # category_id = "integer"
//! ```
//!
//! Environment variables `CACHECLEAR__<SECTION>__<FIELD>` override the file, as for `run`
//! (`CACHECLEAR__KAFKA__GROUP_ID`, `CACHECLEAR__REDIS__URL`, …).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use cacheclear_invalidator::{
    DebeziumConfig, InvalidatorConfig, InvalidatorRule, KafkaConfig, PostgresConfig, RunOptions,
};
use cacheclear_rules::Rules;
use cacheclear_sink_redis::RedisConfig;

use crate::serve::{serve_metrics, shutdown_signal};

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
    /// `[postgres]` (optional): where the rule tables' column types are read at start.
    #[serde(default)]
    pub postgres: Option<PostgresConfig>,
    /// `[[rules]]` (with optional `[rules.types]`).
    #[serde(default)]
    pub rules: Vec<InvalidatorRule>,
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
        Self::load_with_env(path, std::env::vars())
    }

    /// [`InvalidateFile::load`] with an explicit environment (tests).
    ///
    /// # Errors
    /// As [`InvalidateFile::load`].
    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<(InvalidatorConfig, String, Rules)> {
        let file: InvalidateFile = crate::config::read_toml_with_env(
            path,
            env,
            "README.md, section Scale out (invalidator.toml)",
        )?;
        let mut cfg = InvalidatorConfig::new(file.kafka, file.redis)
            .with_debezium(file.debezium)
            .with_rules(file.rules);
        if let Some(pg) = file.postgres {
            cfg = cfg.with_postgres(pg);
        }
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

/// `cacheclear invalidate --config <path>`.
pub async fn invalidate(path: &Path) -> anyhow::Result<()> {
    let (cfg, listen, rules) = InvalidateFile::load(path)?;
    serve_metrics(&listen).await?;
    cacheclear_invalidator::register_metrics();
    cacheclear_sink_redis::register_metrics();
    cacheclear_invalidator::run(
        &cfg,
        Arc::new(rules),
        RunOptions::default(),
        shutdown_signal(),
    )
    .await
    .context("cacheclear invalidate")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The invalidator example of `deploy/` parses with the real loader, and the systemd template
    /// unit's `Environment=CACHECLEAR__KAFKA__INSTANCE_ID=%H-%i` sets `kafka.instance_id`.
    #[test]
    fn deploy_invalidator_example_parses_and_takes_the_instance_id_from_the_environment() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/msk-scram-invalidator.toml");
        let (cfg, listen, _) = InvalidateFile::load_with_env(
            &path,
            vec![(
                "CACHECLEAR__KAFKA__INSTANCE_ID".to_owned(),
                "cache-3-0".to_owned(),
            )],
        )
        .expect("deploy/msk-scram-invalidator.toml");
        assert_eq!(cfg.kafka.instance_id.as_deref(), Some("cache-3-0"));
        assert_eq!(cfg.kafka.properties["security.protocol"], "SASL_SSL");
        assert_eq!(cfg.kafka.properties["sasl.mechanisms"], "SCRAM-SHA-512");
        assert!(cfg.redis.url.starts_with("rediss://"), "{}", cfg.redis.url);
        assert_eq!(listen, "127.0.0.1:9188");
        let unit = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../deploy/cacheclear-invalidate@.service"),
        )
        .expect("unit");
        assert!(
            unit.lines()
                .any(|l| l == "Environment=CACHECLEAR__KAFKA__INSTANCE_ID=%H-%i"),
            "{unit}"
        );
    }
}
