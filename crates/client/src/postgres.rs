//! PostgreSQL for loaders (crate feature `postgres`): [`connect_postgres`], a connection with
//! libpq's TLS parameters, and the read version for loaders on read replicas.

use cacheclear_protocol::{Lsn, LsnParseError};

pub use cacheclear_pg_tls::ConnectError as PgConnectError;

/// Connects to PostgreSQL the way `cacheclear run` does, for the application's loaders: `url` is
/// a `postgres://` URL or a libpq key=value string, with libpq's TLS parameters — `sslmode`
/// (`disable`, `prefer` (default), `require`, `verify-ca`, `verify-full`), `sslrootcert`
/// (PEM CA file; the Mozilla roots without it), `sslcert` + `sslkey` (PEM client certificate and
/// key) — handled with rustls (`verify-full` needs a host name the certificate names). The
/// connection is driven on a task of the current tokio runtime until the client is dropped.
///
/// ```no_run
/// # async fn f() -> Result<(), cacheclear_client::PgConnectError> {
/// let db = cacheclear_client::connect_postgres(
///     "postgres://app@db.example.com/shop?sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem",
/// )
/// .await?;
/// # let _ = db; Ok(()) }
/// ```
///
/// # Errors
/// [`PgConnectError::Config`] for an invalid TLS parameter or an unreadable certificate or key
/// file (field `url`), [`PgConnectError::Certificate`] when the server's certificate fails
/// verification (says what to check), [`PgConnectError::Connect`] otherwise. Errors show the URL
/// with its password redacted, never a key file's contents.
pub async fn connect_postgres(url: &str) -> Result<tokio_postgres::Client, PgConnectError> {
    cacheclear_pg_tls::connect(url, "url").await
}

/// Why [`replica_read_version`] has no version.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaVersionError {
    /// The query failed.
    #[error("cannot read pg_last_wal_replay_lsn(): {0}")]
    Query(#[from] tokio_postgres::Error),
    /// `pg_last_wal_replay_lsn()` is NULL: the server is not in recovery (it is a primary).
    /// On the primary no version is needed; return [`crate::Loaded::new`].
    #[error(
        "pg_last_wal_replay_lsn() is NULL: this server is a primary, not a replica; \
         read without a version (Loaded::new), the lease guards primary reads"
    )]
    NotAReplica,
    /// The server returned text that is not an LSN.
    #[error(transparent)]
    Parse(#[from] LsnParseError),
}

/// The version a replica read is at least as new as: `pg_last_wal_replay_lsn()`, the end of the
/// last WAL record the replica has replayed. Call it **before** the read, on a connection to the
/// same replica, and pass it as [`crate::Loaded::at`]. The fill is then refused if the key's fence
/// (the end LSN of the newest invalidated commit) is newer, i.e. if the replica may not have
/// replayed a commit whose invalidation already happened (docs/architecture.md,
/// "Why both a lease and a fence").
///
/// Outside a transaction (autocommit), or in READ COMMITTED, every later statement's snapshot is
/// taken after this one ends, so it sees at least this much WAL. In REPEATABLE READ /
/// SERIALIZABLE the snapshot is taken by the transaction's first statement: call this before
/// `BEGIN`, not inside the transaction.
///
/// # Errors
/// [`ReplicaVersionError::NotAReplica`] on a primary; [`ReplicaVersionError::Query`] if the
/// query fails.
pub async fn replica_read_version(
    client: &tokio_postgres::Client,
) -> Result<Lsn, ReplicaVersionError> {
    let row = client
        .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
        .await?;
    let text: Option<String> = row.try_get(0)?;
    let text = text.ok_or(ReplicaVersionError::NotAReplica)?;
    Ok(text.parse()?)
}
