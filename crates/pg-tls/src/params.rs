//! The TLS parameters of a connection string: found, taken out (tokio-postgres knows only part of
//! them) and checked.

use std::borrow::Cow;
use std::path::PathBuf;

use cacheclear_protocol::ConfigError;

/// `sslmode`, as libpq spells it (`allow` is read as [`SslMode::Prefer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// TLS when the server offers it, certificate not checked (libpq's default).
    Prefer,
    /// TLS required, certificate not checked.
    Require,
    /// TLS required, the chain checked against `sslrootcert` (else the Mozilla roots).
    VerifyCa,
    /// As [`SslMode::VerifyCa`], and the certificate must name the host connected to.
    VerifyFull,
}

/// The TLS settings found in a connection string. Paths are as given (not read yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTls {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`: PEM file of the CA certificates to trust.
    pub root_cert: Option<PathBuf>,
    /// `sslcert`: PEM file of the client certificate chain.
    pub client_cert: Option<PathBuf>,
    /// `sslkey`: PEM file of the client certificate's private key.
    pub client_key: Option<PathBuf>,
}

const PARAMS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Splits `url` (a `postgres://` / `postgresql://` URL or a libpq key=value string) into the
/// connection string without the TLS parameters (what `tokio-postgres` parses) and those
/// parameters. URL values are percent-decoded; key=value values may be single-quoted.
///
/// # Errors
/// [`ConfigError`] for `field` for an unknown `sslmode`, or a client certificate without its key
/// (or the reverse).
pub fn split_url(
    url: &str,
    field: impl Into<Cow<'static, str>>,
) -> Result<(String, PgTls), ConfigError> {
    let field = field.into();
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
        None | Some("prefer") | Some("allow") => SslMode::Prefer,
        Some("disable") => SslMode::Disable,
        // libpq: "require" with a root certificate verifies the chain, like verify-ca.
        Some("require") if root_cert.is_some() => SslMode::VerifyCa,
        Some("require") => SslMode::Require,
        Some("verify-ca") => SslMode::VerifyCa,
        Some("verify-full") => SslMode::VerifyFull,
        Some(other) => {
            return Err(ConfigError::new(
                field,
                format!(
                    "sslmode `{other}` is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ),
            ));
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
            field,
            "sslcert and sslkey go together (a client certificate and its private key)",
        ));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn tls_parameters_are_split_off_both_url_forms() {
        let (rest, tls) = split_url(
            "postgres://app@db.example.com:5432/shop?sslmode=verify-full&sslrootcert=%2Fetc%2Frds-ca.pem&application_name=x",
            "postgres.url",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://app@db.example.com:5432/shop?application_name=x"
        );
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert.as_deref(), Some(Path::new("/etc/rds-ca.pem")));
        let (rest, tls) = split_url(
            "host=db user=app sslmode=require sslcert=/c.pem sslkey=/k.pem",
            "postgres.url",
        )
        .unwrap();
        assert_eq!(rest, "host=db user=app");
        assert_eq!(tls.mode, SslMode::Require);
        assert_eq!(tls.client_key.as_deref(), Some(Path::new("/k.pem")));
        let (_, tls) = split_url("postgres://db/x", "postgres.url").unwrap();
        assert_eq!(tls.mode, SslMode::Prefer, "libpq's default");
        let (_, tls) =
            split_url("postgres://db/x?sslmode=require&sslrootcert=/ca.pem", "x").unwrap();
        assert_eq!(
            tls.mode,
            SslMode::VerifyCa,
            "libpq: require + root cert verifies the chain"
        );
        let err = split_url("postgres://db/x?sslmode=always", "--postgres-url").unwrap_err();
        assert_eq!(err.field, "--postgres-url");
        assert!(err.reason.contains("`always`"), "{err}");
        assert!(split_url("postgres://db/x?sslcert=/c.pem", "postgres.url").is_err());
    }
}
