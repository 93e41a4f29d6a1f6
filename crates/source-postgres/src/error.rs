//! Why the source stopped: [`SourceError`], and PostgreSQL errors rendered with their causes.

use cacheclear_protocol::ConfigError;

use crate::{barrier, changes, pgoutput};

/// Why the source stopped. Every variant names what failed; [`SourceError::is_fatal`] tells the
/// errors a restart cannot fix (configuration, rules) from transient ones (connection loss), after
/// which `cacheclear run` restarts the source from the slot.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The configuration or the database's set-up cannot work (an invalid `[postgres]` field, a
    /// missing rule table, a publication that misses a table, a lost slot). `field` names the
    /// config field concerned; the reason says how to fix it.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A rule cannot be served by its table (a template column the table lacks, or one its
    /// replica identity leaves out of old rows); the message names the table, template and
    /// column and gives the `ALTER TABLE … REPLICA IDENTITY FULL` fix.
    #[error(transparent)]
    Rule(#[from] cacheclear_rules::RuleError),
    /// A query on the regular connection failed.
    #[error("PostgreSQL query failed: {}", cacheclear_pg_tls::describe(.0))]
    Query(#[from] tokio_postgres::Error),
    /// The connection pool failed to hand out a connection.
    #[error("PostgreSQL connection failed: {}", describe_pool(.0))]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The replication connection failed.
    #[error("replication stream failed: {0}")]
    Replication(#[from] pgwire_replication::PgWireError),
    /// A `pgoutput` payload did not decode.
    #[error(transparent)]
    Decode(#[from] pgoutput::DecodeError),
    /// The stream was inconsistent (a row for an unknown relation, a row outside a transaction).
    #[error(transparent)]
    Map(#[from] changes::MapError),
    /// The visibility barrier failed.
    #[error(transparent)]
    Barrier(#[from] barrier::BarrierError),
    /// The sink failed with an error no retry can fix ([`cacheclear_protocol::Sink::is_fatal`]:
    /// refused credentials, a certificate that fails verification, a missing permission); the
    /// message carries the fix.
    #[error("the sink cannot apply evictions: {0}")]
    Sink(cacheclear_protocol::SinkError),
    /// The replication stream or one of the source's stages ended unexpectedly (server restart,
    /// walsender terminated, a panicking observer); a restart resumes from the slot.
    #[error(transparent)]
    Ended(#[from] Ended),
    /// The sink failed a start-up step (opening the namespace's epoch) or refused the watermark
    /// because the namespace's epoch changed; a restart opens a new epoch.
    #[error("sink: {0}")]
    SinkEpoch(cacheclear_protocol::SinkError),
}

impl SourceError {
    /// True for errors a restart cannot fix: configuration and rules, and what retrying a
    /// connection cannot change — a refused password or authentication method, a certificate
    /// that fails verification, a database that does not exist, a role without the privilege
    /// (SQLSTATE classes 28 and 3D, 42501), and a sink error the sink calls fatal
    /// ([`SourceError::Sink`]). A refused or reset connection stays retryable.
    pub fn is_fatal(&self) -> bool {
        match self {
            SourceError::Config(_) | SourceError::Rule(_) | SourceError::Sink(_) => true,
            SourceError::Query(e) => pg_error_is_fatal(e),
            SourceError::Pool(deadpool_postgres::PoolError::Backend(e)) => pg_error_is_fatal(e),
            SourceError::Replication(pgwire_replication::PgWireError::Auth(_)) => true,
            SourceError::Replication(pgwire_replication::PgWireError::Tls(m)) => {
                // Verification failures, not a handshake cut short by the network.
                let m = m.to_ascii_lowercase();
                m.contains("certificate") || m.contains("config error")
            }
            SourceError::Replication(pgwire_replication::PgWireError::Server(m)) => {
                ["28P01", "28000", "3D000", "42501"]
                    .iter()
                    .any(|code| m.contains(code))
            }
            _ => false,
        }
    }
}

/// What ended before it should have (see [`SourceError::Ended`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Ended {
    /// The server closed the replication stream.
    #[error("the replication stream ended")]
    Stream,
    /// The replication worker stopped at an LSN (it was asked to stop at one).
    #[error("the replication stream stopped")]
    StoppedAt,
    /// A stage task (`barrier`, `apply`) returned or panicked.
    #[error("the {stage} stage ended unexpectedly{}", .cause.as_ref().map(|c| format!(": {c}")).unwrap_or_default())]
    Stage {
        /// The stage's name.
        stage: &'static str,
        /// The task's panic or cancellation, when it did not simply return.
        cause: Option<tokio::task::JoinError>,
    },
    /// The pipeline's task itself panicked or was cancelled.
    #[error("the source task ended unexpectedly: {0}")]
    Task(tokio::task::JoinError),
    /// The pipeline ended before its stream was live, and [`crate::Pipeline::streaming`]
    /// already returned why.
    #[error("the source already stopped (its error was returned by `streaming()`)")]
    AlreadyReported,
}

/// A pool error; a backend error is rendered by [`cacheclear_pg_tls::describe`].
pub(crate) fn describe_pool(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(pg) => cacheclear_pg_tls::describe(pg),
        other => other.to_string(),
    }
}

/// A query-connection error no retry can fix (see [`SourceError::is_fatal`]).
fn pg_error_is_fatal(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    if let Some(code) = e.code() {
        return code.code().starts_with("28")
            || *code == SqlState::INVALID_CATALOG_NAME
            || *code == SqlState::INSUFFICIENT_PRIVILEGE;
    }
    // A TLS verification failure: a rustls error somewhere in the chain.
    cacheclear_pg_tls::is_verification_failure(e)
}
