//! The configuration file (`cacheclear.toml`) and its environment overrides.
//!
//! Sources, later ones winning: the TOML file given with `--config`, then environment variables
//! `CACHECLEAR__<SECTION>__<FIELD>` (double underscores), e.g. `CACHECLEAR__POSTGRES__URL`,
//! `CACHECLEAR__REDIS__URL`, `CACHECLEAR__METRICS__LISTEN`. Unknown fields are errors (a typo
//! must not silently fall back to a default).

use std::path::Path;

use anyhow::{Context, bail};
use cacheclear_rules::{RuleConfig, Rules};
use cacheclear_sink_redis::RedisConfig;
use cacheclear_source_postgres::PostgresConfig;

/// The whole configuration.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// The CDC source (`[postgres]`).
    pub postgres: PostgresConfig,
    /// The Redis sink (`[redis]`).
    pub redis: RedisConfig,
    /// The Prometheus endpoint (`[metrics]`).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Table → cache-key rules (`[[rules]]`), at least one.
    pub rules: Vec<RuleConfig>,
}

/// `[metrics]`: where `/metrics` is served.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Listen address of the Prometheus endpoint (`GET /metrics`); empty disables it.
    /// Default `127.0.0.1:9187`.
    #[serde(default = "default_listen")]
    pub listen: String,
}

fn default_listen() -> String {
    "127.0.0.1:9187".into()
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: default_listen(),
        }
    }
}

impl AppConfig {
    /// Reads `path` and the environment, then validates every section.
    ///
    /// # Errors
    /// The file cannot be read or parsed, a field is missing, unknown or of the wrong type, or a
    /// value is invalid; the message names the file and the field.
    pub fn load(path: &Path) -> anyhow::Result<(AppConfig, Rules)> {
        Self::load_with_env(path, std::env::vars())
    }

    /// [`AppConfig::load`] with an explicit environment (tests).
    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<(AppConfig, Rules)> {
        if !path.exists() {
            bail!(
                "config file {} does not exist (start from the example in README.md, section Configuration)",
                path.display()
            );
        }
        let env: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("CACHECLEAR__"))
            .collect();
        let settings = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("CACHECLEAR")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env)),
            )
            .build()
            .with_context(|| format!("reading config file {}", path.display()))?;
        let cfg: AppConfig = settings
            .try_deserialize()
            .with_context(|| format!("invalid config file {}", path.display()))?;
        let rules = cfg
            .validate()
            .with_context(|| format!("invalid config file {}", path.display()))?;
        Ok((cfg, rules))
    }

    /// Validates every section and compiles the rules.
    ///
    /// # Errors
    /// A message naming the field and the reason.
    pub fn validate(&self) -> anyhow::Result<Rules> {
        self.postgres.validate().map_err(anyhow::Error::msg)?;
        self.redis.validate().map_err(anyhow::Error::msg)?;
        if !self.metrics.listen.is_empty() {
            self.metrics
                .listen
                .parse::<std::net::SocketAddr>()
                .map_err(|e| {
                    anyhow::anyhow!(
                        "metrics.listen: `{}` is not host:port: {e}",
                        self.metrics.listen
                    )
                })?;
        }
        if self.rules.is_empty() {
            bail!("rules: at least one [[rules]] entry is needed (a table and its key templates)");
        }
        Rules::compile(&self.rules).map_err(|e| anyhow::anyhow!("rules: {e}"))
    }
}
