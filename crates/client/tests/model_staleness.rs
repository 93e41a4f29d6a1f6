//! A model check (stateright) of the staleness breaker and the namespace epoch
//! (docs/architecture.md, "Watermark and epoch"; issue 10).
//!
//! Discrete time (`Tick`). A writer commits; the pipeline applies each commit's invalidation in
//! order while up (`INVALIDATE_LUA`: value and lease deleted) and publishes the watermark
//! (`written = now`) only when everything committed is applied — the heartbeat came back. The
//! pipeline can go down by a crash (its restart replays) or with a gap (a lost slot: the
//! commits not yet applied are never invalidated); a restart after a gap bumps the epoch and
//! deletes the watermark (`OPEN_EPOCH_LUA`) before anything else. One reader runs
//! `get_or_load` with the breaker: it re-reads watermark and epoch when its snapshot is `R`
//! ticks old; when the watermark is absent or older than `B`, it serves the database; else a
//! cached value of the snapshot's epoch or newer is served, and a miss takes the lease, reads
//! the database and fills under the snapshot's epoch (a separate step: invalidations and bumps
//! interleave).
//!
//! Invariant: **no value older than the watermark bound is ever served** — a served value that
//! is not the newest was superseded by a commit at most `B + R` ticks ago.
//! Mutants show it is not vacuous: no epoch bump after a gap, and no breaker, both break it.

use stateright::{Checker, Model, Property};

const B: u8 = 2;
const R: u8 = 1;
const WRITES: u8 = 2;
const TICKS: u8 = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Variant {
    /// As shipped.
    Correct,
    /// Mutant: a restart after a gap keeps the epoch.
    NoBump,
    /// Mutant: the reader serves cached values whatever the watermark says.
    NoBreaker,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Pipeline {
    Up,
    /// Down; `true`: a gap (the unapplied commits are lost).
    Down(bool),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Pc {
    Idle,
    /// Holds the lease `token`; read `value` from the database under `epoch`.
    Loaded {
        value: u8,
        epoch: u8,
        token: u8,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    now: u8,
    db: u8,
    /// `commit_time[i]`: when commit `i + 1` happened.
    commit_time: [u8; WRITES as usize],
    /// Commits whose invalidation was applied (or skipped by a gap), in order.
    applied: u8,
    pipeline: Pipeline,
    epoch: u8,
    /// Watermark: `written` time.
    watermark: Option<u8>,
    /// `{K}`: value and the epoch it was filled under.
    cache: Option<(u8, u8)>,
    lease: Option<u8>,
    next_token: u8,
    /// The reader's snapshot: watermark, epoch, when read.
    snapshot: Option<(Option<u8>, u8, u8)>,
    pc: Pc,
    /// A read served a value superseded more than `B + R` ticks ago.
    violated: bool,
    /// Reads served from the cache (non-vacuity).
    cached_reads: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Action {
    Tick,
    Commit,
    Invalidate,
    Publish,
    Crash,
    LoseSlot,
    Restart,
    Read,
    Fill,
}

struct Staleness {
    variant: Variant,
}

impl Staleness {
    /// Whether serving `v` now breaks the bound.
    fn stale_beyond_bound(s: &State, v: u8) -> bool {
        v < s.db && s.now > s.commit_time[usize::from(v)] + B + R
    }
}

impl Model for Staleness {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            now: 0,
            db: 0,
            commit_time: [0; WRITES as usize],
            applied: 0,
            pipeline: Pipeline::Up,
            epoch: 1,
            watermark: Some(0),
            cache: None,
            lease: None,
            next_token: 1,
            snapshot: None,
            pc: Pc::Idle,
            violated: false,
            cached_reads: 0,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        if s.violated {
            return;
        }
        if s.now < TICKS {
            actions.push(Action::Tick);
        }
        if s.db < WRITES {
            actions.push(Action::Commit);
        }
        match s.pipeline {
            Pipeline::Up => {
                if s.applied < s.db {
                    actions.push(Action::Invalidate);
                } else {
                    actions.push(Action::Publish);
                }
                actions.push(Action::Crash);
                // One gap at most keeps the state space finite (every gap bumps the epoch).
                if s.epoch == 1 {
                    actions.push(Action::LoseSlot);
                }
            }
            Pipeline::Down(_) => actions.push(Action::Restart),
        }
        match s.pc {
            Pc::Idle => actions.push(Action::Read),
            Pc::Loaded { .. } => actions.push(Action::Fill),
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::Tick => s.now += 1,
            Action::Commit => {
                s.commit_time[usize::from(s.db)] = s.now;
                s.db += 1;
            }
            Action::Invalidate => {
                s.applied += 1;
                s.cache = None;
                s.lease = None;
            }
            Action::Publish => s.watermark = Some(s.now),
            Action::Crash => s.pipeline = Pipeline::Down(false),
            Action::LoseSlot => s.pipeline = Pipeline::Down(true),
            Action::Restart => {
                if s.pipeline == Pipeline::Down(true) {
                    // The commits not applied are lost: never invalidated.
                    s.applied = s.db;
                    if self.variant != Variant::NoBump {
                        s.epoch += 1;
                        s.watermark = None;
                    }
                }
                s.pipeline = Pipeline::Up;
            }
            Action::Read => {
                if s.snapshot.is_none_or(|(_, _, at)| s.now >= at + R) {
                    s.snapshot = Some((s.watermark, s.epoch, s.now));
                }
                let (watermark, epoch, _) = s.snapshot?;
                let open =
                    self.variant == Variant::NoBreaker || watermark.is_some_and(|w| s.now <= w + B);
                if !open {
                    // Bypass: the database's value, no fill.
                    return Some(s);
                }
                match s.cache {
                    Some((v, e)) if e >= epoch || self.variant == Variant::NoBump => {
                        s.violated = Staleness::stale_beyond_bound(&s, v);
                        s.cached_reads = s.cached_reads.saturating_add(1).min(2);
                    }
                    _ => {
                        if s.lease.is_none() {
                            s.lease = Some(s.next_token);
                            s.pc = Pc::Loaded {
                                value: s.db,
                                epoch,
                                token: s.next_token,
                            };
                            s.next_token = (s.next_token % 3) + 1;
                        }
                    }
                }
            }
            Action::Fill => {
                let Pc::Loaded {
                    value,
                    epoch,
                    token,
                } = s.pc
                else {
                    return None;
                };
                // FILL_LUA: only with our lease; the envelope carries the snapshot's epoch.
                if s.lease == Some(token) {
                    s.cache = Some((value, epoch));
                    s.lease = None;
                }
                s.pc = Pc::Idle;
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(
                "no value older than the watermark bound is ever served",
                |_, s: &State| !s.violated,
            ),
            Property::sometimes("the cache serves twice", |_, s: &State| s.cached_reads >= 2),
            Property::sometimes(
                "a restart after a gap finds a value filled before it",
                |_, s: &State| s.epoch > 1 && s.cache.is_some_and(|(_, e)| e == 1),
            ),
        ]
    }
}

const INVARIANT: &str = "no value older than the watermark bound is ever served";

fn check(variant: Variant) -> impl Checker<Staleness> {
    let checker = Staleness { variant }.checker().spawn_bfs().join();
    eprintln!("{variant:?}: {} states", checker.unique_state_count());
    checker
}

#[test]
fn breaker_and_epoch_bound_what_is_served() {
    check(Variant::Correct).assert_properties();
}

#[test]
fn mutant_without_the_epoch_bump_serves_a_value_whose_invalidation_was_lost() {
    let checker = check(Variant::NoBump);
    let path = checker
        .discovery(INVARIANT)
        .expect("the checker must find the lost invalidation served");
    eprintln!("counterexample: {:?}", path.into_actions());
}

#[test]
fn mutant_without_the_breaker_serves_past_the_bound_while_the_pipeline_is_down() {
    let checker = check(Variant::NoBreaker);
    let path = checker
        .discovery(INVARIANT)
        .expect("the checker must find the stale read");
    eprintln!("counterexample: {:?}", path.into_actions());
}
