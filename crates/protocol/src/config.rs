//! The error every configuration section reports: which field, and why.

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
