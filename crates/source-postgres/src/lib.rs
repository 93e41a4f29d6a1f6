//! cacheclear's CDC source: streams committed changes from PostgreSQL over logical replication
//! (`pgoutput`), maps rows to cache keys with the rules, and hands committed transactions to a
//! [`Sink`] — confirming each commit's LSN to PostgreSQL only after the sink acknowledged every
//! eviction through it.
//!
//! ```text
//!  walsender ──XLogData──► pgoutput::decode ──► ChangeMapper (relation cache, rules)
//!      ▲                                              │ CommittedTxn (commit order)
//!      │ standby status (flush LSN)                   ▼
//!      └── acked LSN (in order) ◄── Sink::apply × max_batches_in_flight (retry forever)
//!                                     ◄── visibility barrier (merges queued batches)
//! ```
//!
//! Guarantees (design.md §3–4): nothing is confirmed mid-transaction or before the sink's `Ok`;
//! a restart resumes from the slot and re-applies (sinks are idempotent); no transaction's
//! evictions are applied before its xid is visible to a new snapshot; while the sink is down the
//! queue is bounded (about `queue_batches + max_batches_in_flight + 2` batches of up to
//! `max_batch_keys` keys) and the replication stream pauses, its
//! keepalives still answered by the replication worker; when nothing is in flight the keepalive's
//! WAL end is confirmed, and heartbeats keep an idle slot's retained WAL bounded.

pub mod barrier;
pub mod catalog;
pub mod changes;
pub mod config;
pub mod pgoutput;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cacheclear_protocol::{Batch, CommittedTxn, KeyArena, Lsn, Op, Sink, TableEviction};
use cacheclear_rules::Rules;
use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use tokio::sync::{mpsc, watch};

pub use catalog::SlotState;
pub use changes::{ChangeMapper, Mapped};
pub use config::PostgresConfig;

/// Why the source stopped. Every variant names what failed; the CLI restarts the source after
/// transient errors (connection loss) and exits on configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The configuration or the database's setup cannot work; the message says how to fix it.
    #[error("{0}")]
    Config(String),
    /// A rule cannot be served by its table (see `TableRules::check_replica_identity`).
    #[error("{0}")]
    Rule(String),
    /// A query on the regular connection failed.
    #[error("PostgreSQL query failed: {}", describe_pg(.0))]
    Query(#[from] tokio_postgres::Error),
    /// The connection pool failed to hand out a connection.
    #[error("PostgreSQL connection failed: {}", describe_pool(.0))]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The replication connection failed.
    #[error("replication stream failed: {0}")]
    Replication(#[from] pgwire_replication::PgWireError),
    /// A payload did not decode.
    #[error("{0}")]
    Decode(#[from] pgoutput::DecodeError),
    /// The stream was inconsistent.
    #[error("{0}")]
    Map(#[from] changes::MapError),
    /// The visibility barrier failed.
    #[error("{0}")]
    Barrier(#[from] barrier::BarrierError),
    /// The replication stream or the sink task ended unexpectedly (server restart, walsender
    /// terminated, a panicking observer); a restart resumes from the slot.
    #[error("{0}")]
    Ended(String),
}

/// A tokio-postgres error with its cause: its `Display` alone says only "db error" or "error
/// connecting to server"; the server's message (and hint) or the I/O cause is what a user needs.
pub fn describe_pg(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
        if let Some(hint) = db.hint() {
            s.push_str("; hint: ");
            s.push_str(hint);
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

fn describe_pool(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(pg) => describe_pg(pg),
        other => other.to_string(),
    }
}

impl SourceError {
    /// True for errors a restart cannot fix (configuration, rules).
    pub fn is_fatal(&self) -> bool {
        matches!(self, SourceError::Config(_) | SourceError::Rule(_))
    }
}

/// Live figures of a running source, readable from other tasks (the bench, the demo, tests).
#[derive(Debug, Default)]
pub struct SourceStatus {
    confirmed_lsn: AtomicU64,
    applied_keys: AtomicU64,
    applied_txns: AtomicU64,
}

impl SourceStatus {
    /// The highest LSN handed to the server as flushed (commit end LSN or idle keepalive WAL end).
    pub fn confirmed_lsn(&self) -> Lsn {
        Lsn(self.confirmed_lsn.load(Ordering::Acquire))
    }
    /// Cache keys whose eviction the sink acknowledged (table-wide evictions count 0).
    pub fn applied_keys(&self) -> u64 {
        self.applied_keys.load(Ordering::Acquire)
    }
    /// Transactions whose evictions the sink acknowledged.
    pub fn applied_txns(&self) -> u64 {
        self.applied_txns.load(Ordering::Acquire)
    }
}

/// Called after each batch the sink acknowledged, with the batch (the bench measures lag here).
pub type BatchObserver = Arc<dyn Fn(&Batch) + Send + Sync>;

/// Optional hooks of [`run`].
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Shared live figures.
    pub status: Arc<SourceStatus>,
    /// Called after each acknowledged batch.
    pub observer: Option<BatchObserver>,
}

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// A deadpool pool for `url` (regular queries: catalog checks, the visibility barrier, heartbeats).
///
/// # Errors
/// [`SourceError::Config`] when `url` does not parse.
pub fn pool(url: &str, size: usize) -> Result<deadpool_postgres::Pool, SourceError> {
    let pg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| SourceError::Config(format!("postgres.url: {e}")))?;
    let manager = deadpool_postgres::Manager::new(pg, tokio_postgres::NoTls);
    deadpool_postgres::Pool::builder(manager)
        .max_size(size)
        .build()
        .map_err(|e| SourceError::Config(format!("postgres.url: {e}")))
}

fn replication_config(cfg: &PostgresConfig) -> Result<ReplicationConfig, SourceError> {
    use tokio_postgres::config::Host;
    let pg: tokio_postgres::Config = cfg
        .url
        .parse()
        .map_err(|e| SourceError::Config(format!("postgres.url: {e}")))?;
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.to_string_lossy().into_owned(),
        None => "127.0.0.1".to_owned(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let user = pg
        .get_user()
        .map(str::to_owned)
        .ok_or_else(|| SourceError::Config("postgres.url: no user given".into()))?;
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let dbname = pg.get_dbname().unwrap_or(&user).to_owned();
    let mut rc = ReplicationConfig::new(
        host,
        user,
        password,
        dbname,
        cfg.slot.clone(),
        cfg.publication.clone(),
    )
    .with_port(port)
    .with_tls(TlsConfig::disabled())
    .with_start_lsn(pgwire_replication::Lsn::ZERO)
    .with_status_interval(cfg.status_interval())
    .with_wakeup_interval(Duration::from_secs(1))
    .with_buffer_size(1024)
    .with_application_name("cacheclear");
    rc.max_message_size = 256 << 20;
    Ok(rc)
}

fn lsn(l: pgwire_replication::Lsn) -> Lsn {
    Lsn(l.as_u64())
}

/// Runs the source until `shutdown` resolves (then returns `Ok`) or an error stops it.
///
/// Start-up: checks every rule against its table's replica identity, ensures the publication and
/// slot, then streams from the slot's confirmed position. A newly created slot first evicts every
/// rule table's keys (changes before the slot existed were never seen).
///
/// # Errors
/// See [`SourceError`]; [`SourceError::is_fatal`] tells configuration errors from transient ones.
pub async fn run<S: Sink>(
    cfg: &PostgresConfig,
    rules: Arc<Rules>,
    sink: S,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SourceError> {
    cfg.validate().map_err(SourceError::Config)?;
    let pool = pool(&cfg.url, 3)?;
    let slot_state = {
        let client = pool.get().await?;
        catalog::check_rules(&client, &rules).await?;
        catalog::ensure_publication(&client, &cfg.publication, &rules, cfg.create_publication)
            .await?;
        catalog::ensure_slot(&client, &cfg.slot, cfg.create_slot).await?
    };
    let mut repl = ReplicationClient::connect(replication_config(cfg)?).await?;
    tracing::info!(slot = %cfg.slot, publication = %cfg.publication, ?slot_state, "streaming");

    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(cfg.queue_batches);
    let (visible_tx, visible_rx) = mpsc::channel::<Batch>(1);
    let (ack_tx, mut ack_rx) = watch::channel(Lsn::ZERO);
    // Transactions handed to the sink side and not yet acknowledged.
    let pending = Arc::new(AtomicUsize::new(0));
    let barrier_task = tokio::spawn(barrier_loop(
        pool.clone(),
        batch_rx,
        visible_tx,
        cfg.max_batch_keys,
    ));
    let sink_task = tokio::spawn(apply_loop(
        sink,
        visible_rx,
        ack_tx,
        Arc::clone(&pending),
        options.clone(),
        cfg.max_batches_in_flight,
    ));
    let housekeeping = tokio::spawn(housekeeping(pool.clone(), cfg.clone()));
    let _guard = AbortOnDrop(vec![
        barrier_task.abort_handle(),
        sink_task.abort_handle(),
        housekeeping.abort_handle(),
    ]);

    let mut current = Batch::default();
    let mut current_keys = 0usize;
    if let SlotState::Created { at } = slot_state {
        current.txns.push(evict_everything(&rules, at));
    }
    let mut mapper = ChangeMapper::new(Arc::clone(&rules), cfg.max_txn_keys);
    let mut sink_task = sink_task;
    tokio::pin!(shutdown);
    loop {
        let room = current_keys < cfg.max_batch_keys;
        tokio::select! {
            biased;
            () = &mut shutdown => {
                tracing::info!("shutting down; unconfirmed work will be replayed from the slot");
                repl.stop();
                return Ok(());
            }
            ended = &mut sink_task => {
                return Err(SourceError::Ended(format!("the sink task ended unexpectedly: {ended:?}")));
            }
            Ok(()) = ack_rx.changed() => {
                let acked = *ack_rx.borrow_and_update();
                confirm(&repl, &options.status, acked);
            }
            permit = batch_tx.reserve(), if !current.txns.is_empty() => {
                let Ok(permit) = permit else {
                    return Err(SourceError::Ended("the sink task stopped".into()));
                };
                pending.fetch_add(current.txns.len(), Ordering::AcqRel);
                permit.send(std::mem::take(&mut current));
                current_keys = 0;
            }
            event = repl.recv(), if room => {
                let Some(event) = event? else {
                    return Err(SourceError::Ended("the replication stream ended".into()));
                };
                let mapped = match event {
                    ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                        mapper.handle(pgoutput::Message::Begin {
                            final_lsn: lsn(final_lsn),
                            commit_time_us: commit_time_micros.saturating_add(pgoutput::PG_EPOCH_OFFSET_US),
                            xid,
                        })?
                    }
                    ReplicationEvent::Commit { lsn: commit_lsn, end_lsn, commit_time_micros } => {
                        mapper.handle(pgoutput::Message::Commit {
                            commit_lsn: lsn(commit_lsn),
                            end_lsn: lsn(end_lsn),
                            commit_time_us: commit_time_micros.saturating_add(pgoutput::PG_EPOCH_OFFSET_US),
                        })?
                    }
                    ReplicationEvent::XLogData { data, .. } => mapper.handle(pgoutput::decode(&data)?)?,
                    ReplicationEvent::Message { transactional, lsn: at, prefix, content } => {
                        mapper.handle(pgoutput::Message::Message { transactional, lsn: lsn(at), prefix, content })?
                    }
                    ReplicationEvent::KeepAlive { wal_end, .. } => Mapped::Message(lsn(wal_end)),
                    ReplicationEvent::StoppedAt { .. } => {
                        return Err(SourceError::Ended("the replication stream stopped".into()));
                    }
                };
                match mapped {
                    Mapped::Committed(txn) => {
                        current_keys += txn.keys.len().max(1);
                        current.txns.push(txn);
                    }
                    Mapped::Message(at) => {
                        // Idle: nothing open, queued or unacknowledged, so every commit before
                        // `at` has been applied; confirming it lets the slot release WAL.
                        if !mapper.in_transaction() && current.txns.is_empty() && pending.load(Ordering::Acquire) == 0 {
                            confirm(&repl, &options.status, at);
                        }
                    }
                    Mapped::Nothing => {}
                }
            }
        }
    }
}

fn confirm(repl: &ReplicationClient, status: &SourceStatus, at: Lsn) {
    let previous = status.confirmed_lsn.fetch_max(at.0, Ordering::AcqRel);
    if at.0 > previous {
        repl.update_applied_lsn(pgwire_replication::Lsn::from_u64(at.0));
        metrics::gauge!("cacheclear_confirmed_lsn").set(at.0 as f64);
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

struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// The barrier stage: takes every batch the reader has sealed so far (up to `max_keys` keys),
/// merges them into one, waits until all their xids are visible to a new snapshot, and passes
/// the merged batch on. It runs while the sink applies earlier batches, so under load a
/// transaction waits for one snapshot query and one sink round trip, not for a queue of them.
async fn barrier_loop(
    pool: deadpool_postgres::Pool,
    mut sealed: mpsc::Receiver<Batch>,
    visible: mpsc::Sender<Batch>,
    max_keys: usize,
) {
    while let Some(mut batch) = sealed.recv().await {
        let mut keys = batch.key_count();
        while keys < max_keys {
            let Ok(more) = sealed.try_recv() else { break };
            keys += more.key_count();
            batch.txns.extend(more.txns);
        }
        batch.taken_us = now_us();
        // xid 0 (InvalidTransactionId) marks the synthetic eviction of a new slot.
        let xids: Vec<u32> = batch
            .txns
            .iter()
            .filter(|t| t.xid != 0 && (!t.keys.is_empty() || !t.tables.is_empty()))
            .map(|t| t.xid)
            .collect();
        let mut backoff = Duration::from_millis(100);
        loop {
            let barrier = async {
                let client = pool.get().await.map_err(|e| describe_pool(&e))?;
                barrier::wait_visible(&client, &xids)
                    .await
                    .map_err(|e| e.to_string())
            };
            match barrier.await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                        "visibility barrier failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        batch.visible_us = now_us();
        metrics::histogram!("cacheclear_visibility_barrier_ms")
            .record((batch.visible_us - batch.taken_us).max(0) as f64 / 1000.0);
        if visible.send(batch).await.is_err() {
            return;
        }
    }
}

/// The apply stage: applies up to `max_in_flight` visible batches at once, each with retry
/// (forever), and acknowledges them strictly in commit order: a batch's last commit LSN is
/// acknowledged only once it and every batch before it were applied.
async fn apply_loop<S: Sink>(
    sink: S,
    mut batches: mpsc::Receiver<Batch>,
    ack: watch::Sender<Lsn>,
    pending: Arc<AtomicUsize>,
    options: RunOptions,
    max_in_flight: usize,
) {
    let sink = &sink;
    let mut in_flight = futures::stream::FuturesOrdered::new();
    let mut open = true;
    loop {
        tokio::select! {
            batch = batches.recv(), if open && in_flight.len() < max_in_flight => match batch {
                Some(batch) => in_flight.push_back(apply_with_retry(sink, batch)),
                None => open = false,
            },
            Some(batch) = futures::StreamExt::next(&mut in_flight), if !in_flight.is_empty() => {
                acknowledge(&batch, &ack, &options);
                pending.fetch_sub(batch.txns.len(), Ordering::AcqRel);
            }
            else => return,
        }
    }
}

/// Applies `batch`, retrying with backoff (50 ms doubling to 5 s) until the sink says `Ok`.
async fn apply_with_retry<S: Sink>(sink: &S, batch: Batch) -> Batch {
    let name = sink.name();
    let started = std::time::Instant::now();
    let mut backoff = Duration::from_millis(50);
    let mut attempt = 0u64;
    loop {
        match sink.apply(&batch).await {
            Ok(()) => break,
            Err(e) => {
                attempt += 1;
                metrics::counter!("cacheclear_sink_errors_total", "sink" => name).increment(1);
                metrics::counter!("cacheclear_sink_retries_total", "sink" => name).increment(1);
                tracing::warn!(sink = name, attempt, error = %e, retry_in_ms = backoff.as_millis() as u64,
                    "sink failed to apply a batch; retrying (nothing after it is confirmed meanwhile)");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    metrics::histogram!("cacheclear_sink_apply_ms", "sink" => name)
        .record(started.elapsed().as_secs_f64() * 1000.0);
    if attempt > 0 {
        tracing::info!(
            sink = name,
            attempts = attempt + 1,
            "sink recovered; batch applied"
        );
    }
    batch
}

/// Records an applied batch (metrics, status, observer) and acknowledges its last commit LSN.
fn acknowledge(batch: &Batch, ack: &watch::Sender<Lsn>, options: &RunOptions) {
    let now = now_us();
    let keys = batch.key_count() as u64;
    for t in &batch.txns {
        if !t.keys.is_empty() || !t.tables.is_empty() {
            let lag_ms = (now - t.commit_time_us).max(0) as f64 / 1000.0;
            metrics::histogram!("cacheclear_commit_to_applied_lag_ms").record(lag_ms);
        }
    }
    metrics::counter!("cacheclear_invalidations_applied_total").increment(keys);
    metrics::counter!("cacheclear_transactions_applied_total").increment(batch.txns.len() as u64);
    options
        .status
        .applied_keys
        .fetch_add(keys, Ordering::AcqRel);
    options
        .status
        .applied_txns
        .fetch_add(batch.txns.len() as u64, Ordering::AcqRel);
    if let Some(observer) = &options.observer {
        observer(batch);
    }
    if let Some(last) = batch.last_lsn() {
        ack.send_replace(last);
    }
}

/// Heartbeats and the retained-WAL gauge.
async fn housekeeping(pool: deadpool_postgres::Pool, cfg: PostgresConfig) {
    let heartbeat =
        (cfg.heartbeat_interval_ms > 0).then(|| Duration::from_millis(cfg.heartbeat_interval_ms));
    let mut tick = tokio::time::interval(
        heartbeat
            .unwrap_or(Duration::from_secs(5))
            .min(Duration::from_secs(5)),
    );
    let mut last_heartbeat = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let Ok(client) = pool.get().await else {
            continue;
        };
        if let Some(every) = heartbeat
            && last_heartbeat.elapsed() >= every
        {
            last_heartbeat = tokio::time::Instant::now();
            if let Err(e) = client
                .execute(
                    "SELECT pg_logical_emit_message(false, 'cacheclear.heartbeat', '')",
                    &[],
                )
                .await
            {
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
        match client
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::float8 FROM pg_replication_slots WHERE slot_name = $1",
                &[&cfg.slot],
            )
            .await
        {
            Ok(Some(row)) => {
                if let Ok(Some(bytes)) = row.try_get::<_, Option<f64>>(0) {
                    metrics::gauge!("cacheclear_slot_retained_wal_bytes").set(bytes);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "retained WAL query failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        struct Shared(Arc<Gate>);
        impl Sink for Shared {
            fn name(&self) -> &'static str {
                "gate"
            }
            fn apply(
                &self,
                batch: &Batch,
            ) -> impl Future<Output = Result<(), cacheclear_protocol::SinkError>> + Send
            {
                self.0.apply(batch)
            }
        }
        let (tx, rx) = mpsc::channel(8);
        let (ack_tx, mut ack_rx) = watch::channel(Lsn::ZERO);
        let pending = Arc::new(AtomicUsize::new(3));
        let task = tokio::spawn(apply_loop(
            Shared(Arc::clone(&sink)),
            rx,
            ack_tx,
            Arc::clone(&pending),
            RunOptions::default(),
            4,
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
        task.await.unwrap();
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
        apply_loop(sink, rx, ack_tx, Arc::clone(&pending), options.clone(), 1).await;
        assert_eq!(*observed.lock().unwrap(), vec![10, 20, 30]);
        assert_eq!(*ack_rx.borrow(), Lsn(30));
        assert_eq!(options.status.applied_txns(), 3);
        assert_eq!(pending.load(Ordering::Acquire), 0);
    }
}
