//! The error every configuration section reports: which field, and why; and [`redact_url`],
//! which keeps secrets out of those errors and of log lines.

use std::borrow::Cow;

/// A configuration value that cannot work. `field` is the dotted path of the field in the config
/// file (`postgres.slot`, `redis.urls[1]`, `rules`); `reason` says what is wrong and how to fix
/// it. Displays as `{field}: {reason}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
#[non_exhaustive]
pub struct ConfigError {
    /// The field's dotted path.
    pub field: Cow<'static, str>,
    /// What is wrong with it and how to fix it.
    pub reason: String,
}

impl ConfigError {
    /// A `ConfigError` for `field`.
    pub fn new(field: impl Into<Cow<'static, str>>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A connection URL with its password replaced by `***`, for errors and log lines:
/// `redis://user:secret@host:6379/0` → `redis://user:***@host:6379/0`,
/// `postgres://app:pw@db/shop` → `postgres://app:***@db/shop`. A URL without user info is
/// returned as it is. Secrets never reach a log line, an error or a metric: every URL that is
/// printed goes through this first.
pub fn redact_url(url: &str) -> String {
    let url = redact_password_params(url);
    let Some((scheme, rest)) = url.split_once("://") else {
        return url;
    };
    // The authority ends at the first `/`, `?` or `#`; an `@` after that is not user info.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url;
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
        // A lone user name is not a secret, but a token-only URL (`redis://token@host`) is.
        None if scheme.starts_with("redis") => format!("{scheme}://***@{host}{tail}"),
        None => url,
    }
}

/// `password=…` as a libpq key=value pair (`host=db password=secret`, also quoted) or a URL
/// query parameter (`?password=secret`), with the value replaced by `***`.
fn redact_password_params(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    while let Some(at) = rest.find("password=") {
        let starts_key = at == 0 || matches!(rest.as_bytes()[at - 1], b' ' | b'\t' | b'?' | b'&');
        out.push_str(&rest[..at + "password=".len()]);
        rest = &rest[at + "password=".len()..];
        if !starts_key {
            continue;
        }
        let end = if let Some(quoted) = rest.strip_prefix('\'') {
            // A quoted libpq value: up to the closing quote (backslash escapes a quote).
            let mut i = 0;
            let bytes = quoted.as_bytes();
            while i < bytes.len() && bytes[i] != b'\'' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            (i + 2).min(rest.len())
        } else {
            rest.find([' ', '\t', '&', '#']).unwrap_or(rest.len())
        };
        out.push_str("***");
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Whether a librdkafka property (or any `key = value` setting) holds a secret: its name contains
/// `password`, `secret`, `token` or `credential`, or it carries a key itself (`ssl.key.pem`,
/// `ssl.keystore…`; `ssl.key.location`, a path, is not a secret): `sasl.password`,
/// `ssl.key.password`, `sasl.oauthbearer.client.secret`, `ssl.keystore.password`, ….
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "token", "credential", "keystore"]
        .iter()
        .any(|w| k.contains(w))
        || (k.contains("key") && k.ends_with(".pem"))
        || k == "sasl.oauthbearer.config"
}

/// `properties` for `Debug` output and log lines: every value [`is_secret_property`] flags
/// replaced by `***`, the others as they are.
pub fn redact_properties(
    properties: &std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<&str, &str> {
    properties
        .iter()
        .map(|(k, v)| {
            let shown = if is_secret_property(k) {
                "***"
            } else {
                v.as_str()
            };
            (k.as_str(), shown)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{redact_properties, redact_url};

    #[test]
    fn redacts_secret_properties() {
        let props: std::collections::BTreeMap<String, String> = [
            ("sasl.password", "pw1"),
            ("ssl.key.password", "pw2"),
            ("ssl.key.pem", "pem"),
            ("sasl.oauthbearer.client.secret", "s"),
            ("sasl.username", "app"),
            ("ssl.key.location", "/etc/k.pem"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let shown = format!("{:?}", redact_properties(&props));
        for secret in ["pw1", "pw2", "\"pem\"", "\"s\""] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("\"app\""), "{shown}");
        assert!(shown.contains("/etc/k.pem"), "{shown}");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("redis://u:p@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact_url("rediss://:p@h"), "rediss://:***@h");
        assert_eq!(redact_url("redis://tok@h/"), "redis://***@h/");
        assert_eq!(
            redact_url("postgres://app:s3cr3t@db:5432/shop?sslmode=require"),
            "postgres://app:***@db:5432/shop?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://app@db/shop"),
            "postgres://app@db/shop"
        );
        assert_eq!(redact_url("postgres://db/x?a=b@c"), "postgres://db/x?a=b@c");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(
            redact_url("host=127.0.0.1 user=app password=S3cret dbname=shop"),
            "host=127.0.0.1 user=app password=*** dbname=shop"
        );
        assert_eq!(
            redact_url("host=db password='a b\\' c' dbname=x"),
            "host=db password=*** dbname=x"
        );
        assert_eq!(
            redact_url("postgres://app@db:5432/shop?sslmode=require&password=S3cret"),
            "postgres://app@db:5432/shop?sslmode=require&password=***"
        );
        assert_eq!(redact_url("host=db nopassword=x"), "host=db nopassword=x");
    }
}
