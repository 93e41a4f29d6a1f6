//! In-process single-flight: concurrent misses of one key in one process share one read (one
//! Redis lease attempt, at most one loader run).
//!
//! The first caller (the leader) registers a flight and runs the read in its own task; later
//! callers (followers) wait for its result. If the leader is cancelled or panics before
//! answering, its flight is removed and the followers retry (one of them becomes the leader).
//!
//! A shared answer must not be older than the follower's own start: the leader may have read
//! its value before an invalidation that was applied before the follower began. So every
//! answer carries the sequence number ([`Flights::tick`]) taken when the observation behind it
//! began — the `GET` that found it sent, the loader started, or the accepted `FILL` sent (an
//! accepted fill proves no invalidation came between the lease and the fill) — and a follower
//! that joined at `j` takes it only if `j < obs`; otherwise it reads again.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::Error;

/// A finished read, type-erased (the value is an `Arc<T>`).
pub(crate) type Shared = Result<Observed, Error>;

/// A leader's value and the sequence number of the observation it came from.
#[derive(Clone)]
pub(crate) struct Observed {
    pub(crate) value: Arc<dyn Any + Send + Sync>,
    pub(crate) obs: u64,
}

type Slot = watch::Receiver<Option<Shared>>;

#[derive(Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<String, (u64, Slot)>>,
    next_id: std::sync::atomic::AtomicU64,
    /// The process's observation order (see the module docs).
    seq: std::sync::atomic::AtomicU64,
}

/// What [`Flights::join`] made of the caller.
pub(crate) enum Role<'a> {
    /// Run the read and [`Leader::finish_with`] it.
    Leader(Leader<'a>),
    /// Await [`Follower::wait`].
    Follower(Follower),
}

pub(crate) struct Leader<'a> {
    flights: &'a Flights,
    key: String,
    id: u64,
    tx: Option<watch::Sender<Option<Shared>>>,
}

pub(crate) struct Follower {
    rx: Slot,
    /// [`Flights::tick`] when this caller joined.
    pub(crate) joined: u64,
}

impl Flights {
    /// The next number of the process's observation order: taken before a `GET` is sent, a
    /// loader starts, a `FILL` is sent, or a follower joins. Always ≥ 1.
    pub(crate) fn tick(&self) -> u64 {
        self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
    }

    pub(crate) fn join(&self, key: &str) -> Role<'_> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, rx)) = map.get(key) {
            return Role::Follower(Follower {
                rx: rx.clone(),
                joined: self.tick(),
            });
        }
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        map.insert(key.to_owned(), (id, rx));
        Role::Leader(Leader {
            flights: self,
            key: key.to_owned(),
            id,
            tx: Some(tx),
        })
    }

    fn remove(&self, key: &str, id: u64) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.get(key).is_some_and(|(i, _)| *i == id) {
            map.remove(key);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Leader<'_> {
    /// Publishes the result to the followers. The flight is removed first, so a caller arriving
    /// after this starts a fresh read instead of taking this (possibly older) answer.
    pub(crate) fn finish_with(mut self, result: impl FnOnce() -> Shared) {
        self.flights.remove(&self.key, self.id);
        if let Some(tx) = self.tx.take() {
            // Only build (clone) the shared result if someone waits for it.
            if tx.receiver_count() > 0 {
                // A follower that gave up in the meantime is fine.
                let _ = tx.send(Some(result()));
            }
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        // Cancelled or panicked before `finish`: dropping the sender wakes the followers with
        // an error, and they retry.
        if self.tx.is_some() {
            self.flights.remove(&self.key, self.id);
        }
    }
}

impl Follower {
    /// The leader's result, or `None` if the leader vanished without one (retry).
    pub(crate) async fn wait(mut self) -> Option<Shared> {
        match self.rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_the_leaders_result() {
        let flights = Flights::default();
        let Role::Leader(leader) = flights.join("k") else {
            panic!("first caller leads")
        };
        let Role::Follower(f1) = flights.join("k") else {
            panic!("second caller follows")
        };
        let Role::Follower(f2) = flights.join("k") else {
            panic!("third caller follows")
        };
        let Role::Leader(other) = flights.join("other") else {
            panic!("other key leads")
        };
        let obs = flights.tick();
        assert!(f1.joined < f2.joined && f2.joined < obs);
        leader.finish_with(|| {
            Ok(Observed {
                value: Arc::new(7u32),
                obs,
            })
        });
        for f in [f1, f2] {
            let v = f.wait().await.unwrap().unwrap();
            assert_eq!(v.value.downcast_ref::<u32>(), Some(&7));
            assert_eq!(v.obs, obs);
        }
        assert_eq!(flights.len(), 1);
        drop(other);
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn vanished_leader_releases_followers() {
        let flights = Flights::default();
        let Role::Leader(leader) = flights.join("k") else {
            panic!()
        };
        let Role::Follower(f) = flights.join("k") else {
            panic!()
        };
        drop(leader);
        assert!(f.wait().await.is_none());
        assert!(matches!(flights.join("k"), Role::Leader(_)));
    }
}
