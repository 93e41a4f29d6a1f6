//! The client's error type.

use std::sync::Arc;

use cacheclear_protocol::KeyError;

use crate::config::ConfigError;

/// A boxed error from an application loader.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a read failed.
///
/// `Clone` because one in-process load (single-flight) answers every concurrent caller of the
/// same key, errors included; sources are therefore held in `Arc`s.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The cache key cannot be laid out in Redis (empty, or contains `{` / `}`). Fix the key
    /// template; nothing was read.
    #[error("invalid cache key: {0}")]
    InvalidKey(#[from] KeyError),
    /// A [`crate::Config`] field is out of range.
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
    /// The application's loader failed. Nothing was cached and the lease (if held) was released.
    /// `source` is the loader's own error (downcast it with `std::error::Error::source`).
    #[error("loader for cache key `{key}` failed: {source}")]
    Loader {
        /// The cache key (`""` for [`crate::Client::get_strict`]).
        key: String,
        /// The loader's error.
        source: Arc<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// Redis failed during `op` and the policy is [`crate::RedisErrorPolicy::Error`].
    #[error(
        "redis {op} for cache key `{key}` failed: {source}; the database was not read (on_redis_error = Error)"
    )]
    Redis {
        /// The cache key.
        key: String,
        /// The operation: `GET`, `lease`, `poll`.
        op: &'static str,
        /// The Redis error.
        source: Arc<redis::RedisError>,
    },
    /// [`crate::Client::connect`] could not reach Redis.
    #[error("cannot connect to redis at {url}: {source}; check the URL and that Redis is running")]
    Connect {
        /// The URL, without its password.
        url: String,
        /// The Redis error.
        source: Arc<redis::RedisError>,
    },
    /// Another process held the key's lease for longer than `lease_wait_ms` and the policy is
    /// [`crate::WaitTimeoutPolicy::Error`].
    #[error(
        "waited {waited_ms} ms for another loader's lease on cache key `{key}` without a value appearing (on_wait_timeout = Error)"
    )]
    LeaseWaitTimeout {
        /// The cache key.
        key: String,
        /// How long the read waited, ms.
        waited_ms: u64,
    },
    /// The staleness breaker is open and this process already runs
    /// [`crate::StalenessConfig::max_bypass_loads`] database loads (policy `Fail`, or `Wait` ran
    /// out after `lease_wait_ms`). Nothing was read.
    #[error(
        "the cache of namespace `{namespace}` is bypassed ({reason}) and {running} database loads are already running in this process; refusing the read of `{key}`"
    )]
    BypassOverloaded {
        /// The cache key.
        key: String,
        /// The namespace.
        namespace: String,
        /// Why the breaker is open (`watermark_stale`, `watermark_missing`, `epoch_missing`).
        reason: &'static str,
        /// The cap (`max_bypass_loads`).
        running: usize,
    },
    /// The loader's value cannot be serialized to JSON (for example a map with non-string keys).
    /// Nothing was cached; the lease was released.
    #[error("value for cache key `{key}` cannot be encoded as JSON: {source}")]
    Encode {
        /// The cache key.
        key: String,
        /// The serializer's error.
        source: Arc<serde_json::Error>,
    },
}

impl Error {
    pub(crate) fn loader(key: &str, e: impl Into<BoxError>) -> Error {
        Error::Loader {
            key: key.to_owned(),
            source: Arc::from(e.into()),
        }
    }
}
