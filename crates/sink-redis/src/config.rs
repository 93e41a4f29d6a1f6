//! `[redis]` section of the configuration.

/// Options of the Redis sink. Every field has a default except `url`.
///
/// ```toml
/// [redis]
/// url = "redis://127.0.0.1:6379/"
/// fence_ttl_ms = 600000
/// ```
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Redis URL, `redis://[user:password@]host:port/[db]`.
    pub url: String,
    /// TTL of fences (`{K}:fence` tombstones), in ms. Must exceed the worst read-replica lag plus
    /// the longest load: a replica reader whose version is older than a fence that already expired
    /// could fill an old value. Default 600000 (10 minutes).
    #[serde(default = "default_fence_ttl_ms")]
    pub fence_ttl_ms: u64,
    /// Cache keys per script call. Default 256.
    #[serde(default = "default_keys_per_call")]
    pub keys_per_call: usize,
    /// Script calls per pipeline (one round trip). Default 16.
    #[serde(default = "default_calls_per_pipeline")]
    pub calls_per_pipeline: usize,
    /// Pipelines in flight at once on the multiplexed connection. Default 4.
    #[serde(default = "default_pipelines_in_flight")]
    pub pipelines_in_flight: usize,
    /// `COUNT` hint of the SCANs of a table-wide eviction (TRUNCATE). Default 1000.
    #[serde(default = "default_scan_count")]
    pub scan_count: usize,
    /// Timeout of one pipeline round trip, in ms; a timeout fails the batch, which is retried.
    /// Default 5000.
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
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
    4
}
fn default_scan_count() -> usize {
    1000
}
fn default_response_timeout_ms() -> u64 {
    5000
}

impl RedisConfig {
    /// Every default, with this URL.
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            fence_ttl_ms: default_fence_ttl_ms(),
            keys_per_call: default_keys_per_call(),
            calls_per_pipeline: default_calls_per_pipeline(),
            pipelines_in_flight: default_pipelines_in_flight(),
            scan_count: default_scan_count(),
            response_timeout_ms: default_response_timeout_ms(),
        }
    }

    /// Checks values that parse but make no sense. Errors name the field and the reason.
    ///
    /// # Errors
    /// A message naming the first invalid field.
    pub fn validate(&self) -> Result<(), String> {
        redis::Client::open(self.url.as_str())
            .map_err(|e| format!("redis.url: `{}` is not a Redis URL: {e}", self.url))?;
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
        ] {
            if v == 0 {
                return Err(format!("{field}: must be at least 1"));
            }
        }
        Ok(())
    }
}
