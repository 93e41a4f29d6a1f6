//! The client's options, each with its default and the failure it prevents.

use std::fmt;
#[cfg(feature = "test-util")]
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "test-util")]
use futures::future::BoxFuture;

/// What a miss does when another process holds the lease and the value has not appeared after
/// [`Config::lease_wait_ms`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WaitTimeoutPolicy {
    /// Run the loader and return its value without writing it to Redis (default). The caller
    /// gets an answer within its latency budget; the lease holder still fills. Costs one extra
    /// database read per waiting process per timeout.
    #[default]
    LoadWithoutFilling,
    /// Return [`crate::Error::LeaseWaitTimeout`]: for callers that prefer failing fast to adding
    /// database load while something already holds up the key's loader.
    Error,
}

/// What a read does when Redis fails (connection refused or lost, timeout, unexpected reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RedisErrorPolicy {
    /// Run the loader and return its value without caching (default): the cache is an
    /// optimisation, and the database is the source of truth. Counted in `redis_errors` and
    /// `fallbacks`. Beware: with Redis down, every read reaches the database.
    #[default]
    Fallback,
    /// Return [`crate::Error::Redis`]: for deployments where the database cannot take the full
    /// read load and shedding requests is the better failure.
    Error,
}

/// How one read treats the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadPolicy {
    /// Cache-aside through Redis (and the local tier when configured): [`crate::Client::get_or_load`].
    #[default]
    Cached,
    /// Read the database directly, never the cache, never fill: for data that must never be
    /// stale (balances, stock decrements, checkout totals; docs/architecture.md,
    /// "Data that must never be stale").
    Strict,
}

/// What a read does when the staleness breaker is open and [`StalenessConfig::max_bypass_loads`]
/// database loads of this process are already running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BypassFullPolicy {
    /// Wait for a free slot, up to [`Config::lease_wait_ms`], then fail with
    /// [`crate::Error::BypassOverloaded`] (default): the database sees at most the cap.
    #[default]
    Wait,
    /// Serve the cached value if there is one, counted in `stale_served` (the caller accepted
    /// staleness beyond the bound under overload: GitLab's "escape hatch"); without a cached
    /// value, wait as [`BypassFullPolicy::Wait`].
    ServeStale,
    /// Fail at once with [`crate::Error::BypassOverloaded`].
    Fail,
}

/// The staleness breaker (docs/architecture.md, "The staleness breaker").
///
/// The pipeline of `namespace` publishes a watermark in Redis (`{cacheclear.ns:N}:watermark`):
/// the newest applied commit, the end-to-end lag of its last heartbeat, and the Redis `TIME` it
/// was written at. The client reads it with the namespace's epoch in one script call at most
/// every `refresh_ms` per process and estimates the staleness as
/// `lag_ms + (Redis now − written_ms)` at the read, plus the time since, on this process's
/// monotonic clock: no two hosts' clocks are ever compared. While that estimate exceeds
/// `max_staleness_ms`, or the watermark or the epoch is absent, reads bypass the cache: they
/// run the loader and do not fill, at most `max_bypass_loads` at once ([`BypassFullPolicy`]).
/// Values filled under an older epoch are misses. Build it with [`StalenessConfig::new`] and
/// the `with_*` methods.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StalenessConfig {
    /// The pipeline's `postgres.namespace` (default there: the slot name).
    pub namespace: String,
    /// The bound, ms. Default **5 000**: the pipeline's heartbeat comes every second, so a healthy
    /// pipeline shows 1–2 s; 5 s rides out a few lost heartbeats or a sink retry without moving
    /// every read to the database, and bounds a flash sale's wrong price at seconds instead of a
    /// 10-minute TTL. A served value is at most `max_staleness_ms + refresh_ms` behind its commit.
    pub max_staleness_ms: u64,
    /// How often this process reads the watermark, ms (one Redis round trip). Default **250**.
    pub refresh_ms: u64,
    /// Database loads this process runs at once while the breaker is open. Default **32**.
    pub max_bypass_loads: usize,
    /// See [`BypassFullPolicy`]. Default [`BypassFullPolicy::Wait`].
    pub on_bypass_full: BypassFullPolicy,
    /// How long [`crate::Client::get_at_least`] waits for the watermark to pass the caller's LSN
    /// before it reads the database, ms. Default **1 000**.
    pub read_your_writes_wait_ms: u64,
}

impl StalenessConfig {
    /// The defaults above for `namespace`.
    pub fn new(namespace: impl Into<String>) -> StalenessConfig {
        StalenessConfig {
            namespace: namespace.into(),
            max_staleness_ms: 5_000,
            refresh_ms: 250,
            max_bypass_loads: 32,
            on_bypass_full: BypassFullPolicy::Wait,
            read_your_writes_wait_ms: 1_000,
        }
    }

    /// Sets [`StalenessConfig::max_staleness_ms`].
    #[must_use]
    pub fn with_max_staleness_ms(mut self, ms: u64) -> Self {
        self.max_staleness_ms = ms;
        self
    }

    /// Sets [`StalenessConfig::refresh_ms`].
    #[must_use]
    pub fn with_refresh_ms(mut self, ms: u64) -> Self {
        self.refresh_ms = ms;
        self
    }

    /// Sets [`StalenessConfig::max_bypass_loads`].
    #[must_use]
    pub fn with_max_bypass_loads(mut self, n: usize) -> Self {
        self.max_bypass_loads = n;
        self
    }

    /// Sets [`StalenessConfig::on_bypass_full`].
    #[must_use]
    pub fn with_on_bypass_full(mut self, policy: BypassFullPolicy) -> Self {
        self.on_bypass_full = policy;
        self
    }

    /// Sets [`StalenessConfig::read_your_writes_wait_ms`].
    #[must_use]
    pub fn with_read_your_writes_wait_ms(mut self, ms: u64) -> Self {
        self.read_your_writes_wait_ms = ms;
        self
    }
}

/// The optional in-process tier in front of Redis (a [moka](https://docs.rs/moka) future cache).
///
/// **Extra staleness.** The invalidation pipeline evicts Redis, not the memory of application
/// processes: a value held here can be served for up to [`LocalTierConfig::ttl_ms`] after its
/// invalidation was applied. Enable it only for keys that tolerate that, and keep the TTL short.
/// [`crate::Client::invalidate_local`] evicts one key from this process. Strict reads never use it,
/// and values whose fill was refused (the read raced an invalidation) are never put in it.
///
/// Build it with [`LocalTierConfig::new`] or [`LocalTierConfig::default`] and the `with_*`
/// methods (fields may be added in minor releases):
///
/// ```
/// use cacheclear_client::{Config, LocalTierConfig};
/// let config = Config::default().with_local_tier(LocalTierConfig::default().with_ttl_ms(250));
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalTierConfig {
    /// Time to live of a local entry, ms. Bounds the tier's extra staleness. Must be ≥ 1.
    pub ttl_ms: u64,
    /// Maximum number of entries (moka evicts by TinyLFU beyond it). Must be ≥ 1.
    pub max_entries: u64,
}

impl Default for LocalTierConfig {
    /// 1 000 ms, 10 000 entries.
    fn default() -> Self {
        LocalTierConfig {
            ttl_ms: 1_000,
            max_entries: 10_000,
        }
    }
}

impl LocalTierConfig {
    /// A local tier keeping entries for `ttl_ms` milliseconds (see [`LocalTierConfig::ttl_ms`];
    /// default 1 000), at most `max_entries` of them (default 10 000). Both must be ≥ 1.
    pub fn new(ttl_ms: u64, max_entries: u64) -> LocalTierConfig {
        LocalTierConfig {
            ttl_ms,
            max_entries,
        }
    }

    /// Sets [`LocalTierConfig::ttl_ms`]: time to live of a local entry, ms. Default **1 000**.
    /// Must be ≥ 1.
    #[must_use]
    pub fn with_ttl_ms(mut self, ttl_ms: u64) -> Self {
        self.ttl_ms = ttl_ms;
        self
    }

    /// Sets [`LocalTierConfig::max_entries`]: maximum number of entries. Default **10 000**.
    /// Must be ≥ 1.
    #[must_use]
    pub fn with_max_entries(mut self, max_entries: u64) -> Self {
        self.max_entries = max_entries;
        self
    }
}

/// Where a [`Hook`] is called. Test instrumentation, not a stable API (crate feature
/// `test-util`).
#[cfg(feature = "test-util")]
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookPoint {
    /// `GET` missed; the lease has not been tried yet.
    Missed,
    /// The lease was just acquired; the loader has not run yet.
    LeaseAcquired,
    /// The loader returned a value; the fill script has not run yet.
    BeforeFill,
    /// The loader failed; the lease has not been released yet.
    BeforeRelease,
}

/// A pause point for tests: awaited at each [`HookPoint`] with the cache key, so a test can make
/// a race (read old value / invalidate / set old value) happen in a chosen order. Crate feature
/// `test-util` only.
#[cfg(feature = "test-util")]
#[doc(hidden)]
pub type Hook = Arc<dyn Fn(HookPoint, &str) -> BoxFuture<'static, ()> + Send + Sync>;

/// Client options. [`Config::default()`] (or [`Config::new()`]) gives the documented defaults;
/// change them with the chainable `with_*` methods, or by assigning the public fields of a
/// `mut` value. Struct literals are not available outside this crate (`#[non_exhaustive]`:
/// options may be added in minor releases).
///
/// ```
/// use cacheclear_client::{Config, RedisErrorPolicy};
/// let config = Config::default()
///     .with_ttl_base_ms(60_000)
///     .with_on_redis_error(RedisErrorPolicy::Error);
/// assert!(config.validate().is_ok());
///
/// let mut config = Config::default();
/// config.lease_ms = 5_000;
/// assert!(config.validate().is_ok());
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct Config {
    /// Lease duration, ms (`SET {K}:lease <token> NX PX lease_ms`). Default **2 000**.
    ///
    /// Must exceed a slow load: a loader that outlives its lease cannot fill (safe, but its work
    /// is wasted and a second loader starts). It is also how long a crashed or paused holder
    /// blocks others from filling. Two seconds is ~100× a typical keyed PostgreSQL read and short
    /// enough that a lost holder is replaced quickly. Must be ≥ 1.
    pub lease_ms: u64,
    /// How long a miss waits for another process's lease holder before applying
    /// [`Config::on_wait_timeout`], ms. Default **2 500**.
    ///
    /// Longer than `lease_ms` on purpose: waiters retry the lease on every poll, so if the holder
    /// died, one waiter takes over the lease when it expires and the others keep waiting for its
    /// fill, instead of all of them loading at once. Set it below `lease_ms` to bound tail
    /// latency more tightly at the cost of extra loads when a holder is lost.
    pub lease_wait_ms: u64,
    /// First wait between polls while another holder loads, ms. Default **5**. Must be ≥ 1.
    pub backoff_initial_ms: u64,
    /// Longest wait between polls, ms (the wait doubles up to it, with jitter). Default **100**.
    /// Must be ≥ `backoff_initial_ms`.
    pub backoff_max_ms: u64,
    /// Base value TTL, ms. Default **600 000** (10 minutes).
    ///
    /// Not the consistency mechanism (the invalidation pipeline is); it reclaims memory from cold
    /// keys and bounds the damage if invalidations stop arriving. Must be in 1 ..= 10 years.
    pub ttl_base_ms: u64,
    /// Relative TTL spread: each fill's TTL is `ttl_base_ms × (1 ± ttl_jitter)`, uniform, never
    /// below 1 ms ([`crate::jittered_ttl_ms`]). Default **0.05** (±5%). Prevents avalanches of
    /// keys that were filled together. Must be in `[0, 1)`.
    pub ttl_jitter: f64,
    /// XFetch probabilistic early refresh (Vattani et al., VLDB 2015) with this β; `None` (the
    /// default) turns it off. `Some(1.0)` is the paper's recommendation. A hit whose
    /// `now − δ·β·ln(rand) ≥ expiry` tries the lease; if it gets it, it reloads and refills,
    /// otherwise (someone else is refreshing) it returns the cached value. Must be finite and ≥ 0.
    pub xfetch_beta: Option<f64>,
    /// See [`WaitTimeoutPolicy`]. Default [`WaitTimeoutPolicy::LoadWithoutFilling`].
    pub on_wait_timeout: WaitTimeoutPolicy,
    /// See [`RedisErrorPolicy`]. Default [`RedisErrorPolicy::Fallback`].
    pub on_redis_error: RedisErrorPolicy,
    /// The in-process tier; `None` (the default) disables it. See [`LocalTierConfig`] for the
    /// extra staleness it brings.
    pub local_tier: Option<LocalTierConfig>,
    /// Keys starting with any of these prefixes are always read with [`ReadPolicy::Strict`],
    /// whatever the call asks. Default empty. Example: `vec!["balance:".into()]`.
    pub strict_key_prefixes: Vec<String>,
    /// Bound on each Redis command, ms, including waiting for a reconnection. Default **500**.
    /// A hung or unreachable Redis then costs a read at most about this long per command before
    /// [`Config::on_redis_error`] applies, instead of the reconnect backoff's seconds.
    pub redis_timeout_ms: u64,
    /// Redis connection timeout, ms, used by [`crate::Client::connect`]. Default **1 000**.
    pub redis_connect_timeout_ms: u64,
    /// The staleness breaker, epochs and read-your-writes of one namespace; `None` (the default)
    /// turns them off (values are served however long the pipeline has been down). See
    /// [`StalenessConfig`].
    pub staleness: Option<StalenessConfig>,
    /// Test instrumentation: awaited at each [`HookPoint`]. Default `None`. Crate feature
    /// `test-util` only; not a stable API.
    #[cfg(feature = "test-util")]
    #[doc(hidden)]
    pub hook: Option<Hook>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            lease_ms: 2_000,
            lease_wait_ms: 2_500,
            backoff_initial_ms: 5,
            backoff_max_ms: 100,
            ttl_base_ms: 600_000,
            ttl_jitter: 0.05,
            xfetch_beta: None,
            on_wait_timeout: WaitTimeoutPolicy::default(),
            on_redis_error: RedisErrorPolicy::default(),
            local_tier: None,
            strict_key_prefixes: Vec::new(),
            redis_timeout_ms: 500,
            redis_connect_timeout_ms: 1_000,
            staleness: None,
            #[cfg(feature = "test-util")]
            hook: None,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Config");
        d.field("lease_ms", &self.lease_ms)
            .field("lease_wait_ms", &self.lease_wait_ms)
            .field("backoff_initial_ms", &self.backoff_initial_ms)
            .field("backoff_max_ms", &self.backoff_max_ms)
            .field("ttl_base_ms", &self.ttl_base_ms)
            .field("ttl_jitter", &self.ttl_jitter)
            .field("xfetch_beta", &self.xfetch_beta)
            .field("on_wait_timeout", &self.on_wait_timeout)
            .field("on_redis_error", &self.on_redis_error)
            .field("local_tier", &self.local_tier)
            .field("strict_key_prefixes", &self.strict_key_prefixes)
            .field("redis_timeout_ms", &self.redis_timeout_ms)
            .field("redis_connect_timeout_ms", &self.redis_connect_timeout_ms)
            .field("staleness", &self.staleness);
        #[cfg(feature = "test-util")]
        d.field("hook", &self.hook.as_ref().map(|_| "set"));
        d.finish()
    }
}

/// Ten years in ms: the largest accepted TTL (Redis adds `PX` to its clock in ms; absurd values
/// overflow it and are rejected as `invalid expire time`).
const MAX_TTL_MS: u64 = 10 * 365 * 24 * 3_600 * 1_000;

/// A [`Config`] field out of range. The message names the field, the value and the valid range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid cacheclear client config: `{field}` = {value}: {expected}")]
pub struct ConfigError {
    /// The field's name.
    pub field: &'static str,
    /// The rejected value, formatted.
    pub value: String,
    /// The valid range.
    pub expected: &'static str,
}

impl Config {
    /// The documented defaults; the same as [`Config::default()`].
    pub fn new() -> Config {
        Config::default()
    }

    /// Sets [`Config::lease_ms`]: lease duration, ms. Default **2 000**. Must be ≥ 1 and
    /// exceed a slow load.
    #[must_use]
    pub fn with_lease_ms(mut self, lease_ms: u64) -> Self {
        self.lease_ms = lease_ms;
        self
    }

    /// Sets [`Config::lease_wait_ms`]: how long a miss waits for another process's lease
    /// holder before applying [`Config::on_wait_timeout`], ms. Default **2 500**. At most 10
    /// years.
    #[must_use]
    pub fn with_lease_wait_ms(mut self, lease_wait_ms: u64) -> Self {
        self.lease_wait_ms = lease_wait_ms;
        self
    }

    /// Sets [`Config::backoff_initial_ms`]: first wait between polls, ms. Default **5**. Must be
    /// ≥ 1 and ≤ [`Config::backoff_max_ms`].
    #[must_use]
    pub fn with_backoff_initial_ms(mut self, backoff_initial_ms: u64) -> Self {
        self.backoff_initial_ms = backoff_initial_ms;
        self
    }

    /// Sets [`Config::backoff_max_ms`]: longest wait between polls, ms. Default **100**. Must be
    /// ≥ [`Config::backoff_initial_ms`].
    #[must_use]
    pub fn with_backoff_max_ms(mut self, backoff_max_ms: u64) -> Self {
        self.backoff_max_ms = backoff_max_ms;
        self
    }

    /// Sets [`Config::ttl_base_ms`]: base value TTL, ms. Default **600 000** (10 minutes).
    /// Must be in 1 ..= 10 years.
    #[must_use]
    pub fn with_ttl_base_ms(mut self, ttl_base_ms: u64) -> Self {
        self.ttl_base_ms = ttl_base_ms;
        self
    }

    /// Sets [`Config::ttl_jitter`]: relative TTL spread, a fraction (0.05 = ±5%). Default
    /// **0.05**. Must be in `[0, 1)`.
    #[must_use]
    pub fn with_ttl_jitter(mut self, ttl_jitter: f64) -> Self {
        self.ttl_jitter = ttl_jitter;
        self
    }

    /// Sets [`Config::xfetch_beta`]: the XFetch β (dimensionless), or `None` to turn early
    /// refresh off. Default **`None`** (off); `1.0` is the usual choice. Accepts `f64` or
    /// `Option<f64>`. Must be finite and ≥ 0.
    #[must_use]
    pub fn with_xfetch_beta(mut self, xfetch_beta: impl Into<Option<f64>>) -> Self {
        self.xfetch_beta = xfetch_beta.into();
        self
    }

    /// Sets [`Config::on_wait_timeout`]. Default [`WaitTimeoutPolicy::LoadWithoutFilling`].
    #[must_use]
    pub fn with_on_wait_timeout(mut self, on_wait_timeout: WaitTimeoutPolicy) -> Self {
        self.on_wait_timeout = on_wait_timeout;
        self
    }

    /// Sets [`Config::on_redis_error`]. Default [`RedisErrorPolicy::Fallback`].
    #[must_use]
    pub fn with_on_redis_error(mut self, on_redis_error: RedisErrorPolicy) -> Self {
        self.on_redis_error = on_redis_error;
        self
    }

    /// Sets [`Config::local_tier`]: a [`LocalTierConfig`] enables the in-process tier, `None`
    /// disables it. Default **`None`** (disabled). Accepts `LocalTierConfig` or
    /// `Option<LocalTierConfig>`. See [`LocalTierConfig`] for the extra staleness it brings.
    #[must_use]
    pub fn with_local_tier(mut self, local_tier: impl Into<Option<LocalTierConfig>>) -> Self {
        self.local_tier = local_tier.into();
        self
    }

    /// Sets [`Config::strict_key_prefixes`] (replacing the previous list): keys starting with
    /// any of them are always read strictly. Default empty. Example: `["balance:"]`.
    #[must_use]
    pub fn with_strict_key_prefixes<I, S>(mut self, prefixes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.strict_key_prefixes = prefixes.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`Config::redis_timeout_ms`]: bound on each Redis command, ms. Default **500**.
    /// Must be ≥ 1.
    #[must_use]
    pub fn with_redis_timeout_ms(mut self, redis_timeout_ms: u64) -> Self {
        self.redis_timeout_ms = redis_timeout_ms;
        self
    }

    /// Sets [`Config::redis_connect_timeout_ms`]: Redis connection timeout of
    /// [`crate::Client::connect`], ms. Default **1 000**. Must be ≥ 1.
    #[must_use]
    pub fn with_redis_connect_timeout_ms(mut self, redis_connect_timeout_ms: u64) -> Self {
        self.redis_connect_timeout_ms = redis_connect_timeout_ms;
        self
    }

    /// Sets the test hook (awaited at each [`HookPoint`]). Default none. Crate feature
    /// `test-util` only; not a stable API.
    #[cfg(feature = "test-util")]
    #[doc(hidden)]
    #[must_use]
    pub fn with_hook(mut self, hook: Hook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Sets [`Config::staleness`]: the staleness breaker of one namespace (`None`: off).
    #[must_use]
    pub fn with_staleness(mut self, staleness: impl Into<Option<StalenessConfig>>) -> Self {
        self.staleness = staleness.into();
        self
    }

    /// Checks every field's range.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn check(
            ok: bool,
            field: &'static str,
            value: impl fmt::Display,
            expected: &'static str,
        ) -> Result<(), ConfigError> {
            if ok {
                Ok(())
            } else {
                Err(ConfigError {
                    field,
                    value: value.to_string(),
                    expected,
                })
            }
        }
        check(
            (1..=MAX_TTL_MS).contains(&self.lease_ms),
            "lease_ms",
            self.lease_ms,
            "between 1 ms and 10 years",
        )?;
        check(
            self.lease_wait_ms <= MAX_TTL_MS,
            "lease_wait_ms",
            self.lease_wait_ms,
            "at most 10 years",
        )?;
        check(
            self.backoff_initial_ms >= 1,
            "backoff_initial_ms",
            self.backoff_initial_ms,
            "at least 1 ms",
        )?;
        check(
            self.backoff_max_ms >= self.backoff_initial_ms,
            "backoff_max_ms",
            self.backoff_max_ms,
            "at least backoff_initial_ms",
        )?;
        check(
            (1..=MAX_TTL_MS).contains(&self.ttl_base_ms),
            "ttl_base_ms",
            self.ttl_base_ms,
            "between 1 ms and 10 years",
        )?;
        check(
            (0.0..1.0).contains(&self.ttl_jitter),
            "ttl_jitter",
            self.ttl_jitter,
            "in [0, 1)",
        )?;
        if let Some(beta) = self.xfetch_beta {
            check(
                beta.is_finite() && beta >= 0.0,
                "xfetch_beta",
                beta,
                "finite and ≥ 0 (1.0 is the usual choice)",
            )?;
        }
        if let Some(local) = &self.local_tier {
            check(
                local.ttl_ms >= 1,
                "local_tier.ttl_ms",
                local.ttl_ms,
                "at least 1 ms",
            )?;
            check(
                local.max_entries >= 1,
                "local_tier.max_entries",
                local.max_entries,
                "at least 1",
            )?;
        }
        check(
            self.redis_timeout_ms >= 1,
            "redis_timeout_ms",
            self.redis_timeout_ms,
            "at least 1 ms",
        )?;
        check(
            self.redis_connect_timeout_ms >= 1,
            "redis_connect_timeout_ms",
            self.redis_connect_timeout_ms,
            "at least 1 ms",
        )?;
        if let Some(s) = &self.staleness {
            check(
                !s.namespace.is_empty() && !s.namespace.contains(['{', '}']),
                "staleness.namespace",
                &s.namespace,
                "non-empty, without `{` or `}` (the pipeline's postgres.namespace, default its slot name)",
            )?;
            check(
                (1..=MAX_TTL_MS).contains(&s.max_staleness_ms),
                "staleness.max_staleness_ms",
                s.max_staleness_ms,
                "between 1 ms and 10 years",
            )?;
            check(
                s.refresh_ms >= 1 && s.refresh_ms <= s.max_staleness_ms,
                "staleness.refresh_ms",
                s.refresh_ms,
                "between 1 ms and max_staleness_ms",
            )?;
            check(
                s.max_bypass_loads >= 1,
                "staleness.max_bypass_loads",
                s.max_bypass_loads,
                "at least 1",
            )?;
            check(
                s.read_your_writes_wait_ms <= MAX_TTL_MS,
                "staleness.read_your_writes_wait_ms",
                s.read_your_writes_wait_ms,
                "at most 10 years",
            )?;
        }
        Ok(())
    }

    /// Whether `key` falls under [`Config::strict_key_prefixes`].
    pub fn is_strict_key(&self, key: &str) -> bool {
        self.strict_key_prefixes
            .iter()
            .any(|p| key.starts_with(p.as_str()))
    }

    pub(crate) fn lease_wait(&self) -> Duration {
        Duration::from_millis(self.lease_wait_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
        assert_eq!(Config::default().lease_ms, 2_000);
        assert!(Config::default().lease_wait_ms > Config::default().lease_ms);
    }

    #[test]
    fn rejects_out_of_range() {
        let err = Config {
            ttl_jitter: 1.0,
            ..Config::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.field, "ttl_jitter");
        assert!(err.to_string().contains("in [0, 1)"), "{err}");
        assert_eq!(
            Config {
                lease_ms: 0,
                ..Config::default()
            }
            .validate()
            .unwrap_err()
            .field,
            "lease_ms"
        );
        assert_eq!(
            Config {
                ttl_base_ms: 0,
                ..Config::default()
            }
            .validate()
            .unwrap_err()
            .field,
            "ttl_base_ms"
        );
        assert_eq!(
            Config {
                xfetch_beta: Some(f64::NAN),
                ..Config::default()
            }
            .validate()
            .unwrap_err()
            .field,
            "xfetch_beta"
        );
        assert_eq!(
            Config {
                backoff_initial_ms: 10,
                backoff_max_ms: 5,
                ..Config::default()
            }
            .validate()
            .unwrap_err()
            .field,
            "backoff_max_ms"
        );
        assert_eq!(
            Config {
                local_tier: Some(LocalTierConfig {
                    ttl_ms: 0,
                    max_entries: 1
                }),
                ..Config::default()
            }
            .validate()
            .unwrap_err()
            .field,
            "local_tier.ttl_ms"
        );
    }

    #[test]
    fn builders_set_their_field() {
        let c = Config::new()
            .with_lease_ms(1)
            .with_lease_wait_ms(2)
            .with_backoff_initial_ms(3)
            .with_backoff_max_ms(4)
            .with_ttl_base_ms(5)
            .with_ttl_jitter(0.5)
            .with_xfetch_beta(1.0)
            .with_on_wait_timeout(WaitTimeoutPolicy::Error)
            .with_on_redis_error(RedisErrorPolicy::Error)
            .with_local_tier(LocalTierConfig::new(6, 7))
            .with_strict_key_prefixes(["a:", "b:"])
            .with_redis_timeout_ms(8)
            .with_redis_connect_timeout_ms(9);
        assert_eq!(
            (
                c.lease_ms,
                c.lease_wait_ms,
                c.backoff_initial_ms,
                c.backoff_max_ms
            ),
            (1, 2, 3, 4)
        );
        assert_eq!(
            (c.ttl_base_ms, c.ttl_jitter, c.xfetch_beta),
            (5, 0.5, Some(1.0))
        );
        assert_eq!(c.on_wait_timeout, WaitTimeoutPolicy::Error);
        assert_eq!(c.on_redis_error, RedisErrorPolicy::Error);
        assert_eq!(c.local_tier, Some(LocalTierConfig::new(6, 7)));
        assert_eq!(c.strict_key_prefixes, ["a:", "b:"]);
        assert_eq!((c.redis_timeout_ms, c.redis_connect_timeout_ms), (8, 9));
        c.validate().unwrap();
        let c = c.with_xfetch_beta(None).with_local_tier(None);
        assert_eq!((c.xfetch_beta, c.local_tier), (None, None));
        assert_eq!(
            LocalTierConfig::default()
                .with_ttl_ms(1)
                .with_max_entries(2),
            LocalTierConfig::new(1, 2)
        );
        assert_eq!(
            format!("{:?}", Config::new()),
            format!("{:?}", Config::default())
        );
    }

    #[test]
    fn strict_prefixes() {
        let c = Config {
            strict_key_prefixes: vec!["balance:".into()],
            ..Config::default()
        };
        assert!(c.is_strict_key("balance:7"));
        assert!(!c.is_strict_key("product:7"));
    }
}
