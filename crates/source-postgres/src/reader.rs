//! The reader: start-up checks, then the replication stream → `pgoutput` decoder →
//! [`ChangeMapper`] → sealed batches for the barrier stage; it confirms acknowledged LSNs to the
//! server and, when asked to stop, drains what is in flight and confirms it before it leaves.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cacheclear_protocol::{Batch, CommittedTxn, KeyArena, Lsn, Op, Sink, TableEviction, now_us};
use cacheclear_rules::Rules;
use pgwire_replication::{ReplicationClient, ReplicationEvent};
use tokio::sync::{mpsc, watch};

use crate::catalog::{self, SlotState};
use crate::changes::{ChangeMapper, Mapped};
use crate::connect::{self, lsn};
use crate::error::Ended;
use crate::{PostgresConfig, RunOptions, SourceError, SourceStatus, apply, barrier};
use crate::{drift, housekeeping, pgoutput, telemetry, watermark};

/// Connections in the pool: catalog checks, the barrier's snapshot queries (up to
/// [`barrier::BARRIERS_IN_FLIGHT`] at once), heartbeats (the slot lease's connection is taken
/// from it and detached, so it does not count).
const POOL_SIZE: usize = 2 + barrier::BARRIERS_IN_FLIGHT;

/// First key of the slot lease's advisory lock (`pg_try_advisory_lock(LEASE_CLASS,
/// hashtext(slot))`): "cclr".
const LEASE_CLASS: i32 = 0x6363_6c72;

/// How often a standby tries the slot lease: the takeover bound, once PostgreSQL has ended the
/// active process's session.
pub(crate) const STANDBY_POLL: Duration = Duration::from_millis(500);

/// Runs the source until `stop` resolves or an error stops it.
///
/// Start-up: checks every rule against its table's replica identity, ensures the publication and
/// slot, then streams from the slot's confirmed position. A newly created slot first evicts every
/// rule table's keys (changes before the slot existed were never seen). `streaming` is set once
/// the server accepted START_REPLICATION and, for a new slot, that first eviction was
/// acknowledged by the sink.
///
/// When `stop` resolves: no further change is read; the transactions already committed and read
/// are applied, acknowledged and confirmed to the server (bounded by
/// `postgres.shutdown_timeout_ms`); then the replication connection is closed. What was not
/// confirmed is replayed from the slot on the next start.
pub(crate) async fn run<S: Sink>(
    cfg: PostgresConfig,
    rules: Arc<Rules>,
    sink: S,
    options: RunOptions,
    streaming: watch::Sender<bool>,
    stop: impl Future<Output = ()>,
) -> Result<(), SourceError> {
    cfg.validate()?;
    let pool = connect::pool(&cfg.url, POOL_SIZE)?;
    let sink = Arc::new(sink);
    let namespace = cfg.namespace().to_owned();
    tokio::pin!(stop);
    let (slot_state, tables, epoch, origin, lease) = {
        let client = pool.get().await?;
        let tables = catalog::check_rules(&client, &rules, &cfg.publication).await?;
        catalog::ensure_publication(
            &client,
            &cfg.publication,
            &rules,
            &tables,
            cfg.create_publication,
        )
        .await?;
        // One active process per slot; the others wait here, before anything that changes the
        // slot or the namespace's epoch (docs/architecture.md, "Active and standby").
        let Some(lease) = take_slot_lease(&pool, &cfg.slot, stop.as_mut()).await? else {
            return Ok(()); // stopped while standby
        };
        if cfg.failover_slot {
            catalog::check_failover_slot(&client, &cfg.slot).await?;
        }
        let found =
            catalog::ensure_slot(&client, &cfg.slot, cfg.create_slot, cfg.on_slot_lost).await?;
        // Every gap bumps the namespace's epoch *before* anything changes in PostgreSQL: should
        // the bump fail, the slot is still missing or lost at the next start, and the gap with it.
        let origin = catalog::origin(&client).await?;
        let (gap, continuity) = match &found {
            SlotState::Missing | SlotState::Created { lost: false, .. } => {
                (Some("new_slot"), false)
            }
            SlotState::Lost | SlotState::Created { lost: true, .. } => (Some("slot_lost"), false),
            SlotState::Resumed { failover, .. } => (None, *failover),
        };
        let opened = sink
            .open_epoch(&namespace, &origin, gap, continuity)
            .await
            .map_err(|e| {
                if sink.is_fatal(&e) {
                    SourceError::Sink(e)
                } else {
                    SourceError::SinkEpoch(e)
                }
            })?;
        if let Some(opened) = opened.as_ref().filter(|o| o.deferred) {
            tracing::info!(%namespace, open = opened.epoch, gap = opened.bumped.as_deref().unwrap_or("none"), %origin,
                "sent the epoch records to every partition; the invalidators open the epoch (and count any bump)");
        }
        if let Some(opened) = opened.as_ref().filter(|o| !o.deferred) {
            match &opened.bumped {
                Some(reason) => {
                    metrics::counter!(telemetry::EPOCH_BUMPS, "reason" => reason.clone())
                        .increment(1);
                    tracing::warn!(%namespace, epoch = opened.epoch, reason, %origin,
                        "bumped the namespace's epoch: every value cached before is a miss");
                }
                None => {
                    tracing::info!(%namespace, epoch = opened.epoch, %origin, "namespace epoch kept")
                }
            }
        }
        let slot_state = match found {
            SlotState::Missing => {
                catalog::create_slot(&client, &cfg.slot, false, cfg.failover_slot).await?
            }
            SlotState::Lost => {
                catalog::create_slot(&client, &cfg.slot, true, cfg.failover_slot).await?
            }
            other => other,
        };
        (slot_state, tables, opened.map(|o| o.epoch), origin, lease)
    };
    let mut repl = ReplicationClient::connect(connect::replication_config(&cfg)?).await?;
    repl.wait_started().await?;
    tracing::info!(slot = %cfg.slot, publication = %cfg.publication, ?slot_state, "streaming");

    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(cfg.queue_batches);
    let (visible_tx, visible_rx) = mpsc::channel::<Batch>(1);
    let (ack_tx, ack_rx) = watch::channel(Lsn::ZERO);
    let (acked_at_tx, acked_at_rx) = watch::channel((Lsn::ZERO, 0i64));
    // Transactions handed to the barrier and apply stages and not yet acknowledged.
    let pending = Arc::new(AtomicUsize::new(0));
    let barrier_task = tokio::spawn(barrier::stage(
        pool.clone(),
        batch_rx,
        visible_tx,
        cfg.max_batch_keys,
    ));
    let beats = Arc::new(watermark::Heartbeats::default());
    let watermark_task = tokio::spawn({
        let publish = epoch.map(|epoch| {
            watermark::publish(
                Arc::clone(&sink),
                namespace.clone(),
                origin,
                epoch,
                acked_at_rx,
                Arc::clone(&beats),
            )
        });
        async move {
            match publish {
                Some(publish) => publish.await,
                // A sink without epochs keeps no watermark.
                None => std::future::pending().await,
            }
        }
    });
    let heartbeat_task = tokio::spawn({
        let every = (epoch.is_some() && cfg.watermark_interval_ms > 0)
            .then(|| Duration::from_millis(cfg.watermark_interval_ms));
        let (pool, beats) = (pool.clone(), Arc::clone(&beats));
        async move {
            match every {
                Some(every) => watermark::emit(pool, every, beats).await,
                None => std::future::pending().await,
            }
        }
    });
    let apply_task = tokio::spawn(apply::stage(
        sink,
        visible_rx,
        ack_tx,
        acked_at_tx,
        Arc::clone(&pending),
        options.clone(),
        cfg.max_batches_in_flight,
        // Two full batches: a large transaction's parts keep the sink busy, no more.
        cfg.max_batch_keys.saturating_mul(2),
    ));
    let housekeeping = tokio::spawn(housekeeping::run(pool.clone(), cfg.clone()));
    let watch_now = Arc::new(tokio::sync::Notify::new());
    let drift_task = tokio::spawn(drift::watch(
        pool.clone(),
        cfg.clone(),
        Arc::clone(&rules),
        tables,
        Arc::clone(&watch_now),
    ));
    let _guard = AbortOnDrop(vec![
        barrier_task.abort_handle(),
        apply_task.abort_handle(),
        housekeeping.abort_handle(),
        drift_task.abort_handle(),
        watermark_task.abort_handle(),
        heartbeat_task.abort_handle(),
    ]);

    let mut reader = Reader {
        _lease: lease,
        pool: pool.clone(),
        mapper: ChangeMapper::new(Arc::clone(&rules), cfg.max_txn_keys),
        repl,
        status: options.status,
        confirmed: Lsn::ZERO,
        current: Batch::default(),
        current_keys: 0,
        part_keys: cfg.max_batch_keys,
        batch_tx,
        ack_rx,
        pending,
        apply_task,
        drift_task,
        watermark_task,
        watch_now,
        streaming,
        live_at: None,
    };
    match slot_state {
        // Nothing committed before the slot will be seen, so every rule table is evicted as a
        // whole first. With an epoch, the bump above already made every old value a miss in
        // O(1) for clients that read the namespace (`StalenessConfig`); the SCAN stays for the
        // clients that do not, so no configuration leaves them a stale value after a gap.
        SlotState::Created { at, .. } => {
            reader.current.txns.push(evict_everything(&rules, at));
            reader.live_at = Some(at);
        }
        _ => {
            reader.streaming.send_replace(true);
        }
    }
    metrics::counter!(telemetry::TRANSACTION_PARTS).increment(0);
    reader.stream(cfg.max_batch_keys, stop.as_mut()).await?;
    reader.drain(&cfg).await;
    Ok(())
}

/// Takes the slot lease: a session-level advisory lock, `pg_try_advisory_lock(LEASE_CLASS,
/// hashtext(slot))`, on a connection held until the pipeline ends. While another process holds
/// it this process is the **standby**: it says so once at INFO, sets `cacheclear_source_role`,
/// and tries again every [`STANDBY_POLL`]. PostgreSQL releases the lock when the holder's session
/// ends (a clean stop, a crash, `kill -9`: the socket closes), so the standby takes over within
/// one poll of that. Returns `None` when `stop` resolved first.
async fn take_slot_lease(
    pool: &deadpool_postgres::Pool,
    slot: &str,
    mut stop: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<deadpool_postgres::ClientWrapper>, SourceError> {
    let client = pool.get().await?;
    let mut standby_since: Option<std::time::Instant> = None;
    loop {
        let held: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock($1::int4, hashtext($2::text))",
                &[&LEASE_CLASS, &slot],
            )
            .await?
            .try_get(0)?;
        if held {
            telemetry::set_role(true);
            match standby_since {
                Some(since) => tracing::warn!(%slot, standby_for_s = since.elapsed().as_secs(),
                    "taking over: the active process released slot `{slot}`; this one is now active"),
                None => tracing::debug!(%slot, "slot lease taken: active"),
            }
            // Detached from the pool: whenever this run ends, early or late, the connection
            // closes and PostgreSQL releases the lease at once (a pooled connection could outlive
            // the run, holding the lock).
            return Ok(Some(deadpool_postgres::Object::take(client)));
        }
        if standby_since.is_none() {
            telemetry::set_role(false);
            tracing::info!(%slot, poll_ms = STANDBY_POLL.as_millis() as u64,
                "standby: another `cacheclear run` is active on slot `{slot}`; taking over when it stops");
            standby_since = Some(std::time::Instant::now());
        }
        tokio::select! {
            () = stop.as_mut() => return Ok(None),
            () = tokio::time::sleep(STANDBY_POLL) => {}
        }
    }
}

/// The reader's state between start-up and the end of the drain.
struct Reader {
    /// The slot lease's connection ([`take_slot_lease`]): held, never used, until the end.
    _lease: deadpool_postgres::ClientWrapper,
    /// For partition look-ups ([`Reader::resolve_partition`]).
    pool: deadpool_postgres::Pool,
    mapper: ChangeMapper,
    repl: ReplicationClient,
    status: Arc<SourceStatus>,
    /// The highest LSN this connection reported as flushed.
    confirmed: Lsn,
    /// The batch being filled (sealed when the barrier stage has room for it).
    current: Batch,
    current_keys: usize,
    /// An open transaction holding this many keys is handed over as a partial part
    /// (`max_batch_keys`): a large transaction's keys are evicted while the rest of it streams.
    part_keys: usize,
    batch_tx: mpsc::Sender<Batch>,
    ack_rx: watch::Receiver<Lsn>,
    pending: Arc<AtomicUsize>,
    apply_task: tokio::task::JoinHandle<Result<(), cacheclear_protocol::SinkError>>,
    /// The publication watch; it returns only the error that stops the pipeline.
    drift_task: tokio::task::JoinHandle<SourceError>,
    /// The watermark publisher; it returns only the error that stops the pipeline (the
    /// namespace's epoch changed under it).
    watermark_task: tokio::task::JoinHandle<SourceError>,
    /// Wakes the publication watch (a `Relation` message arrived).
    watch_now: Arc<tokio::sync::Notify>,
    streaming: watch::Sender<bool>,
    /// A new slot's first eviction: the stream is live once it is acknowledged.
    live_at: Option<Lsn>,
}

impl Reader {
    /// Reads the stream until `stop` resolves (`Ok`) or something fails.
    async fn stream(
        &mut self,
        max_batch_keys: usize,
        stop: impl Future<Output = ()>,
    ) -> Result<(), SourceError> {
        tokio::pin!(stop);
        loop {
            let room = self.current_keys < max_batch_keys;
            // Handlers only touch fields the branch futures do not borrow; work that needs the
            // whole reader runs after the select.
            let event = tokio::select! {
                biased;
                () = &mut stop => return Ok(()),
                ended = &mut self.apply_task => {
                    return Err(match ended {
                        Ok(Err(e)) => SourceError::Sink(e),
                        Ok(Ok(())) => Ended::Stage { stage: "apply", cause: None }.into(),
                        Err(e) => Ended::Stage { stage: "apply", cause: Some(e) }.into(),
                    });
                }
                stopped = &mut self.watermark_task => {
                    return Err(match stopped {
                        Ok(e) => e,
                        Err(e) => Ended::Stage { stage: "watermark", cause: Some(e) }.into(),
                    });
                }
                stopped = &mut self.drift_task => {
                    return Err(match stopped {
                        Ok(e) => e,
                        Err(e) => Ended::Stage { stage: "publication watch", cause: Some(e) }.into(),
                    });
                }
                Ok(()) = self.ack_rx.changed() => None,
                permit = self.batch_tx.reserve(), if !self.current.txns.is_empty() => {
                    let Ok(permit) = permit else {
                        return Err(Ended::Stage { stage: "barrier", cause: None }.into());
                    };
                    self.pending.fetch_add(self.current.txns.len(), Ordering::AcqRel);
                    permit.send(std::mem::take(&mut self.current));
                    self.current_keys = 0;
                    continue;
                }
                event = self.repl.recv(), if room => {
                    let Some(event) = event? else {
                        return Err(Ended::Stream.into());
                    };
                    Some(event)
                }
            };
            match event {
                Some(event) => self.on_event(event).await?,
                None => self.on_ack(),
            }
        }
    }

    /// Maps one replication event; a committed transaction joins the current batch.
    async fn on_event(&mut self, event: ReplicationEvent) -> Result<(), SourceError> {
        let commit_time = |us: i64| us.saturating_add(pgoutput::PG_EPOCH_OFFSET_US);
        let mapped = match event {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => self.mapper.handle(pgoutput::Message::Begin {
                final_lsn: lsn(final_lsn),
                commit_time_us: commit_time(commit_time_micros),
                xid,
            })?,
            ReplicationEvent::Commit {
                lsn: commit_lsn,
                end_lsn,
                commit_time_micros,
            } => self.mapper.handle(pgoutput::Message::Commit {
                commit_lsn: lsn(commit_lsn),
                end_lsn: lsn(end_lsn),
                commit_time_us: commit_time(commit_time_micros),
            })?,
            ReplicationEvent::XLogData { data, .. } => {
                let message = pgoutput::decode(&data)?;
                if let pgoutput::Message::Relation(relation) = &message {
                    self.resolve_partition(relation).await?;
                }
                self.mapper.handle(message)?
            }
            ReplicationEvent::Message {
                transactional,
                lsn: at,
                prefix,
                content,
            } => self.mapper.handle(pgoutput::Message::Message {
                transactional,
                lsn: lsn(at),
                prefix,
                content,
            })?,
            ReplicationEvent::KeepAlive { wal_end, .. } => Mapped::Message(lsn(wal_end)),
            ReplicationEvent::StoppedAt { .. } => return Err(Ended::StoppedAt.into()),
        };
        match mapped {
            Mapped::Committed(txn) => {
                self.current_keys += txn.keys.len().max(1);
                self.current.txns.push(txn);
            }
            Mapped::Message(at) => {
                // Idle: nothing open, queued or unacknowledged, so every commit before `at` has
                // been applied; confirming it lets the slot release WAL.
                if !self.mapper.in_transaction()
                    && self.current.txns.is_empty()
                    && self.pending.load(Ordering::Acquire) == 0
                {
                    self.confirm(at);
                }
            }
            Mapped::Relation => self.watch_now.notify_one(),
            Mapped::Nothing => {
                // pgoutput sends a transaction only after its commit, so its keys may go to the
                // barrier (which waits for the commit to be visible) and the sink before the
                // rest of it arrives; nothing is confirmed before its last part is acknowledged.
                if let Some(part) = self.mapper.take_part(self.part_keys) {
                    metrics::counter!(telemetry::TRANSACTION_PARTS).increment(1);
                    self.current_keys += part.keys.len();
                    self.current.txns.push(part);
                }
            }
        }
        Ok(())
    }

    /// A relation no rule names may be a partition of a partitioned rule table (partitions are
    /// published under their own names: `publish_via_partition_root = false`). Looks up its
    /// partition root once, when its `Relation` message arrives; partitions attached or created
    /// while running are found the same way.
    async fn resolve_partition(
        &mut self,
        relation: &pgoutput::Relation,
    ) -> Result<(), SourceError> {
        if self.mapper.has_rule(&relation.namespace, &relation.name) {
            return Ok(());
        }
        let client = self.pool.get().await?;
        let root = client
            .query_opt(
                "SELECT n.nspname::text, c.relname::text
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.oid = pg_partition_root($1::oid) AND c.oid <> $1::oid",
                &[&relation.oid],
            )
            .await?;
        if let Some(root) = root {
            let (schema, table): (String, String) = (root.try_get(0)?, root.try_get(1)?);
            if self.mapper.has_rule(&schema, &table) {
                tracing::info!(
                    partition = %format!("{}.{}", relation.namespace, relation.name),
                    table = %format!("{schema}.{table}"),
                    "partition of a rule table: its rows evict the rule's keys"
                );
                self.mapper.set_partition_root(relation.oid, schema, table);
            }
        }
        Ok(())
    }

    /// The apply stage acknowledged up to a new LSN.
    fn on_ack(&mut self) {
        let acked = *self.ack_rx.borrow_and_update();
        self.confirm(acked);
        if self.live_at.is_some_and(|at| acked >= at) {
            self.live_at = None;
            self.streaming.send_replace(true);
        }
    }

    /// Reports `at` as flushed (when it moves this connection's position forward).
    fn confirm(&mut self, at: Lsn) {
        if at > self.confirmed {
            self.confirmed = at;
            self.repl
                .update_applied_lsn(pgwire_replication::Lsn::from_u64(at.0));
        }
        if self.status.raise_confirmed(at) {
            metrics::gauge!(telemetry::CONFIRMED_LSN).set(at.0 as f64);
        }
    }

    /// The graceful end: hands the open batch over, waits until every transaction handed over
    /// was acknowledged and confirmed, sees the confirmed LSN reported to the server, and closes
    /// the stream. Bounded by `shutdown_timeout_ms`; what is left is replayed on the next start.
    async fn drain(mut self, cfg: &PostgresConfig) {
        let deadline = tokio::time::Instant::now() + cfg.shutdown_timeout();
        let drained = tokio::time::timeout_at(deadline, self.drain_batches())
            .await
            .unwrap_or(false);
        // The replication worker sends the position at its next status interval.
        let reported = tokio::time::timeout_at(deadline, async {
            let metrics = self.repl.metrics();
            while metrics.last_applied_lsn().as_u64() < self.confirmed.0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .is_ok();
        let left = self.pending.load(Ordering::Acquire) + self.current.txns.len();
        if drained && reported && self.mapper.in_transaction() {
            tracing::info!(confirmed = %self.confirmed,
                "stopped in the middle of a transaction: the parts of it read so far were applied, its commit is not confirmed, and it is replayed whole on the next start");
        } else if drained && reported {
            tracing::info!(confirmed = %self.confirmed, "stopped; every transaction read was applied and confirmed");
        } else {
            tracing::warn!(confirmed = %self.confirmed, unconfirmed_transactions = left,
                "stopped before everything read was confirmed (postgres.shutdown_timeout_ms); the rest is replayed from the slot on the next start");
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.repl.shutdown()).await;
    }

    /// Hands the open batch to the barrier stage and waits for every acknowledgement; false when
    /// a stage ended first.
    async fn drain_batches(&mut self) -> bool {
        while !self.current.txns.is_empty() {
            let acked = tokio::select! {
                biased;
                changed = self.ack_rx.changed() => match changed {
                    Ok(()) => true,
                    Err(_) => return false,
                },
                permit = self.batch_tx.reserve() => {
                    let Ok(permit) = permit else { return false };
                    self.pending.fetch_add(self.current.txns.len(), Ordering::AcqRel);
                    permit.send(std::mem::take(&mut self.current));
                    false
                }
            };
            if acked {
                self.on_ack();
            }
        }
        while self.pending.load(Ordering::Acquire) > 0 {
            if self.ack_rx.changed().await.is_err() {
                return false;
            }
            self.on_ack();
        }
        true
    }
}

/// The synthetic first transaction of a new slot: every rule table, evicted as a whole.
fn evict_everything(rules: &Rules, at: Lsn) -> CommittedTxn {
    CommittedTxn {
        xid: 0,
        commit_lsn: at,
        commit_time_us: now_us(),
        received_us: now_us(),
        keys: KeyArena::default(),
        partial: false,
        tables: rules
            .tables()
            .map(|t| TableEviction {
                table: Arc::from(t.qualified()),
                op: Op::Truncate,
                patterns: t.scan_patterns(),
            })
            .collect(),
    }
}

/// Aborts the stage tasks when the reader returns, whichever way.
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}
