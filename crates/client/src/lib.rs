//! The cache-aside client of cacheclear: what applications link to read through Redis while the
//! cacheclear pipeline keeps Redis consistent with PostgreSQL.
//!
//! ```no_run
//! use cacheclear_client::{Client, Config, Loaded};
//!
//! #[derive(Clone, serde::Serialize, serde::Deserialize)]
//! struct Product { id: i64, name: String, price_cents: i64 }
//!
//! # async fn example(db: tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
//! let cache = Client::connect("redis://127.0.0.1:6379", Config::default()).await?;
//! let id = 42_i64;
//! let product: Product = cache
//!     .get_or_load(&format!("product:{id}"), || async {
//!         // Runs only on a miss, in one task across all processes sharing this Redis.
//!         let row = db.query_one("SELECT name, price_cents FROM product WHERE id = $1", &[&id]).await?;
//!         Ok::<_, tokio_postgres::Error>(Loaded::new(Product { id, name: row.get(0), price_cents: row.get(1) }))
//!     })
//!     .await?;
//! println!("{} costs {}", product.name, product.price_cents);
//! # Ok(()) }
//! ```
//!
//! # Connecting: TLS, ACL users, Sentinel
//!
//! [`Client::connect`] takes a URL (`redis[s]://[user:password@]host:port[/db]`; `rediss://`
//! checks the server against the Mozilla roots). [`Client::connect_to`] takes a
//! [`RedisTarget`]: a URL with the `[redis.tls]` settings of
//! cacheclear's configuration (`ca_file`, `crt_file`, `key_file`, `verify_certificate`,
//! `verify_hostname`: [`RedisTls`]), or the master of a Sentinel
//! deployment ([`RedisSentinel`]), asked for again after a
//! connection error or a `READONLY` reply. The rustls crypto provider (`ring`) is installed by
//! the crate itself when none is.
//!
//! # The protocol (docs/architecture.md, "The Lua scripts")
//!
//! Per cache key `K` three Redis keys share one hash tag ([`cacheclear_protocol::KeyLayout`]):
//! `{K}` the value envelope ([`envelope`]), `{K}:lease` the token of the one loader allowed to
//! fill, `{K}:fence` the newest commit LSN invalidated for `K`. The pipeline's invalidation
//! deletes the value and the lease and raises the fence, in one script.
//!
//! [`Client::get_or_load`] reads `{K}`; on a miss it takes the lease with a random token
//! (`SET NX PX`), runs the loader and fills with one script that writes only if the lease still
//! holds its token and the fence is not newer than the version the loader read, releasing the
//! lease in the same step. Other readers wait and re-read. These are the leases of Nishtala et al.,
//! "Scaling Memcache at Facebook" (NSDI'13, §3.2.1): an invalidation deletes the lease, so a
//! loader that read the old row before a commit can never store it after the commit's
//! invalidation (the *stale set*), and one loader per key per invalidation runs (no *thundering
//! herd*). The fence covers loaders on read replicas ([`replica_read_version`]).
//!
//! Also: single-flight inside a process; TTL = base × (1 ± jitter) ([`jittered_ttl_ms`]);
//! optional XFetch early refresh ([`xfetch_should_refresh`], Vattani et al., VLDB 2015); an
//! optional in-process tier ([`LocalTierConfig`], with its extra staleness); strict reads that
//! bypass the cache ([`Client::get_strict`], [`ReadPolicy::Strict`]); Redis failures fall back to
//! the database or fail, per [`RedisErrorPolicy`]; counters ([`Client::stats`], and the
//! [`metrics`] facade, see [`describe_metrics`]).
//!
//! Every key the client writes carries a TTL: values `ttl_base_ms × (1 ± ttl_jitter)`, leases
//! `lease_ms`. Fences are the pipeline's.
//!
//! # Crate features
//! - `postgres` (default): [`connect_postgres`] (libpq's TLS parameters, rustls) and [`replica_read_version`], via `tokio-postgres`.
//! - `local-tier` (default): the in-process tier, via `moka`. Still off unless configured.
//! - `test-util` (off): test instrumentation, not a stable API: pause points (`Hook`,
//!   `HookPoint`, `Config::hook`) that let a test order a race. Only this crate's own tests
//!   enable it.

#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod breaker;
mod client;
mod config;
pub mod envelope;
mod error;
#[cfg(feature = "postgres")]
mod postgres;
mod singleflight;
mod stats;
mod ttl;

pub use client::{Client, Loaded};
pub use config::{
    BypassFullPolicy, Config, ConfigError, LocalTierConfig, ReadPolicy, RedisErrorPolicy,
    StalenessConfig, WaitTimeoutPolicy,
};
#[cfg(feature = "test-util")]
#[doc(hidden)]
pub use config::{Hook, HookPoint};
pub use error::{BoxError, Error};
#[cfg(feature = "postgres")]
pub use postgres::{PgConnectError, ReplicaVersionError, connect_postgres, replica_read_version};
pub use stats::{Stats, describe_metrics};
pub use ttl::{jittered_ttl_ms, xfetch_should_refresh};

pub use cacheclear_protocol::Lsn;
/// Connection settings shared with cacheclear's `[redis]` section (TLS, Sentinel), for
/// [`Client::connect_to`] and [`Client::with_connection`].
pub use cacheclear_protocol::connect::{RedisConnection, RedisSentinel, RedisTarget, RedisTls};
