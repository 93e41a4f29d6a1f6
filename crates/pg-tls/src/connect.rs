//! Opening a connection: the connection string parsed with its TLS parameters, and the errors
//! told apart (a certificate that failed verification is not a network hiccup).

use std::borrow::Cow;
use std::error::Error as _;

use cacheclear_protocol::{ConfigError, redact_url};

use crate::{PgTls, SslMode, connector, split_url};

/// `url` parsed by `tokio-postgres`, with the TLS parameters it does not know (`sslrootcert`,
/// `sslcert`, `sslkey`, and the verifying `sslmode`s) taken out first, and those parameters.
/// tokio-postgres's own `sslmode` is set to match (`verify-*` → `require`; the checking is
/// done by the verifier of [`crate::client_config`]).
///
/// # Errors
/// [`ConfigError`] for `field` when the TLS parameters are invalid or the rest is not a
/// PostgreSQL connection string.
pub fn parse_url(
    url: &str,
    field: impl Into<Cow<'static, str>>,
) -> Result<(tokio_postgres::Config, PgTls), ConfigError> {
    let field = field.into();
    let (rest, tls) = split_url(url, field.clone())?;
    let mut config: tokio_postgres::Config = rest.parse().map_err(|e: tokio_postgres::Error| {
        ConfigError::new(field, format!("not a PostgreSQL connection string: {e}"))
    })?;
    config.ssl_mode(match tls.mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    Ok((config, tls))
}

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The connection string or a certificate/key file is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The server's certificate failed verification (`verify-ca` / `verify-full`, or `require`
    /// with `sslrootcert`): the wrong CA, an expired certificate, or (`verify-full`) a
    /// certificate for another host name. Retrying cannot fix it.
    #[error(
        "cannot connect to {url}: the server's TLS certificate failed verification ({cause}); \
         check that sslrootcert names the CA that signed the server's certificate and, with \
         sslmode=verify-full, that the host name in the URL is one the certificate names"
    )]
    Certificate {
        /// The connection string, password redacted.
        url: String,
        /// tokio-postgres's error with its causes.
        cause: String,
        /// The error itself.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Connecting or authenticating failed (refused, reset, a wrong password, a missing
    /// database, a `pg_hba.conf` line that rejects the connection).
    #[error("cannot connect to {url}: {cause}")]
    Connect {
        /// The connection string, password redacted.
        url: String,
        /// tokio-postgres's error with its causes (or the server's message and SQLSTATE).
        cause: String,
        /// The error itself.
        #[source]
        source: tokio_postgres::Error,
    },
}

/// Connects to `url` (a URL or key=value string, TLS parameters as libpq's) and drives the
/// connection on a task of the current tokio runtime until the client is dropped; a connection
/// that fails later is logged at WARN (without the password). `field` names the setting `url`
/// came from, for errors.
///
/// # Errors
/// [`ConnectError::Config`] for an unusable connection string or certificate file,
/// [`ConnectError::Certificate`] when the server's certificate fails verification,
/// [`ConnectError::Connect`] for any other failure. No variant carries the password.
pub async fn connect(
    url: &str,
    field: impl Into<Cow<'static, str>>,
) -> Result<tokio_postgres::Client, ConnectError> {
    let field = field.into();
    let (config, tls) = parse_url(url, field.clone())?;
    let tls = connector(&tls, field)?;
    match config.connect(tls).await {
        Ok((client, connection)) => {
            let shown = redact_url(url);
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(url = %shown, error = %describe(&e), "PostgreSQL connection ended");
                }
            });
            Ok(client)
        }
        Err(source) => {
            let url = redact_url(url);
            let cause = describe(&source);
            if is_verification_failure(&source) {
                Err(ConnectError::Certificate { url, cause, source })
            } else {
                Err(ConnectError::Connect { url, cause, source })
            }
        }
    }
}

/// A tokio-postgres error as a user needs it (its `Display` alone says only "db error" or
/// "error connecting to server"). Shape: `ERROR: <message> (SQLSTATE <code>)[; hint: <hint>]`,
/// or the error and its causes joined by `: `.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
        if let Some(hint) = db.hint() {
            s.push_str("; hint: ");
            s.push_str(hint);
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// True when `e` (or an error in its chain, an `io::Error`'s inner error included) is a rustls
/// certificate verification failure: the server presented no certificate or one that did not
/// verify. A handshake cut short by the network is not one.
pub fn is_verification_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        let rustls_err = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if matches!(
            rustls_err,
            Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)
        ) {
            return true;
        }
        current = err.source();
    }
    false
}
