//! Private, throwaway PostgreSQL and Redis servers for cacheclear's integration tests, benchmarks
//! and the zero-config `cacheclear demo`.
//!
//! Each instance is started from the installed binaries, in its own temporary directory, on a
//! free port on 127.0.0.1 (never the system servers on 5432/6379), and is killed and deleted when
//! dropped. Many instances can run at once, from many threads and many processes: ports that get
//! taken between "found free" and "bound" are retried with a new port.
//!
//! ```no_run
//! use cacheclear_harness::{PgInstance, RedisInstance};
//! # fn main() -> Result<(), cacheclear_harness::HarnessError> {
//! let pg = PgInstance::start()?; // wal_level=logical, trust auth, ~1-2 s
//! assert_eq!(pg.psql("SHOW wal_level")?, "logical");
//! let redis = RedisInstance::start()?;
//! assert_eq!(redis.cli(&["PING"])?, "PONG");
//! println!("{} {}", pg.conn_string(), redis.url());
//! # Ok(()) }
//! ```
//!
//! A Redis Cluster is several such Redis instances joined together: [`RedisCluster::start`]
//! (`masters`, `replicas_per_master`).
//!
//! Binaries: PostgreSQL from `$CACHECLEAR_PG_BIN`, else `pg_config --bindir`, else the
//! highest `/usr/lib/postgresql/*/bin`, else `PATH`; Redis from `$CACHECLEAR_REDIS_BIN`, else
//! `PATH`. See [`PgBinaries`] and [`RedisBinaries`] to check prerequisites up front.
//!
//! Everything here is synchronous (std::process); async callers use `spawn_blocking` or start
//! instances before the async work.
//!
//! With the feature `fixtures`, the module `fixtures` is the test kit the workspace's
//! integration tests share (product rules, `wait_for`, Redis helpers for values and fences).

#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod bins;
#[cfg(feature = "fixtures")]
mod certs;
mod cluster;
mod error;
#[cfg(feature = "fixtures")]
pub mod fixtures;
mod kafka;
mod pg;
mod process;
mod redis;
mod sentinel;
mod server;
mod tansu_install;

pub use bins::{PG_BIN_ENV, PgBinaries, REDIS_BIN_ENV, RedisBinaries};
#[cfg(feature = "fixtures")]
pub use certs::TestCertificates;
pub use cluster::{CLUSTER_SLOTS, RedisCluster};
pub use error::HarnessError;
pub use kafka::{KafkaBroker, KafkaOptions, TANSU_BIN_ENV, TANSU_INSTALL, find_tansu};
pub use pg::{PgInstance, PgOptions};
pub use process::{free_port, kill_on_parent_exit, spawn_tied_to_process};
pub use redis::{RedisInstance, RedisOptions, RedisServerTls};
pub use sentinel::{RedisSentinelSet, SENTINEL_MASTER};
