//! TLS for both PostgreSQL connections, configured the way libpq users expect: the `sslmode`,
//! `sslrootcert`, `sslcert` and `sslkey` parameters of `postgres.url` (URL query or key=value
//! form), with rustls. The semantics follow libpq's (PostgreSQL docs, "SSL Support", table
//! "SSL Mode Descriptions"):
//!
//! | `sslmode` | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | no | — |
//! | `prefer` (libpq's default) | if the server offers TLS | no |
//! | `require` | yes | no (but with `sslrootcert` given, like libpq: as `verify-ca`) |
//! | `verify-ca` | yes | chain to `sslrootcert` (else the Mozilla roots) |
//! | `verify-full` | yes | chain and host name |
//!
//! `sslcert` + `sslkey` (PEM) present a client certificate. The regular connections (pool) use
//! `tokio-postgres-rustls`; the replication connection `pgwire-replication`'s rustls support, fed
//! the same settings.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use cacheclear_protocol::ConfigError;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::SourceError;

/// `sslmode`, as libpq spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// The TLS settings found in `postgres.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PgTls {
    pub(crate) mode: SslMode,
    pub(crate) root_cert: Option<PathBuf>,
    pub(crate) client_cert: Option<PathBuf>,
    pub(crate) client_key: Option<PathBuf>,
}

const PARAMS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Splits `url` into the connection string without the TLS parameters (what `tokio-postgres`
/// parses) and those parameters.
///
/// # Errors
/// [`SourceError::Config`] (`postgres.url`) for an unknown `sslmode` or a client certificate
/// without its key (or the reverse).
pub(crate) fn split_url(url: &str) -> Result<(String, PgTls), SourceError> {
    let mut found: Vec<(String, String)> = Vec::new();
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_owned(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if PARAMS.contains(&k) {
                        found.push((k.to_owned(), percent_decode(v)));
                    } else {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for token in url.split_whitespace() {
            match token.split_once('=') {
                Some((k, v)) if PARAMS.contains(&k.trim()) => {
                    found.push((k.trim().to_owned(), v.trim_matches('\'').to_owned()))
                }
                _ => kept.push(token),
            }
        }
        kept.join(" ")
    };
    let get = |k: &str| {
        found
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let root_cert = get("sslrootcert").map(PathBuf::from);
    let mode = match get("sslmode").as_deref() {
        None | Some("prefer") => SslMode::Prefer,
        Some("disable") => SslMode::Disable,
        Some("allow") => SslMode::Prefer,
        // libpq: "require" with a root certificate verifies the chain, like verify-ca.
        Some("require") if root_cert.is_some() => SslMode::VerifyCa,
        Some("require") => SslMode::Require,
        Some("verify-ca") => SslMode::VerifyCa,
        Some("verify-full") => SslMode::VerifyFull,
        Some(other) => {
            return Err(ConfigError::new(
                "postgres.url",
                format!(
                    "sslmode `{other}` is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ),
            )
            .into());
        }
    };
    let tls = PgTls {
        mode,
        root_cert,
        client_cert: get("sslcert").map(PathBuf::from),
        client_key: get("sslkey").map(PathBuf::from),
    };
    if tls.client_cert.is_some() != tls.client_key.is_some() {
        return Err(ConfigError::new(
            "postgres.url",
            "sslcert and sslkey go together (a client certificate and its private key)",
        )
        .into());
    }
    Ok((rest, tls))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(h) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(h, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// rustls needs one process-wide crypto provider when more than one is compiled in.
fn install_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means another part of the process installed one first: that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn provider() -> Arc<CryptoProvider> {
    install_provider();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

fn bad_file(param: &str, path: &Path, why: impl std::fmt::Display) -> SourceError {
    ConfigError::new(
        "postgres.url",
        format!("{param} `{}`: {why}", path.display()),
    )
    .into()
}

fn roots(tls: &PgTls) -> Result<RootCertStore, SourceError> {
    let mut store = RootCertStore::empty();
    match &tls.root_cert {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad_file("sslrootcert", path, e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad_file("sslrootcert", path, e))?;
            if certs.is_empty() {
                return Err(bad_file("sslrootcert", path, "holds no PEM certificate"));
            }
            for cert in certs {
                store
                    .add(cert)
                    .map_err(|e| bad_file("sslrootcert", path, e))?;
            }
        }
        None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(store)
}

/// The rustls client configuration for the query pool.
///
/// # Errors
/// [`SourceError::Config`] (`postgres.url`) when a certificate or key file cannot be read or
/// holds nothing usable.
pub(crate) fn client_config(tls: &PgTls) -> Result<rustls::ClientConfig, SourceError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new("postgres.url", format!("TLS: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match tls.mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => Arc::new(Verifier {
            chain: None,
            check_name: false,
            provider: Arc::clone(&provider),
        }),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let chain = WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(tls)?),
                Arc::clone(&provider),
            )
            .build()
            .map_err(|e| ConfigError::new("postgres.url", format!("sslrootcert: {e}")))?;
            Arc::new(Verifier {
                chain: Some(chain),
                check_name: tls.mode == SslMode::VerifyFull,
                provider: Arc::clone(&provider),
            })
        }
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| bad_file("sslcert", cert, e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad_file("sslcert", cert, e))?;
            let key_der =
                PrivateKeyDer::from_pem_file(key).map_err(|e| bad_file("sslkey", key, e))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| bad_file("sslcert", cert, e))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// The replication connection's TLS settings (`pgwire-replication`).
pub(crate) fn replication_tls(tls: &PgTls) -> pgwire_replication::TlsConfig {
    use pgwire_replication::config::SslMode as M;
    install_provider();
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

/// Checks the server's certificate per `sslmode`: nothing (`require`), the chain only
/// (`verify-ca`), or chain and host name (`verify-full`). Handshake signatures are always
/// verified.
#[derive(Debug)]
struct Verifier {
    chain: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_split_off_both_url_forms() {
        let (rest, tls) = split_url(
            "postgres://app@db.example.com:5432/shop?sslmode=verify-full&sslrootcert=%2Fetc%2Frds-ca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://app@db.example.com:5432/shop?application_name=x"
        );
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert.as_deref(), Some(Path::new("/etc/rds-ca.pem")));
        let (rest, tls) =
            split_url("host=db user=app sslmode=require sslcert=/c.pem sslkey=/k.pem").unwrap();
        assert_eq!(rest, "host=db user=app");
        assert_eq!(tls.mode, SslMode::Require);
        assert_eq!(tls.client_key.as_deref(), Some(Path::new("/k.pem")));
        let (_, tls) = split_url("postgres://db/x").unwrap();
        assert_eq!(tls.mode, SslMode::Prefer, "libpq's default");
        let (_, tls) = split_url("postgres://db/x?sslmode=require&sslrootcert=/ca.pem").unwrap();
        assert_eq!(
            tls.mode,
            SslMode::VerifyCa,
            "libpq: require + root cert verifies the chain"
        );
        assert!(split_url("postgres://db/x?sslmode=always").is_err());
        assert!(split_url("postgres://db/x?sslcert=/c.pem").is_err());
    }
}
