//! The pipeline of `bench pipeline` in a child process of its own (`cacheclear bench
//! pipeline-child`, hidden), so that its memory can be read apart from the load generator's and
//! the floor consumer's: the parent reads the child's `VmHWM` / `VmRSS` from
//! `/proc/<pid>/status` (the kernel's own accounting of resident pages, file-backed ones such as
//! the binary's text included).
//!
//! The child runs the CDC source (PostgreSQL → rules → Redis) and the same batch observer the
//! in-process bench had; the parent drives it over stdin/stdout, one line per request and one
//! JSON line per reply:
//! - `record`: forget the steady-phase histograms and start recording; reply `null`;
//! - `figures`: stop recording; reply the phase's [`StageFigures`];
//! - `applied`: reply the count of transactions applied so far;
//! - `bulk`: reply the bulk transaction's [`BulkTimes`], or `null` before it is applied;
//! - `stop`: stop the pipeline (what it read is applied and confirmed); reply `null`; exit.
//!
//! The child prints `"ready"` (a JSON string) once the pipeline streams. URLs come through the
//! environment (`CACHECLEAR_BENCH_CHILD_POSTGRES_URL`, `CACHECLEAR_BENCH_CHILD_REDIS_URL`), not
//! the command line, so that a password is not shown in `ps`.
//!
//! Profiling hooks (environment of the parent, both optional):
//! - `CACHECLEAR_BENCH_PIPELINE_WRAPPER`: a command (split on whitespace) the child is started
//!   under, e.g. `valgrind --tool=callgrind --collect-atstart=no --callgrind-out-file=/tmp/cg.out`;
//! - `CACHECLEAR_BENCH_BULK_PROFILER`: a shell command (`sh -c`) started just before the bulk
//!   UPDATE with `{pid}` replaced by the child's pid, sent SIGINT once the bulk is applied and
//!   waited for, e.g. `perf record -g -p {pid} -o /tmp/bulk.perf` or
//!   `callgrind_control -i on {pid}`.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use cacheclear_protocol::{Batch, now_us};
use cacheclear_sink_redis::{RedisConfig, RedisSink};
use cacheclear_source_postgres::{PostgresConfig, RunOptions};
use clap::Args;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::stages::{SourceStages, StageFigures};
use super::{SourceOnOwnRuntime, bench_rules};

const PG_ENV: &str = "CACHECLEAR_BENCH_CHILD_POSTGRES_URL";
const REDIS_ENV: &str = "CACHECLEAR_BENCH_CHILD_REDIS_URL";

/// Options of the hidden `bench pipeline-child` (started by `bench pipeline`, not by hand).
#[derive(Args)]
pub struct ChildArgs {
    /// A transaction with at least this many keys is the bulk one.
    #[arg(long)]
    bulk_rows: u64,
}

/// When the bulk transaction passed each stage, µs since the Unix epoch (PostgreSQL's commit
/// timestamp, then this machine's clock, as for the steady phases).
#[derive(Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(super) struct BulkTimes {
    /// Its keys.
    pub keys: u64,
    /// Its commit timestamp.
    pub commit_us: i64,
    /// Its Commit message received by the source (the whole transaction streamed and decoded).
    pub received_us: i64,
    /// Its batch passed the visibility barrier.
    pub visible_us: i64,
    /// Redis acknowledged its last eviction.
    pub applied_us: i64,
}

/// Lag per row, recorded by the pipeline's batch observer.
struct Recorder {
    stages: SourceStages,
    /// A transaction with at least this many keys is the bulk one.
    bulk_threshold: u64,
    bulk: Option<BulkTimes>,
    recording: bool,
    /// Keys of the partial parts seen so far, by xid.
    parts: std::collections::HashMap<u32, u64>,
}

/// `cacheclear bench pipeline-child`: the pipeline, driven over stdin/stdout (module docs).
pub(super) async fn pipeline_child(args: ChildArgs) -> anyhow::Result<()> {
    let pg_url = std::env::var(PG_ENV).with_context(|| format!("{PG_ENV} is not set"))?;
    let redis_url = std::env::var(REDIS_ENV).with_context(|| format!("{REDIS_ENV} is not set"))?;
    let rules = Arc::new(bench_rules()?);
    let mut pg_cfg = PostgresConfig::new(pg_url);
    pg_cfg.slot = "cacheclear_bench".into();
    pg_cfg.publication = "cacheclear_bench".into();
    pg_cfg.status_interval_ms = 200;
    let recorder = Arc::new(Mutex::new(Recorder {
        stages: SourceStages::new()?,
        bulk_threshold: args.bulk_rows,
        bulk: None,
        recording: false,
        parts: std::collections::HashMap::new(),
    }));
    let observer = {
        let recorder = Arc::clone(&recorder);
        Arc::new(move |batch: &Batch| {
            let applied = now_us();
            let Ok(mut r) = recorder.lock() else { return };
            for t in &batch.txns {
                // A large transaction arrives in partial parts, then its last part.
                if t.partial {
                    *r.parts.entry(t.xid).or_default() += t.keys.len() as u64;
                    continue;
                }
                let keys = t.keys.len() as u64 + r.parts.remove(&t.xid).unwrap_or(0);
                if keys >= r.bulk_threshold {
                    r.bulk = Some(BulkTimes {
                        keys,
                        commit_us: t.commit_time_us,
                        received_us: t.received_us,
                        visible_us: batch.visible_us,
                        applied_us: applied,
                    });
                } else if r.recording && keys > 0 {
                    r.stages.record(batch, t, applied);
                }
            }
        })
    };
    let options = RunOptions {
        observer: Some(observer),
        ..RunOptions::default()
    };
    let status = Arc::clone(&options.status);
    let redis_cfg = RedisConfig::new(redis_url);
    let source = SourceOnOwnRuntime::start(
        pg_cfg,
        rules,
        move || Ok(RedisSink::connect(redis_cfg)?),
        options,
    )
    .await?;
    let mut out = tokio::io::stdout();
    reply(&mut out, serde_json::json!("ready")).await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let lock = || {
            recorder
                .lock()
                .map_err(|_| anyhow::anyhow!("recorder poisoned"))
        };
        let value = match line.trim() {
            "record" => {
                let mut r = lock()?;
                r.stages.reset();
                r.recording = true;
                serde_json::Value::Null
            }
            "figures" => {
                let mut r = lock()?;
                r.recording = false;
                serde_json::to_value(r.stages.figures())?
            }
            "applied" => serde_json::json!(status.applied_txns()),
            "bulk" => serde_json::to_value(lock()?.bulk)?,
            "stop" => {
                source.stop().await?;
                reply(&mut out, serde_json::Value::Null).await?;
                return Ok(());
            }
            other => bail!("pipeline-child: unknown request {other:?}"),
        };
        if source.is_finished() {
            match source.stop().await {
                Ok(()) => bail!("pipeline-child: the pipeline stopped"),
                Err(e) => bail!("pipeline-child: the pipeline stopped: {e:#}"),
            }
        }
        reply(&mut out, value).await?;
    }
    // The parent went away without `stop`.
    source.stop().await
}

/// Writes one reply line.
async fn reply(out: &mut tokio::io::Stdout, v: serde_json::Value) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(&v)?;
    line.push(b'\n');
    out.write_all(&line).await?;
    out.flush().await?;
    Ok(())
}

/// The parent's handle on a `bench pipeline-child` process (killed when dropped).
pub(super) struct PipelineChild {
    child: Child,
    stdin: ChildStdin,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
    /// The child's pid (that of the wrapper, if any: `valgrind` runs its tool in that process).
    pub(super) pid: u32,
}

impl PipelineChild {
    /// Starts the child (under `CACHECLEAR_BENCH_PIPELINE_WRAPPER`, if set) and waits until its
    /// pipeline streams.
    ///
    /// # Errors
    /// The executable could not be found or started, or the child exited or did not stream
    /// within 600 s (a wrapper such as valgrind is slow to start).
    pub(super) async fn start(
        pg_url: &str,
        redis_url: &str,
        bulk_rows: u64,
    ) -> anyhow::Result<PipelineChild> {
        let exe = std::env::current_exe().context("locating this executable")?;
        let wrapper = std::env::var("CACHECLEAR_BENCH_PIPELINE_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut cmd = match words.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(words).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(["bench", "pipeline-child", "--bulk-rows"])
            .arg(bulk_rows.to_string())
            .env(PG_ENV, pg_url)
            .env(REDIS_ENV, redis_url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} bench pipeline-child", exe.display()))?;
        let pid = child.id().context("the pipeline child exited at once")?;
        let stdin = child.stdin.take().context("the child's stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("the child's stdout")?).lines();
        let mut this = PipelineChild {
            child,
            stdin,
            stdout,
            pid,
        };
        let ready = tokio::time::timeout(Duration::from_secs(600), this.read())
            .await
            .context("the pipeline child did not stream within 600 s")??;
        if ready != serde_json::json!("ready") {
            bail!("the pipeline child said {ready} instead of \"ready\"");
        }
        Ok(this)
    }

    async fn read(&mut self) -> anyhow::Result<serde_json::Value> {
        match self.stdout.next_line().await? {
            Some(line) => serde_json::from_str(&line)
                .with_context(|| format!("the pipeline child's reply {line:?}")),
            None => {
                // Its output closed: it is exiting; give it a moment to be reaped.
                let status = tokio::time::timeout(Duration::from_secs(2), self.child.wait())
                    .await
                    .ok()
                    .and_then(Result::ok);
                match status {
                    Some(status) => bail!("the pipeline child exited with {status}"),
                    None => bail!("the pipeline child closed its output"),
                }
            }
        }
    }

    /// Sends one request (module docs) and returns the reply.
    ///
    /// # Errors
    /// The child exited, or its reply is not JSON.
    pub(super) async fn ask(&mut self, request: &str) -> anyhow::Result<serde_json::Value> {
        self.stdin
            .write_all(format!("{request}\n").as_bytes())
            .await
            .context("writing to the pipeline child")?;
        self.stdin.flush().await?;
        self.read().await
    }

    /// `record`: starts a steady phase's recording.
    pub(super) async fn record(&mut self) -> anyhow::Result<()> {
        self.ask("record").await.map(drop)
    }

    /// `figures`: ends a steady phase's recording and returns its figures.
    pub(super) async fn figures(&mut self) -> anyhow::Result<StageFigures> {
        Ok(serde_json::from_value(self.ask("figures").await?)?)
    }

    /// `applied`: transactions applied so far.
    pub(super) async fn applied_txns(&mut self) -> anyhow::Result<u64> {
        Ok(serde_json::from_value(self.ask("applied").await?)?)
    }

    /// `bulk`: the bulk transaction's stage times, once applied.
    pub(super) async fn bulk(&mut self) -> anyhow::Result<Option<BulkTimes>> {
        Ok(serde_json::from_value(self.ask("bulk").await?)?)
    }

    /// `VmHWM` (peak resident set) and `VmRSS` (resident now) of the child, MB (10^6 bytes),
    /// from `/proc/<pid>/status`.
    ///
    /// # Errors
    /// The file cannot be read (the child exited) or lacks the fields.
    pub(super) fn rss_mb(&self) -> anyhow::Result<(f64, f64)> {
        let path = format!("/proc/{}/status", self.pid);
        Ok((
            super::status_mb(&path, "VmHWM:")?,
            super::status_mb(&path, "VmRSS:")?,
        ))
    }

    /// `RssAnon` of the child now (heap and stacks, without the executable's mapped pages), MB
    /// (10^6 bytes), from `/proc/<pid>/status`.
    ///
    /// # Errors
    /// The file cannot be read (the child exited) or lacks the field.
    pub(super) fn anon_mb(&self) -> anyhow::Result<f64> {
        super::status_mb(&format!("/proc/{}/status", self.pid), "RssAnon:")
    }

    /// `stop`: stops the pipeline, then waits for the child to exit.
    ///
    /// # Errors
    /// The pipeline had stopped with an error, or the child exited unsuccessfully.
    pub(super) async fn stop(mut self) -> anyhow::Result<()> {
        self.ask("stop").await?;
        drop(self.stdin);
        let status = self.child.wait().await?;
        if !status.success() {
            bail!("the pipeline child exited with {status}");
        }
        Ok(())
    }
}

/// A profiler attached to the child for the bulk phase (`CACHECLEAR_BENCH_BULK_PROFILER`).
pub(super) struct BulkProfiler(Option<Child>);

impl BulkProfiler {
    /// Starts `CACHECLEAR_BENCH_BULK_PROFILER` (if set) for `pid`, and gives it 1 s to attach.
    ///
    /// # Errors
    /// `sh` could not be started.
    pub(super) async fn start(pid: u32) -> anyhow::Result<BulkProfiler> {
        let Ok(cmd) = std::env::var("CACHECLEAR_BENCH_BULK_PROFILER") else {
            return Ok(BulkProfiler(None));
        };
        let child = Command::new("sh")
            .arg("-c")
            .arg(cmd.replace("{pid}", &pid.to_string()))
            // Its output must not mix with the figures (`--json` prints them on stdout).
            .stdout(Stdio::from(std::io::stderr()))
            .kill_on_drop(true)
            .spawn()
            .context("starting CACHECLEAR_BENCH_BULK_PROFILER")?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(BulkProfiler(Some(child)))
    }

    /// Sends SIGINT to the profiler's process group leader (if still running) and waits for it.
    ///
    /// # Errors
    /// `kill` could not be run.
    pub(super) async fn finish(self) -> anyhow::Result<()> {
        let Some(mut child) = self.0 else {
            return Ok(());
        };
        if child.try_wait()?.is_none() {
            if let Some(pid) = child.id() {
                // `sh -c CMD` with one command execs it: the pid is the profiler's.
                Command::new("kill")
                    .args(["-INT", &pid.to_string()])
                    .status()
                    .await?;
            }
            let _ = tokio::time::timeout(Duration::from_secs(120), child.wait()).await;
        }
        Ok(())
    }
}
