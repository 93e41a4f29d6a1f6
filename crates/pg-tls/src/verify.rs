//! The rustls client configuration for an [`SslMode`]: which roots, whether the chain and the
//! host name are checked, the client certificate.

use std::borrow::Cow;
use std::path::Path;
use std::sync::{Arc, Once};

use cacheclear_protocol::ConfigError;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::{PgTls, SslMode};

/// Installs rustls's `ring` crypto provider as the process default, once. rustls needs one
/// process-wide provider when more than one is compiled in; if another part of the process
/// installed one first, that one is used.
pub fn install_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means another provider was installed first: that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn provider() -> Arc<CryptoProvider> {
    install_provider();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// A PEM error in words that never quote the file: a key file's lines are its secret, and
/// `pem::Error`'s own `Display` can print one.
fn pem_problem(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error as E;
    match e {
        E::Io(io) => io.to_string(),
        E::MissingSectionEnd { .. } => "a PEM section has no END line".to_owned(),
        E::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed".to_owned(),
        E::Base64Decode(_) => "a PEM section is not valid base64".to_owned(),
        E::NoItemsFound => "it holds no PEM item of the expected kind".to_owned(),
        _ => "it is not valid PEM".to_owned(),
    }
}

fn bad_file(field: &str, param: &str, path: &Path, why: String) -> ConfigError {
    ConfigError::new(
        field.to_owned(),
        format!("{param} `{}`: {why}", path.display()),
    )
}

fn roots(tls: &PgTls, field: &str) -> Result<RootCertStore, ConfigError> {
    let mut store = RootCertStore::empty();
    match &tls.root_cert {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad_file(field, "sslrootcert", path, pem_problem(&e)))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad_file(field, "sslrootcert", path, pem_problem(&e)))?;
            if certs.is_empty() {
                return Err(bad_file(
                    field,
                    "sslrootcert",
                    path,
                    "holds no PEM certificate".to_owned(),
                ));
            }
            for cert in certs {
                store
                    .add(cert)
                    .map_err(|e| bad_file(field, "sslrootcert", path, e.to_string()))?;
            }
        }
        None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(store)
}

/// The rustls client configuration for `tls`: the server certificate checked as its
/// [`SslMode`] says (handshake signatures always), the client certificate presented when
/// `sslcert`/`sslkey` are given. Reads the certificate and key files now.
///
/// # Errors
/// [`ConfigError`] for `field` when a certificate or key file cannot be read or holds nothing
/// usable; the message names the parameter and the path, never the file's contents.
pub fn client_config(
    tls: &PgTls,
    field: impl Into<Cow<'static, str>>,
) -> Result<rustls::ClientConfig, ConfigError> {
    let field = field.into();
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new(field.clone(), format!("TLS: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match tls.mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => Arc::new(Verifier {
            chain: None,
            check_name: false,
            provider: Arc::clone(&provider),
        }),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let chain = WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(tls, &field)?),
                Arc::clone(&provider),
            )
            .build()
            .map_err(|e| ConfigError::new(field.clone(), format!("sslrootcert: {e}")))?;
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
                .map_err(|e| bad_file(&field, "sslcert", cert, pem_problem(&e)))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad_file(&field, "sslcert", cert, pem_problem(&e)))?;
            let key_der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| bad_file(&field, "sslkey", key, pem_problem(&e)))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| bad_file(&field, "sslcert", cert, e.to_string()))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// The `tokio-postgres` TLS connector for `tls` ([`client_config`] wrapped).
///
/// # Errors
/// As [`client_config`].
pub fn connector(
    tls: &PgTls,
    field: impl Into<Cow<'static, str>>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, ConfigError> {
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(
        client_config(tls, field)?,
    ))
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
    fn a_key_file_is_never_quoted_in_errors() {
        let dir = std::env::temp_dir().join(format!("cacheclear-pg-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("k.pem");
        std::fs::write(&key, "-----BEGIN SECRETLINE\nxx\n").unwrap();
        let cert = dir.join("c.pem");
        std::fs::write(&cert, "").unwrap();
        let tls = PgTls {
            mode: SslMode::Require,
            root_cert: None,
            client_cert: Some(cert),
            client_key: Some(key.clone()),
        };
        let err = client_config(&tls, "postgres.url").unwrap_err().to_string();
        assert!(!err.contains("SECRETLINE"), "{err}");
        assert!(err.contains("postgres.url: sslkey"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
