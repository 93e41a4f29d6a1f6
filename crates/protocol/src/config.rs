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
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The authority ends at the first `/`, `?` or `#`; an `@` after that is not user info.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
        // A lone user name is not a secret, but a token-only URL (`redis://token@host`) is.
        None if scheme.starts_with("redis") => format!("{scheme}://***@{host}{tail}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

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
    }
}
