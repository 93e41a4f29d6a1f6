//! The two kinds of connection the source opens: a small pool for regular queries (catalog
//! checks, the visibility barrier, heartbeats) and the replication connection (pgoutput stream).

use std::time::Duration;

use cacheclear_pg_tls::{PgTls, SslMode};
use cacheclear_protocol::{ConfigError, Lsn};
use pgwire_replication::ReplicationConfig;

use crate::{PostgresConfig, SourceError};

/// Replication events buffered between the replication worker and the reader.
const REPLICATION_BUFFER_EVENTS: usize = 1024;

/// Largest replication message accepted, in bytes (a row image of a wide table).
const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// `url` parsed by `tokio-postgres`, with its TLS parameters (`cacheclear-pg-tls`).
fn parse_url(url: &str) -> Result<(tokio_postgres::Config, PgTls), SourceError> {
    Ok(cacheclear_pg_tls::parse_url(url, "postgres.url")?)
}

/// A deadpool pool of at most `size` connections to `url`.
///
/// # Errors
/// [`SourceError::Config`] (`postgres.url`) when `url` does not parse.
pub(crate) fn pool(url: &str, size: usize) -> Result<deadpool_postgres::Pool, SourceError> {
    let (config, tls) = parse_url(url)?;
    let connector = cacheclear_pg_tls::connector(&tls, "postgres.url")?;
    let manager = deadpool_postgres::Manager::new(config, connector);
    deadpool_postgres::Pool::builder(manager)
        .max_size(size)
        .build()
        .map_err(|e| ConfigError::new("postgres.url", e.to_string()).into())
}

/// The replication connection's settings, from `postgres.url` and the slot, publication and
/// status interval of `cfg`. Streaming starts at the slot's confirmed position (start LSN 0).
///
/// # Errors
/// [`SourceError::Config`] (`postgres.url`) when the URL does not parse or names no user.
pub(crate) fn replication_config(cfg: &PostgresConfig) -> Result<ReplicationConfig, SourceError> {
    use tokio_postgres::config::Host;
    let (pg, tls) = parse_url(&cfg.url)?;
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.to_string_lossy().into_owned(),
        None => "127.0.0.1".to_owned(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let user = pg
        .get_user()
        .map(str::to_owned)
        .ok_or_else(|| ConfigError::new("postgres.url", "no user given"))?;
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let dbname = pg.get_dbname().unwrap_or(&user).to_owned();
    let mut rc = ReplicationConfig::new(
        host,
        user,
        password,
        dbname,
        cfg.slot.clone(),
        cfg.publication.clone(),
    )
    .with_port(port)
    .with_tls(replication_tls(&tls))
    .with_start_lsn(pgwire_replication::Lsn::ZERO)
    .with_status_interval(cfg.status_interval())
    .with_wakeup_interval(Duration::from_secs(1))
    .with_buffer_size(REPLICATION_BUFFER_EVENTS)
    .with_application_name("cacheclear");
    rc.max_message_size = MAX_MESSAGE_BYTES;
    Ok(rc)
}

/// The replication connection's TLS settings (`pgwire-replication`'s rustls support, fed the
/// same parameters as the query pool).
fn replication_tls(tls: &PgTls) -> pgwire_replication::TlsConfig {
    use pgwire_replication::config::SslMode as M;
    cacheclear_pg_tls::install_provider();
    let mut t = pgwire_replication::TlsConfig::disabled();
    t.mode = match tls.mode {
        SslMode::Disable => M::Disable,
        SslMode::Prefer => M::Prefer,
        SslMode::Require => M::Require,
        SslMode::VerifyCa => M::VerifyCa,
        SslMode::VerifyFull => M::VerifyFull,
    };
    t.ca_pem_path = tls.root_cert.clone();
    t.client_cert_pem_path = tls.client_cert.clone();
    t.client_key_pem_path = tls.client_key.clone();
    t
}

/// pgwire-replication's LSN as ours.
pub(crate) fn lsn(l: pgwire_replication::Lsn) -> Lsn {
    Lsn(l.as_u64())
}
