//! The lifecycle every throwaway server shares (PostgreSQL, Redis, the Kafka broker): a temp dir
//! with the server log, a child process on a loopback port, started and probed until ready with
//! backoff, given up on after the startup timeout, stopped with a port reservation kept, started
//! again on the same port, and killed and deleted on drop.
//!
//! [`ServerProcess`] holds that state; a server type implements [`Server`] (its command line and
//! its readiness probe) and gets [`Server::launch`] and [`Server::relaunch`].

use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::HarnessError;
use crate::process::{
    self, PortReservation, file_len, kill_on_parent_exit, spawn_error, spawn_tied_to_process,
    status_text, tail,
};

/// Lines of the server log quoted in error messages.
pub(crate) const LOG_TAIL_LINES: usize = 30;

/// The advice of a [`HarnessError::PortInUse`] for a fresh port that was taken meanwhile.
const TAKEN_HINT: &str = "Parallel tests or other programs keep taking the free ports we pick; \
                          retry, or run fewer tests at once.";

/// What differs between the servers' lifecycles, apart from their command line and probe.
#[derive(Debug)]
pub(crate) struct ServerSpec {
    /// The server's name in error messages, e.g. "PostgreSQL".
    pub name: &'static str,
    /// The prefix of its temp dir, e.g. "cacheclear-pg-".
    pub temp_prefix: &'static str,
    /// Whom the temp dir is for, in the error message when it cannot be created.
    pub temp_for: &'static str,
    /// The log file in the temp dir (the server's stdout and stderr, appended across restarts).
    pub log_file: &'static str,
    /// The signal that takes the server down at once: on a failed start, on drop, and as the
    /// parent-death signal.
    pub kill_signal: libc::c_int,
    /// How long after `kill_signal` before SIGKILL.
    pub kill_grace: Duration,
    /// Log text meaning "the port was taken" when the server exits during startup.
    pub port_in_use: &'static [&'static str],
    /// The first pause between readiness probes; it doubles up to `max_pause`.
    pub first_pause: Duration,
    /// The longest pause between readiness probes.
    pub max_pause: Duration,
    /// The advice when the port of a stopped server was taken meanwhile.
    pub restart_hint: &'static str,
}

/// One start of the server process: what a readiness probe and the startup errors need.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Launch {
    /// The port the server was told to listen on.
    pub port: u16,
    /// The server's process id.
    pub pid: u32,
    /// The log's length before this start: the errors quote the log from here.
    pub log_start: u64,
}

/// The state of a server process and its temp dir. Dropping it stops the server with the
/// spec's `kill_signal` and deletes the temp dir (errors go to stderr).
#[derive(Debug)]
pub(crate) struct ServerProcess {
    spec: &'static ServerSpec,
    startup_timeout: Duration,
    root: PathBuf,
    log_path: PathBuf,
    port: u16,
    /// A second port that belongs to the server (a Redis Cluster node's bus port), reserved with
    /// the first while the server is stopped.
    extra_port: Option<u16>,
    child: Option<Child>,
    reservations: Vec<PortReservation>,
    dir: Option<TempDir>,
}

impl ServerProcess {
    /// Creates the temp dir (`$TMPDIR/<temp_prefix>*`); no process runs yet. Every start may
    /// take `startup_timeout` until the server is ready.
    pub(crate) fn new(
        spec: &'static ServerSpec,
        startup_timeout: Duration,
    ) -> Result<ServerProcess, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix(spec.temp_prefix)
            .tempdir()
            .map_err(|e| {
                HarnessError::io(
                    format!(
                        "could not create a temporary directory in {} for {} (set TMPDIR to a \
                         writable directory)",
                        std::env::temp_dir().display(),
                        spec.temp_for
                    ),
                    e,
                )
            })?;
        let root = dir.path().to_path_buf();
        Ok(ServerProcess {
            spec,
            startup_timeout,
            log_path: root.join(spec.log_file),
            root,
            port: 0,
            extra_port: None,
            child: None,
            reservations: Vec::new(),
            dir: Some(dir),
        })
    }

    /// The temp dir.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// The server log.
    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the server log.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path, 0, lines)
    }

    /// The port of the last start (0 before the first).
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// The second port, if any (see [`ServerProcess::set_extra_port`]).
    pub(crate) fn extra_port(&self) -> Option<u16> {
        self.extra_port
    }

    /// Sets the second port the server listens on, reserved with the first while it is stopped.
    pub(crate) fn set_extra_port(&mut self, port: u16) {
        self.extra_port = Some(port);
    }

    /// The process id, `None` while stopped.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while a stop has left no process (stopped, or never started).
    pub(crate) fn is_stopped(&self) -> bool {
        self.child.is_none()
    }

    /// True while the process runs.
    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Drops the port reservations (before the server binds the ports again).
    pub(crate) fn release_ports(&mut self) {
        self.reservations.clear();
    }

    /// Stops the server: `first_signal`, SIGKILL after `grace`, then waits. The ports stay
    /// reserved until the next start. A stopped server is left alone.
    ///
    /// # Errors
    /// [`HarnessError::StopTimeout`] if it survives even SIGKILL (the handle is kept, so a later
    /// stop or drop tries again).
    pub(crate) fn stop(
        &mut self,
        first_signal: libc::c_int,
        grace: Duration,
    ) -> Result<(), HarnessError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id();
        let result = process::terminate(&mut child, first_signal, grace);
        self.reservations = std::iter::once(self.port)
            .chain(self.extra_port)
            .filter_map(PortReservation::new)
            .collect();
        result.map_err(|waited| {
            self.child = Some(child);
            HarnessError::StopTimeout {
                server: self.spec.name,
                port: self.port,
                pid,
                timeout: waited,
            }
        })
    }

    /// Stops the server at once: [`ServerProcess::stop`] with the spec's `kill_signal`.
    ///
    /// # Errors
    /// As [`ServerProcess::stop`].
    pub(crate) fn kill(&mut self) -> Result<(), HarnessError> {
        self.stop(self.spec.kill_signal, self.spec.kill_grace)
    }

    /// The server log opened for appending, twice: for stdout and stderr.
    fn open_log(&self) -> Result<(File, File), HarnessError> {
        let open = || {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log_path)
                .map_err(|e| {
                    HarnessError::io(format!("could not open {}", self.log_path.display()), e)
                })
        };
        Ok((open()?, open()?))
    }

    /// Kills a server that did not come up (the spec's `kill_signal`) and reaps it.
    fn abandon(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = process::terminate(&mut child, self.spec.kill_signal, self.spec.kill_grace);
        }
    }

    /// `Some(status)` when the process is gone (`Some(None)`: status unknown).
    fn exit_status(&mut self) -> Option<Option<ExitStatus>> {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => None,
            Some(Ok(Some(status))) => Some(Some(status)),
            Some(Err(_)) | None => Some(None),
        }
    }

    /// The startup error when the process of `launch` has exited: [`HarnessError::PortInUse`] if
    /// its log says the port was taken, else [`HarnessError::ServerExited`]. `None` while it runs.
    pub(crate) fn exited(&mut self, launch: &Launch) -> Option<HarnessError> {
        let status = self.exit_status()?;
        let since = process::read_from(&self.log_path, launch.log_start);
        if self.spec.port_in_use.iter().any(|m| since.contains(m)) {
            return Some(self.port_in_use(launch, TAKEN_HINT));
        }
        Some(HarnessError::ServerExited {
            server: self.spec.name,
            port: launch.port,
            status: status_text(status),
            log_tail: tail(&self.log_path, launch.log_start, LOG_TAIL_LINES),
        })
    }

    /// [`HarnessError::PortInUse`] for the port of `launch` (one attempt; the retry loop counts).
    pub(crate) fn port_in_use(&self, launch: &Launch, hint: &'static str) -> HarnessError {
        HarnessError::PortInUse {
            server: self.spec.name,
            port: launch.port,
            attempts: 1,
            hint,
            log_tail: tail(&self.log_path, launch.log_start, LOG_TAIL_LINES),
        }
    }
}

impl Drop for ServerProcess {
    /// Takes the server down (the spec's `kill_signal`), waits for it, then deletes the temp
    /// dir. Errors are reported on stderr, never panicked on.
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("cacheclear-harness: {e}");
        }
        self.release_ports();
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                eprintln!(
                    "cacheclear-harness: could not remove {}: {e}; delete it by hand",
                    path.display()
                );
            }
        }
    }
}

/// A throwaway server: its command line and readiness probe; the lifecycle is provided.
pub(crate) trait Server {
    /// The process state.
    fn process(&mut self) -> &mut ServerProcess;

    /// The server's command line for `port` (stdout, stderr, process group and parent-death
    /// signal are set by [`Server::launch`]).
    fn command(&self, port: u16) -> Command;

    /// Explains why the server `program` could not be spawned.
    fn spawn_failed(&self, program: &Path, e: std::io::Error) -> HarnessError {
        spawn_error(program, e, None)
    }

    /// One readiness check of the process of `launch`, which was running just before:
    /// `Ok(true)` ready, `Ok(false)` not yet, `Err` give up (e.g. another server answers).
    fn probe(&mut self, launch: &Launch) -> Result<bool, HarnessError>;

    /// Starts the server on `port` and waits until it is ready. On failure the process is
    /// killed and reaped; a taken port is [`HarnessError::PortInUse`].
    fn launch(&mut self, port: u16) -> Result<(), HarnessError> {
        let log_start = file_len(self.process().log_path());
        let (out, err) = self.process().open_log()?;
        let mut cmd = self.command(port);
        // Own process group: a Ctrl-C in the terminal reaches us, not the server; we stop it.
        cmd.stdout(out).stderr(err).process_group(0);
        kill_on_parent_exit(&mut cmd, self.process().spec.kill_signal);
        let program = PathBuf::from(cmd.get_program());
        let child = spawn_tied_to_process(cmd).map_err(|e| self.spawn_failed(&program, e))?;
        let launch = Launch {
            port,
            pid: child.id(),
            log_start,
        };
        let p = self.process();
        p.port = port;
        p.child = Some(child);
        let ready = self.wait_ready(&launch);
        if ready.is_err() {
            self.process().abandon();
        }
        ready
    }

    /// Polls until the server of `launch` is ready, it exits, or the startup timeout passes.
    fn wait_ready(&mut self, launch: &Launch) -> Result<(), HarnessError> {
        let (spec, timeout) = (self.process().spec, self.process().startup_timeout);
        let deadline = Instant::now() + timeout;
        let mut pause = spec.first_pause;
        loop {
            if let Some(e) = self.process().exited(launch) {
                return Err(e);
            }
            if self.probe(launch)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let p = self.process();
                return Err(HarnessError::StartTimeout {
                    server: spec.name,
                    port: launch.port,
                    timeout,
                    log_tail: tail(&p.log_path, launch.log_start, LOG_TAIL_LINES),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(spec.max_pause);
        }
    }

    /// Starts a stopped server again on its port (clients hold it), retrying while another
    /// process holds it ([`HarnessError::PortInUse`] with the spec's `restart_hint` if it stays
    /// taken).
    fn relaunch(&mut self) -> Result<(), HarnessError> {
        let p = self.process();
        let retry = (p.port, p.spec.restart_hint);
        process::launch_retrying_port(Some(retry), |port| {
            self.process().release_ports();
            self.launch(port)
        })
    }
}
