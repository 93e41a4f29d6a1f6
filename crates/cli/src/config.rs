//! The configuration file (`cacheclear.toml`) and its environment overrides.
//!
//! Sources, later ones winning: the TOML file given with `--config`, then environment variables
//! `CACHECLEAR__<SECTION>__<FIELD>` (double underscores), e.g. `CACHECLEAR__POSTGRES__URL`,
//! `CACHECLEAR__REDIS__URL`, `CACHECLEAR__METRICS__LISTEN`. List fields take comma-separated
//! values: `CACHECLEAR__REDIS__URLS="redis://a:6379/,redis://b:6379/"` (also `KAFKA__TOPICS`,
//! `KAFKA__DEBEZIUM_TOPICS`; `KAFKA__BROKERS` is one string, as in the file). Unknown fields are
//! errors (a typo must not silently fall back to a default).

use std::path::Path;

use anyhow::{Context, bail};
use cacheclear_rules::{RuleConfig, Rules};
use cacheclear_sink_kafka::KafkaConfig;
use cacheclear_sink_redis::RedisConfig;
use cacheclear_source_postgres::PostgresConfig;

/// The whole configuration.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// The CDC source (`[postgres]`).
    pub postgres: PostgresConfig,
    /// Which sink the pipeline writes to (`[sink]`); default Redis.
    #[serde(default)]
    pub sink: SinkSection,
    /// The Redis sink (`[redis]`): required when `sink.kind = "redis"`, refused otherwise.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// The Kafka sink (`[kafka]`): required when `sink.kind = "kafka"`, refused otherwise.
    #[serde(default)]
    pub kafka: Option<KafkaConfig>,
    /// The Prometheus endpoint (`[metrics]`).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Table → cache-key rules (`[[rules]]`), at least one.
    pub rules: Vec<RuleConfig>,
}

/// `[sink]`: where the pipeline's evictions go.
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSection {
    /// `"redis"` (default) or `"kafka"`.
    #[serde(default)]
    pub kind: SinkKind,
}

/// The sink kinds `[sink] kind` names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// Direct mode: the pipeline evicts in Redis itself (`[redis]`).
    #[default]
    Redis,
    /// Bus mode: the pipeline publishes bus records to a Kafka topic (`[kafka]`).
    Kafka,
}

impl<'de> serde::Deserialize<'de> for SinkKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "redis" => Ok(SinkKind::Redis),
            "kafka" => Ok(SinkKind::Kafka),
            other => Err(serde::de::Error::custom(format!(
                "sink.kind: `{other}` is not a sink; use \"redis\" (direct mode) or \"kafka\" (bus \
                 mode)"
            ))),
        }
    }
}

/// The validated sink configuration, one per [`SinkKind`].
#[derive(Debug, Clone)]
pub enum SinkChoice {
    /// `sink.kind = "redis"` with its `[redis]` section.
    Redis(RedisConfig),
    /// `sink.kind = "kafka"` with its `[kafka]` section.
    Kafka(KafkaConfig),
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
        let cfg: AppConfig = read_toml_with_env(path, env, "README.md, section Configuration")?;
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
        self.sink()?;
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

    /// The sink `[sink] kind` selects, with its validated section.
    ///
    /// # Errors
    /// The selected section is missing or invalid, or the other sink's section is present; the
    /// message names `sink.kind` and the sections.
    pub fn sink(&self) -> anyhow::Result<SinkChoice> {
        match (self.sink.kind, &self.redis, &self.kafka) {
            (SinkKind::Redis, Some(redis), None) => {
                redis.validate().map_err(anyhow::Error::msg)?;
                Ok(SinkChoice::Redis(redis.clone()))
            }
            (SinkKind::Kafka, None, Some(kafka)) => {
                kafka.validate().map_err(anyhow::Error::msg)?;
                Ok(SinkChoice::Kafka(kafka.clone()))
            }
            (SinkKind::Redis, None, None) => bail!(
                "redis: missing [redis] section (sink.kind is \"redis\", the default); add [redis] \
                 with its url, or set [sink] kind = \"kafka\" with a [kafka] section"
            ),
            (SinkKind::Redis, _, Some(_)) => bail!(
                "kafka: a [kafka] section is set but sink.kind is \"redis\" (the default); to \
                 publish to Kafka set [sink] kind = \"kafka\" and remove [redis], otherwise \
                 remove [kafka]"
            ),
            (SinkKind::Kafka, _, None) => bail!(
                "kafka: missing [kafka] section (sink.kind is \"kafka\"); add [kafka] with its \
                 brokers"
            ),
            (SinkKind::Kafka, Some(_), Some(_)) => bail!(
                "redis: a [redis] section is set but sink.kind is \"kafka\": in bus mode the \
                 pipeline writes only to Kafka and the invalidator (cacheclear invalidate) \
                 applies the records to Redis; remove [redis], or set [sink] kind = \"redis\" \
                 and remove [kafka]"
            ),
        }
    }
}

/// Reads the TOML file `path`, applies `CACHECLEAR__<SECTION>__<FIELD>` overrides from `env`,
/// and deserializes it into `T`. `example` says where a starting point is documented.
///
/// # Errors
/// The file is missing or does not parse, or a field is missing, unknown or of the wrong type;
/// the message names the file and the field.
pub fn read_toml_with_env<T: serde::de::DeserializeOwned>(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
    example: &str,
) -> anyhow::Result<T> {
    if !path.exists() {
        bail!(
            "config file {} does not exist (start from the example in {example})",
            path.display()
        );
    }
    let env: std::collections::HashMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("CACHECLEAR__"))
        .collect();
    // Errors name the environment too when it overrode something: a typo there is as likely.
    let mut overrides: Vec<&str> = env.keys().map(String::as_str).collect();
    overrides.sort_unstable();
    let origin = if overrides.is_empty() {
        format!("config file {}", path.display())
    } else {
        format!(
            "config file {} with environment overrides {}",
            path.display(),
            overrides.join(", ")
        )
    };
    let settings = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix("CACHECLEAR")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                // Only these are lists; every other value stays one string (a broker list is
                // one comma-separated string, as librdkafka takes it).
                .list_separator(",")
                .with_list_parse_key("redis.urls")
                .with_list_parse_key("redis.sentinel.urls")
                .with_list_parse_key("kafka.topics")
                .with_list_parse_key("kafka.debezium_topics")
                .source(Some(env)),
        )
        .build()
        .with_context(|| format!("reading {origin}"))?;
    settings
        .try_deserialize()
        .with_context(|| format!("invalid {origin}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `deploy/<name>` at the repository root.
    fn deploy(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy")
            .join(name)
    }

    #[test]
    fn deploy_examples_for_run_parse_with_the_real_loader() {
        let (cfg, _) = AppConfig::load_with_env(&deploy("msk-scram.toml"), Vec::new())
            .expect("deploy/msk-scram.toml");
        let SinkChoice::Kafka(kafka) = cfg.sink().expect("sink") else {
            panic!("msk-scram.toml is bus mode");
        };
        assert_eq!(kafka.properties["security.protocol"], "SASL_SSL");
        assert_eq!(kafka.properties["sasl.mechanisms"], "SCRAM-SHA-512");
        assert!(cfg.postgres.url.contains("sslmode=verify-full"));
        let (cfg, _) = AppConfig::load_with_env(&deploy("rds-elasticache.toml"), Vec::new())
            .expect("deploy/rds-elasticache.toml");
        let SinkChoice::Redis(redis) = cfg.sink().expect("sink") else {
            panic!("rds-elasticache.toml is direct mode");
        };
        assert!(redis.url.starts_with("rediss://"), "{}", redis.url);
        assert!(cfg.postgres.url.contains("sslmode=verify-full"));
        // The secrets go in the environment (the systemd unit's EnvironmentFile).
        let (cfg, _) = AppConfig::load_with_env(
            &deploy("rds-elasticache.toml"),
            vec![(
                "CACHECLEAR__POSTGRES__URL".to_owned(),
                "postgres://cacheclear:pw@db.example.com/shop?sslmode=verify-full".to_owned(),
            )],
        )
        .expect("with the URL from the environment");
        assert!(cfg.postgres.url.starts_with("postgres://cacheclear:pw@"));
    }

    const BASE: &str = "[postgres]\nurl = \"postgres://127.0.0.1:5432/db\"\n\n[[rules]]\ntable = \"public.product\"\nkeys = [\"product:{id}\"]\n";

    fn load(text: &str, env: &[(&str, &str)]) -> anyhow::Result<AppConfig> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("cacheclear.toml");
        std::fs::write(&path, text)?;
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        AppConfig::load_with_env(&path, env).map(|(cfg, _)| cfg)
    }

    fn err(text: &str) -> String {
        format!("{:#}", load(text, &[]).expect_err("invalid"))
    }

    #[test]
    fn redis_is_the_default_sink() {
        let cfg = load(
            &format!("{BASE}[redis]\nurl = \"redis://127.0.0.1:6379/\"\n"),
            &[],
        )
        .expect("valid");
        assert_eq!(cfg.sink.kind, SinkKind::Redis);
        assert!(matches!(cfg.sink().expect("sink"), SinkChoice::Redis(_)));
    }

    #[test]
    fn kafka_sink_with_defaults_and_properties() {
        let text = format!(
            "{BASE}[sink]\nkind = \"kafka\"\n[kafka]\nbrokers = \"k1:9092,k2:9092\"\n\
             [kafka.properties]\n\"compression.type\" = \"lz4\"\n\"client.id\" = \"me\"\n"
        );
        let cfg = load(&text, &[]).expect("valid");
        let SinkChoice::Kafka(kafka) = cfg.sink().expect("sink") else {
            panic!("not kafka: {cfg:?}");
        };
        assert_eq!(kafka.brokers, "k1:9092,k2:9092");
        assert_eq!(kafka.topic, "cacheclear.invalidations");
        assert_eq!(kafka.linger_ms, 2);
        assert_eq!(kafka.message_timeout_ms, 30_000);
        assert_eq!(
            kafka.properties.get("compression.type").map(String::as_str),
            Some("lz4")
        );
        assert_eq!(kafka.properties.len(), 2, "{:?}", kafka.properties);
    }

    #[test]
    fn the_environment_selects_and_configures_kafka() {
        let cfg = load(
            BASE,
            &[
                ("CACHECLEAR__SINK__KIND", "kafka"),
                ("CACHECLEAR__KAFKA__BROKERS", "127.0.0.1:9092"),
                ("CACHECLEAR__KAFKA__TOPIC", "inv"),
            ],
        )
        .expect("valid");
        let SinkChoice::Kafka(kafka) = cfg.sink().expect("sink") else {
            panic!("not kafka");
        };
        assert_eq!(
            (kafka.brokers.as_str(), kafka.topic.as_str()),
            ("127.0.0.1:9092", "inv")
        );
    }

    #[test]
    fn list_fields_come_from_comma_separated_variables() {
        let cfg = load(
            &format!("{BASE}[redis]\nurl = \"redis://127.0.0.1:6379/\"\n"),
            &[
                ("CACHECLEAR__REDIS__CLUSTER", "true"),
                ("CACHECLEAR__REDIS__URL", ""),
                (
                    "CACHECLEAR__REDIS__URLS",
                    "redis://127.0.0.1:7001/,redis://127.0.0.1:7002/",
                ),
            ],
        )
        .expect("valid");
        let SinkChoice::Redis(redis) = cfg.sink().expect("sink") else {
            panic!("not redis: {cfg:?}");
        };
        assert!(redis.cluster);
        assert_eq!(
            redis.urls,
            ["redis://127.0.0.1:7001/", "redis://127.0.0.1:7002/"]
        );
        // A broker list stays one string.
        let cfg = load(
            BASE,
            &[
                ("CACHECLEAR__SINK__KIND", "kafka"),
                ("CACHECLEAR__KAFKA__BROKERS", "k1:9092,k2:9092"),
            ],
        )
        .expect("valid");
        let SinkChoice::Kafka(kafka) = cfg.sink().expect("sink") else {
            panic!("not kafka");
        };
        assert_eq!(kafka.brokers, "k1:9092,k2:9092");
    }

    #[test]
    fn invalid_combinations_name_the_fields() {
        let kafka = "[kafka]\nbrokers = \"k:9092\"\n";
        let redis = "[redis]\nurl = \"redis://127.0.0.1:6379/\"\n";
        let e = err(&format!("{BASE}{kafka}"));
        assert!(
            e.contains("[kafka] section is set but sink.kind is \"redis\""),
            "{e}"
        );
        let e = err(&format!("{BASE}{kafka}{redis}"));
        assert!(e.contains("sink.kind is \"redis\""), "{e}");
        let e = err(&format!("{BASE}[sink]\nkind = \"kafka\"\n"));
        assert!(e.contains("kafka: missing [kafka] section"), "{e}");
        let e = err(&format!("{BASE}[sink]\nkind = \"kafka\"\n{kafka}{redis}"));
        assert!(
            e.contains("[redis] section is set but sink.kind is \"kafka\""),
            "{e}"
        );
        let e = err(BASE);
        assert!(e.contains("redis: missing [redis] section"), "{e}");
        let e = err(&format!(
            "{BASE}[sink]\nkind = \"kafka\"\n[kafka]\nbrokers = \"\"\n"
        ));
        assert!(e.contains("kafka.brokers"), "{e}");
        let e = err(&format!(
            "{BASE}[sink]\nkind = \"kafka\"\n{kafka}topic = \"a b\"\n"
        ));
        assert!(e.contains("kafka.topic"), "{e}");
        let e = err(&format!(
            "{BASE}[sink]\nkind = \"kafka\"\n{kafka}[kafka.properties]\nacks = \"1\"\n"
        ));
        assert!(e.contains("kafka.properties.\"acks\""), "{e}");
        let e = err(&format!(
            "{BASE}[sink]\nkind = \"kafka\"\n{kafka}linger = 1\n"
        ));
        assert!(e.contains("unknown field `linger`"), "{e}");
        let e = err(&format!("{BASE}[sink]\nkind = \"rabbit\"\n"));
        assert!(e.contains("rabbit"), "{e}");
    }
}
