//! The two kinds of connection the source opens: a small pool for regular queries (catalog
//! checks, the visibility barrier, heartbeats) and the replication connection (pgoutput stream).

use std::time::Duration;

use cacheclear_protocol::{ConfigError, Lsn};
use pgwire_replication::ReplicationConfig;

use crate::{PostgresConfig, SourceError, tls};

/// Replication events buffered between the replication worker and the reader.
const REPLICATION_BUFFER_EVENTS: usize = 1024;

/// Largest replication message accepted, in bytes (a row image of a wide table).
const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// `url` parsed by `tokio-postgres`, with the TLS parameters it does not know (`sslrootcert`,
/// `sslcert`, `sslkey`, and the verifying `sslmode`s) taken out first (see `tls.rs`).
fn parse_url(url: &str) -> Result<(tokio_postgres::Config, tls::PgTls), SourceError> {
    let (rest, tls) = tls::split_url(url)?;
    let mut config: tokio_postgres::Config = rest.parse().map_err(|e: tokio_postgres::Error| {
        SourceError::from(ConfigError::new("postgres.url", e.to_string()))
    })?;
    config.ssl_mode(match tls.mode {
        tls::SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        tls::SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    Ok((config, tls))
}

/// A deadpool pool of at most `size` connections to `url`.
///
/// # Errors
/// [`SourceError::Config`] (`postgres.url`) when `url` does not parse.
pub(crate) fn pool(url: &str, size: usize) -> Result<deadpool_postgres::Pool, SourceError> {
    let (config, tls) = parse_url(url)?;
    let connector = tokio_postgres_rustls::MakeRustlsConnect::new(tls::client_config(&tls)?);
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
    .with_tls(tls::replication_tls(&tls))
    .with_start_lsn(pgwire_replication::Lsn::ZERO)
    .with_status_interval(cfg.status_interval())
    .with_wakeup_interval(Duration::from_secs(1))
    .with_buffer_size(REPLICATION_BUFFER_EVENTS)
    .with_application_name("cacheclear");
    rc.max_message_size = MAX_MESSAGE_BYTES;
    Ok(rc)
}

/// pgwire-replication's LSN as ours.
pub(crate) fn lsn(l: pgwire_replication::Lsn) -> Lsn {
    Lsn(l.as_u64())
}
