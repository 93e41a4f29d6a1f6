use crate::Lsn;

/// What happened to the row(s) that produced an invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// INSERT: the new row's keys.
    Insert,
    /// UPDATE: the old row's keys and the new row's keys.
    Update,
    /// DELETE: the old row's keys.
    Delete,
    /// TRUNCATE: every key any rule of the table can produce (its key patterns).
    Truncate,
}

/// One transaction's evictions for one table:
/// `{ keys, commit_lsn, commit_time, xid, table, op }`. Evict, never update.
///
/// JSON shape (stable; the Kafka sink publishes it):
/// `{"keys":["product:1"],"commit_lsn":"0/16B6C50","commit_time_us":1764445200000000,"xid":750,"table":"public.product","op":"update"}`
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Invalidation {
    /// Cache keys `K` to evict (without braces; see [`crate::KeyLayout`]).
    pub keys: Vec<String>,
    /// The end LSN of the transaction's commit record. A replica whose
    /// `pg_last_wal_replay_lsn()` is at least this has replayed the commit, which is why the fence
    /// stores the *end* and not the start of the commit record.
    pub commit_lsn: Lsn,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_us: i64,
    /// The transaction id, widened to 64 bits (xid8) with the epoch.
    pub xid: u64,
    /// Schema-qualified table name, `schema.table`.
    pub table: String,
    /// The row operation.
    pub op: Op,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_is_stable() {
        let inv = Invalidation {
            keys: vec!["product:1".into()],
            commit_lsn: Lsn(0x16B_6C50),
            commit_time_us: 1_764_445_200_000_000,
            xid: 750,
            table: "public.product".into(),
            op: Op::Update,
        };
        let json = serde_json::to_string(&inv).unwrap();
        assert_eq!(
            json,
            r#"{"keys":["product:1"],"commit_lsn":"0/16B6C50","commit_time_us":1764445200000000,"xid":750,"table":"public.product","op":"update"}"#
        );
        assert_eq!(serde_json::from_str::<Invalidation>(&json).unwrap(), inv);
    }
}
