//! [`Pipeline`]: the source's lifecycle handle — spawn, know when the stream is live, stop with a
//! final confirm. (The shape follows supabase/etl's `Pipeline`: start / wait / shutdown-and-wait.)

use std::sync::Arc;

use cacheclear_protocol::Sink;
use cacheclear_rules::Rules;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::error::Ended;
use crate::{PostgresConfig, RunOptions, SourceError, SourceStatus, reader};

/// A running CDC source: PostgreSQL logical replication → rules → `sink`, on a task of its own.
///
/// ```no_run
/// # async fn example(sink: impl cacheclear_protocol::Sink) -> Result<(), cacheclear_source_postgres::SourceError> {
/// use std::sync::Arc;
/// use cacheclear_source_postgres::{Pipeline, PostgresConfig, RunOptions};
/// let rules = Arc::new(cacheclear_rules::Rules::compile(&[]).expect("rules"));
/// let mut pipeline = Pipeline::spawn(
///     PostgresConfig::new("postgres://postgres@127.0.0.1:5432/shop"),
///     rules,
///     sink,
///     RunOptions::default(),
/// );
/// pipeline.streaming().await?; // live: every commit from now on is evicted
/// // ...
/// pipeline.stop().await?; // applies and confirms what was read, then closes the stream
/// # Ok(()) }
/// ```
///
/// Dropping the handle without [`Pipeline::stop`] aborts the task: nothing unconfirmed is lost
/// (the slot replays it on the next start), but nothing more is confirmed either.
#[derive(Debug)]
pub struct Pipeline {
    status: Arc<SourceStatus>,
    streaming: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), SourceError>>>,
}

impl Pipeline {
    /// Spawns the source on the current tokio runtime. Start-up (rule checks against the
    /// tables' replica identity, publication, slot) runs on the task: its errors come from
    /// [`Pipeline::streaming`], [`Pipeline::wait`] or [`Pipeline::stop`].
    ///
    /// A newly created slot first evicts every rule table's keys as a whole (changes committed
    /// before it existed were never seen).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn spawn<S: Sink>(
        cfg: PostgresConfig,
        rules: Arc<Rules>,
        sink: S,
        options: RunOptions,
    ) -> Pipeline {
        let (streaming_tx, streaming) = watch::channel(false);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let status = Arc::clone(&options.status);
        let task = tokio::spawn(reader::run(
            cfg,
            rules,
            sink,
            options,
            streaming_tx,
            async {
                // A dropped sender (the handle dropped) also stops; the task is aborted then anyway.
                let _ = stop_rx.await;
            },
        ));
        Pipeline {
            status,
            streaming,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    /// The source's live figures (shared with [`RunOptions::status`]).
    pub fn status(&self) -> &Arc<SourceStatus> {
        &self.status
    }

    /// True when the pipeline's task has ended (by an error, or its result was already taken).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// True once the stream is live (see [`Pipeline::streaming`]).
    pub fn is_streaming(&self) -> bool {
        *self.streaming.borrow()
    }

    /// Resolves when the stream is live: the server accepted START_REPLICATION on the slot and,
    /// when the slot was created now, its table-wide eviction was acknowledged by the sink. From
    /// then on, every commit is evicted; whatever the slot's history, this is the moment a test,
    /// the bench or the demo may start writing.
    ///
    /// # Errors
    /// The pipeline stopped first: its error (a fatal configuration error, a connection
    /// failure). It is then not returned again by [`Pipeline::wait`] or [`Pipeline::stop`].
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future loses nothing.
    pub async fn streaming(&mut self) -> Result<(), SourceError> {
        let Some(task) = self.task.as_mut() else {
            return Err(Ended::AlreadyReported.into());
        };
        let finished = tokio::select! {
            live = self.streaming.wait_for(|live| *live) => {
                // Err: the task dropped its sender, so it ended; its result is taken below.
                if live.is_ok() {
                    return Ok(());
                }
                None
            }
            ended = &mut *task => Some(ended),
        };
        let ended = match finished {
            Some(ended) => ended,
            None => task.await,
        };
        self.task = None;
        match joined(ended) {
            Ok(()) => Err(Ended::Stream.into()),
            Err(e) => Err(e),
        }
    }

    /// Waits until the pipeline ends by itself, which it only does on an error (it runs until
    /// stopped otherwise); `Ok` if [`Pipeline::streaming`] already returned its error.
    ///
    /// # Errors
    /// Why it stopped; [`SourceError::is_fatal`] tells whether a restart can help.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future loses nothing, and `wait` or `stop` may follow.
    pub async fn wait(&mut self) -> Result<(), SourceError> {
        let Some(task) = self.task.as_mut() else {
            return Ok(());
        };
        let ended = task.await;
        self.task = None;
        joined(ended)
    }

    /// Stops the pipeline and waits for it: no further change is read, the transactions already
    /// read are applied and their commit LSNs confirmed to the server (within
    /// `postgres.shutdown_timeout_ms`; what is left is replayed from the slot on the next
    /// start), then the replication connection closes.
    ///
    /// # Errors
    /// The error that stopped the pipeline before it was asked to stop, if any.
    pub async fn stop(mut self) -> Result<(), SourceError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.wait().await
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn joined(
    ended: Result<Result<(), SourceError>, tokio::task::JoinError>,
) -> Result<(), SourceError> {
    ended.unwrap_or_else(|e| Err(Ended::Task(e).into()))
}
