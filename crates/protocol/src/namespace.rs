//! The per-namespace Redis keys: the watermark, the epoch and the origin
//! (docs/architecture.md, "Redis key layout" and "Watermark and epoch").
//!
//! A *namespace* is one deployment of the pipeline writing one Redis (default: the slot name).
//! Its three keys share the hash tag `{cacheclear.ns:N}`, so one script reads or writes all of
//! them on Redis Cluster too:
//!
//! | Redis key | holds | TTL |
//! |---|---|---|
//! | `{cacheclear.ns:N}:epoch` | the epoch, a decimal integer (`max(previous + 1, Redis TIME in ms)`) | none |
//! | `{cacheclear.ns:N}:origin` | `system_identifier/timeline` of the PostgreSQL server last streamed from | none |
//! | `{cacheclear.ns:N}:watermark` | `LSN commit_time_us lag_ms written_ms epoch` ([`Watermark`]) | [`WATERMARK_TTL_MS`] |
//! | `{cacheclear.ns:N}:opened` | bus mode: the `open` id of the source start whose epoch record was applied | none |
//! | `{cacheclear.ns:N}:bumped_open` | bus mode: the `open` id of the newest source start whose epoch record bumped the epoch | none |
//! | `{cacheclear.ns:N}:partitions` | bus mode: a hash, partition number → `LSN commit_time_us lag_ms` of the newest watermark record applied from it under that open | none |
//!
//! The epoch and origin carry no TTL on purpose: under a `volatile-*` eviction policy Redis never
//! evicts them; should they vanish anyway (a Redis restart without persistence, `allkeys-*`), the
//! next pipeline start bumps the epoch, and until then clients see no epoch and bypass the cache.

use crate::{KeyError, Lsn};

/// TTL of the watermark key (10 min): long past any `max_staleness_ms`, so an absent watermark
/// means the pipeline has not written one for that long (or Redis lost it).
pub const WATERMARK_TTL_MS: u64 = 600_000;

/// The start of every namespace key (`{cacheclear.ns:`): these keys are not cache keys, and the
/// epoch and origin keys have no TTL by design (doctor's TTL sample skips them).
pub const NAMESPACE_KEY_PREFIX: &str = "{cacheclear.ns:";

/// The Redis keys of one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamespaceLayout {
    tag: String,
}

impl NamespaceLayout {
    /// Lays out namespace `name`.
    ///
    /// # Errors
    /// [`KeyError`] for an empty name or one containing `{` / `}` (it would break the hash tag).
    pub fn new(name: &str) -> Result<NamespaceLayout, KeyError> {
        if name.is_empty() {
            return Err(KeyError::Empty);
        }
        if name.contains(['{', '}']) {
            return Err(KeyError::Brace(name.to_owned()));
        }
        Ok(NamespaceLayout {
            tag: format!("{{cacheclear.ns:{name}}}"),
        })
    }

    /// `{cacheclear.ns:N}:epoch`.
    pub fn epoch(&self) -> String {
        format!("{}:epoch", self.tag)
    }

    /// `{cacheclear.ns:N}:origin`.
    pub fn origin(&self) -> String {
        format!("{}:origin", self.tag)
    }

    /// `{cacheclear.ns:N}:watermark`.
    pub fn watermark(&self) -> String {
        format!("{}:watermark", self.tag)
    }

    /// `{cacheclear.ns:N}:opened` (bus mode).
    pub fn opened(&self) -> String {
        format!("{}:opened", self.tag)
    }

    /// `{cacheclear.ns:N}:partitions` (bus mode).
    pub fn partitions(&self) -> String {
        format!("{}:partitions", self.tag)
    }

    /// `{cacheclear.ns:N}:bumped_open` (bus mode).
    pub fn bumped_open(&self) -> String {
        format!("{}:bumped_open", self.tag)
    }
}

/// What the pipeline publishes after every acknowledged batch (and at least every
/// `watermark_interval_ms` through the WAL heartbeat), as stored at `{cacheclear.ns:N}:watermark`:
/// five space-separated fields `LSN(fixed hex) commit_time_us lag_ms written_ms epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermark {
    /// Newest commit end LSN the sink acknowledged, in commit order.
    pub lsn: Lsn,
    /// That commit's time, µs since the Unix epoch, by the PostgreSQL server's clock
    /// (informational: ages are never computed across hosts).
    pub commit_time_us: i64,
    /// End-to-end lag in ms when written: the time, on the pipeline's monotonic clock, since it
    /// emitted the newest heartbeat (`pg_logical_emit_message`) that has come back through the
    /// slot and the sink. Every commit older than that heartbeat has been applied.
    pub lag_ms: u64,
    /// When Redis stored it: Redis `TIME` in ms, set by the script (never a client's clock).
    pub written_ms: u64,
    /// The epoch the pipeline streams under.
    pub epoch: u64,
}

impl Watermark {
    /// Parses the stored form.
    ///
    /// # Errors
    /// A message naming the malformed field.
    pub fn parse(s: &str) -> Result<Watermark, String> {
        let mut it = s.split(' ');
        let mut next = |what: &str| {
            it.next()
                .ok_or_else(|| format!("watermark `{s}` lacks its {what} field"))
        };
        let lsn =
            Lsn::from_fixed_hex(next("LSN")?).map_err(|e| format!("watermark `{s}`: LSN: {e}"))?;
        let num = |v: &str, what: &str| {
            v.parse::<u64>()
                .map_err(|e| format!("watermark `{s}`: {what} `{v}`: {e}"))
        };
        let commit_time_us = next("commit_time_us")?
            .parse::<i64>()
            .map_err(|e| format!("watermark `{s}`: commit_time_us: {e}"))?;
        let lag_ms = num(next("lag_ms")?, "lag_ms")?;
        let written_ms = num(next("written_ms")?, "written_ms")?;
        let epoch = num(next("epoch")?, "epoch")?;
        Ok(Watermark {
            lsn,
            commit_time_us,
            lag_ms,
            written_ms,
            epoch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_parse() {
        let ns = NamespaceLayout::new("cacheclear").unwrap();
        assert_eq!(ns.epoch(), "{cacheclear.ns:cacheclear}:epoch");
        assert_eq!(ns.watermark(), "{cacheclear.ns:cacheclear}:watermark");
        assert!(NamespaceLayout::new("a{b").is_err());
        let w = Watermark::parse("00000000016B6C50 1764445200000000 12 1764445200123 7").unwrap();
        assert_eq!(w.lsn, Lsn(0x16B_6C50));
        assert_eq!(
            (w.lag_ms, w.written_ms, w.epoch),
            (12, 1_764_445_200_123, 7)
        );
        assert!(Watermark::parse("00000000016B6C50 1 2").is_err());
        assert!(Watermark::parse("zz 1 2 3 4").is_err());
    }
}
