//! Required test 5: a model check of the consistency protocol (docs/architecture.md,
//! "Why both a lease and a fence") with stateright.
//!
//! Processes: a writer (UPDATE + COMMIT on the primary, visible at once), a replica that replays
//! commits in order at its own pace, the pipeline (applies each commit's invalidation, in any
//! order, only after the commit is visible: the visibility barrier), and readers running the
//! steps of `get_or_load`: GET; on a miss `SET lease NX`; read the database (a replica reader
//! takes `pg_last_wal_replay_lsn()` first, then reads); fill-if-token-and-fence (FILL_LUA, which
//! also releases); or, on a failed load, RELEASE. Lease expiry and value expiry are
//! nondeterministic steps. Commit number `i` has LSN `i` and writes the value `i`.
//!
//! Invariant: once the last write is committed, every invalidation is applied and no reader is
//! between reading the database and its fill, the cache holds no value older than the database.
//!
//! Mutants show the checker is not vacuous: a fill that ignores the lease token (stale set with
//! primary readers), and a fill that ignores the fence (lagging replica), both break it.

use stateright::{Checker, Model, Property};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Fill {
    /// FILL_LUA as shipped: our token AND fence not newer than the version.
    Correct,
    /// Mutant: writes whenever the fence allows, whoever holds the lease.
    IgnoresToken,
    /// Mutant: writes whenever the lease is ours, whatever the fence.
    IgnoresFence,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Source {
    Primary,
    Replica,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Pc {
    /// About to start a `get_or_load` (if rounds are left).
    Start,
    /// Missed; about to try `SET lease NX`.
    TryLease,
    /// Holds the lease (token in `token`); about to read the database (a replica reader first
    /// takes its version).
    Read,
    /// Replica reader: version taken, about to read the replica.
    ReadReplica,
    /// Read `value` at `version`; about to run the fill script.
    Fill,
    /// Lease held elsewhere; about to re-read (GET) after a backoff.
    Wait,
    /// No rounds left.
    Done,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Reader {
    pc: Pc,
    rounds_left: u8,
    waits_left: u8,
    token: u8,
    version: Option<u8>,
    value: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    /// Committed (and visible) commits on the primary; the row's value is this number.
    db: u8,
    /// Commits replayed by the replica.
    replica: u8,
    /// Bit `i` set: commit `i + 1`'s invalidation is applied.
    applied: u8,
    /// `{K}`: the value (the commit number it was read at).
    cache: Option<u8>,
    /// `{K}:lease`: the token.
    lease: Option<u8>,
    /// `{K}:fence`: highest invalidated commit LSN (0 = none).
    fence: u8,
    next_token: u8,
    readers: Vec<Reader>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Action {
    Commit,
    Replay,
    Invalidate(u8),
    ExpireLease,
    ExpireValue,
    Step(usize),
    LoadFails(usize),
}

struct Protocol {
    fill: Fill,
    readers: Vec<Source>,
    writes: u8,
    rounds: u8,
    waits: u8,
}

impl Protocol {
    fn all_applied(&self, s: &State) -> bool {
        s.applied.count_ones() == u32::from(self.writes)
    }
}

impl Model for Protocol {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            db: 0,
            replica: 0,
            applied: 0,
            cache: None,
            lease: None,
            fence: 0,
            next_token: 1,
            readers: self
                .readers
                .iter()
                .map(|_| Reader {
                    pc: Pc::Start,
                    rounds_left: self.rounds,
                    waits_left: self.waits,
                    token: 0,
                    version: None,
                    value: 0,
                })
                .collect(),
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        if s.db < self.writes {
            actions.push(Action::Commit);
        }
        if s.replica < s.db {
            actions.push(Action::Replay);
        }
        for i in 1..=s.db {
            // Visibility barrier: only commits already visible (all of 1..=db) are invalidated.
            if s.applied & (1 << (i - 1)) == 0 {
                actions.push(Action::Invalidate(i));
            }
        }
        if s.lease.is_some() {
            actions.push(Action::ExpireLease);
        }
        if s.cache.is_some() {
            actions.push(Action::ExpireValue);
        }
        for (r, reader) in s.readers.iter().enumerate() {
            if reader.pc != Pc::Done && !(reader.pc == Pc::Start && reader.rounds_left == 0) {
                actions.push(Action::Step(r));
            }
            if matches!(reader.pc, Pc::Read | Pc::ReadReplica) {
                actions.push(Action::LoadFails(r));
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::Commit => s.db += 1,
            Action::Replay => s.replica += 1,
            Action::Invalidate(lsn) => {
                // INVALIDATE_LUA: delete value and lease; fence = max(fence, lsn).
                s.cache = None;
                s.lease = None;
                s.fence = s.fence.max(lsn);
                s.applied |= 1 << (lsn - 1);
            }
            Action::ExpireLease => s.lease = None,
            Action::ExpireValue => s.cache = None,
            Action::LoadFails(r) => {
                // RELEASE_LUA: compare-and-delete.
                if s.lease == Some(s.readers[r].token) {
                    s.lease = None;
                }
                finish_round(&mut s.readers[r]);
            }
            Action::Step(r) => {
                let source = self.readers[r];
                let reader = &mut s.readers[r];
                match reader.pc {
                    Pc::Start => {
                        reader.rounds_left -= 1;
                        reader.waits_left = self.waits;
                        reader.pc = if s.cache.is_some() {
                            after_round(reader)
                        } else {
                            Pc::TryLease
                        };
                    }
                    Pc::TryLease => {
                        if s.lease.is_none() {
                            s.lease = Some(s.next_token);
                            reader.token = s.next_token;
                            s.next_token += 1;
                            reader.pc = Pc::Read;
                        } else if reader.waits_left == 0 {
                            // Wait bound reached: load without filling (writes nothing).
                            reader.pc = after_round(reader);
                        } else {
                            reader.waits_left -= 1;
                            reader.pc = Pc::Wait;
                        }
                    }
                    Pc::Wait => {
                        reader.pc = if s.cache.is_some() {
                            after_round(reader)
                        } else {
                            Pc::TryLease
                        };
                    }
                    Pc::Read => match source {
                        Source::Primary => {
                            reader.version = None;
                            reader.value = s.db;
                            reader.pc = Pc::Fill;
                        }
                        Source::Replica => {
                            // pg_last_wal_replay_lsn(), taken before the read.
                            reader.version = Some(s.replica);
                            reader.pc = Pc::ReadReplica;
                        }
                    },
                    Pc::ReadReplica => {
                        reader.value = s.replica;
                        reader.pc = Pc::Fill;
                    }
                    Pc::Fill => {
                        // FILL_LUA (and its mutants).
                        let ours = s.lease == Some(reader.token);
                        if ours {
                            s.lease = None;
                        }
                        let token_ok = ours || self.fill == Fill::IgnoresToken;
                        let fence_ok = self.fill == Fill::IgnoresFence
                            || reader.version.is_none_or(|v| s.fence <= v);
                        if token_ok && fence_ok {
                            s.cache = Some(reader.value);
                        }
                        reader.pc = after_round(reader);
                    }
                    Pc::Done => return None,
                }
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(
                "no stale value once the last invalidation is applied",
                |m: &Protocol, s: &State| {
                    let quiescent = s.db == m.writes
                        && m.all_applied(s)
                        && s.readers
                            .iter()
                            .all(|r| !matches!(r.pc, Pc::Read | Pc::ReadReplica | Pc::Fill));
                    !quiescent || s.cache.is_none_or(|v| v == s.db)
                },
            ),
            // Non-vacuity: the interesting states are reachable.
            Property::sometimes(
                "a fill stores the latest value after the last invalidation",
                |m: &Protocol, s: &State| {
                    m.all_applied(s) && s.db == m.writes && s.cache == Some(m.writes)
                },
            ),
            Property::sometimes(
                "a reader holds a lease across an invalidation",
                |_, s: &State| {
                    s.applied != 0
                        && s.readers
                            .iter()
                            .any(|r| r.pc == Pc::Fill && s.lease.is_none())
                },
            ),
        ]
    }
}

fn after_round(reader: &Reader) -> Pc {
    if reader.rounds_left == 0 {
        Pc::Done
    } else {
        Pc::Start
    }
}

fn finish_round(reader: &mut Reader) {
    reader.pc = after_round(reader);
}

const INVARIANT: &str = "no stale value once the last invalidation is applied";

fn check(fill: Fill, readers: &[Source]) -> impl Checker<Protocol> {
    let model = Protocol {
        fill,
        readers: readers.to_vec(),
        writes: 2,
        rounds: 2,
        waits: 1,
    };
    let checker = model.checker().spawn_bfs().join();
    eprintln!(
        "{fill:?} {readers:?}: {} states",
        checker.unique_state_count()
    );
    checker
}

#[test]
fn protocol_holds_with_primary_readers() {
    let checker = check(Fill::Correct, &[Source::Primary, Source::Primary]);
    checker.assert_properties();
}

#[test]
fn protocol_holds_with_a_replica_reader() {
    check(Fill::Correct, &[Source::Primary, Source::Replica]).assert_properties();
    check(Fill::Correct, &[Source::Replica, Source::Replica]).assert_properties();
}

#[test]
fn mutant_fill_ignoring_the_lease_token_stores_a_stale_value() {
    let checker = check(Fill::IgnoresToken, &[Source::Primary, Source::Primary]);
    let path = checker
        .discovery(INVARIANT)
        .expect("the checker must find the stale set");
    let last = path.last_state().clone();
    assert!(
        last.cache.is_some_and(|v| v < last.db),
        "stale value in {last:?}"
    );
    eprintln!("counterexample: {:?}", path.into_actions());
}

#[test]
fn mutant_fill_ignoring_the_fence_stores_a_stale_replica_value() {
    // With primary readers only, the lease alone suffices: the fence mutant is harmless there...
    check(Fill::IgnoresFence, &[Source::Primary, Source::Primary]).assert_properties();
    // ...but a lagging replica reader refills the old row after the invalidation.
    let checker = check(Fill::IgnoresFence, &[Source::Primary, Source::Replica]);
    let path = checker
        .discovery(INVARIANT)
        .expect("the checker must find the lagging-replica fill");
    let last = path.last_state().clone();
    assert!(
        last.cache.is_some_and(|v| v < last.db),
        "stale value in {last:?}"
    );
    eprintln!("counterexample: {:?}", path.into_actions());
}
