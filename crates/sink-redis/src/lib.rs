//! cacheclear's Redis sink ("direct mode"): applies committed evictions to one Redis, or to a
//! Redis Cluster, with the protocol's invalidation script
//! ([`cacheclear_protocol::scripts::INVALIDATE_LUA`]).
//!
//! Keys of many transactions travel in one script call (each key carries its own commit LSN, the
//! fence value), `keys_per_call` keys per call, `calls_per_pipeline` calls per round trip,
//! `pipelines_in_flight` round trips at once on one multiplexed connection. `apply` returns `Ok`
//! only when Redis replied to every call with the number of keys it processed, and the counts add
//! up; anything else is an error and the source retries the whole batch (the script is
//! idempotent).
//!
//! Table-wide evictions (TRUNCATE) SCAN for the table's patterns and invalidate what they find,
//! page by page: keys created after the SCAN began belong to loads that started after the
//! TRUNCATE was visible, so they are current.
//!
//! **Redis Cluster** (`cluster = true`, seed nodes in `urls`, see [`RedisConfig`]): each script
//! call carries the keys of one hash slot only (the three keys of a cache key share its slot,
//! see [`KeyLayout::slot`]), calls are pipelined per master, and keys that were not acknowledged
//! (a failover, a slot migration, a lost connection) are re-sent with a fresh slot map, up to
//! `cluster_retries` times, before `invalidate` fails. Table-wide evictions SCAN every master.
//! The semantics are the same as standalone: `Ok` only when every key was acknowledged.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use cacheclear_sink_redis::{RedisConfig, RedisSink};
//! let sink = RedisSink::connect(RedisConfig::new("redis://127.0.0.1:6379/"))?;
//! let cluster = RedisSink::connect(RedisConfig::cluster([
//!     "redis://127.0.0.1:7000/",
//!     "redis://127.0.0.1:7001/",
//! ]))?;
//! # Ok(()) }
//! ```

#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod cluster;
mod config;
pub mod doctor;
mod telemetry;

use std::sync::Arc;
use std::time::Duration;

use cacheclear_protocol::connect::{ConnectTimeouts, RedisConnection};
use cacheclear_protocol::namespace::WATERMARK_TTL_MS;
use cacheclear_protocol::scripts::INVALIDATE_LUA;
use cacheclear_protocol::{
    Batch, EpochChanged, EpochOpened, KeyLayout, Lsn, NamespaceLayout, Sink, SinkError, Watermark,
    scripts,
};
use futures::{StreamExt, TryStreamExt};
use redis::aio::ConnectionManagerConfig;

pub use config::RedisConfig;
pub use telemetry::{describe_metrics, register_metrics};

/// Errors of the Redis sink; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisSinkError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] cacheclear_protocol::ConfigError),
    /// Redis replied with an error or the connection failed. Displays the error with its fix
    /// when it is one retrying cannot fix ([`RedisSinkError::is_fatal`]).
    #[error("Redis: {}", cacheclear_protocol::connect::describe(.0))]
    Redis(#[from] redis::RedisError),
    /// Redis acknowledged fewer keys than were sent.
    #[error("Redis acknowledged {acked} of {sent} keys in a pipeline")]
    ShortAck {
        /// Keys sent.
        sent: usize,
        /// Keys the script reported.
        acked: i64,
    },
    /// A key from the pipeline cannot be laid out (contains a brace).
    #[error("{0}")]
    Key(#[from] cacheclear_protocol::KeyError),
    /// A pipeline took longer than `response_timeout_ms`.
    #[error("Redis did not answer within {0} ms")]
    Timeout(u64),
    /// `WAIT`: fewer replicas than `wait_replicas` acknowledged the batch within
    /// `wait_timeout_ms`. The batch is retried; nothing is confirmed meanwhile.
    #[error(
        "only {acked} of the {wanted} replicas required (redis.wait_replicas) acknowledged the evictions within {timeout_ms} ms (WAIT); retrying the batch, nothing confirmed"
    )]
    NotReplicated {
        /// Replicas required.
        wanted: u32,
        /// Replicas that acknowledged (in cluster mode the fewest of any master).
        acked: i64,
        /// `wait_timeout_ms`.
        timeout_ms: u64,
    },
    /// The namespace's epoch changed under the pipeline (see [`EpochChanged`]).
    #[error(transparent)]
    EpochChanged(EpochChanged),
    /// Redis Cluster mode: the cluster's topology does not allow the write (a slot no master
    /// serves, an unexpected `CLUSTER SLOTS` or script reply). Retried like any other error.
    #[error("Redis Cluster: {0}")]
    Cluster(String),
}

impl RedisSinkError {
    /// True for errors retrying cannot fix: an invalid configuration, refused credentials
    /// (`WRONGPASS`, `NOAUTH`), a missing ACL permission (`NOPERM`), a server certificate that
    /// fails verification ([`cacheclear_protocol::connect::is_fatal`]). A refused, reset or
    /// timed-out connection, a failover (`READONLY`, `MOVED`) are not: they are retried.
    pub fn is_fatal(&self) -> bool {
        match self {
            RedisSinkError::Config(_) => true,
            RedisSinkError::Redis(e) => cacheclear_protocol::connect::is_fatal(e),
            _ => false,
        }
    }
}

/// The Redis sink. Cheap to clone (one multiplexed, auto-reconnecting connection; in cluster
/// mode one per node, shared by the clones). With a sentinel, the connection goes to the master
/// the sentinels name, asked again after a connection error or a `READONLY` reply.
#[derive(Clone)]
pub struct RedisSink {
    conn: Backend,
    cfg: RedisConfig,
    sha: String,
}

#[derive(Clone)]
enum Backend {
    /// A standalone Redis, or the master of a Sentinel deployment.
    Standalone(RedisConnection),
    Cluster(Arc<cluster::ClusterBackend>),
}

impl RedisSink {
    /// Validates `cfg` and prepares a lazily connecting, auto-reconnecting connection: Redis may be
    /// down at start; `apply` fails (and is retried) until it is back. In cluster mode
    /// (`cfg.cluster`) the cluster connection is opened on first use, from any reachable seed
    /// node in `cfg.urls`.
    ///
    /// # Errors
    /// [`RedisSinkError::Config`] for an invalid configuration.
    pub fn connect(cfg: RedisConfig) -> Result<RedisSink, RedisSinkError> {
        cfg.validate().map_err(RedisSinkError::Config)?;
        let sha = redis::Script::new(INVALIDATE_LUA).get_hash().to_owned();
        if cfg.cluster {
            let backend = cluster::ClusterBackend::new(&cfg)?;
            return Ok(RedisSink {
                conn: Backend::Cluster(Arc::new(backend)),
                cfg,
                sha,
            });
        }
        let timeout = Duration::from_millis(cfg.response_timeout_ms);
        let manager_cfg = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = cfg.target().connect_lazy(
            ConnectTimeouts {
                connect: timeout,
                response: timeout,
            },
            manager_cfg,
        )?;
        Ok(RedisSink {
            conn: Backend::Standalone(conn),
            cfg,
            sha,
        })
    }

    /// Connects now and asks for `PING` (standalone, the Sentinel master) or the slot map
    /// (cluster), so refused credentials or a refused certificate are reported at start rather
    /// than at the first eviction. Callers stop on an error that
    /// [`RedisSinkError::is_fatal`] and carry on after any other (Redis may come up later).
    ///
    /// # Errors
    /// The Redis error, or [`RedisSinkError::Timeout`] after `response_timeout_ms`.
    pub async fn check(&self) -> Result<(), RedisSinkError> {
        let timeout = Duration::from_millis(self.cfg.response_timeout_ms);
        match &self.conn {
            Backend::Standalone(conn) => {
                let mut conn = conn.clone();
                let _: String =
                    tokio::time::timeout(timeout, redis::cmd("PING").query_async(&mut conn))
                        .await
                        .map_err(|_| RedisSinkError::Timeout(self.cfg.response_timeout_ms))??;
                Ok(())
            }
            Backend::Cluster(cluster) => cluster.slot_table(true, timeout).await.map(|_| ()),
        }
    }

    /// Runs `invocation` (a namespace script: all its keys share one hash tag) on the node that
    /// holds its keys, bounded by `response_timeout_ms`.
    async fn run_ns_script<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, RedisSinkError> {
        let timeout = Duration::from_millis(self.cfg.response_timeout_ms);
        let fut = async {
            match &self.conn {
                Backend::Standalone(conn) => invocation.invoke_async(&mut conn.clone()).await,
                Backend::Cluster(cluster) => {
                    invocation
                        .invoke_async(&mut cluster.connection().await?)
                        .await
                }
            }
            .map_err(RedisSinkError::from)
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| RedisSinkError::Timeout(self.cfg.response_timeout_ms))?
    }

    /// Opens the epoch of `namespace` ([`scripts::OPEN_EPOCH_LUA`]): see [`Sink::open_epoch`].
    ///
    /// # Errors
    /// A Redis error or timeout; [`RedisSinkError::Key`] for a namespace containing a brace;
    /// [`RedisSinkError::Cluster`] for a reply that is not `{epoch, reason}`.
    pub async fn open_namespace_epoch(
        &self,
        namespace: &str,
        origin: &str,
        gap: Option<&str>,
        continuity: bool,
    ) -> Result<EpochOpened, RedisSinkError> {
        self.open_epoch_script(namespace, origin, gap, continuity, None)
            .await
    }

    /// Applies a bus [`cacheclear_protocol::BusControl::Epoch`] record (the invalidator): as
    /// [`RedisSink::open_namespace_epoch`], once per `open` id — the record's copies on the
    /// other partitions find the open applied and change nothing (`bumped: None`).
    ///
    /// # Errors
    /// As [`RedisSink::open_namespace_epoch`].
    pub async fn apply_bus_epoch(
        &self,
        namespace: &str,
        origin: &str,
        gap: Option<&str>,
        continuity: bool,
        open: u64,
    ) -> Result<EpochOpened, RedisSinkError> {
        self.open_epoch_script(namespace, origin, gap, continuity, Some(open))
            .await
    }

    async fn open_epoch_script(
        &self,
        namespace: &str,
        origin: &str,
        gap: Option<&str>,
        continuity: bool,
        open: Option<u64>,
    ) -> Result<EpochOpened, RedisSinkError> {
        let ns = NamespaceLayout::new(namespace)?;
        let script = scripts::open_epoch();
        let mut invocation = script.prepare_invoke();
        invocation
            .key(ns.epoch())
            .key(ns.origin())
            .key(ns.watermark())
            .arg(origin)
            .arg(gap.unwrap_or(""))
            .arg(if continuity { "1" } else { "" });
        if let Some(open) = open {
            invocation
                .key(ns.opened())
                .key(ns.partitions())
                .key(ns.bumped_open())
                .arg(open);
        }
        let (epoch, reason): (String, String) = self.run_ns_script(&invocation).await?;
        let epoch = epoch.parse::<u64>().map_err(|e| {
            RedisSinkError::Cluster(format!(
                "the epoch script for namespace `{namespace}` returned epoch `{epoch}`: {e}"
            ))
        })?;
        Ok(EpochOpened {
            epoch,
            bumped: (!reason.is_empty()).then_some(reason),
            deferred: false,
        })
    }

    /// Writes `watermark` for `namespace` ([`scripts::WATERMARK_LUA`]).
    ///
    /// # Errors
    /// [`RedisSinkError::EpochChanged`] when the namespace's epoch is absent or not
    /// `watermark.epoch`; a Redis error or timeout otherwise.
    pub async fn write_watermark(
        &self,
        namespace: &str,
        watermark: &Watermark,
    ) -> Result<(), RedisSinkError> {
        let ns = NamespaceLayout::new(namespace)?;
        let script = scripts::watermark();
        let mut invocation = script.prepare_invoke();
        invocation
            .key(ns.watermark())
            .key(ns.epoch())
            .arg(watermark.lsn.to_fixed_hex())
            .arg(watermark.commit_time_us)
            .arg(watermark.lag_ms)
            .arg(watermark.epoch)
            .arg(WATERMARK_TTL_MS);
        let written: i64 = self.run_ns_script(&invocation).await?;
        match written {
            scripts::WATERMARK_WRITTEN => Ok(()),
            scripts::WATERMARK_EPOCH_MISSING | scripts::WATERMARK_EPOCH_CHANGED => {
                Err(RedisSinkError::EpochChanged(EpochChanged {
                    namespace: namespace.to_owned(),
                    epoch: watermark.epoch,
                    missing: written == scripts::WATERMARK_EPOCH_MISSING,
                }))
            }
            other => Err(RedisSinkError::Cluster(format!(
                "the watermark script of namespace `{namespace}` returned {other}"
            ))),
        }
    }

    /// Applies a bus [`cacheclear_protocol::BusControl::Watermark`] record of `partition`
    /// ([`scripts::BUS_WATERMARK_LUA`]).
    ///
    /// # Errors
    /// A Redis error or timeout; [`RedisSinkError::Key`] for a namespace containing a brace;
    /// [`RedisSinkError::Cluster`] for a reply of another shape.
    pub async fn apply_bus_watermark(
        &self,
        namespace: &str,
        record: &BusWatermark<'_>,
        partition: i32,
    ) -> Result<BusWatermarkApplied, RedisSinkError> {
        let ns = NamespaceLayout::new(namespace)?;
        let script = scripts::bus_watermark();
        let mut invocation = script.prepare_invoke();
        invocation
            .key(ns.watermark())
            .key(ns.epoch())
            .key(ns.origin())
            .key(ns.opened())
            .key(ns.partitions())
            .key(ns.bumped_open())
            .arg(record.open)
            .arg(record.origin)
            .arg(partition)
            .arg(record.partitions)
            .arg(record.lsn.to_fixed_hex())
            .arg(record.commit_time_us)
            .arg(record.lag_ms)
            .arg(WATERMARK_TTL_MS);
        let (outcome, reason, lag_ms): (i64, String, u64) = self.run_ns_script(&invocation).await?;
        let outcome = match outcome {
            1 => BusWatermarkOutcome::Written { lag_ms },
            0 => BusWatermarkOutcome::Pending,
            -1 => BusWatermarkOutcome::EarlierOpen,
            other => {
                return Err(RedisSinkError::Cluster(format!(
                    "the bus watermark script of namespace `{namespace}` returned {other}"
                )));
            }
        };
        Ok(BusWatermarkApplied {
            outcome,
            bumped: (!reason.is_empty()).then_some(reason),
        })
    }

    /// `WAIT wait_replicas wait_timeout_ms` (no-op when `wait_replicas` is 0): on the one
    /// connection in standalone mode — it covers every write sent on it before, i.e. the
    /// batch's scripts — and on every master in cluster mode (the fewest replicas count).
    ///
    /// # Errors
    /// [`RedisSinkError::NotReplicated`] when too few replicas acknowledged in time; a Redis
    /// error or timeout.
    pub async fn wait_for_replicas(&self) -> Result<(), RedisSinkError> {
        let wanted = self.cfg.wait_replicas;
        if wanted == 0 {
            return Ok(());
        }
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(wanted).arg(self.cfg.wait_timeout_ms);
        let timeout =
            Duration::from_millis(self.cfg.wait_timeout_ms + self.cfg.response_timeout_ms);
        let fut = async {
            match &self.conn {
                Backend::Standalone(conn) => cmd.query_async::<i64>(&mut conn.clone()).await,
                Backend::Cluster(cluster) => {
                    use redis::cluster_routing::{
                        AggregateOp, MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo,
                    };
                    let mut conn = cluster.connection().await?;
                    let reply = conn
                        .route_command(
                            cmd,
                            RoutingInfo::MultiNode((
                                MultipleNodeRoutingInfo::AllMasters,
                                Some(ResponsePolicy::Aggregate(AggregateOp::Min)),
                            )),
                        )
                        .await?;
                    redis::from_redis_value::<i64>(reply).map_err(redis::RedisError::from)
                }
            }
            .map_err(RedisSinkError::from)
        };
        let acked = tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| RedisSinkError::Timeout(timeout.as_millis() as u64))??;
        if acked < i64::from(wanted) {
            return Err(RedisSinkError::NotReplicated {
                wanted,
                acked,
                timeout_ms: self.cfg.wait_timeout_ms,
            });
        }
        Ok(())
    }

    /// True in Redis Cluster mode.
    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Backend::Cluster(_))
    }

    /// Invalidates `keys`, each with its commit LSN. Returns the number Redis acknowledged, which
    /// on `Ok` is always the number of keys given (duplicates included).
    ///
    /// # Errors
    /// A Redis error, a timeout, a short acknowledgement, or a key containing a brace. In cluster
    /// mode after `cluster_retries` rounds of re-sending what was not acknowledged; part of the
    /// keys may have been applied then (the script is idempotent: retry them all).
    pub async fn invalidate<'a>(
        &self,
        keys: impl IntoIterator<Item = (&'a str, Lsn)>,
    ) -> Result<u64, RedisSinkError> {
        let conn = match &self.conn {
            Backend::Standalone(conn) => conn,
            Backend::Cluster(cluster) => {
                return cluster.invalidate(&self.cfg, &self.sha, keys).await;
            }
        };
        let per_pipeline = self.cfg.keys_per_call * self.cfg.calls_per_pipeline;
        let mut keys = keys.into_iter();
        let mut chunk: Vec<(&str, Lsn)> = Vec::with_capacity(per_pipeline);
        // Each pipeline is built when a slot among the `pipelines_in_flight` frees up, so the
        // next one is built while the others are in Redis (building and Redis's work overlap),
        // and memory stays bounded by the in-flight pipelines however many keys the batch holds.
        let pipelines = std::iter::from_fn(move || {
            chunk.clear();
            chunk.extend(keys.by_ref().take(per_pipeline));
            (!chunk.is_empty()).then(|| self.pipeline(&chunk))
        });
        futures::stream::iter(pipelines)
            .map(|built| async move {
                let (pipe, n) = built?;
                self.send(conn.clone(), pipe, n).await
            })
            .buffer_unordered(self.cfg.pipelines_in_flight)
            .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
            .await
    }

    fn pipeline(&self, keys: &[(&str, Lsn)]) -> Result<(redis::Pipeline, usize), RedisSinkError> {
        let mut pipe = redis::pipe();
        // Loading first makes the EVALSHAs below immune to NOSCRIPT (a restarted Redis, a
        // failover); loading a cached script costs one SHA1.
        pipe.cmd("SCRIPT").arg("LOAD").arg(INVALIDATE_LUA).ignore();
        // `arg` copies its bytes: one buffer serves every lease and fence name.
        let mut name = String::new();
        for call in keys.chunks(self.cfg.keys_per_call) {
            let cmd = pipe.cmd("EVALSHA").arg(&self.sha).arg(call.len() * 3);
            for (key, _) in call {
                let layout = KeyLayout::new(key)?;
                cmd.arg(layout.value());
                layout.lease_into(&mut name);
                cmd.arg(name.as_str());
                layout.fence_into(&mut name);
                cmd.arg(name.as_str());
            }
            cmd.arg(self.cfg.fence_ttl_ms);
            lsn_args(cmd, call.iter().map(|&(_, lsn)| lsn));
        }
        Ok((pipe, keys.len()))
    }

    async fn send(
        &self,
        mut conn: RedisConnection,
        pipe: redis::Pipeline,
        sent: usize,
    ) -> Result<u64, RedisSinkError> {
        let timeout = Duration::from_millis(self.cfg.response_timeout_ms);
        let replies: Vec<i64> = tokio::time::timeout(timeout, pipe.query_async(&mut conn))
            .await
            .map_err(|_| RedisSinkError::Timeout(self.cfg.response_timeout_ms))??;
        let acked: i64 = replies.iter().sum();
        if acked != sent as i64 {
            return Err(RedisSinkError::ShortAck { sent, acked });
        }
        Ok(sent as u64)
    }

    /// Invalidates every key matching one of `patterns` (SCAN MATCH globs over the `{K}` layout),
    /// with fence `lsn`. Returns the number of distinct cache keys found per page, summed. In
    /// cluster mode every master is scanned (SCAN is per node; a master whose scan fails is
    /// scanned again from the start, with a fresh slot map).
    ///
    /// # Errors
    /// A Redis error or timeout (in cluster mode after `cluster_retries` retries).
    pub async fn invalidate_matching(
        &self,
        patterns: &[String],
        lsn: Lsn,
    ) -> Result<u64, RedisSinkError> {
        let conn = match &self.conn {
            Backend::Standalone(conn) => conn,
            Backend::Cluster(cluster) => {
                return cluster
                    .invalidate_matching(&self.cfg, &self.sha, patterns, lsn)
                    .await;
            }
        };
        let mut total = 0u64;
        let timeout = Duration::from_millis(self.cfg.response_timeout_ms);
        for pattern in patterns {
            let mut cursor: u64 = 0;
            loop {
                let mut conn = conn.clone();
                let (next, found): (u64, Vec<String>) = tokio::time::timeout(
                    timeout,
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(self.cfg.scan_count)
                        .query_async(&mut conn),
                )
                .await
                .map_err(|_| RedisSinkError::Timeout(self.cfg.response_timeout_ms))??;
                let mut keys: Vec<(&str, Lsn)> = found
                    .iter()
                    .filter_map(|k| Some((cache_key_of(k)?, lsn)))
                    .collect();
                keys.sort_unstable();
                keys.dedup();
                total += self.invalidate(keys).await?;
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(total)
    }
}

/// Appends, to the pipeline's last command, `invalidate.lua`'s LSN arguments for one call's
/// keys: a single LSN when every key shares it (a transaction's keys do; the script then applies
/// it to every triple), else one per key, each rendered once per run of equal LSNs (keys come in
/// commit order). Fewer arguments are less for Redis to parse, and Redis's CPU bounds a bulk
/// eviction.
pub(crate) fn lsn_args(cmd: &mut redis::Pipeline, lsns: impl Iterator<Item = Lsn> + Clone) {
    let mut rest = lsns.clone();
    let Some(first) = rest.next() else { return };
    if rest.all(|l| l == first) {
        cmd.arg(first.to_fixed_hex());
        return;
    }
    let mut hex: Option<(Lsn, String)> = None;
    for lsn in lsns {
        let text = match &hex {
            Some((last, text)) if *last == lsn => text,
            _ => &hex.insert((lsn, lsn.to_fixed_hex())).1,
        };
        cmd.arg(text.as_str());
    }
}

/// The cache key `K` of a Redis key in the protocol layout (`{K}`, `{K}:lease`, `{K}:fence`);
/// `None` for keys of any other shape.
pub fn cache_key_of(redis_key: &str) -> Option<&str> {
    let rest = redis_key.strip_prefix('{')?;
    let end = rest.find('}')?;
    let (key, suffix) = (&rest[..end], &rest[end + 1..]);
    (!key.is_empty() && matches!(suffix, "" | ":lease" | ":fence")).then_some(key)
}

/// The fields of a bus watermark record [`RedisSink::apply_bus_watermark`] needs (see
/// [`cacheclear_protocol::BusControl::Watermark`]).
#[derive(Debug, Clone, Copy)]
pub struct BusWatermark<'a> {
    /// The id of the source start that sent it.
    pub open: u64,
    /// `system_identifier/timeline`.
    pub origin: &'a str,
    /// Commit end LSN.
    pub lsn: Lsn,
    /// Its commit time, µs since the Unix epoch.
    pub commit_time_us: i64,
    /// The source's lag at acknowledgement, ms.
    pub lag_ms: u64,
    /// Partitions of the topic.
    pub partitions: u32,
}

/// What [`RedisSink::apply_bus_watermark`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusWatermarkApplied {
    /// Written, pending or ignored.
    pub outcome: BusWatermarkOutcome,
    /// `Some("epoch_missing")` when Redis had lost the namespace and a new epoch was opened.
    pub bumped: Option<String>,
}

/// The outcome of one bus watermark record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusWatermarkOutcome {
    /// The namespace's watermark was written (every partition has reported), carrying this lag.
    Written {
        /// `max(source lag, Redis TIME − commit time)`, ms.
        lag_ms: u64,
    },
    /// The partition's progress was recorded; another partition has not reported yet.
    Pending,
    /// The record belongs to an earlier start of the source; ignored.
    EarlierOpen,
}

impl Sink for RedisSink {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn is_fatal(&self, error: &SinkError) -> bool {
        error
            .downcast_ref::<RedisSinkError>()
            .is_some_and(RedisSinkError::is_fatal)
    }

    async fn apply(&self, batch: &Batch) -> Result<(), SinkError> {
        self.invalidate(BatchKeys {
            batch,
            txn: 0,
            key: 0,
        })
        .await?;
        for txn in &batch.txns {
            for table in &txn.tables {
                let n = self
                    .invalidate_matching(&table.patterns, txn.commit_lsn)
                    .await?;
                tracing::info!(table = %table.table, op = ?table.op, keys = n, "evicted every cached key of the table");
            }
        }
        self.wait_for_replicas().await?;
        Ok(())
    }

    async fn open_epoch(
        &self,
        namespace: &str,
        origin: &str,
        gap: Option<&str>,
        continuity: bool,
    ) -> Result<Option<EpochOpened>, SinkError> {
        let opened = self
            .open_namespace_epoch(namespace, origin, gap, continuity)
            .await?;
        // A bump lost with its master would let the old epoch's values back.
        self.wait_for_replicas().await?;
        Ok(Some(opened))
    }

    async fn publish_watermark(
        &self,
        namespace: &str,
        watermark: &Watermark,
    ) -> Result<(), SinkError> {
        match self.write_watermark(namespace, watermark).await {
            Err(RedisSinkError::EpochChanged(e)) => Err(Box::new(e)),
            other => Ok(other?),
        }
    }
}

/// Every key of a batch with its transaction's commit LSN. (A named type rather than a
/// `flat_map` closure: the closure's higher-ranked lifetimes make the `apply` future non-`Send`.)
struct BatchKeys<'a> {
    batch: &'a Batch,
    txn: usize,
    key: usize,
}

impl<'a> Iterator for BatchKeys<'a> {
    type Item = (&'a str, Lsn);

    fn next(&mut self) -> Option<(&'a str, Lsn)> {
        loop {
            let txn = self.batch.txns.get(self.txn)?;
            if self.key < txn.keys.len() {
                self.key += 1;
                return Some((txn.keys.get(self.key - 1), txn.commit_lsn));
            }
            self.txn += 1;
            self.key = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_of_parses_the_layout() {
        assert_eq!(cache_key_of("{product:1}"), Some("product:1"));
        assert_eq!(cache_key_of("{product:1}:lease"), Some("product:1"));
        assert_eq!(cache_key_of("{product:1}:fence"), Some("product:1"));
        assert_eq!(cache_key_of("{product:1}:other"), None);
        assert_eq!(cache_key_of("product:1"), None);
        assert_eq!(cache_key_of("{}"), None);
    }
}
