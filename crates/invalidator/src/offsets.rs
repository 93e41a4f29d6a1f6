//! Which offsets may be committed: per partition, the highest contiguous applied offset + 1, and
//! only for partitions this member still owns in the same assignment generation.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// A topic partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tp {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
}

/// The partitions this group member owns, each with the generation of its assignment. Written by
/// the rebalance callbacks, read by the consume loop. A partition revoked and assigned again gets
/// a new generation, so work received under the old assignment is never committed.
#[derive(Debug, Default)]
pub struct Ownership {
    owned: Mutex<HashMap<Tp, u64>>,
    next: AtomicU64,
}

impl Ownership {
    /// Records an assignment of `tps`.
    pub fn assign(&self, tps: impl IntoIterator<Item = Tp>) {
        if let Ok(mut owned) = self.owned.lock() {
            for tp in tps {
                let generation = self.next.fetch_add(1, Ordering::Relaxed) + 1;
                owned.insert(tp, generation);
            }
        }
    }

    /// Records the revocation of `tps`.
    pub fn revoke(&self, tps: impl IntoIterator<Item = Tp>) {
        if let Ok(mut owned) = self.owned.lock() {
            for tp in tps {
                owned.remove(&tp);
            }
        }
    }

    /// Revokes everything (the member lost its group membership).
    pub fn revoke_all(&self) {
        if let Ok(mut owned) = self.owned.lock() {
            owned.clear();
        }
    }

    /// The generation of `tp`'s current assignment, `None` when not owned.
    pub fn generation(&self, tp: &Tp) -> Option<u64> {
        self.owned.lock().ok()?.get(tp).copied()
    }

    /// The partitions owned now.
    pub fn owned(&self) -> Vec<Tp> {
        self.owned
            .lock()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    }
}

#[derive(Debug, Default)]
struct Partition {
    generation: u64,
    /// Received offsets not yet committable → applied?
    pending: BTreeMap<i64, bool>,
    /// Next offset to commit (highest contiguous applied + 1), if any advanced.
    commit: Option<i64>,
    /// Last offset handed out for commit.
    committed: Option<i64>,
}

/// Per-partition progress: offsets received, offsets applied, what may be committed.
///
/// Kafka delivers a partition's records in offset order; a record is *applied* when Redis (or, for
/// a malformed one, the dead-letter topic) acknowledged it. The committable position is the
/// highest offset `o` such that every record received at or before `o` is applied, plus one
/// (Kafka's committed offset is the next record to read). Offsets may have gaps (compaction,
/// transaction markers); only received records count.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: HashMap<Tp, Partition>,
}

impl OffsetTracker {
    /// A record at `offset` of `tp` was received under assignment `generation`. A new generation
    /// discards what was tracked under the previous one.
    pub fn received(&mut self, tp: &Tp, generation: u64, offset: i64) {
        let part = self.parts.entry(tp.clone()).or_default();
        if part.generation != generation {
            *part = Partition {
                generation,
                ..Partition::default()
            };
        }
        part.pending.insert(offset, false);
    }

    /// The record at `offset` of `tp` (generation `generation`) was applied.
    pub fn applied(&mut self, tp: &Tp, generation: u64, offset: i64) {
        let Some(part) = self.parts.get_mut(tp) else {
            return;
        };
        if part.generation != generation {
            return;
        }
        if let Some(done) = part.pending.get_mut(&offset) {
            *done = true;
        }
        while let Some(entry) = part.pending.first_entry() {
            if !*entry.get() {
                break;
            }
            let (offset, _) = entry.remove_entry();
            part.commit = Some(offset + 1);
        }
    }

    /// Offsets to commit now: for each partition whose committable position advanced and whose
    /// generation `current` still reports, `(tp, next offset)`. Partitions no longer owned (or
    /// owned under a newer generation) are forgotten, their in-flight work dropped.
    pub fn take_commits(&mut self, current: impl Fn(&Tp) -> Option<u64>) -> Vec<(Tp, i64)> {
        let mut out = Vec::new();
        self.parts.retain(|tp, part| {
            if current(tp) != Some(part.generation) {
                return false;
            }
            if let Some(c) = part.commit
                && part.committed != Some(c)
            {
                part.committed = Some(c);
                out.push((tp.clone(), c));
            }
            true
        });
        out.sort();
        out
    }

    /// Records of `tp` received but not yet committable (an unapplied record and everything
    /// received after it), under any generation. The consume loop pauses a partition whose count
    /// grows past a bound while one of its dead letters is retried.
    pub fn held(&self, tp: &Tp) -> usize {
        self.parts.get(tp).map_or(0, |p| p.pending.len())
    }

    /// The last offsets handed out by [`OffsetTracker::take_commits`] for partitions still owned
    /// (the final synchronous commit on shutdown).
    pub fn committed(&self, current: impl Fn(&Tp) -> Option<u64>) -> Vec<(Tp, i64)> {
        let mut out: Vec<(Tp, i64)> = self
            .parts
            .iter()
            .filter(|(tp, p)| current(tp) == Some(p.generation))
            .filter_map(|(tp, p)| Some((tp.clone(), p.committed?)))
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> Tp {
        Tp {
            topic: "t".into(),
            partition: p,
        }
    }

    #[test]
    fn commits_the_highest_contiguous_applied_offset_plus_one() {
        let mut t = OffsetTracker::default();
        for o in [10, 11, 13] {
            t.received(&tp(0), 1, o);
        }
        t.applied(&tp(0), 1, 11);
        assert_eq!(t.take_commits(|_| Some(1)), vec![]);
        t.applied(&tp(0), 1, 10);
        assert_eq!(t.take_commits(|_| Some(1)), vec![(tp(0), 12)]);
        // Nothing new: nothing to commit.
        assert_eq!(t.take_commits(|_| Some(1)), vec![]);
        t.applied(&tp(0), 1, 13);
        assert_eq!(t.take_commits(|_| Some(1)), vec![(tp(0), 14)]);
        assert_eq!(t.committed(|_| Some(1)), vec![(tp(0), 14)]);
    }

    #[test]
    fn revoked_or_reassigned_partitions_are_never_committed() {
        let mut t = OffsetTracker::default();
        t.received(&tp(0), 1, 5);
        t.received(&tp(1), 2, 7);
        t.applied(&tp(0), 1, 5);
        t.applied(&tp(1), 2, 7);
        // tp(0) revoked, tp(1) revoked and assigned again (generation 3).
        let current = |x: &Tp| (x.partition == 1).then_some(3);
        assert_eq!(t.take_commits(current), vec![]);
        // Late acknowledgements of the old generation change nothing.
        t.applied(&tp(1), 2, 7);
        assert_eq!(t.take_commits(current), vec![]);
        t.received(&tp(1), 3, 7);
        t.applied(&tp(1), 3, 7);
        assert_eq!(t.take_commits(current), vec![(tp(1), 8)]);
    }

    #[test]
    fn ownership_generations_change_on_reassignment() {
        let o = Ownership::default();
        o.assign([tp(0), tp(1)]);
        let g = o.generation(&tp(0)).unwrap();
        o.revoke([tp(0)]);
        assert_eq!(o.generation(&tp(0)), None);
        o.assign([tp(0)]);
        assert_ne!(o.generation(&tp(0)), Some(g));
        o.revoke_all();
        assert!(o.owned().is_empty());
    }
}
