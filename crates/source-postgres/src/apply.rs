//! The apply stage and the in-order acknowledgement — the project's headline guarantee: a commit's
//! LSN is confirmed to PostgreSQL only after the sink acknowledged every eviction through it.
//!
//! Up to `max_batches_in_flight` batches are applied at once (evictions commute: `DEL`,
//! `fence = max(fence, LSN)`, so the order in which they land does not matter), but they are
//! acknowledged strictly in commit order, so the acknowledged LSN never passes a batch that has
//! not landed. A failing batch is retried (50 ms doubling to 5 s) forever, unless the sink says
//! the error is one no retry can fix ([`Sink::is_fatal`]: refused credentials, a certificate
//! that fails verification): then the stage stops with it, and nothing after it is confirmed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cacheclear_protocol::{Batch, Lsn, Sink, SinkError, now_us};
use tokio::sync::{mpsc, watch};

use crate::RunOptions;
use crate::telemetry;

/// The apply stage: applies up to `max_in_flight` visible batches at once, each with retry
/// (forever), and acknowledges them strictly in commit order: a batch's last commit LSN is
/// acknowledged only once it and every batch before it were applied. `pending` (transactions
/// handed to the sink side and not yet acknowledged) goes down as batches are acknowledged.
/// Returns `Ok` when `batches` closes and everything in flight was acknowledged, or the first
/// error the sink calls fatal ([`Sink::is_fatal`]).
///
/// `acked_at` gets `(last commit LSN, its commit time in µs)` with every acknowledgement, for
/// the watermark publisher.
///
/// Besides `max_in_flight` batches, the keys in flight are bounded by `max_keys_in_flight`: a
/// batch that would pass it waits until the batches before it landed (a batch alone is always
/// admitted). Small batches never meet the bound; a large transaction's parts are applied a few
/// at a time, which keeps the sink busy (Redis's CPU is the limit then) without holding every
/// queued part's Redis pipelines in memory at once.
#[allow(clippy::too_many_arguments)] // the stage's channels and bounds, each used once
pub(crate) async fn stage<S: Sink>(
    sink: Arc<S>,
    mut batches: mpsc::Receiver<Batch>,
    ack: watch::Sender<Lsn>,
    acked_at: watch::Sender<(Lsn, i64)>,
    pending: Arc<AtomicUsize>,
    options: RunOptions,
    max_in_flight: usize,
    max_keys_in_flight: usize,
) -> Result<(), SinkError> {
    let sink = &*sink;
    let mut in_flight = futures::stream::FuturesOrdered::new();
    let mut keys_in_flight = 0usize;
    // A batch received but over the key bound: admitted once enough has landed.
    let mut held: Option<Batch> = None;
    let mut open = true;
    loop {
        if let Some(batch) = held.take() {
            let keys = batch.key_count();
            if in_flight.is_empty() || keys_in_flight + keys <= max_keys_in_flight {
                keys_in_flight += keys;
                in_flight.push_back(apply_with_retry(sink, batch));
            } else {
                held = Some(batch);
            }
        }
        tokio::select! {
            batch = batches.recv(), if open && held.is_none() && in_flight.len() < max_in_flight => match batch {
                Some(batch) => held = Some(batch),
                None => open = false,
            },
            Some(applied) = futures::StreamExt::next(&mut in_flight), if !in_flight.is_empty() => {
                let batch = applied?;
                keys_in_flight -= batch.key_count();
                // Before the acknowledgement, so whoever sees the new LSN also sees the count
                // without this batch (the batch and all before it have landed either way).
                pending.fetch_sub(batch.txns.len(), Ordering::AcqRel);
                acknowledge(&batch, &ack, &options);
                // A batch of partial parts only acknowledges nothing: their commit is not applied yet.
                if let Some(last) = batch.last_complete() {
                    acked_at.send_replace((last.commit_lsn, last.commit_time_us));
                }
            }
            else => return Ok(()),
        }
    }
}

/// Applies `batch`, retrying with backoff (50 ms doubling to 5 s) until the sink says `Ok`, or
/// returns the first error the sink calls fatal.
async fn apply_with_retry<S: Sink>(sink: &S, batch: Batch) -> Result<Batch, SinkError> {
    let name = sink.name();
    let started = std::time::Instant::now();
    let mut backoff = Duration::from_millis(50);
    let mut attempt = 0u64;
    loop {
        match sink.apply(&batch).await {
            Ok(()) => break,
            Err(e) if sink.is_fatal(&e) => {
                metrics::counter!(telemetry::SINK_ERRORS, "sink" => name).increment(1);
                tracing::error!(sink = name, error = %e, "sink failed with an error no retry can fix; stopping");
                return Err(e);
            }
            Err(e) => {
                attempt += 1;
                metrics::counter!(telemetry::SINK_ERRORS, "sink" => name).increment(1);
                metrics::counter!(telemetry::SINK_RETRIES, "sink" => name).increment(1);
                tracing::warn!(sink = name, attempt, error = %e, retry_in_ms = backoff.as_millis() as u64,
                    "sink failed to apply a batch; retrying (nothing after it is confirmed meanwhile)");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    metrics::histogram!(telemetry::SINK_APPLY, "sink" => name)
        .record(started.elapsed().as_secs_f64() * 1000.0);
    if attempt > 0 {
        tracing::info!(
            sink = name,
            attempts = attempt + 1,
            "sink recovered; batch applied"
        );
    }
    Ok(batch)
}

/// Records an applied batch (metrics, status, observer) and acknowledges its last commit LSN
/// (re-announcing the current one for a batch of partial parts only).
fn acknowledge(batch: &Batch, ack: &watch::Sender<Lsn>, options: &RunOptions) {
    let now = now_us();
    let keys = batch.key_count() as u64;
    let complete = batch.complete_count() as u64;
    for t in batch.txns.iter().filter(|t| !t.partial) {
        if !t.keys.is_empty() || !t.tables.is_empty() {
            let lag_ms = (now - t.commit_time_us).max(0) as f64 / 1000.0;
            metrics::histogram!(telemetry::COMMIT_TO_APPLIED_LAG).record(lag_ms);
        }
    }
    metrics::counter!(telemetry::INVALIDATIONS_APPLIED).increment(keys);
    metrics::counter!(telemetry::TRANSACTIONS_APPLIED).increment(complete);
    options.status.add_applied(complete, keys);
    if let Some(observer) = &options.observer {
        observer(batch);
    }
    match batch.last_lsn() {
        Some(last) => {
            ack.send_replace(last);
        }
        // Only partial parts: nothing new to confirm, but the reader still hears of it (its
        // drain waits for every batch handed over, partial ones included).
        None => ack.send_modify(|_| {}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cacheclear_protocol::{CommittedTxn, KeyArena, Op};
    use std::future::Future;
    use std::sync::Mutex;

    /// A sink whose batches finish when the test says so, failing the first attempt of any
    /// batch listed in `fail_once`.
    struct Gate {
        release: Mutex<std::collections::HashMap<u64, watch::Receiver<bool>>>,
        fail_once: Mutex<Vec<u64>>,
        landed: Mutex<Vec<u64>>,
    }

    impl Sink for Gate {
        fn name(&self) -> &'static str {
            "gate"
        }
        async fn apply(&self, batch: &Batch) -> Result<(), cacheclear_protocol::SinkError> {
            let lsn = batch.last_lsn().map_or(0, |l| l.0);
            let gate = self.release.lock().unwrap().get(&lsn).cloned();
            if let Some(mut gate) = gate {
                gate.wait_for(|open| *open)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let mut fail = self.fail_once.lock().unwrap();
            if let Some(i) = fail.iter().position(|&l| l == lsn) {
                fail.remove(i);
                return Err(format!("batch {lsn} failed once").into());
            }
            self.landed.lock().unwrap().push(lsn);
            Ok(())
        }
    }

    /// A [`Gate`] the test keeps a handle on.
    struct Shared(Arc<Gate>);

    impl Sink for Shared {
        fn name(&self) -> &'static str {
            "gate"
        }
        fn apply(
            &self,
            batch: &Batch,
        ) -> impl Future<Output = Result<(), cacheclear_protocol::SinkError>> + Send {
            self.0.apply(batch)
        }
    }

    fn batch(lsn: u64) -> Batch {
        let mut keys = KeyArena::default();
        keys.push(&Arc::from("public.t"), Op::Update, &format!("t:{lsn}"));
        Batch {
            txns: vec![CommittedTxn {
                xid: lsn as u32,
                commit_lsn: Lsn(lsn),
                keys,
                ..CommittedTxn::default()
            }],
            ..Batch::default()
        }
    }

    /// Later batches may land first, but the acknowledged LSN never passes a batch that has not
    /// landed; a failed batch is retried and only then acknowledged.
    #[tokio::test(start_paused = true)]
    async fn concurrent_applies_are_acknowledged_in_commit_order() {
        let (open_first, first_gate) = watch::channel(false);
        let sink = Arc::new(Gate {
            release: Mutex::new([(10, first_gate)].into_iter().collect()),
            fail_once: Mutex::new(vec![20]),
            landed: Mutex::new(Vec::new()),
        });
        let (tx, rx) = mpsc::channel(8);
        let (ack_tx, mut ack_rx) = watch::channel(Lsn::ZERO);
        let pending = Arc::new(AtomicUsize::new(3));
        let (acked_at, _) = watch::channel((Lsn::ZERO, 0));
        let task = tokio::spawn(stage(
            Arc::new(Shared(Arc::clone(&sink))),
            rx,
            ack_tx,
            acked_at,
            Arc::clone(&pending),
            RunOptions::default(),
            4,
            usize::MAX,
        ));
        for lsn in [10, 20, 30] {
            tx.send(batch(lsn)).await.unwrap();
        }
        // 30 lands, 20 fails once and is retried after 50 ms; 10 is held by its gate.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(*sink.landed.lock().unwrap(), vec![30, 20]);
        assert_eq!(
            *ack_rx.borrow_and_update(),
            Lsn::ZERO,
            "nothing passes batch 10"
        );
        assert_eq!(pending.load(Ordering::Acquire), 3);

        open_first.send(true).unwrap();
        ack_rx.changed().await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(*sink.landed.lock().unwrap(), vec![30, 20, 10]);
        assert_eq!(*ack_rx.borrow(), Lsn(30));
        assert_eq!(pending.load(Ordering::Acquire), 0);
        drop(tx);
        task.await.unwrap().unwrap();
    }

    /// Over the key bound a batch waits for the ones before it, even with room for more batches;
    /// a batch alone is admitted whatever its size.
    #[tokio::test(start_paused = true)]
    async fn the_keys_in_flight_are_bounded() {
        let (open_first, first_gate) = watch::channel(false);
        let sink = Gate {
            release: Mutex::new([(10, first_gate)].into_iter().collect()),
            fail_once: Mutex::new(vec![]),
            landed: Mutex::new(Vec::new()),
        };
        let (tx, rx) = mpsc::channel(8);
        let (ack_tx, mut ack_rx) = watch::channel(Lsn::ZERO);
        let (acked_at, _) = watch::channel((Lsn::ZERO, 0));
        let sink = Arc::new(sink);
        let task = tokio::spawn(stage(
            Arc::new(Shared(Arc::clone(&sink))),
            rx,
            ack_tx,
            acked_at,
            Arc::new(AtomicUsize::new(3)),
            RunOptions::default(),
            4,
            5,
        ));
        // 3 + 3 keys > 5: batch 20 waits for batch 10 (held by its gate); 6 keys alone pass.
        for (lsn, keys) in [(10, 3), (20, 3), (30, 6)] {
            let mut b = batch(lsn);
            for k in 1..keys {
                b.txns[0]
                    .keys
                    .push(&Arc::from("public.t"), Op::Update, &format!("t:{lsn}:{k}"));
            }
            tx.send(b).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            sink.landed.lock().unwrap().is_empty(),
            "20 started beside 10"
        );
        open_first.send(true).unwrap();
        while *ack_rx.borrow_and_update() != Lsn(30) {
            ack_rx.changed().await.unwrap();
        }
        assert_eq!(*sink.landed.lock().unwrap(), vec![10, 20, 30]);
        drop(tx);
        task.await.unwrap().unwrap();
    }

    /// With one batch in flight, batches are applied one after the other, in order.
    #[tokio::test(start_paused = true)]
    async fn one_in_flight_applies_in_order() {
        let sink = Gate {
            release: Mutex::new(Default::default()),
            fail_once: Mutex::new(vec![10]),
            landed: Mutex::new(Vec::new()),
        };
        let (tx, rx) = mpsc::channel(8);
        let (ack_tx, ack_rx) = watch::channel(Lsn::ZERO);
        for lsn in [10, 20, 30] {
            tx.send(batch(lsn)).await.unwrap();
        }
        drop(tx);
        let pending = Arc::new(AtomicUsize::new(3));
        // The loop returns once the channel is closed and everything in flight is acknowledged.
        let observed = Arc::new(Mutex::new(Vec::new()));
        let options = RunOptions {
            observer: Some({
                let observed = Arc::clone(&observed);
                Arc::new(move |b: &Batch| observed.lock().unwrap().push(b.last_lsn().unwrap().0))
            }),
            ..RunOptions::default()
        };
        let (acked_at, acked_rx) = watch::channel((Lsn::ZERO, 0));
        stage(
            Arc::new(sink),
            rx,
            ack_tx,
            acked_at,
            Arc::clone(&pending),
            options.clone(),
            1,
            usize::MAX,
        )
        .await
        .unwrap();
        assert_eq!(acked_rx.borrow().0, Lsn(30));
        assert_eq!(*observed.lock().unwrap(), vec![10, 20, 30]);
        assert_eq!(*ack_rx.borrow(), Lsn(30));
        assert_eq!(options.status.applied_txns(), 3);
        assert_eq!(pending.load(Ordering::Acquire), 0);
    }

    /// An error the sink calls fatal stops the stage with it, unretried; nothing from that
    /// batch on is acknowledged.
    #[tokio::test(start_paused = true)]
    async fn a_fatal_sink_error_stops_the_stage() {
        struct Refused(Mutex<u32>);
        impl Sink for Refused {
            fn name(&self) -> &'static str {
                "refused"
            }
            async fn apply(&self, batch: &Batch) -> Result<(), cacheclear_protocol::SinkError> {
                *self.0.lock().unwrap() += 1;
                match batch.last_lsn() {
                    Some(Lsn(20)) => Err("WRONGPASS invalid username-password pair".into()),
                    _ => Ok(()),
                }
            }
            fn is_fatal(&self, error: &cacheclear_protocol::SinkError) -> bool {
                error.to_string().starts_with("WRONGPASS")
            }
        }
        let (tx, rx) = mpsc::channel(8);
        let (ack_tx, ack_rx) = watch::channel(Lsn::ZERO);
        for lsn in [10, 20, 30] {
            tx.send(batch(lsn)).await.unwrap();
        }
        let pending = Arc::new(AtomicUsize::new(3));
        let sink = Arc::new(Refused(Mutex::new(0)));
        struct Shared(Arc<Refused>);
        impl Sink for Shared {
            fn name(&self) -> &'static str {
                "refused"
            }
            fn apply(
                &self,
                batch: &Batch,
            ) -> impl Future<Output = Result<(), cacheclear_protocol::SinkError>> + Send
            {
                self.0.apply(batch)
            }
            fn is_fatal(&self, error: &cacheclear_protocol::SinkError) -> bool {
                self.0.is_fatal(error)
            }
        }
        let (acked_at, _acked_rx) = watch::channel((Lsn::ZERO, 0));
        let err = stage(
            Arc::new(Shared(Arc::clone(&sink))),
            rx,
            ack_tx,
            acked_at,
            pending,
            RunOptions::default(),
            1,
            usize::MAX,
        )
        .await
        .expect_err("stops");
        assert_eq!(err.to_string(), "WRONGPASS invalid username-password pair");
        assert_eq!(
            *ack_rx.borrow(),
            Lsn(10),
            "nothing from the refused batch on"
        );
        assert_eq!(
            *sink.0.lock().unwrap(),
            2,
            "the refused batch was not retried"
        );
        drop(tx);
    }
}
