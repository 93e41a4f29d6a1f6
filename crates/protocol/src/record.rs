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
}
