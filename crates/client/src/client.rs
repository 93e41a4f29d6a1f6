//! [`Client`]: the cache-aside read path (docs/architecture.md, "The client's read path").

use std::any::Any;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cacheclear_protocol::connect::{ConnectError, ConnectTimeouts, RedisConnection, RedisTarget};
use cacheclear_protocol::{KeyLayout, Lsn, scripts};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, RedisResult, Script};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::breaker::{Breaker, Gate, Reason};
#[cfg(feature = "test-util")]
use crate::config::HookPoint;
use crate::config::{BypassFullPolicy, Config, ReadPolicy, RedisErrorPolicy, WaitTimeoutPolicy};
use crate::envelope::{Envelope, FORMAT};
use crate::error::{BoxError, Error};
use crate::singleflight::{Flights, Observed, Role};
use crate::stats::{Counter, Counters, Stats};
use crate::ttl::{jittered_ttl_ms, xfetch_should_refresh};

/// What a loader returns: the value and the version it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded<T> {
    /// The value read from the database.
    pub value: T,
    /// The LSN the read is at least as new as, for reads on a read replica: the
    /// [`crate::replica_read_version`] taken *before* the read. The fill is refused when the
    /// key's fence (the newest invalidated commit) is newer. `None` for reads on the primary,
    /// where the lease is the guard.
    pub version: Option<Lsn>,
}

impl<T> Loaded<T> {
    /// A value read on the primary (no version needed: the lease guards the fill).
    pub fn new(value: T) -> Loaded<T> {
        Loaded {
            value,
            version: None,
        }
    }

    /// A value read on a replica whose `pg_last_wal_replay_lsn()` was `version` before the read.
    pub fn at(value: T, version: Lsn) -> Loaded<T> {
        Loaded {
            value,
            version: Some(version),
        }
    }
}

/// The cache-aside client. Cheap to clone (an `Arc`); clones share the Redis connection, the
/// counters, the single-flight table and the local tier.
///
/// See the [crate docs](crate) for the protocol and an example.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[cfg(feature = "local-tier")]
type LocalCache = moka::future::Cache<String, Arc<dyn Any + Send + Sync>>;

struct Inner {
    conn: RedisConnection,
    config: Config,
    counters: Counters,
    flights: Flights,
    #[cfg(feature = "local-tier")]
    local: Option<LocalCache>,
    fill: Script,
    release: Script,
    /// The staleness breaker ([`Config::staleness`]).
    breaker: Option<Breaker>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to Redis at `redis_url` (`redis[s]://[user:password@]host:port[/db]`; a
    /// `rediss://` URL verifies the server against the Mozilla roots) with a connection that
    /// reconnects on its own, and builds a client. For a CA file, a client certificate or
    /// Sentinel use [`Client::connect_to`].
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `config` is out of range; [`Error::Connect`] if the URL is
    /// malformed or Redis cannot be reached now (or refuses the credentials / certificate).
    pub async fn connect(redis_url: &str, config: Config) -> Result<Client, Error> {
        Client::connect_to(&RedisTarget::url(redis_url), config).await
    }

    /// Connects to `target` — a URL with its `[redis.tls]` settings, or the master of a Sentinel
    /// deployment (asked for again after a connection error or a `READONLY` reply) — and builds
    /// a client. The same settings as cacheclear's `[redis]` section:
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), cacheclear_client::Error> {
    /// use cacheclear_client::{Client, Config, RedisTarget, RedisTls};
    /// let target = RedisTarget::url("rediss://app:secret@cache.internal:6380/")
    ///     .with_tls(Some(RedisTls::with_ca_file("/etc/ssl/redis-ca.pem")));
    /// let client = Client::connect_to(&target, Config::new()).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Client::connect`]; a bad `[redis.tls]` file or sentinel table is
    /// [`Error::Connect`] naming the field.
    pub async fn connect_to(target: &RedisTarget, config: Config) -> Result<Client, Error> {
        config.validate()?;
        let url = target.display();
        let manager_config = ConnectionManagerConfig::new()
            .set_number_of_retries(2)
            .set_min_delay(ms(50))
            .set_max_delay(ms(1_000));
        let timeouts = ConnectTimeouts {
            connect: ms(config.redis_connect_timeout_ms),
            response: ms(config.redis_timeout_ms),
        };
        let conn = target
            .connect(timeouts, manager_config)
            .await
            .map_err(|e| Error::Connect {
                url: url.clone(),
                source: Arc::new(match e {
                    ConnectError::Redis(e) => e,
                    ConnectError::Config(e) => RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "invalid Redis settings",
                        e.to_string(),
                    )),
                }),
            })?;
        Client::with_connection(conn, config)
    }

    /// Builds a client on an existing connection manager (it is cloned per command).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `config` is out of range, or asks for the local tier while
    /// the crate feature `local-tier` is off.
    pub fn new(conn: ConnectionManager, config: Config) -> Result<Client, Error> {
        Client::with_connection(RedisConnection::from(conn), config)
    }

    /// Builds a client on an existing [`RedisConnection`] (a connection manager, or a Sentinel
    /// master link from [`RedisTarget::connect_lazy`]); it is cloned per command.
    ///
    /// # Errors
    /// As [`Client::new`].
    pub fn with_connection(conn: RedisConnection, config: Config) -> Result<Client, Error> {
        config.validate()?;
        #[cfg(feature = "local-tier")]
        let local = config.local_tier.as_ref().map(|l| {
            moka::future::Cache::builder()
                .max_capacity(l.max_entries)
                .time_to_live(ms(l.ttl_ms))
                .build()
        });
        #[cfg(not(feature = "local-tier"))]
        if config.local_tier.is_some() {
            return Err(crate::config::ConfigError {
                field: "local_tier",
                value: "Some(..)".into(),
                expected: "None: this build lacks the crate feature `local-tier`",
            }
            .into());
        }
        let breaker = match &config.staleness {
            Some(s) => Some(Breaker::new(s.clone())?),
            None => None,
        };
        Ok(Client {
            inner: Arc::new(Inner {
                breaker,
                conn,
                config,
                counters: Counters::default(),
                flights: Flights::default(),
                #[cfg(feature = "local-tier")]
                local,
                fill: scripts::fill(),
                release: scripts::release(),
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// A snapshot of this client's counters (shared by its clones).
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot()
    }

    /// Reads cache key `key` through the cache ([`ReadPolicy::Cached`], unless `key` matches
    /// [`Config::strict_key_prefixes`]).
    ///
    /// 1. Local tier (if configured), then `GET {K}`: a hit returns the payload. With XFetch on,
    ///    a hit near its expiry may refresh it early (see [`Config::xfetch_beta`]).
    /// 2. In-process single-flight of misses: if this process already reads `key` after a miss,
    ///    wait for that read, and take its answer only if it was observed after this call
    ///    joined (the `GET` that found it sent, the loader started, or the accepted fill sent
    ///    after the join): a shared answer is never older than an invalidation applied before
    ///    this call. Otherwise read again (`coalesced_retries`).
    /// 3. Miss: `SET {K}:lease <128-bit random token> NX PX lease_ms`, pipelined with
    ///    `GET {K}:fence` (kept as the envelope's `read_after`). The holder runs `loader`
    ///    and fills with the protocol's FILL script, which writes only if the lease still holds
    ///    our token and the fence is not newer than [`Loaded::version`], and releases the lease
    ///    in the same step. A failed load releases the lease (compare-and-delete) and caches
    ///    nothing. Leases are the memcache paper's (Nishtala et al., "Scaling Memcache at
    ///    Facebook", NSDI'13, §3.2.1): they stop both stale sets and thundering herds.
    /// 4. Lease held elsewhere: poll (`GET`, then retry the lease) with doubling, jittered backoff
    ///    for up to `lease_wait_ms`, then apply [`Config::on_wait_timeout`].
    ///
    /// The value returned by a loader whose fill was refused is still returned to the caller: it
    /// was current when read, it is just not cached.
    ///
    /// `loader` runs at most once per call, and only when this call is the one that must read
    /// the database. Concurrent callers of one key in one process share a single loader run (the
    /// first caller's), so every loader of a key must read the same thing. `T` is stored as JSON
    /// ([`crate::envelope`]); it must deserialize from what it serializes to.
    ///
    /// # Errors
    /// - [`Error::InvalidKey`]: `key` is empty or contains `{` / `}`.
    /// - [`Error::Loader`]: the loader failed (shared with concurrent callers of the same key).
    /// - [`Error::Redis`]: Redis failed and [`Config::on_redis_error`] is `Error`.
    /// - [`Error::LeaseWaitTimeout`]: [`Config::on_wait_timeout`] is `Error` and the wait ran out.
    /// - [`Error::Encode`]: `T`'s `Serialize` failed.
    ///
    /// # Cancel safety
    ///
    /// The future may be dropped at any await point (`tokio::time::timeout`, a `select!` branch
    /// that lost, an aborted task). Nothing resumes: calling again starts the read over and may
    /// run a loader again. What a drop leaves behind depends on where the future was:
    ///
    /// - **Following another call for `key` in this process** (single-flight): nothing. That
    ///   call's read goes on for its own caller and its other followers.
    /// - **Leading this process's read of `key`** (every case below except the local tier
    ///   lookup, the first `GET` and a hit's XFetch refresh, and a strict key's loader, which
    ///   come before single-flight): the flight is
    ///   removed when the future is dropped, which wakes this process's followers; they retry,
    ///   and one of them leads a fresh read with its own loader (they never get the dropped
    ///   read's result).
    /// - **No lease held**: the local tier lookup, `GET`, a poll's backoff sleep or `GET`, or a
    ///   loader run outside the lease protocol (strict key, [`Config::on_redis_error`] fallback,
    ///   [`Config::on_wait_timeout`] load, Redis out of memory). Nothing is left to undo; the
    ///   loader's future is dropped where it stands (its own cancel safety applies).
    /// - **`SET {K}:lease NX PX` in flight**: if Redis had already applied it, that lease has no
    ///   guard yet and is not released: it expires after [`Config::lease_ms`]. Until then the
    ///   other readers of `key` wait as they would for a live holder; at their first poll after
    ///   the expiry one of them takes the lease and loads (those whose [`Config::lease_wait_ms`]
    ///   runs out first apply [`Config::on_wait_timeout`]).
    /// - **Lease held**: the re-read under the lease, the loader, the `FILL` script, a `RELEASE`
    ///   after a hit under the lease or a failed load or fill. The lease's guard is dropped armed, and its `Drop` spawns a task
    ///   on the current Tokio runtime that runs `RELEASE` (compare-and-delete of this call's
    ///   token, so it never deletes a lease another loader took since), bounded by
    ///   [`Config::redis_timeout_ms`]. The other readers of `key` take the lease at their first
    ///   poll after that round trip (polls are at most [`Config::backoff_max_ms`] apart), instead
    ///   of after `lease_ms`. If the future is dropped outside a Tokio runtime, or the `RELEASE`
    ///   fails, the lease expires after `lease_ms` as above. The loader's future is dropped where
    ///   it stands (its own cancel safety applies), and no fill is started after cancellation, so
    ///   a cancelled load caches nothing. One exception: a `FILL` already sent when the future
    ///   is dropped may still be run by Redis. It is checked against the lease and the fence like
    ///   any fill, so what it stores is what a completed call would have stored; it also deletes
    ///   the lease, and the background `RELEASE` (sent after it) then deletes nothing. During an
    ///   XFetch early refresh the cached value stays in Redis and keeps being served.
    /// - **Storing a value in the local tier** (after a hit, or after a fill Redis accepted):
    ///   Redis has the value and no lease of this call remains; only this process's local tier
    ///   misses the value.
    ///
    /// A panicking loader unwinds through the same guards: the lease is released in the
    /// background, and the followers retry.
    pub async fn get_or_load<T, F, Fut, E>(&self, key: &str, loader: F) -> Result<T, Error>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded<T>, E>>,
        E: Into<BoxError>,
    {
        self.get_with(key, ReadPolicy::Cached, loader).await
    }

    /// [`Client::get_or_load`] with an explicit [`ReadPolicy`] for this call.
    /// [`ReadPolicy::Strict`] (or a key matching [`Config::strict_key_prefixes`]) runs the loader
    /// directly, touching neither Redis nor the local tier; the key is still validated.
    ///
    /// # Errors
    /// As [`Client::get_or_load`].
    ///
    /// # Cancel safety
    /// As [`Client::get_or_load`] (a strict read holds no lease: dropping it drops the loader).
    pub async fn get_with<T, F, Fut, E>(
        &self,
        key: &str,
        policy: ReadPolicy,
        loader: F,
    ) -> Result<T, Error>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded<T>, E>>,
        E: Into<BoxError>,
    {
        let layout = KeyLayout::new(key)?;
        if policy == ReadPolicy::Strict || self.inner.config.is_strict_key(key) {
            self.incr(Counter::strict_loads);
            return self.run_loader(key, loader).await;
        }
        let epoch = match self.gate().await {
            None => None,
            Some(Gate::Open { epoch, .. }) => Some(epoch),
            Some(Gate::Bypass(reason)) => return self.bypass(&layout, reason, loader).await,
        };
        if let Some(v) = self.local_get::<T>(key).await {
            self.incr(Counter::local_hits);
            return Ok(v);
        }
        // A hit needs no coordination: every reader sends its own `GET`, as a raw `GET` would.
        let mut conn = self.inner.conn.clone();
        match self.get_value::<T>(&mut conn, &layout, epoch).await {
            Err(e) => return self.redis_failed(key, "GET", e, loader).await,
            Ok(Some(env)) => return self.hit(&layout, env, epoch, loader).await,
            Ok(None) => self.missed(key).await,
        }
        // A miss: concurrent misses of `key` in this process share one read, and a follower
        // takes its answer only if it was observed after the follower joined (module docs of
        // `singleflight`): never a value older than an invalidation applied before this call.
        loop {
            match self.inner.flights.join(key) {
                Role::Leader(leader) => {
                    let result = self.miss(&layout, epoch, loader).await;
                    leader.finish_with(|| {
                        result.clone().map(|(v, obs)| Observed {
                            value: Arc::new(v) as Arc<dyn Any + Send + Sync>,
                            obs,
                        })
                    });
                    return result.map(|(v, _)| v);
                }
                Role::Follower(follower) => {
                    self.incr(Counter::coalesced);
                    let joined = follower.joined;
                    match follower.wait().await {
                        Some(Ok(shared)) if joined < shared.obs => {
                            match shared.value.downcast::<T>() {
                                Ok(v) => return Ok(T::clone(&v)),
                                // The same key read as another type in this process: read on
                                // our own.
                                Err(_) => return self.read_through(&layout, epoch, loader).await,
                            }
                        }
                        // Observed before this call joined: read again.
                        Some(Ok(_)) => self.incr(Counter::coalesced_retries),
                        Some(Err(e)) => return Err(e),
                        // The leader was cancelled or panicked: read again.
                        None => {}
                    }
                    match self.get_value::<T>(&mut conn, &layout, epoch).await {
                        Err(e) => return self.redis_failed(key, "GET", e, loader).await,
                        Ok(Some(env)) => {
                            self.incr(Counter::hits);
                            self.local_put(key, &env.payload).await;
                            return Ok(env.payload);
                        }
                        Ok(None) => {}
                    }
                }
            }
        }
    }

    /// Strict mode: runs `loader` against the database and returns its value, bypassing every
    /// cache tier: balances, stock, checkout totals (docs/architecture.md,
    /// "Data that must never be stale"). Counted in `strict_loads`.
    /// The loader has the same shape as for [`Client::get_or_load`], so one loader serves both;
    /// its version is ignored.
    ///
    /// # Errors
    /// [`Error::Loader`] (with an empty key) if the loader fails.
    pub async fn get_strict<T, F, Fut, E>(&self, loader: F) -> Result<T, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded<T>, E>>,
        E: Into<BoxError>,
    {
        self.incr(Counter::strict_loads);
        self.run_loader("", loader).await
    }

    /// Evicts `key` from this process's local tier (no-op without one). Redis is not touched:
    /// evicting Redis is the invalidation pipeline's job.
    pub async fn invalidate_local(&self, key: &str) {
        #[cfg(feature = "local-tier")]
        if let Some(local) = &self.inner.local {
            local.invalidate(key).await;
        }
        #[cfg(not(feature = "local-tier"))]
        let _ = key;
    }

    /// Read-your-writes: reads `key` through the cache only once the namespace's watermark has
    /// passed `min_lsn` — the `pg_current_wal_lsn()` the application read after its commit, or
    /// a commit LSN it knows — so the eviction of that commit has been applied. Until then it
    /// re-reads the watermark with a backoff from 5 ms doubling to
    /// [`crate::StalenessConfig::refresh_ms`] (the pipeline publishes it as soon as it applied a
    /// commit) for up to
    /// [`crate::StalenessConfig::read_your_writes_wait_ms`], then runs the loader without
    /// filling (`ryw_loads`). Never joins another caller's in-flight read (that read may predate
    /// the write). Without [`Config::staleness`] there is no watermark: the loader runs.
    ///
    /// # Errors
    /// As [`Client::get_or_load`], and [`Error::BypassOverloaded`].
    ///
    /// # Cancel safety
    /// As [`Client::get_or_load`].
    pub async fn get_at_least<T, F, Fut, E>(
        &self,
        key: &str,
        min_lsn: Lsn,
        loader: F,
    ) -> Result<T, Error>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded<T>, E>>,
        E: Into<BoxError>,
    {
        let layout = KeyLayout::new(key)?;
        if self.inner.config.is_strict_key(key) {
            self.incr(Counter::strict_loads);
            return self.run_loader(key, loader).await;
        }
        let Some(breaker) = &self.inner.breaker else {
            self.incr(Counter::ryw_loads);
            return self.run_loader(key, loader).await;
        };
        let deadline = Instant::now() + ms(breaker.cfg.read_your_writes_wait_ms);
        let mut waited = false;
        // While waiting, the namespace is re-read with a backoff from 5 ms doubling to
        // `refresh_ms`: the pipeline publishes the watermark as soon as it applied a commit, so
        // a wait paced by `refresh_ms` alone would cost up to `refresh_ms` after every write.
        let refresh = ms(breaker.cfg.refresh_ms);
        let mut poll: Option<Duration> = None;
        loop {
            let gate = breaker
                .gate_within(
                    &self.inner.conn,
                    &self.inner.config,
                    &self.inner.counters,
                    poll,
                )
                .await;
            match gate {
                Gate::Open { epoch, lsn } if lsn >= min_lsn => {
                    return self.read_through(&layout, Some(epoch), loader).await;
                }
                Gate::Bypass(reason) => return self.bypass(&layout, reason, loader).await,
                Gate::Open { .. } => {}
            }
            let now = Instant::now();
            if now >= deadline {
                self.incr(Counter::ryw_loads);
                return self.run_loader(key, loader).await;
            }
            if !waited {
                waited = true;
                self.incr(Counter::ryw_waits);
            }
            let pause = poll.map_or(ms(RYW_POLL_INITIAL_MS), |p| p * 2).min(refresh);
            poll = Some(pause);
            tokio::time::sleep(pause.min(deadline - now)).await;
        }
    }

    /// The staleness breaker's verdict (`None`: no breaker configured).
    async fn gate(&self) -> Option<Gate> {
        let breaker = self.inner.breaker.as_ref()?;
        Some(
            breaker
                .gate(&self.inner.conn, &self.inner.config, &self.inner.counters)
                .await,
        )
    }

    /// The breaker is open: run the loader without filling, at most `max_bypass_loads` at once
    /// in this process, else [`BypassFullPolicy`].
    async fn bypass<T, F, Fut, E>(
        &self,
        layout: &KeyLayout,
        reason: Reason,
        loader: F,
    ) -> Result<T, Error>
    where
        T: DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded<T>, E>>,
        E: Into<BoxError>,
    {
        let key = layout.key();
        let Some(breaker) = &self.inner.breaker else {
            return self.run_loader(key, loader).await;
        };
        self.incr(reason.counter());
        let overloaded = || Error::BypassOverloaded {
            key: key.to_owned(),
            namespace: breaker.cfg.namespace.clone(),
            reason: reason.label(),
            running: breaker.cfg.max_bypass_loads,
        };
        let permit = match breaker.bypass.try_acquire() {
            Ok(permit) => permit,
            Err(_) => {
                if breaker.cfg.on_bypass_full == BypassFullPolicy::Fail {
                    self.incr(Counter::bypass_overloaded);
                    return Err(overloaded());
                }
                if breaker.cfg.on_bypass_full == BypassFullPolicy::ServeStale {
                    let mut conn = self.inner.conn.clone();
                    if let Ok(Some(env)) = self.get_value::<T>(&mut conn, layout, None).await {
                        self.incr(Counter::stale_served);
                        tracing::debug!(
                            key,
                            reason = reason.label(),
                            "breaker open, bypass cap reached: serving the cached value (stale)"
                        );
                        return Ok(env.payload);
                    }
                }
                self.incr(Counter::bypass_waits);
                match tokio::time::timeout(self.inner.config.lease_wait(), breaker.bypass.acquire())
                    .await
                {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        self.incr(Counter::bypass_overloaded);
                        return Err(overloaded());
                    }
                }
            }
        };
        let result = self.run_loader(key, loader).await;
        drop(permit);
        result
    }

    // ----- the read path -----

    /// One read of `key` without single-flight: `GET`, then the hit or the miss path
    /// (`get_at_least`, which never joins another caller's read, and a follower whose leader
    /// read the key as another type).
    async fn read_through<T, F, Fut, E>(
        &self,
        layout: &KeyLayout,
        epoch: Option<u64>,
        loader: F,
    ) -> Result<T, Error>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded<T>, E>>,
        E: Into<BoxError>,
    {
        let mut conn = self.inner.conn.clone();
        match self.get_value::<T>(&mut conn, layout, epoch).await {
            Err(e) => return self.redis_failed(layout.key(), "GET", e, loader).await,
            Ok(Some(env)) => return self.hit(layout, env, epoch, loader).await,
            Ok(None) => self.missed(layout.key()).await,
        }
        self.miss(layout, epoch, loader).await.map(|(v, _)| v)
    }

    /// Counts a miss (the first `GET` found nothing usable).
    async fn missed(&self, key: &str) {
        self.incr(Counter::misses);
        #[cfg(feature = "test-util")]
        self.hook(HookPoint::Missed, key).await;
        #[cfg(not(feature = "test-util"))]
        let _ = key;
    }

    /// A hit: serves `env`, unless XFetch picks this read to refresh the value early.
    async fn hit<T, F, Fut, E>(
        &self,
        layout: &KeyLayout,
        env: Envelope<T>,
        epoch: Option<u64>,
        loader: F,
    ) -> Result<T, Error>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded<T>, E>>,
        E: Into<BoxError>,
    {
        let key = layout.key();
        // XFetch: near expiry, one reader (the one that wins the draw and the lease) reloads
        // early; the others, and any refresh that fails, serve the cached value.
        if self.xfetch_due(&env)
            && let Ok(Lease::Acquired(held)) =
                self.try_lease(&mut self.inner.conn.clone(), layout).await
        {
            self.incr(Counter::early_refreshes);
            match self.load_and_fill(layout, held, epoch, loader).await {
                Ok((v, _)) => return Ok(v),
                Err(e) => {
                    // The cached value is still valid (not invalidated): serve it.
                    tracing::warn!(key, error = %e, "early refresh failed; serving the cached value");
                }
            }
        }
        self.incr(Counter::hits);
        self.local_put(key, &env.payload).await;
        Ok(env.payload)
    }

    /// After a miss: the lease, the wait for another holder, or a load outside the lease
    /// protocol. Returns the value and the [`Flights::tick`] of the observation it came from
    /// (taken before the `GET` that found it, the loader's start, or the accepted `FILL`), which
    /// decides whether a single-flight follower may take it.
    async fn miss<T, F, Fut, E>(
        &self,
        layout: &KeyLayout,
        epoch: Option<u64>,
        loader: F,
    ) -> Result<(T, u64), Error>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded<T>, E>>,
        E: Into<BoxError>,
    {
        let key = layout.key();
        let config = &self.inner.config;
        let flights = &self.inner.flights;
        let mut conn = self.inner.conn.clone();
        let started = Instant::now();
        let deadline = started + config.lease_wait();
        let mut backoff = ms(config.backoff_initial_ms);
        let mut waiting = false;
        loop {
            match self.try_lease(&mut conn, layout).await {
                Ok(Lease::Acquired(LeaseHeld { token, read_after })) => {
                    // Another holder may have filled and released between our GET and our
                    // lease. Re-read under the lease, so one invalidation costs one load.
                    let guard = LeaseGuard {
                        inner: Some(self.inner.clone()),
                        lease_key: layout.lease(),
                        token,
                    };
                    let obs = flights.tick();
                    match self.get_value::<T>(&mut conn, layout, epoch).await {
                        Ok(Some(env)) => {
                            guard.release().await;
                            self.incr(Counter::hits);
                            self.local_put(key, &env.payload).await;
                            return Ok((env.payload, obs));
                        }
                        Ok(None) => {
                            let token = guard.into_token();
                            let held = LeaseHeld { token, read_after };
                            return self.load_and_fill(layout, held, epoch, loader).await;
                        }
                        Err(e) => {
                            guard.release_in_background();
                            return self
                                .observed(self.redis_failed(key, "GET", e, loader))
                                .await;
                        }
                    }
                }
                Ok(Lease::HeldElsewhere) => {}
                // Redis is full: "don't cache" (not a Redis failure, whatever the policy).
                Ok(Lease::OutOfMemory) => {
                    return self.observed(self.run_loader(key, loader)).await;
                }
                Err(e) => {
                    return self
                        .observed(self.redis_failed(key, "lease", e, loader))
                        .await;
                }
            }
            if !waiting {
                waiting = true;
                self.incr(Counter::lease_waits);
            }
            let now = Instant::now();
            if now >= deadline {
                self.incr(Counter::lease_wait_timeouts);
                let waited_ms = millis(started.elapsed());
                return match config.on_wait_timeout {
                    WaitTimeoutPolicy::LoadWithoutFilling => {
                        tracing::debug!(
                            key,
                            waited_ms,
                            "lease wait timed out; loading without filling"
                        );
                        self.incr(Counter::unfilled_loads);
                        self.observed(self.run_loader(key, loader)).await
                    }
                    WaitTimeoutPolicy::Error => Err(Error::LeaseWaitTimeout {
                        key: key.to_owned(),
                        waited_ms,
                    }),
                };
            }
            // Full jitter in [backoff/2, backoff]: pollers of one key in different processes
            // spread out instead of arriving together.
            let half = backoff / 2;
            let pause = half + half.mul_f64(rand::random::<f64>());
            tokio::time::sleep(pause.min(deadline - now)).await;
            backoff = (backoff * 2).min(ms(config.backoff_max_ms));
            let obs = flights.tick();
            match self.get_value::<T>(&mut conn, layout, epoch).await {
                Ok(Some(env)) => {
                    self.incr(Counter::hits);
                    self.local_put(key, &env.payload).await;
                    return Ok((env.payload, obs));
                }
                Ok(None) => {}
                Err(e) => {
                    return self
                        .observed(self.redis_failed(key, "poll", e, loader))
                        .await;
                }
            }
        }
    }

    /// Whether this hit should try an XFetch early refresh.
    fn xfetch_due<T>(&self, env: &Envelope<T>) -> bool {
        let Some(beta) = self.inner.config.xfetch_beta else {
            return false;
        };
        // `1 − random()` is in (0, 1], as ln() needs.
        let unit = 1.0 - rand::random::<f64>();
        xfetch_should_refresh(now_ms(), env.delta_ms, env.expiry_ms, beta, unit)
    }

    /// The lease holder's part: load, then fill-and-release, or release on failure. Returns the
    /// value and its observation tick (see [`Client::miss`]): the accepted `FILL`'s, else the
    /// loader's start.
    async fn load_and_fill<T, F, Fut, E>(
        &self,
        layout: &KeyLayout,
        held: LeaseHeld,
        epoch: Option<u64>,
        loader: F,
    ) -> Result<(T, u64), Error>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded<T>, E>>,
        E: Into<BoxError>,
    {
        let key = layout.key();
        let config = &self.inner.config;
        // Released on every path, including cancellation and panics (see `LeaseGuard::drop`).
        let LeaseHeld { token, read_after } = held;
        let guard = LeaseGuard {
            inner: Some(self.inner.clone()),
            lease_key: layout.lease(),
            token,
        };
        #[cfg(feature = "test-util")]
        self.hook(HookPoint::LeaseAcquired, key).await;
        self.incr(Counter::loads);
        let load_obs = self.inner.flights.tick();
        let started = Instant::now();
        let loaded = loader().await;
        let delta_ms = millis(started.elapsed());
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                self.incr(Counter::loader_errors);
                let err = Error::loader(key, e);
                tracing::warn!(key, error = %err, "loader failed; releasing the lease, caching nothing");
                #[cfg(feature = "test-util")]
                self.hook(HookPoint::BeforeRelease, key).await;
                guard.release().await;
                return Err(err);
            }
        };
        #[cfg(feature = "test-util")]
        self.hook(HookPoint::BeforeFill, key).await;

        let ttl_ms = jittered_ttl_ms(config.ttl_base_ms, config.ttl_jitter, rand::random::<f64>());
        let env = Envelope {
            format: FORMAT,
            version: loaded.version,
            read_after,
            delta_ms,
            expiry_ms: now_ms().saturating_add(ttl_ms),
            payload: loaded.value,
            epoch,
        };
        let bytes = match env.encode() {
            Ok(bytes) => bytes,
            Err(e) => {
                guard.release().await;
                return Err(Error::Encode {
                    key: key.to_owned(),
                    source: Arc::new(e),
                });
            }
        };
        let version = env.version.map(Lsn::to_fixed_hex).unwrap_or_default();
        let mut conn = self.inner.conn.clone();
        let fill_obs = self.inner.flights.tick();
        let reply: RedisResult<i64> = self
            .bounded(
                self.inner
                    .fill
                    .key(layout.value())
                    .key(layout.lease())
                    .key(layout.fence())
                    .arg(&guard.token)
                    .arg(&version)
                    .arg(bytes)
                    .arg(ttl_ms)
                    .invoke_async(&mut conn),
            )
            .await;
        let mut obs = load_obs;
        match reply {
            Ok(scripts::FILLED) => {
                guard.disarm();
                self.incr(Counter::fills);
                self.local_put(key, &env.payload).await;
                // No invalidation came between the lease and this fill.
                obs = fill_obs;
            }
            Ok(scripts::LEASE_LOST) => {
                guard.disarm();
                self.incr(Counter::fills_refused_lease_lost);
                tracing::debug!(
                    key,
                    "fill refused: lease lost (expired or invalidated); not cached"
                );
            }
            Ok(scripts::FENCED) => {
                guard.disarm();
                self.incr(Counter::fills_refused_fenced);
                tracing::debug!(key, version = ?env.version, "fill refused: fence newer than the version read; not cached");
            }
            Ok(other) => {
                self.incr(Counter::redis_errors);
                tracing::warn!(key, reply = other, "unexpected FILL reply; not cached");
                guard.release().await;
            }
            Err(e) if is_oom(&e) => {
                // maxmemory reached and nothing evictable: "don't cache", not a failure.
                self.incr(Counter::fills_skipped_oom);
                tracing::warn!(key, error = %e, "redis is out of memory (maxmemory); value not cached");
                guard.release().await;
            }
            Err(e) => {
                self.redis_error(key, "FILL", &e);
                guard.release().await;
            }
        }
        Ok((env.payload, obs))
    }

    /// Runs `read` — a path that may run the loader outside the lease protocol (a fallback, a
    /// wait timeout, Redis out of memory) — and pairs its value with a [`Flights::tick`] taken
    /// before it starts (futures do nothing until awaited): its observation, for single-flight
    /// followers ([`Client::miss`]).
    async fn observed<T>(
        &self,
        read: impl Future<Output = Result<T, Error>>,
    ) -> Result<(T, u64), Error> {
        let obs = self.inner.flights.tick();
        read.await.map(|v| (v, obs))
    }

    /// Runs the loader outside the lease protocol (strict reads, fallbacks, wait timeouts).
    async fn run_loader<T, F, Fut, E>(&self, key: &str, loader: F) -> Result<T, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded<T>, E>>,
        E: Into<BoxError>,
    {
        match loader().await {
            Ok(loaded) => Ok(loaded.value),
            Err(e) => {
                self.incr(Counter::loader_errors);
                Err(Error::loader(key, e))
            }
        }
    }

    /// Applies [`Config::on_redis_error`] after a failed Redis step (already counted).
    async fn redis_failed<T, F, Fut, E>(
        &self,
        key: &str,
        op: &'static str,
        e: RedisError,
        loader: F,
    ) -> Result<T, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded<T>, E>>,
        E: Into<BoxError>,
    {
        match self.inner.config.on_redis_error {
            RedisErrorPolicy::Fallback => {
                self.incr(Counter::fallbacks);
                self.run_loader(key, loader).await
            }
            RedisErrorPolicy::Error => Err(Error::Redis {
                key: key.to_owned(),
                op,
                source: Arc::new(e),
            }),
        }
    }

    // ----- Redis steps -----

    /// `GET {K}`, decoded. Undecodable bytes count as a miss.
    /// With `epoch` (the staleness breaker's), a value filled under an older epoch, or without
    /// one, is a miss.
    async fn get_value<T: DeserializeOwned>(
        &self,
        conn: &mut RedisConnection,
        layout: &KeyLayout,
        epoch: Option<u64>,
    ) -> RedisResult<Option<Envelope<T>>> {
        let bytes: Option<Vec<u8>> = match self
            .bounded(redis::cmd("GET").arg(layout.value()).query_async(conn))
            .await
        {
            Ok(b) => b,
            Err(e) => {
                self.redis_error(layout.key(), "GET", &e);
                return Err(e);
            }
        };
        let Some(bytes) = bytes else { return Ok(None) };
        match Envelope::<T>::decode(&bytes) {
            Ok(env) if epoch.is_some_and(|e| env.epoch.unwrap_or(0) < e) => {
                self.incr(Counter::epoch_misses);
                Ok(None)
            }
            Ok(env) => Ok(Some(env)),
            Err(e) => {
                self.incr(Counter::decode_errors);
                tracing::warn!(key = layout.key(), error = %e, "cached value is not a readable envelope; treating it as a miss");
                Ok(None)
            }
        }
    }

    /// `SET {K}:lease <token> NX PX lease_ms`.
    async fn try_lease(
        &self,
        conn: &mut RedisConnection,
        layout: &KeyLayout,
    ) -> RedisResult<Lease> {
        let token = format!("{:032x}", rand::random::<u128>());
        // The fence, read in the same round trip (same hash slot), is where the value loaded
        // under this lease stands: a change invalidated after it would delete the lease and
        // refuse the fill. It becomes the envelope's `read_after` (for `cacheclear audit`).
        let reply: RedisResult<(Option<String>, Option<String>)> = self
            .bounded(
                redis::pipe()
                    .cmd("SET")
                    .arg(layout.lease())
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(self.inner.config.lease_ms)
                    .cmd("GET")
                    .arg(layout.fence())
                    .query_async(conn),
            )
            .await;
        match reply {
            Ok((Some(_), fence)) => {
                let read_after = match fence.as_deref().map(Lsn::from_fixed_hex) {
                    None => Some(Lsn(0)),
                    Some(Ok(lsn)) => Some(lsn),
                    Some(Err(e)) => {
                        tracing::warn!(key = layout.key(), error = %e, "unreadable fence; the value's read position stays unknown");
                        None
                    }
                };
                Ok(Lease::Acquired(LeaseHeld { token, read_after }))
            }
            Ok((None, _)) => Ok(Lease::HeldElsewhere),
            Err(e) if is_oom(&e) => {
                // maxmemory reached and nothing evictable: nothing can be cached now.
                self.incr(Counter::fills_skipped_oom);
                tracing::warn!(key = layout.key(), error = %e, "redis is out of memory (maxmemory); not caching");
                Ok(Lease::OutOfMemory)
            }
            Err(e) => {
                self.redis_error(layout.key(), "lease", &e);
                // The SET may have been applied before the error (a timeout): drop it so no lease
                // of ours lingers (its TTL would end it anyway).
                LeaseGuard {
                    inner: Some(self.inner.clone()),
                    lease_key: layout.lease(),
                    token,
                }
                .release_in_background();
                Err(e)
            }
        }
    }

    /// Bounds a Redis command by `redis_timeout_ms`, including the connection manager's wait
    /// for a reconnection.
    async fn bounded<V>(&self, fut: impl Future<Output = RedisResult<V>>) -> RedisResult<V> {
        bounded_cmd(&self.inner.config, fut).await
    }

    fn redis_error(&self, key: &str, op: &'static str, e: &RedisError) {
        redis_error(&self.inner, key, op, e);
    }

    fn incr(&self, c: Counter) {
        self.inner.counters.incr(c);
    }

    /// Awaits the test hook, if any (crate feature `test-util`).
    #[cfg(feature = "test-util")]
    async fn hook(&self, point: HookPoint, key: &str) {
        if let Some(hook) = &self.inner.config.hook {
            hook(point, key).await;
        }
    }

    // ----- local tier -----

    async fn local_get<T: Clone + Send + Sync + 'static>(&self, key: &str) -> Option<T> {
        #[cfg(feature = "local-tier")]
        if let Some(local) = &self.inner.local {
            return local
                .get(key)
                .await
                .and_then(|any| any.downcast_ref::<T>().cloned());
        }
        let _ = key;
        None
    }

    async fn local_put<T: Clone + Send + Sync + 'static>(&self, key: &str, value: &T) {
        #[cfg(feature = "local-tier")]
        if let Some(local) = &self.inner.local {
            local.insert(key.to_owned(), Arc::new(value.clone())).await;
        }
        let _ = (key, value);
    }
}

pub(crate) async fn bounded_cmd<V>(
    config: &Config,
    fut: impl Future<Output = RedisResult<V>>,
) -> RedisResult<V> {
    match tokio::time::timeout(ms(config.redis_timeout_ms), fut).await {
        Ok(r) => r,
        Err(_) => Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no reply within redis_timeout_ms = {}",
                config.redis_timeout_ms
            ),
        ))),
    }
}

/// What `SET {K}:lease NX` gave us.
enum Lease {
    /// The lease, with our token.
    Acquired(LeaseHeld),
    /// Another loader holds it.
    HeldElsewhere,
    /// Redis replied OOM: maxmemory reached with nothing evictable.
    OutOfMemory,
}

/// A lease this process took.
struct LeaseHeld {
    /// Our random token (the lease key's value).
    token: String,
    /// The key's fence when the lease was taken (`Lsn(0)`: none); `None` if it was unreadable.
    read_after: Option<Lsn>,
}

/// Redis's `-OOM command not allowed when used memory > 'maxmemory'` reply.
fn is_oom(e: &RedisError) -> bool {
    // A pipelined command's refusal (the lease's `SET NX` + `GET fence`) arrives wrapped as a
    // pipeline failure whose text carries the server's `OOM` reply.
    e.code() == Some("OOM") || e.to_string().contains("\"OOM\": command not allowed")
}

fn redis_error(inner: &Inner, key: &str, op: &'static str, e: &RedisError) {
    inner.counters.incr(Counter::redis_errors);
    tracing::warn!(key, op, error = %e, "redis command failed");
}

/// Our lease on one key until it is filled or released. Dropped while armed (the read was
/// cancelled, or the loader panicked), it releases the lease from a background task, so no lease
/// of ours outlives the read longer than one round trip.
struct LeaseGuard {
    /// `None` once disarmed.
    inner: Option<Arc<Inner>>,
    lease_key: String,
    token: String,
}

impl LeaseGuard {
    fn disarm(mut self) {
        self.inner = None;
    }

    /// Disarms the guard and hands its token on (to `load_and_fill`, which guards it again).
    fn into_token(mut self) -> String {
        self.inner = None;
        std::mem::take(&mut self.token)
    }

    /// `RELEASE`: compare-and-delete of our token.
    async fn release(mut self) {
        let Some(inner) = self.inner.clone() else {
            return;
        };
        release(&inner, &self.lease_key, &self.token).await;
        self.inner = None;
    }

    fn release_in_background(mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let lease_key = std::mem::take(&mut self.lease_key);
        let token = std::mem::take(&mut self.token);
        handle.spawn(async move { release(&inner, &lease_key, &token).await });
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if self.inner.is_some() {
            let guard = LeaseGuard {
                inner: self.inner.take(),
                lease_key: std::mem::take(&mut self.lease_key),
                token: std::mem::take(&mut self.token),
            };
            guard.release_in_background();
        }
    }
}

async fn release(inner: &Inner, lease_key: &str, token: &str) {
    let mut conn = inner.conn.clone();
    let reply: RedisResult<i64> = bounded_cmd(
        &inner.config,
        inner
            .release
            .key(lease_key)
            .arg(token)
            .invoke_async(&mut conn),
    )
    .await;
    if let Err(e) = reply {
        // The lease's own TTL (lease_ms) ends it.
        redis_error(inner, lease_key, "RELEASE", &e);
    }
}

/// The first pause of a read-your-writes wait between namespace reads (ms); it doubles up to
/// `refresh_ms` (docs/protocol.md §5).
const RYW_POLL_INITIAL_MS: u64 = 5;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(millis)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_times_out() {
        let config = Config::default().with_redis_timeout_ms(10);
        let r: RedisResult<()> = bounded_cmd(&config, std::future::pending()).await;
        let e = r.unwrap_err();
        assert!(e.is_timeout() || e.is_io_error(), "{e:?}");
    }
}
