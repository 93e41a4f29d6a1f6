//! The unit of work between the CDC source and a sink: committed transactions, in commit order,
//! with their cache keys stored compactly.
//!
//! A bulk `UPDATE` of a million rows is one transaction with a million keys. pgoutput sends a
//! transaction only after it committed, so once its commit is visible (docs/architecture.md, "The
//! visibility barrier") its keys may be evicted while the rest of it still streams: the source
//! hands such a transaction over in [`CommittedTxn::partial`] parts of `max_batch_keys` keys.
//! [`KeyArena`]
//! keeps them in fixed-size byte chunks plus a `u32` end offset per key — about `len + 4` bytes
//! per key instead of `len + 40` for a `Vec<String>` — and grows by adding chunks, never by
//! reallocating: a doubling `Vec` would briefly hold the old and the new buffer (and glibc copies
//! large reallocations once its mmap threshold has adapted), which is what decided whether a
//! million-key transaction fit the pipeline's memory budget.

use std::sync::Arc;

use crate::{Lsn, Op};

/// Bytes per key-text chunk (1 MiB). A key never straddles two chunks.
const TEXT_CHUNK: usize = 1 << 20;
/// End offsets per offset chunk (256 Ki entries, 1 MiB).
const ENDS_CHUNK: usize = 1 << 18;

/// Cache keys in fixed-size chunks, tagged by runs of `(table, op)`.
///
/// Key text lives in 1 MiB chunks addressed as one virtual byte space; a key that does not fit in
/// the current chunk starts the next one (the unused tail is at most one key long). Key `i`
/// ends at virtual offset `ends[i]` and starts at the previous key's end, or at the start of its
/// own chunk when it was moved there.
#[derive(Debug, Default, Clone)]
pub struct KeyArena {
    text: Vec<Vec<u8>>,
    ends: Vec<Vec<u32>>,
    len: usize,
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
    /// Returns `false`, storing nothing, when the arena cannot hold the key: a key longer than
    /// 1 MiB, or over 4 GiB of key text in all. The caller then falls back to a table-wide
    /// invalidation.
    pub fn push(&mut self, table: &Arc<str>, op: Op, key: &str) -> bool {
        if key.len() > TEXT_CHUNK {
            return false;
        }
        let fits = self
            .text
            .last()
            .is_some_and(|c| c.len() + key.len() <= TEXT_CHUNK);
        let start = if fits {
            (self.text.len() - 1) * TEXT_CHUNK + self.text.last().map_or(0, Vec::len)
        } else {
            self.text.len() * TEXT_CHUNK
        };
        let Ok(end) = u32::try_from(start + key.len()) else {
            return false;
        };
        if !fits {
            // The first chunk grows on demand (most transactions hold a few keys); later ones
            // are allocated whole, so a large transaction never reallocates.
            let capacity = if self.text.is_empty() { 0 } else { TEXT_CHUNK };
            self.text.push(Vec::with_capacity(capacity));
        }
        if let Some(chunk) = self.text.last_mut() {
            chunk.extend_from_slice(key.as_bytes());
        }
        if self.ends.last().is_none_or(|c| c.len() == ENDS_CHUNK) {
            let capacity = if self.ends.is_empty() { 0 } else { ENDS_CHUNK };
            self.ends.push(Vec::with_capacity(capacity));
        }
        if let Some(chunk) = self.ends.last_mut() {
            chunk.push(end);
        }
        self.len += 1;
        match self.runs.last_mut() {
            Some(run) if run.op == op && Arc::ptr_eq(&run.table, table) => run.end = self.len,
            _ => self.runs.push(Run {
                table: Arc::clone(table),
                op,
                end: self.len,
            }),
        }
        true
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of key text held (not counting offsets or chunk tails).
    pub fn text_bytes(&self) -> usize {
        self.text.iter().map(Vec::len).sum()
    }

    fn end(&self, i: usize) -> usize {
        self.ends[i / ENDS_CHUNK][i % ENDS_CHUNK] as usize
    }

    /// The `i`-th key.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn get(&self, i: usize) -> &str {
        let end = self.end(i);
        let previous = if i == 0 { 0 } else { self.end(i - 1) };
        // A non-empty key lies wholly in the chunk holding its last byte; it starts there if
        // it was moved to a fresh chunk (then the previous key ended in an earlier one).
        let (chunk, start) = if end == previous {
            (end / TEXT_CHUNK, end)
        } else {
            let chunk = (end - 1) / TEXT_CHUNK;
            (chunk, previous.max(chunk * TEXT_CHUNK))
        };
        let base = chunk * TEXT_CHUNK;
        let bytes = self
            .text
            .get(chunk)
            .and_then(|c| c.get(start - base..end - base))
            .unwrap_or_default();
        // Keys enter only through `push(&str)`, and offsets split only at their boundaries.
        std::str::from_utf8(bytes).unwrap_or_default()
    }

    /// All keys in insertion order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// The `(table, op)` runs, in order.
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// Drops every key, keeping the first chunk of each kind.
    pub fn clear(&mut self) {
        self.text.truncate(1);
        self.ends.truncate(1);
        for c in &mut self.text {
            c.clear();
        }
        for c in &mut self.ends {
            c.clear();
        }
        self.len = 0;
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
    /// For a [`CommittedTxn::partial`] part: the commit record's *start* LSN (Begin's
    /// `final_lsn`) + 1, the fence of its keys, which is never confirmed.
    pub commit_lsn: Lsn,
    /// True for a leading part of a large transaction, evicted while the rest of it still
    /// streams (docs/architecture.md, "Large transactions"). Such a part is never acknowledged
    /// on its own: the transaction's last part (`partial == false`, same `xid`) carries the real
    /// commit LSN, and it is confirmed only once every part before it was applied.
    ///
    /// Its fence, Begin's `final_lsn` + 1, refuses exactly the fills the commit's end LSN
    /// refuses: a replica's replay position is the end of a whole replayed record, so none lies
    /// in `final_lsn + 1 .. end_lsn` (the commit record itself).
    pub partial: bool,
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
    /// Commit LSN of the last whole transaction (what may be confirmed after the batch is
    /// applied); `None` when the batch holds only [`CommittedTxn::partial`] parts.
    pub fn last_lsn(&self) -> Option<Lsn> {
        self.last_complete().map(|t| t.commit_lsn)
    }

    /// The last transaction of the batch that is not a [`CommittedTxn::partial`] part.
    pub fn last_complete(&self) -> Option<&CommittedTxn> {
        self.txns.iter().rev().find(|t| !t.partial)
    }

    /// Transactions whose commit the batch completes (every one but the
    /// [`CommittedTxn::partial`] parts).
    pub fn complete_count(&self) -> usize {
        self.txns.iter().filter(|t| !t.partial).count()
    }

    /// Total keys over all transactions.
    pub fn key_count(&self) -> usize {
        self.txns.iter().map(|t| t.keys.len()).sum()
    }
}

/// Microseconds since the Unix epoch, now (the clock of every `*_us` timestamp in a [`Batch`]
/// and a [`CommittedTxn`]); 0 if the system clock is before 1970.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
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
        a.clear();
        assert!(a.is_empty() && a.runs().is_empty() && a.iter().next().is_none());
        assert!(a.push(&order, Op::Delete, "order:10"));
        assert_eq!(a.iter().collect::<Vec<_>>(), ["order:10"]);
    }

    /// Keys that do not fit a chunk's tail move to the next chunk; offsets cross the offset
    /// chunks; empty keys and a key of exactly one chunk are kept.
    #[test]
    fn arena_spans_chunks() {
        let t: Arc<str> = Arc::from("public.t");
        let mut a = KeyArena::default();
        let mut expected = Vec::new();
        let mut i = 0usize;
        while a.len() <= ENDS_CHUNK + 10 {
            // Lengths 0..=96 so chunk tails are left unused now and then.
            let key = "k".repeat(i % 97) + &i.to_string();
            let key = if i % 1000 == 7 { String::new() } else { key };
            assert!(a.push(&t, Op::Update, &key));
            expected.push(key);
            i += 1;
        }
        let big = "x".repeat(TEXT_CHUNK);
        assert!(a.push(&t, Op::Update, &big));
        expected.push(big);
        assert!(a.push(&t, Op::Update, "after"));
        expected.push("after".into());
        assert!(!a.push(&t, Op::Update, &"y".repeat(TEXT_CHUNK + 1)));
        assert!(a.text.len() > 3 && a.ends.len() == 2);
        assert_eq!(a.len(), expected.len());
        assert!(a.iter().eq(expected.iter().map(String::as_str)));
        assert_eq!(
            a.text_bytes(),
            expected.iter().map(String::len).sum::<usize>()
        );
    }
}
