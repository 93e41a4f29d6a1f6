//! `[redis]` section of the configuration.

use cacheclear_protocol::connect::{RedisSentinel, RedisTarget, RedisTls};
use cacheclear_protocol::{ConfigError, redact_url};
/// Options of the Redis sink. Every field has a default except the target: `url` for a
/// standalone Redis, `cluster = true` with `urls` for a Redis Cluster, or `sentinel` for the
/// master of a Redis Sentinel deployment.
///
/// A standalone Redis (or a primary behind a proxy):
///
/// ```toml
/// [redis]
/// url = "redis://127.0.0.1:6379/"
/// fence_ttl_ms = 600000
/// ```
///
/// A Redis Cluster: list some of its nodes (any one reachable node is enough to discover the
/// rest; list several so that the sink can start while one is down):
///
/// ```toml
/// [redis]
/// cluster = true
/// urls = ["redis://127.0.0.1:7000/", "redis://127.0.0.1:7001/", "redis://127.0.0.1:7002/"]
/// ```
///
/// The master of a Sentinel deployment (asked for again after a connection error or a
/// `READONLY` reply, so a failed batch is retried against the promoted replica), over TLS:
///
/// ```toml
/// [redis]
/// sentinel = { master = "mymaster", urls = ["rediss://10.0.0.1:26379/", "rediss://10.0.0.2:26379/"], username = "cacheclear", password = "…" }
/// [redis.tls]
/// ca_file = "/etc/cacheclear/redis-ca.pem"
/// ```
///
/// TLS: a `rediss://` URL (every URL of the section, sentinels included) encrypts with the
/// `[redis.tls]` settings ([`RedisTls`]: `ca_file`, `crt_file`, `key_file`,
/// `verify_certificate`, `verify_hostname`), or the Mozilla roots without the table. ACL users:
/// `rediss://user:password@host:port/`; in cluster mode the seeds' credentials authenticate to
/// every node the sink discovers.
///
/// In cluster mode the keys of a batch are grouped by hash slot (each script call carries the
/// keys of one slot: no `CROSSSLOT`) and the calls by the master that serves the slot (one
/// pipeline per master per round trip). Redirections and failovers (`MOVED`, `ASK`, `READONLY`,
/// `TRYAGAIN`, `CLUSTERDOWN`, connection resets) are retried with a fresh slot map, up to
/// `cluster_retries` times, before the batch fails (and is retried whole by its source).
/// Table-wide evictions (TRUNCATE) SCAN every master.
///
/// In code, start from [`RedisConfig::new`] (standalone) or [`RedisConfig::cluster`] and chain
/// the `with_*` methods, or assign the public fields of a `mut` value. Struct literals are not
/// available outside this crate (`#[non_exhaustive]`: options may be added in minor releases).
///
/// ```
/// use cacheclear_sink_redis::RedisConfig;
/// let cfg = RedisConfig::new("redis://127.0.0.1:6379/")
///     .with_fence_ttl_ms(3_600_000)
///     .with_response_timeout_ms(2_000);
/// assert!(cfg.validate().is_ok());
/// ```
#[derive(Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisConfig {
    /// Standalone mode: the Redis URL, `redis://[user:password@]host:port/[db]` (`rediss://` for
    /// TLS). Required unless `cluster = true`, and must then be left unset (empty): a cluster's
    /// nodes go in `urls`, so a half-converted configuration cannot silently write to one node.
    #[serde(default)]
    pub url: String,
    /// Redis Cluster mode. Default `false`. Prevents `CROSSSLOT`/`MOVED` failures: a
    /// standalone connection to one cluster node can only write the slots that node serves.
    #[serde(default)]
    pub cluster: bool,
    /// Cluster mode: seed node URLs, `redis://[user:password@]host:port/` each, database 0 (a
    /// cluster has no other). At least one; the other nodes are discovered with `CLUSTER SLOTS`.
    /// List several: with a single seed, the sink cannot (re)connect while that node is down.
    /// Default empty; must stay empty in standalone mode.
    #[serde(default)]
    pub urls: Vec<String>,
    /// Sentinel mode: the sentinels and the master's name and credentials (see
    /// [`RedisSentinel`]). Default: none. Excludes `url`, `urls` and `cluster`.
    #[serde(default)]
    pub sentinel: Option<RedisSentinel>,
    /// `[redis.tls]`: TLS settings for `rediss://` URLs (see [`RedisTls`]). Default: none (a
    /// `rediss://` URL then verifies against the Mozilla roots, host name included).
    #[serde(default)]
    pub tls: Option<RedisTls>,
    /// TTL of fences (`{K}:fence` tombstones), in ms. Must exceed the worst read-replica lag plus
    /// the longest load: a replica reader whose version is older than a fence that already expired
    /// could fill an old value. Default 600000 (10 minutes).
    #[serde(default = "default_fence_ttl_ms")]
    pub fence_ttl_ms: u64,
    /// Cache keys per script call (in cluster mode: at most, as a call only carries keys of one
    /// slot). Default 256.
    #[serde(default = "default_keys_per_call")]
    pub keys_per_call: usize,
    /// Script calls per pipeline (one round trip). Default 16. In cluster mode a pipeline to one
    /// master holds up to `keys_per_call × calls_per_pipeline` keys, in as many calls as slots.
    #[serde(default = "default_calls_per_pipeline")]
    pub calls_per_pipeline: usize,
    /// Pipelines in flight at once on the multiplexed connection (in cluster mode: per master).
    /// Default 2: one being executed while the next is in transit keeps Redis busy; 4 gave the
    /// same bulk throughput (85–92k rows/s in `bench pipeline`) for ~4 MB more peak RSS.
    #[serde(default = "default_pipelines_in_flight")]
    pub pipelines_in_flight: usize,
    /// `COUNT` hint of the SCANs of a table-wide eviction (TRUNCATE). Default 1000.
    #[serde(default = "default_scan_count")]
    pub scan_count: usize,
    /// Timeout of one pipeline round trip, in ms; a timeout fails the batch, which is retried.
    /// Default 5000.
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// Cluster mode: how many times the keys of a batch that failed on some master (a failover,
    /// a slot migration, a lost connection) are re-sent, with a fresh slot map and a backoff of
    /// 50 ms doubling up to 1 s, before the batch fails. Default 10 (about 7 s, which covers a
    /// manual failover and an automatic one with a short `cluster-node-timeout`). Prevents a
    /// failover from failing whole batches, which the source would re-apply from scratch.
    /// 0 disables the in-sink retries.
    #[serde(default = "default_cluster_retries")]
    pub cluster_retries: u32,
    /// Replicas that must have a batch's evictions before the batch counts as acknowledged:
    /// after its scripts, `WAIT wait_replicas wait_timeout_ms` on the connection (in cluster mode
    /// on every master). Fewer replicas in time → the batch fails and is retried, and nothing is
    /// confirmed to PostgreSQL, so a master dying before its replicas got an eviction cannot
    /// lose it (the retry lands on the promoted replica). Default 0: no `WAIT` (replication is
    /// asynchronous; an acknowledged eviction can vanish with its master).
    #[serde(default)]
    pub wait_replicas: u32,
    /// The `WAIT` timeout, ms (used when `wait_replicas` > 0). Default 1000. Must be ≥ 1 (Redis
    /// reads 0 as "forever").
    #[serde(default = "default_wait_timeout_ms")]
    pub wait_timeout_ms: u64,
}

fn default_wait_timeout_ms() -> u64 {
    1000
}

/// `Debug` with every URL's password shown as `***` (a panic or a debug log line must not print
/// it).
impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("cluster", &self.cluster)
            .field("urls", &urls)
            .field("sentinel", &self.sentinel)
            .field("tls", &self.tls)
            .field("fence_ttl_ms", &self.fence_ttl_ms)
            .finish_non_exhaustive()
    }
}

fn default_fence_ttl_ms() -> u64 {
    600_000
}
fn default_keys_per_call() -> usize {
    256
}
fn default_calls_per_pipeline() -> usize {
    16
}
fn default_pipelines_in_flight() -> usize {
    2
}
fn default_scan_count() -> usize {
    1000
}
fn default_response_timeout_ms() -> u64 {
    5000
}
fn default_cluster_retries() -> u32 {
    10
}

impl RedisConfig {
    /// Standalone mode: every default, with this URL (see [`RedisConfig::url`]).
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            cluster: false,
            urls: Vec::new(),
            sentinel: None,
            tls: None,
            fence_ttl_ms: default_fence_ttl_ms(),
            keys_per_call: default_keys_per_call(),
            calls_per_pipeline: default_calls_per_pipeline(),
            pipelines_in_flight: default_pipelines_in_flight(),
            scan_count: default_scan_count(),
            response_timeout_ms: default_response_timeout_ms(),
            cluster_retries: default_cluster_retries(),
            wait_replicas: 0,
            wait_timeout_ms: default_wait_timeout_ms(),
        }
    }

    /// Cluster mode (`cluster = true`): every default, with these seed node URLs (see
    /// [`RedisConfig::urls`]).
    pub fn cluster<I, S>(seeds: I) -> RedisConfig
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RedisConfig {
            cluster: true,
            urls: seeds.into_iter().map(Into::into).collect(),
            ..RedisConfig::new(String::new())
        }
    }

    /// Sentinel mode: every default, the master named by `sentinel`'s sentinels (see
    /// [`RedisConfig::sentinel`]).
    pub fn sentinel(sentinel: RedisSentinel) -> RedisConfig {
        RedisConfig {
            sentinel: Some(sentinel),
            ..RedisConfig::new(String::new())
        }
    }

    /// Sets [`RedisConfig::tls`]: the `[redis.tls]` table for `rediss://` URLs.
    #[must_use]
    pub fn with_tls(mut self, tls: impl Into<Option<RedisTls>>) -> Self {
        self.tls = tls.into();
        self
    }

    /// The standalone or Sentinel target of this configuration (not for cluster mode), for
    /// [`cacheclear_protocol::connect`].
    pub fn target(&self) -> RedisTarget {
        RedisTarget {
            url: self.url.clone(),
            sentinel: self.sentinel.clone(),
            tls: self.tls.clone(),
            section: "redis".into(),
        }
    }

    /// What to print for the target: the redacted URL(s), or the sentinel master and sentinels.
    pub fn display_target(&self) -> String {
        if self.cluster {
            self.urls
                .iter()
                .map(|u| redact_url(u))
                .collect::<Vec<_>>()
                .join(", ")
        } else {
            self.target().display()
        }
    }

    /// Sets [`RedisConfig::fence_ttl_ms`]: TTL of fences, ms. Default **600 000** (10 minutes).
    /// Must be ≥ 1 and exceed the worst read-replica lag plus the longest load.
    #[must_use]
    pub fn with_fence_ttl_ms(mut self, fence_ttl_ms: u64) -> Self {
        self.fence_ttl_ms = fence_ttl_ms;
        self
    }

    /// Sets [`RedisConfig::keys_per_call`]: cache keys per script call. Default **256**. Must be
    /// ≥ 1.
    #[must_use]
    pub fn with_keys_per_call(mut self, keys_per_call: usize) -> Self {
        self.keys_per_call = keys_per_call;
        self
    }

    /// Sets [`RedisConfig::calls_per_pipeline`]: script calls per pipeline (one round trip).
    /// Default **16**. Must be ≥ 1.
    #[must_use]
    pub fn with_calls_per_pipeline(mut self, calls_per_pipeline: usize) -> Self {
        self.calls_per_pipeline = calls_per_pipeline;
        self
    }

    /// Sets [`RedisConfig::pipelines_in_flight`]: pipelines in flight at once (per master in
    /// cluster mode). Default **2**. Must be ≥ 1.
    #[must_use]
    pub fn with_pipelines_in_flight(mut self, pipelines_in_flight: usize) -> Self {
        self.pipelines_in_flight = pipelines_in_flight;
        self
    }

    /// Sets [`RedisConfig::scan_count`]: `COUNT` hint (keys per `SCAN` step) of table-wide
    /// evictions. Default **1 000**. Must be ≥ 1.
    #[must_use]
    pub fn with_scan_count(mut self, scan_count: usize) -> Self {
        self.scan_count = scan_count;
        self
    }

    /// Sets [`RedisConfig::response_timeout_ms`]: timeout of one pipeline round trip, ms.
    /// Default **5 000**. Must be ≥ 1.
    #[must_use]
    pub fn with_response_timeout_ms(mut self, response_timeout_ms: u64) -> Self {
        self.response_timeout_ms = response_timeout_ms;
        self
    }

    /// Sets [`RedisConfig::wait_replicas`] and [`RedisConfig::wait_timeout_ms`]: replicas that
    /// must have a batch (`WAIT`), and how long to wait for them, ms.
    #[must_use]
    pub fn with_wait_replicas(mut self, wait_replicas: u32, wait_timeout_ms: u64) -> Self {
        self.wait_replicas = wait_replicas;
        self.wait_timeout_ms = wait_timeout_ms;
        self
    }

    /// Sets [`RedisConfig::cluster_retries`]: re-sends of a batch's failed keys in cluster mode
    /// (a count; backoff 50 ms doubling to 1 s between them). Default **10**; 0 disables them.
    #[must_use]
    pub fn with_cluster_retries(mut self, cluster_retries: u32) -> Self {
        self.cluster_retries = cluster_retries;
        self
    }

    /// Checks values that parse but make no sense. Errors name the field and the reason.
    ///
    /// # Errors
    /// A message naming the first invalid field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cluster {
            if !self.url.is_empty() {
                return Err(ConfigError::new(
                    "redis.url",
                    format!(
                        "with cluster = true the nodes go in redis.urls (a list); url \
                     (`{}`) is for a standalone Redis: move it into urls",
                        redact_url(&self.url)
                    ),
                ));
            }
            if self.urls.is_empty() {
                return Err(ConfigError::new(
                    "redis.urls",
                    "cluster = true needs at least one seed node, e.g. \
                            urls = [\"redis://10.0.0.1:6379/\", \"redis://10.0.0.2:6379/\"]",
                ));
            }
            for (i, url) in self.urls.iter().enumerate() {
                let info =
                    redis::IntoConnectionInfo::into_connection_info(url.as_str()).map_err(|e| {
                        ConfigError::new(
                            format!("redis.urls[{i}]"),
                            format!("`{}` is not a Redis URL: {e}", redact_url(url)),
                        )
                    })?;
                if info.redis_settings().db() != 0 {
                    return Err(ConfigError::new(
                        format!("redis.urls[{i}]"),
                        format!(
                            "`{}` selects database {}, but a Redis Cluster only \
                         has database 0: drop the /{} from the URL",
                            redact_url(url),
                            info.redis_settings().db(),
                            info.redis_settings().db()
                        ),
                    ));
                }
            }
            if self.sentinel.is_some() {
                return Err(ConfigError::new(
                    "redis.sentinel",
                    "a Redis Cluster has no sentinels: remove sentinel (or cluster = true)",
                ));
            }
            cacheclear_protocol::connect::cluster_client_builder(
                &self.urls,
                self.tls.as_ref(),
                "redis.urls",
                "redis.tls",
            )?
            .build()
            .map_err(|e| ConfigError::new("redis.urls", e.to_string()))?;
        } else {
            if !self.urls.is_empty() {
                return Err(ConfigError::new(
                    "redis.urls",
                    "only read with cluster = true; for a Redis Cluster set \
                            cluster = true (and leave url unset), for a standalone Redis use url",
                ));
            }
            if self.url.is_empty() && self.sentinel.is_none() {
                return Err(ConfigError::new(
                    "redis.url",
                    "missing: the Redis URL, e.g. \
                            url = \"redis://127.0.0.1:6379/\" (for a Redis Cluster set \
                            cluster = true and urls = [...] instead; for Sentinel set \
                            sentinel = { master = \"mymaster\", urls = [...] })",
                ));
            }
            self.target().validate()?;
        }
        for (field, v) in [
            ("redis.fence_ttl_ms", self.fence_ttl_ms as usize),
            ("redis.keys_per_call", self.keys_per_call),
            ("redis.calls_per_pipeline", self.calls_per_pipeline),
            ("redis.pipelines_in_flight", self.pipelines_in_flight),
            ("redis.scan_count", self.scan_count),
            (
                "redis.response_timeout_ms",
                self.response_timeout_ms as usize,
            ),
            ("redis.wait_timeout_ms", self.wait_timeout_ms as usize),
        ] {
            if v == 0 {
                return Err(ConfigError::new(field, "must be at least 1"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<RedisConfig, String> {
        let cfg: RedisConfig = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    #[test]
    fn standalone_and_cluster_shapes_parse() {
        let cfg = parse("url = \"redis://127.0.0.1:6379/\"").expect("standalone");
        assert!(!cfg.cluster);
        assert_eq!(cfg.cluster_retries, 10);
        let cfg = parse(
            "cluster = true\nurls = [\"redis://127.0.0.1:7000/\", \"redis://127.0.0.1:7001\"]",
        )
        .expect("cluster");
        assert!(cfg.cluster);
        assert_eq!(cfg.urls.len(), 2);
        assert!(cfg.url.is_empty());
        RedisConfig::cluster(["redis://127.0.0.1:7000/"])
            .validate()
            .expect("constructor");
    }

    #[test]
    fn tls_and_sentinel_tables_parse() {
        let cfg =
            parse("url = \"rediss://u:p@cache.internal:6380/\"\n[tls]\nverify_hostname = false")
                .expect("tls table");
        let tls = cfg.tls.expect("tls");
        assert!(tls.verify_certificate && !tls.verify_hostname);
        assert_eq!(tls.ca_file, None);
        let cfg = parse(
            "sentinel = { master = \"mymaster\", urls = [\"redis://s1:26379/\", \"redis://s2:26379/\"], username = \"app\", password = \"pw\" }",
        )
        .expect("sentinel");
        let sentinel = cfg.sentinel.expect("sentinel");
        assert_eq!(sentinel.master, "mymaster");
        assert_eq!(sentinel.urls.len(), 2);
        assert_eq!(sentinel.password.as_deref(), Some("pw"));
        assert!(cfg.url.is_empty());
        let cases = [
            (
                "url = \"redis://a:1/\"\n[tls]\nca_file = \"/x\"",
                "redis.url: `redis://a:1/` is not a TLS URL",
            ),
            (
                "url = \"rediss://a:1/\"\n[tls]\nca_file = \"/nonexistent/ca.pem\"",
                "redis.tls.ca_file: cannot read `/nonexistent/ca.pem`",
            ),
            (
                "url = \"rediss://a:1/\"\n[tls]\ncafile = \"/x\"",
                "unknown field `cafile`",
            ),
            (
                "cluster = true\nurls = [\"redis://a:1/\"]\nsentinel = { master = \"m\", urls = [\"redis://s:1/\"] }",
                "redis.sentinel: a Redis Cluster has no sentinels",
            ),
            (
                "url = \"redis://a:1/\"\nsentinel = { master = \"m\", urls = [\"redis://s:1/\"] }",
                "redis.url: with redis.sentinel",
            ),
            (
                "sentinel = { master = \"m\", urls = [] }",
                "redis.sentinel.urls: at least one sentinel",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).expect_err(text);
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn mixed_or_missing_targets_name_the_field() {
        let cases = [
            ("", "redis.url: missing"),
            ("cluster = true", "redis.urls: cluster = true needs"),
            (
                "cluster = true\nurls = []",
                "redis.urls: cluster = true needs",
            ),
            (
                "url = \"redis://a:1/\"\nurls = [\"redis://b:2/\"]",
                "redis.urls: only read with cluster = true",
            ),
            (
                "cluster = true\nurl = \"redis://a:1/\"\nurls = [\"redis://b:2/\"]",
                "redis.url: with cluster = true",
            ),
            (
                "cluster = true\nurls = [\"redis://a:1/\", \"nonsense\"]",
                "redis.urls[1]: `nonsense` is not a Redis URL",
            ),
            (
                "cluster = true\nurls = [\"redis://a:1/3\"]",
                "redis.urls[0]: `redis://a:1/3` selects database 3",
            ),
            (
                "cluster = true\nurls = [\"redis+unix:///tmp/r.sock\"]",
                "redis.urls: ",
            ),
            (
                "url = \"redis://a:1/\"\nkeys_per_call = 0",
                "redis.keys_per_call",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).expect_err(text);
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
