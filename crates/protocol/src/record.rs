//! The record published on the Kafka bus: one per cache key (Kafka key = the cache key), or one
//! per table-wide eviction (Kafka key = the table), as JSON.
//!
//! ```json
//! {"key":"product:42","commit_lsn":"0/16B6C50","commit_time_us":1764445200000000,"xid":750,"table":"public.product","op":"update"}
//! {"patterns":["{product:*}*"],"commit_lsn":"0/16B6D00","commit_time_us":1764445200100000,"xid":751,"table":"public.product","op":"truncate"}
//! ```
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `key` | string, absent for table-wide records | the cache key `K` to evict |
//! | `patterns` | array of strings, absent for key records | SCAN MATCH globs: evict every key they match |
//! | `commit_lsn` | string, PostgreSQL `X/X` form | end LSN of the commit record: the fence value |
//! | `commit_time_us` | integer | commit time, µs since the Unix epoch |
//! | `xid` | integer | transaction id as pgoutput's Begin carries it (32 bits, no epoch) |
//! | `table` | string | `schema.table` |
//! | `op` | `insert` \| `update` \| `delete` \| `truncate` | the row operation (`truncate` also for fallbacks) |

use crate::{Lsn, Op};

/// One bus record; see the module docs for the JSON shape.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusRecord {
    /// The cache key to evict (key records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// SCAN MATCH patterns to evict (table-wide records).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patterns: Vec<String>,
    /// End LSN of the commit record.
    pub commit_lsn: Lsn,
    /// Commit time, µs since the Unix epoch.
    pub commit_time_us: i64,
    /// Transaction id (32-bit, as pgoutput carries it).
    pub xid: u64,
    /// `schema.table`.
    pub table: String,
    /// Row operation.
    pub op: Op,
}

/// A bus record that does not parse, or parses to nothing to evict.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Not JSON of the documented shape.
    #[error("not a cacheclear bus record: {0}")]
    Json(#[from] serde_json::Error),
    /// Neither `key` nor `patterns`, or both.
    #[error("a bus record needs exactly one of `key` or `patterns`")]
    Shape,
}

impl BusRecord {
    /// Parses and checks one record value.
    ///
    /// # Errors
    /// [`RecordError`] naming what is wrong.
    pub fn from_json(bytes: &[u8]) -> Result<BusRecord, RecordError> {
        let r: BusRecord = serde_json::from_slice(bytes)?;
        if r.key.is_some() != r.patterns.is_empty() {
            return Err(RecordError::Shape);
        }
        Ok(r)
    }

    /// The JSON value.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A control record of the bus (docs/architecture.md, "Watermark and epoch in bus mode"): sent by
/// the Kafka sink to **every** partition of the topic with an explicit partition number and the
/// Kafka key `cacheclear.control:<namespace>`, so each partition carries it in order with its
/// evictions. The invalidator applies it once every record before it on that partition is
/// acknowledged by Redis.
///
/// ```json
/// {"control":"epoch","namespace":"cacheclear","open":1764445200000123,"origin":"7301/1","gap":"new_slot","continuity":false}
/// {"control":"watermark","namespace":"cacheclear","open":1764445200000123,"origin":"7301/1","lsn":"0/16B6C50","commit_time_us":1764445200000000,"lag_ms":4,"partitions":4}
/// ```
///
/// | field | meaning |
/// |---|---|
/// | `control` | `epoch` (the source (re)started: open the namespace's epoch) or `watermark` |
/// | `namespace` | the deployment namespace (`postgres.namespace`, default the slot name) |
/// | `open` | the id of the source's start that sent it (µs since the Unix epoch at start): the first `epoch` record of an open applies, its copies on the other partitions are no-ops, and `watermark` records of an earlier open are ignored |
/// | `origin` | `system_identifier/timeline` of the PostgreSQL server streamed from |
/// | `gap` | `epoch` only: `new_slot`, `slot_lost`, or absent (no gap the source knows of) |
/// | `continuity` | `epoch` only: a failover slot showed continuity across an origin change |
/// | `lsn`, `commit_time_us` | `watermark` only: every commit up to this end LSN (committed at this time, PostgreSQL's clock) is on every partition before this record |
/// | `lag_ms` | `watermark` only: the source's end-to-end lag when Kafka acknowledged the record (heartbeat emission → acknowledgement, the source's monotonic clock) |
/// | `partitions` | `watermark` only: how many partitions the topic had; the namespace's watermark moves only once each of them has delivered one |
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "control", rename_all = "snake_case", deny_unknown_fields)]
pub enum BusControl {
    /// Open the namespace's epoch for a new stream.
    Epoch {
        /// Namespace.
        namespace: String,
        /// The id of the source's start.
        open: u64,
        /// `system_identifier/timeline`.
        origin: String,
        /// The gap the source knows of.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gap: Option<String>,
        /// Continuity shown across an origin change.
        #[serde(default)]
        continuity: bool,
    },
    /// Every commit up to `lsn` precedes this record on this partition.
    Watermark {
        /// Namespace.
        namespace: String,
        /// The id of the source's start.
        open: u64,
        /// `system_identifier/timeline`.
        origin: String,
        /// Commit end LSN.
        lsn: Lsn,
        /// Its commit time, µs since the Unix epoch (PostgreSQL's clock).
        commit_time_us: i64,
        /// The source's end-to-end lag at acknowledgement, ms.
        lag_ms: u64,
        /// Partitions of the topic when sent.
        partitions: u32,
    },
}

/// The Kafka key prefix of [`BusControl`] records (`cacheclear.control:` + namespace).
pub const CONTROL_KEY_PREFIX: &str = "cacheclear.control:";

impl BusControl {
    /// True when `value` is shaped like a control record (its JSON starts with `{"control":`,
    /// as [`BusControl::to_json`] writes it); eviction records never do.
    pub fn is_control(value: &[u8]) -> bool {
        value.starts_with(br#"{"control":"#)
    }

    /// Parses one control record value.
    ///
    /// # Errors
    /// [`RecordError::Json`] naming what is wrong.
    pub fn from_json(bytes: &[u8]) -> Result<BusControl, RecordError> {
        Ok(serde_json::from_slice(bytes)?)
    }

    /// The JSON value.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The namespace it is about.
    pub fn namespace(&self) -> &str {
        match self {
            BusControl::Epoch { namespace, .. } | BusControl::Watermark { namespace, .. } => {
                namespace
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrips_and_rejects_bad_shapes() {
        let r = BusRecord {
            key: Some("product:42".into()),
            patterns: vec![],
            commit_lsn: Lsn(0x16B_6C50),
            commit_time_us: 1_764_445_200_000_000,
            xid: 750,
            table: "public.product".into(),
            op: Op::Update,
        };
        let json = r.to_json();
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"key":"product:42","commit_lsn":"0/16B6C50","commit_time_us":1764445200000000,"xid":750,"table":"public.product","op":"update"}"#
        );
        assert_eq!(BusRecord::from_json(&json).unwrap(), r);
        assert!(matches!(
            BusRecord::from_json(
                br#"{"commit_lsn":"0/1","commit_time_us":1,"xid":1,"table":"t","op":"insert"}"#
            ),
            Err(RecordError::Shape)
        ));
        assert!(matches!(
            BusRecord::from_json(b"{"),
            Err(RecordError::Json(_))
        ));
        assert!(BusRecord::from_json(br#"{"key":"k","commit_lsn":"zz","commit_time_us":1,"xid":1,"table":"t","op":"insert"}"#).is_err());
    }

    #[test]
    fn control_records_roundtrip_and_are_told_apart() {
        let e = BusControl::Epoch {
            namespace: "cacheclear".into(),
            open: 1_764_445_200_000_123,
            origin: "7301/1".into(),
            gap: Some("new_slot".into()),
            continuity: false,
        };
        let json = e.to_json();
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"control":"epoch","namespace":"cacheclear","open":1764445200000123,"origin":"7301/1","gap":"new_slot","continuity":false}"#
        );
        assert!(BusControl::is_control(&json));
        assert_eq!(BusControl::from_json(&json).unwrap(), e);
        let w = BusControl::Watermark {
            namespace: "cacheclear".into(),
            open: 9,
            origin: "7301/1".into(),
            lsn: Lsn(0x16B_6C50),
            commit_time_us: 5,
            lag_ms: 4,
            partitions: 4,
        };
        let json = w.to_json();
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"control":"watermark","namespace":"cacheclear","open":9,"origin":"7301/1","lsn":"0/16B6C50","commit_time_us":5,"lag_ms":4,"partitions":4}"#
        );
        assert_eq!(BusControl::from_json(&json).unwrap(), w);
        assert!(!BusControl::is_control(br#"{"key":"k"}"#));
        assert!(BusControl::from_json(br#"{"control":"reset","namespace":"n"}"#).is_err());
        assert!(
            BusControl::from_json(br#"{"control":"watermark","namespace":"n","open":1}"#).is_err()
        );
    }
}
