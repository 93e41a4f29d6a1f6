//! `--fault`: a part of cacheclear that fails at the sale-end commit, and the staleness breaker
//! bounding what shoppers see while it does (docs/architecture.md, "The staleness breaker").
//!
//! - `pipeline-stop`: the invalidation pipeline is stopped (its task aborted, as by a crash)
//!   right before the sale-end transaction runs, and stays down for the rest of the run. No
//!   eviction of the sale prices ever arrives; the watermark stops moving.
//! - `slot-lost`: the same stop, then the slot is lost across the sale-end commit
//!   (`max_slot_wal_keep_size` lowered to 1 MB and WAL churned until `wal_status = lost`, then
//!   reset), then the pipeline restarts: `postgres.on_slot_lost = "flush_and_recreate"` bumps
//!   the namespace's epoch, drops and recreates the slot and streams on. The sale-end
//!   transaction's changes are never seen by any pipeline.
//!
//! Only the cacheclear run has a pipeline; ttl-only runs the same scenario unchanged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::oneshot;

use super::catalog;
use super::scenario::{Clock, DemoPipeline, LagRecorder, Settings};

/// What fails at the sale-end commit (`cacheclear demo --fault`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Nothing: every part stays up.
    #[default]
    None,
    /// The pipeline is stopped right before the sale-end transaction and stays down.
    PipelineStop,
    /// The pipeline is stopped, the slot is lost across the sale-end commit, the pipeline
    /// restarts (epoch bump, new slot).
    SlotLost,
}

impl Fault {
    /// The name used on the command line and in the JSON (`scenario.fault`).
    pub fn label(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::PipelineStop => "pipeline-stop",
            Fault::SlotLost => "slot-lost",
        }
    }
}

/// Asked by the sale-end thread right before its transaction: the driver answers on the inner
/// sender once the pipeline is down.
pub(super) type StopRequest = oneshot::Sender<()>;

/// When the pipeline went down and came back, by the run's clock.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct FaultTimes {
    /// The pipeline was stopped (before the sale-end transaction began).
    pub stopped: Option<Instant>,
    /// The restarted pipeline streams again (`slot-lost`).
    pub resumed: Option<Instant>,
}

/// Runs `fault` against `pipeline`: waits for the sale-end thread's request, takes the pipeline
/// down, answers, and for `slot-lost` loses the slot once the sale-end commit was sent and restarts the pipeline with the same lag recorder. Returns the
/// pipeline still running at the end (to be stopped by the caller), if any.
///
/// # Errors
/// The restarted pipeline did not stream within 30 s, or a statement losing the slot failed.
pub(super) async fn drive(
    fault: Fault,
    settings: Arc<Settings>,
    pipeline: DemoPipeline,
    requests: oneshot::Receiver<StopRequest>,
    clock: Arc<Clock>,
    sale_xid: Arc<AtomicU64>,
    recorder: Arc<std::sync::Mutex<LagRecorder>>,
) -> anyhow::Result<(Option<DemoPipeline>, FaultTimes)> {
    let mut times = FaultTimes::default();
    if fault == Fault::None {
        return Ok((Some(pipeline), times));
    }
    let Ok(done) = requests.await else {
        // The sale-end thread failed before asking: its error is reported by the run.
        return Ok((Some(pipeline), times));
    };
    // Aborted, as by a crash: nothing read after the last acknowledged batch is applied.
    drop(pipeline);
    times.stopped = Some(Instant::now());
    let _ = done.send(());
    if fault == Fault::PipelineStop {
        return Ok((None, times));
    }

    while clock.commit_sent.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let db = cacheclear_pg_tls::connect(&settings.pg_url, "--postgres-url").await?;
    lose_slot(&db).await?;
    let restarted = DemoPipeline::start(&settings, sale_xid, recorder)
        .await
        .context("restarting the pipeline after the slot was lost")?;
    times.resumed = Some(Instant::now());
    Ok((Some(restarted), times))
}

/// Lowers `max_slot_wal_keep_size` to 1 MB, writes and switches WAL segments and checkpoints
/// until the demo's slot shows `wal_status = lost` (at most 60 s), then resets the setting.
async fn lose_slot(db: &tokio_postgres::Client) -> anyhow::Result<()> {
    // Two calls: ALTER SYSTEM cannot run inside the implicit transaction of a multi-statement
    // query.
    set_max_slot_wal_keep_size(db, "'1MB'")
        .await
        .context("--fault slot-lost: lowering max_slot_wal_keep_size")?;
    let started = Instant::now();
    let lost = loop {
        db.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {schema}.wal_churn (x text);
             INSERT INTO {schema}.wal_churn SELECT repeat('x', 1000) FROM generate_series(1, 2000);
             TRUNCATE {schema}.wal_churn;
             SELECT pg_switch_wal();
             CHECKPOINT;",
            schema = catalog::SCHEMA
        ))
        .await
        .context("--fault slot-lost: churning WAL")?;
        let status: Option<String> = db
            .query_opt(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&catalog::SLOT],
            )
            .await
            .context("--fault slot-lost: reading pg_replication_slots")?
            .and_then(|row| row.get(0));
        if status.as_deref() == Some("lost") {
            break true;
        }
        if started.elapsed() > Duration::from_secs(60) {
            break false;
        }
    };
    set_max_slot_wal_keep_size(db, "DEFAULT")
        .await
        .context("--fault slot-lost: resetting max_slot_wal_keep_size")?;
    anyhow::ensure!(
        lost,
        "--fault slot-lost: the slot `{}` was not lost after 60 s of WAL churn",
        catalog::SLOT
    );
    Ok(())
}

/// `ALTER SYSTEM SET max_slot_wal_keep_size = {value}`, then a configuration reload.
async fn set_max_slot_wal_keep_size(
    db: &tokio_postgres::Client,
    value: &str,
) -> Result<(), tokio_postgres::Error> {
    db.batch_execute(&format!(
        "ALTER SYSTEM SET max_slot_wal_keep_size = {value}"
    ))
    .await?;
    db.batch_execute("SELECT pg_reload_conf()").await
}
