//! One finding of `cacheclear doctor`: [`Check`], with its [`Status`]. Each component crate checks
//! its own part of a deployment (`cacheclear_source_postgres::doctor`,
//! `cacheclear_sink_redis::doctor`, …) and returns these; the binary prints them.

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Set up as cacheclear needs.
    Ok,
    /// Works, with a caveat an operator should know (the fix says what to do).
    Warn,
    /// Cannot work as configured: `run` or `invalidate` would refuse to start, or values could
    /// stay stale.
    Fail,
}

/// One check of `cacheclear doctor`: `{"id", "status", "found", "fix"}` in its JSON output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    /// Stable identifier, `<component>.<what>` (`postgres.wal_level`, `redis.maxmemory_policy`).
    pub id: String,
    /// The outcome.
    pub status: Status,
    /// What was found, in a sentence (never a secret: URLs are redacted).
    pub found: String,
    /// How to fix it (`None` when there is nothing to do).
    pub fix: Option<String>,
}

impl Check {
    /// An `ok` check.
    pub fn ok(id: impl Into<String>, found: impl Into<String>) -> Check {
        Check {
            id: id.into(),
            status: Status::Ok,
            found: found.into(),
            fix: None,
        }
    }

    /// A `warn` check with its fix.
    pub fn warn(id: impl Into<String>, found: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            id: id.into(),
            status: Status::Warn,
            found: found.into(),
            fix: Some(fix.into()),
        }
    }

    /// A `fail` check with its fix.
    pub fn fail(id: impl Into<String>, found: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            id: id.into(),
            status: Status::Fail,
            found: found.into(),
            fix: Some(fix.into()),
        }
    }
}
