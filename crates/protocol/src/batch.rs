//! The unit of work between the CDC source and a sink: committed transactions, in commit order,
//! with their cache keys stored compactly.
//!
//! A bulk `UPDATE` of a million rows is one transaction with a million keys, and none of them may be
//! evicted before the commit is visible (design.md §3), so they are held until then. [`KeyArena`]
//! keeps them in one byte buffer plus a `u32` end offset per key — about `len + 4` bytes per key
//! instead of `len + 40` for a `Vec<String>` — which is what keeps the pipeline's peak RSS within
//! its budget on bulk changes.

use std::sync::Arc;

use crate::{Lsn, Op};

/// Cache keys in one contiguous buffer, tagged by runs of `(table, op)`.
#[derive(Debug, Default, Clone)]
pub struct KeyArena {
    bytes: Vec<u8>,
    ends: Vec<u32>,
    runs: Vec<Run>,
}

/// A run of consecutive keys in a [`KeyArena`] that share table and operation.
#[derive(Debug, Clone)]
pub struct Run {
    /// Schema-qualified table, `schema.table`.
    pub table: Arc<str>,
    /// The row operation that produced these keys.
    pub op: Op,
    /// Index one past the run's last key.
    pub end: usize,
}

impl KeyArena {
    /// Appends one key produced by `op` on `table`.
    ///
    /// # Panics
    /// Never for realistic input; the arena refuses to grow past 4 GiB of key bytes by returning
    /// `false` instead (the caller then falls back to a table-wide invalidation).
    pub fn push(&mut self, table: &Arc<str>, op: Op, key: &str) -> bool {
        let Ok(end) = u32::try_from(self.bytes.len() + key.len()) else {
            return false;
        };
        self.bytes.extend_from_slice(key.as_bytes());
        self.ends.push(end);
        match self.runs.last_mut() {
            Some(run) if run.op == op && Arc::ptr_eq(&run.table, table) => {
                run.end = self.ends.len()
            }
            _ => self.runs.push(Run {
                table: Arc::clone(table),
                op,
                end: self.ends.len(),
            }),
        }
        true
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Bytes of key text held (not counting offsets).
    pub fn text_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// The `i`-th key.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn get(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        let end = self.ends[i] as usize;
        // Keys enter only through `push(&str)`, and offsets split only at their boundaries.
        std::str::from_utf8(&self.bytes[start..end]).unwrap_or_default()
    }

    /// All keys in insertion order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// The `(table, op)` runs, in order.
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// Drops every key, keeping the allocation.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
        self.runs.clear();
    }
}

/// A table-wide eviction: every Redis key matching one of `patterns` (SCAN MATCH globs in the
/// `{K}`/`{K}:lease`/`{K}:fence` layout) is invalidated. Produced by TRUNCATE, and as the safe
/// fallback whenever a row's keys cannot be computed (a renamed rule column, an unchanged TOAST
/// value with no old image, a transaction over the per-transaction key budget).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableEviction {
    /// Schema-qualified table.
    pub table: Arc<str>,
    /// Why the whole table is evicted: `Op::Truncate` for TRUNCATE, otherwise the row op whose keys
    /// could not be computed.
    pub op: Op,
    /// SCAN MATCH patterns covering every key of the table's rules.
    pub patterns: Vec<String>,
}

/// One committed transaction's evictions.
#[derive(Debug, Clone, Default)]
pub struct CommittedTxn {
    /// Transaction id as pgoutput's Begin carries it (32 bits, no epoch).
    pub xid: u32,
    /// End LSN of the commit record: the fence value, and what the source confirms once applied.
    pub commit_lsn: Lsn,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_us: i64,
    /// When the source received the Commit message, microseconds since the Unix epoch: splits
    /// the commit→applied lag into the server's part (commit → received) and ours.
    pub received_us: i64,
    /// Cache keys to evict.
    pub keys: KeyArena,
    /// Table-wide evictions (TRUNCATE or fallback).
    pub tables: Vec<TableEviction>,
}

/// Committed transactions in commit order, handed to a sink as one unit. The source confirms
/// [`Batch::last_lsn`] only after the sink acknowledged the whole batch.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// The transactions, in commit order.
    pub txns: Vec<CommittedTxn>,
    /// When the sink side took the batch and started its visibility barrier, microseconds since
    /// the Unix epoch (0 if unset). With [`Batch::visible_us`] it splits our part of the lag
    /// into queueing, the visibility barrier and the sink.
    pub taken_us: i64,
    /// When the visibility barrier found every transaction of the batch visible, microseconds
    /// since the Unix epoch (0 if the batch went through no barrier).
    pub visible_us: i64,
}

impl Batch {
    /// Commit LSN of the last transaction (what may be confirmed after the batch is applied).
    pub fn last_lsn(&self) -> Option<Lsn> {
        self.txns.last().map(|t| t.commit_lsn)
    }

    /// Total keys over all transactions.
    pub fn key_count(&self) -> usize {
        self.txns.iter().map(|t| t.keys.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_keeps_keys_and_runs() {
        let product: Arc<str> = Arc::from("public.product");
        let order: Arc<str> = Arc::from("public.order");
        let mut a = KeyArena::default();
        assert!(a.push(&product, Op::Update, "product:1"));
        assert!(a.push(&product, Op::Update, "category:3:products"));
        assert!(a.push(&order, Op::Insert, "order:9"));
        assert_eq!(
            a.iter().collect::<Vec<_>>(),
            ["product:1", "category:3:products", "order:9"]
        );
        assert_eq!(a.runs().len(), 2);
        assert_eq!(a.runs()[0].end, 2);
        assert_eq!(&*a.runs()[1].table, "public.order");
        assert_eq!(a.text_bytes(), 9 + 19 + 7);
    }
}
