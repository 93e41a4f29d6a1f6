//! The audit's read-only Redis access: `GET` of values and fences, `SCAN` for value keys.

use std::time::Duration;

use cacheclear_protocol::connect::{ConnectError, ConnectTimeouts, RedisConnection};
use cacheclear_protocol::{KeyLayout, Lsn};
use cacheclear_sink_redis::RedisConfig;
use redis::aio::{ConnectionLike, ConnectionManagerConfig};

use crate::AuditError;

/// A connection to the deployment's Redis (standalone or Cluster, as `[redis]` configures it),
/// used only to read.
#[derive(Clone)]
pub struct Probe {
    conn: Conn,
}

#[derive(Clone)]
enum Conn {
    Single(RedisConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

fn redis_err(what: &'static str) -> impl FnOnce(redis::RedisError) -> AuditError {
    move |source| AuditError::Redis { what, source }
}

/// How long connecting (and each reply) may take.
const TIMEOUT: Duration = Duration::from_secs(10);

impl Probe {
    /// Connects as `[redis]` `cfg` says, the way `run` does (`cacheclear_protocol::connect`):
    /// a URL (`redis://` or `rediss://`), a sentinel table, or `cluster = true` with `urls`,
    /// with `[redis.tls]` and the URLs' ACL user.
    ///
    /// # Errors
    /// An invalid `[redis]` section or unreadable certificate: [`AuditError::Config`] naming
    /// the field; Redis cannot be reached or refuses us: [`AuditError::Redis`] (`connect`).
    pub async fn connect(cfg: &RedisConfig) -> Result<Probe, AuditError> {
        let conn =
            if cfg.cluster {
                let client = cacheclear_protocol::connect::cluster_client_builder(
                    &cfg.urls,
                    cfg.tls.as_ref(),
                    "redis.urls",
                    "redis.tls",
                )
                .map_err(|e| AuditError::Config(e.to_string()))?
                .connection_timeout(TIMEOUT)
                .response_timeout(TIMEOUT)
                .build()
                .map_err(redis_err("connect"))?;
                Conn::Cluster(
                    client
                        .get_async_connection()
                        .await
                        .map_err(redis_err("connect"))?,
                )
            } else {
                let timeouts = ConnectTimeouts {
                    connect: TIMEOUT,
                    response: TIMEOUT,
                };
                let manager = ConnectionManagerConfig::new().set_number_of_retries(1);
                Conn::Single(cfg.target().connect(timeouts, manager).await.map_err(
                    |e| match e {
                        ConnectError::Config(e) => AuditError::Config(e.to_string()),
                        ConnectError::Redis(source) => AuditError::Redis {
                            what: "connect",
                            source,
                        },
                    },
                )?)
            };
        Ok(Probe { conn })
    }

    /// True for a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, AuditError> {
        async fn on<C: ConnectionLike, T: redis::FromRedisValue>(
            mut c: C,
            cmd: &redis::Cmd,
        ) -> redis::RedisResult<T> {
            cmd.query_async(&mut c).await
        }
        match &self.conn {
            Conn::Single(c) => on(c.clone(), cmd).await,
            Conn::Cluster(c) => on(c.clone(), cmd).await,
        }
        .map_err(redis_err(what))
    }

    /// The stored value of cache key `key` (`GET {key}`), if any.
    ///
    /// # Errors
    /// Redis failed: [`AuditError::Redis`] (`GET`).
    pub async fn value(&self, layout: &KeyLayout) -> Result<Option<Vec<u8>>, AuditError> {
        self.query("GET", redis::cmd("GET").arg(layout.value()))
            .await
    }

    /// The value and the fence of `key` in one `MGET` (both keys share the hash slot).
    ///
    /// # Errors
    /// Redis failed: [`AuditError::Redis`] (`MGET`); a fence that is not a fixed-hex LSN:
    /// [`AuditError::Config`] naming the key.
    pub async fn value_and_fence(
        &self,
        layout: &KeyLayout,
    ) -> Result<(Option<Vec<u8>>, Option<Lsn>), AuditError> {
        let (value, fence): (Option<Vec<u8>>, Option<String>) = self
            .query(
                "MGET",
                redis::cmd("MGET").arg(layout.value()).arg(layout.fence()),
            )
            .await?;
        let fence = match fence {
            None => None,
            Some(f) => Some(Lsn::from_fixed_hex(&f).map_err(|e| {
                AuditError::Config(format!(
                    "Redis key `{}` does not hold a fence (fixed-hex LSN): {e}",
                    layout.fence()
                ))
            })?),
        };
        Ok((value, fence))
    }

    /// One `SCAN cursor MATCH {* COUNT count` page on a standalone Redis: (next cursor, keys).
    ///
    /// # Errors
    /// Redis failed: [`AuditError::Redis`] (`SCAN`); on a Cluster: [`AuditError::Config`].
    pub async fn scan_page(
        &self,
        cursor: u64,
        count: u32,
    ) -> Result<(u64, Vec<String>), AuditError> {
        if self.is_cluster() {
            return Err(AuditError::Config(
                "audit --scan reads a standalone Redis; on a Redis Cluster use the follow mode (without --scan)".into(),
            ));
        }
        self.query(
            "SCAN",
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg("{*")
                .arg("COUNT")
                .arg(count),
        )
        .await
    }
}
