//! PostgreSQL connections configured the way libpq users expect: the `sslmode`, `sslrootcert`,
//! `sslcert` and `sslkey` parameters of a connection string (URL query or key=value form), with
//! rustls. The semantics follow libpq's (PostgreSQL docs, "SSL Support", table "SSL Mode
//! Descriptions"):
//!
//! | `sslmode` | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | no | — |
//! | `prefer` (libpq's default; `allow` is read as `prefer`) | if the server offers TLS | no |
//! | `require` | yes | no (but with `sslrootcert` given, like libpq: as `verify-ca`) |
//! | `verify-ca` | yes | chain to `sslrootcert` (else the Mozilla roots) |
//! | `verify-full` | yes | chain and host name |
//!
//! `sslcert` + `sslkey` (PEM) present a client certificate.
//!
//! One copy serves every PostgreSQL connection cacheclear makes: the source's query pool and
//! replication connection (`cacheclear-source-postgres`), the client library's
//! [`connect`] helper (`cacheclear-client`, feature `postgres`) and the demo and benchmarks
//! (`cacheclear-lab`). It depends on no replication code, so applications linking the client
//! do not pull the replication stack.
//!
//! Every error is a [`cacheclear_protocol::ConfigError`] naming the setting the caller passed as
//! `field` (`postgres.url`, `--postgres-url`), or a [`ConnectError`]; neither ever carries the
//! password of the connection string.

mod connect;
mod params;
mod verify;

pub use connect::{ConnectError, connect, describe, is_verification_failure, parse_url};
pub use params::{PgTls, SslMode, split_url};
pub use verify::{client_config, connector, install_provider};
