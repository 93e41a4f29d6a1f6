//! Throwaway Redis instances.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::HarnessError;
use crate::bins::RedisBinaries;
use crate::process::{
    self, PortReservation, file_len, free_port, kill_on_parent_exit, spawn_error,
    spawn_tied_to_process, status_text, tail,
};

const SERVER: &str = "Redis";
const HOST: &str = "127.0.0.1";
const LOG_TAIL_LINES: usize = 30;

/// Options for [`RedisInstance::start_with`]. `RedisOptions::default()` is what
/// [`RedisInstance::start`] uses.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Extra `redis-server` command-line arguments, appended after the harness's own (so they
    /// win), e.g. `["--maxmemory", "64mb", "--maxmemory-policy", "volatile-lfu"]`.
    pub extra_args: Vec<String>,
    /// How long to wait for the server to answer after starting it (default 30 s).
    pub startup_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            extra_args: Vec::new(),
            startup_timeout: Duration::from_secs(30),
        }
    }
}

impl RedisOptions {
    /// Adds `redis-server` arguments (builder style), e.g. `.args(["--maxmemory", "64mb"])`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// A private Redis server on a free port on 127.0.0.1, run as a child process with
/// `--port N --bind 127.0.0.1 --save "" --appendonly no --dir <temp dir> --daemonize no`
/// (no persistence; the log goes to `<temp dir>/redis.log`).
///
/// Lifetime: dropping the instance kills the server (SIGKILL), waits for it and deletes the
/// directory. If this process dies without running `Drop`, Linux kills the server too
/// (parent-death signal); only the directory (`$TMPDIR/cacheclear-redis-*`) is left behind.
///
/// All methods block; from async code call them in `spawn_blocking` or before the runtime work.
#[derive(Debug)]
pub struct RedisInstance {
    bins: RedisBinaries,
    root: PathBuf,
    log_path: PathBuf,
    port: u16,
    opts: RedisOptions,
    server: Option<Child>,
    reservation: Option<PortReservation>,
    /// Cluster nodes only: the cluster bus port (`--cluster-port`), and its reservation while
    /// the server is stopped.
    bus_port: Option<u16>,
    bus_reservation: Option<PortReservation>,
    dir: Option<TempDir>,
}

impl RedisInstance {
    /// Starts a server with default options and waits until it answers (`INFO` from our own
    /// process). Takes a few milliseconds.
    ///
    /// # Errors
    /// [`HarnessError::BinaryNotFound`] if `redis-server` is missing; a server that exits or
    /// does not answer in time (the error carries the tail of its log); ports that keep being
    /// taken.
    pub fn start() -> Result<RedisInstance, HarnessError> {
        Self::start_with(RedisOptions::default())
    }

    /// Like [`RedisInstance::start`], with extra server arguments and a startup timeout.
    ///
    /// # Errors
    /// As [`RedisInstance::start`]; a bad extra argument shows up as
    /// [`HarnessError::ServerExited`] with Redis's complaint in the log tail.
    pub fn start_with(opts: RedisOptions) -> Result<RedisInstance, HarnessError> {
        Self::start_inner(opts, false)
    }

    /// Starts one Redis Cluster node: like [`RedisInstance::start_with`], plus
    /// `--cluster-enabled yes --cluster-config-file nodes.conf --cluster-port <bus port>`
    /// (`nodes.conf` lives in the instance's temp dir; the bus port is a second free port, picked
    /// again with the client port when either is taken). The node starts alone, without slots.
    pub(crate) fn start_cluster_node(opts: RedisOptions) -> Result<RedisInstance, HarnessError> {
        Self::start_inner(opts, true)
    }

    fn start_inner(opts: RedisOptions, cluster: bool) -> Result<RedisInstance, HarnessError> {
        let bins = RedisBinaries::discover()?;
        let dir = tempfile::Builder::new()
            .prefix("cacheclear-redis-")
            .tempdir()
            .map_err(|e| {
                HarnessError::io(
                    format!(
                        "could not create a temporary directory in {} for Redis (set TMPDIR to a \
                         writable directory)",
                        std::env::temp_dir().display()
                    ),
                    e,
                )
            })?;
        let root = dir.path().to_path_buf();
        let mut redis = RedisInstance {
            bins,
            log_path: root.join("redis.log"),
            root,
            port: 0,
            opts,
            server: None,
            reservation: None,
            bus_port: None,
            bus_reservation: None,
            dir: Some(dir),
        };
        process::launch_retrying_port(None, |port| {
            if cluster {
                redis.bus_port = Some(free_port()?);
            }
            redis.launch(port)
        })?;
        Ok(redis)
    }

    /// TCP port the server listens on (on 127.0.0.1). Stays the same across
    /// [`RedisInstance::stop`]/[`RedisInstance::start_again`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Host to connect to: always `"127.0.0.1"`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// Connection URL for the `redis` crate: `"redis://127.0.0.1:N/"`.
    pub fn url(&self) -> String {
        format!("redis://{HOST}:{}/", self.port)
    }

    /// The cluster bus port (`--cluster-port`) of a Redis Cluster node started by
    /// [`crate::RedisCluster`]; `None` for a standalone server. Stays the same across
    /// [`RedisInstance::stop`]/[`RedisInstance::start_again`].
    pub fn cluster_bus_port(&self) -> Option<u16> {
        self.bus_port
    }

    /// The instance's temp dir (working directory of the server; deleted on drop).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The server log (stdout/stderr of `redis-server`, appended across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the server log, for diagnostics in failing tests.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path, 0, lines)
    }

    /// The binaries this instance uses.
    pub fn binaries(&self) -> &RedisBinaries {
        &self.bins
    }

    /// Process id of the server, `None` while stopped.
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(Child::id)
    }

    /// True while the server process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.server.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Kills the server (SIGKILL: "Redis goes down", nothing is saved) and waits for it. The
    /// port stays reserved: connections to it are refused and no other process can bind it until
    /// [`RedisInstance::start_again`] (a cluster node's bus port too). Stopping a stopped
    /// instance is a no-op.
    ///
    /// # Errors
    /// [`HarnessError::StopTimeout`] if the process does not exit even after SIGKILL.
    pub fn stop(&mut self) -> Result<(), HarnessError> {
        let Some(mut child) = self.server.take() else {
            return Ok(());
        };
        let pid = child.id();
        let result = process::terminate(&mut child, libc::SIGKILL, Duration::ZERO);
        self.reservation = PortReservation::new(self.port);
        self.bus_reservation = self.bus_port.and_then(PortReservation::new);
        result.map_err(|waited| {
            self.server = Some(child);
            HarnessError::StopTimeout {
                server: SERVER,
                port: self.port,
                pid,
                timeout: waited,
            }
        })
    }

    /// Starts the server again on the same port (stopping it first if it runs). The data set
    /// starts empty; a cluster node keeps its identity and bus port (its `nodes.conf` stays in
    /// the temp dir) and rejoins its cluster. Waits until it answers.
    ///
    /// # Errors
    /// As [`RedisInstance::start`]; [`HarnessError::PortInUse`] if another process took the port
    /// meanwhile (the port cannot change: clients hold it).
    pub fn start_again(&mut self) -> Result<(), HarnessError> {
        self.stop()?;
        let restart = (
            self.port,
            "Another process took the port while the instance was stopped; \
             start a new instance instead.",
        );
        process::launch_retrying_port(Some(restart), |port| {
            self.reservation = None;
            self.bus_reservation = None;
            self.launch(port)
        })
    }

    /// Runs `redis-cli -e -h 127.0.0.1 -p N <args...>` and returns its stdout without the
    /// trailing newline. Output is redis-cli's non-terminal format: bare values, one per line
    /// (`"PONG"`, `"OK"`, `""` for nil).
    ///
    /// # Errors
    /// [`HarnessError::RedisCli`] when the command gets an error reply or the server is
    /// unreachable (e.g. after [`RedisInstance::stop`]); [`HarnessError::BinaryNotFound`] if
    /// redis-cli is not installed.
    pub fn cli(&self, args: &[&str]) -> Result<String, HarnessError> {
        let cli = self.bins.require_cli()?;
        let out = Command::new(cli)
            .stdin(Stdio::null())
            .args(["-e", "-h", HOST, "-p", &self.port.to_string()])
            .args(args)
            .env_remove("REDISCLI_AUTH")
            .output()
            .map_err(|e| spawn_error(cli, e, None))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stdout = stdout.strip_suffix('\n').unwrap_or(&stdout);
        // redis-cli can exit 0 after "Could not connect" in some versions: check stderr too.
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if out.status.success() && !stderr.starts_with("Could not connect") {
            return Ok(stdout.to_string());
        }
        let hint = if self.server.is_none() {
            " (this instance is stopped: call start_again() first)".to_string()
        } else {
            String::new()
        };
        Err(HarnessError::RedisCli {
            port: self.port,
            args: args.join(" "),
            stderr: if stderr.is_empty() {
                stdout.trim().to_string()
            } else {
                stderr
            },
            hint,
        })
    }

    fn launch(&mut self, port: u16) -> Result<(), HarnessError> {
        let log_start = file_len(&self.log_path);
        let open_log = || {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log_path)
                .map_err(|e| {
                    HarnessError::io(format!("could not open {}", self.log_path.display()), e)
                })
        };
        let (out, err) = (open_log()?, open_log()?);
        let mut cmd = Command::new(&self.bins.server);
        cmd.current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .args(["--port", &port.to_string(), "--bind", HOST])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.root);
        if let Some(bus_port) = self.bus_port {
            // Relative to --dir: every node keeps its own nodes.conf in its own temp dir.
            cmd.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-port", &bus_port.to_string()]);
        }
        cmd.args(&self.opts.extra_args).process_group(0);
        kill_on_parent_exit(&mut cmd, libc::SIGKILL);
        let child =
            spawn_tied_to_process(cmd).map_err(|e| spawn_error(&self.bins.server, e, None))?;
        self.port = port;
        self.server = Some(child);
        match self.wait_ready(port, log_start) {
            Ok(()) => Ok(()),
            Err(e) => {
                if let Some(mut child) = self.server.take() {
                    let _ = process::terminate(&mut child, libc::SIGKILL, Duration::ZERO);
                }
                Err(e)
            }
        }
    }

    fn wait_ready(&mut self, port: u16, log_start: u64) -> Result<(), HarnessError> {
        let timeout = self.opts.startup_timeout;
        let deadline = Instant::now() + timeout;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut pause = Duration::from_millis(2);
        loop {
            let (exited, pid) = match self.server.as_mut() {
                Some(child) => match child.try_wait() {
                    Ok(None) => (None, child.id()),
                    Ok(Some(status)) => (Some(Some(status)), child.id()),
                    Err(_) => (Some(None), child.id()),
                },
                None => (Some(None), 0),
            };
            if let Some(status) = exited {
                let since = process::read_from(&self.log_path, log_start);
                let log_tail = tail(&self.log_path, log_start, LOG_TAIL_LINES);
                if since.contains("Address already in use") {
                    return Err(HarnessError::PortInUse {
                        server: SERVER,
                        port,
                        attempts: 1,
                        hint: "Parallel tests or other programs keep taking the free ports we \
                               pick; retry, or run fewer tests at once.",
                        log_tail,
                    });
                }
                return Err(HarnessError::ServerExited {
                    server: SERVER,
                    port,
                    status: status_text(status),
                    log_tail,
                });
            }
            let mut still_ours =
                || matches!(self.server.as_mut().map(Child::try_wait), Some(Ok(None)));
            match server_pid(addr, &mut still_ours) {
                Ok(Some(answering)) if answering == pid => return Ok(()),
                Ok(Some(_)) => {
                    // Another Redis answers on this port; ours will fail to bind.
                    return Err(HarnessError::PortInUse {
                        server: SERVER,
                        port,
                        attempts: 1,
                        hint: "Another Redis server answers on this port.",
                        log_tail: tail(&self.log_path, log_start, LOG_TAIL_LINES),
                    });
                }
                // Not listening yet, or still loading: keep waiting.
                Ok(None) | Err(_) => {}
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::StartTimeout {
                    server: SERVER,
                    port,
                    timeout,
                    log_tail: tail(&self.log_path, log_start, LOG_TAIL_LINES),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

impl Drop for RedisInstance {
    /// Kills the server, waits for it, then deletes the temp dir. Errors are reported on stderr.
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("cacheclear-harness: {e}");
        }
        self.reservation = None;
        self.bus_reservation = None;
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

/// Asks the Redis server at `addr` for `INFO server` and returns its `process_id`.
/// `Ok(None)`: it answered with an error (e.g. `-LOADING`) or without a process id, or
/// `still_ours()` turned false while waiting (our server exited: whoever accepted the connection
/// is not it). Waits at most 5 s for the reply.
fn server_pid(addr: SocketAddr, still_ours: &mut dyn FnMut() -> bool) -> io::Result<Option<u32>> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_millis(50)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if !still_ours() {
                    return Ok(None);
                }
                if Instant::now() >= deadline {
                    return Err(e);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if let Some(reply) = parse_info_reply(&buf)? {
            return Ok(reply);
        }
    }
}

/// Parses a (possibly incomplete) RESP reply to `INFO`. `Ok(None)`: need more bytes;
/// `Ok(Some(pid))`: complete, with the `process_id` if it was a bulk string holding one.
fn parse_info_reply(buf: &[u8]) -> io::Result<Option<Option<u32>>> {
    let Some(header_end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let header = String::from_utf8_lossy(&buf[..header_end]);
    let Some(len) = header.strip_prefix('$') else {
        // An error ("-LOADING ...") or another reply type: complete, no pid.
        return Ok(Some(None));
    };
    let len: usize = len
        .trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad RESP bulk length"))?;
    let body_start = header_end + 2;
    let Some(body) = buf.get(body_start..body_start + len) else {
        return Ok(None);
    };
    let body = String::from_utf8_lossy(body);
    Ok(Some(
        body.lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|v| v.trim().parse().ok()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_reply_parsing_handles_partial_and_error_replies() {
        assert_eq!(parse_info_reply(b"$30\r\n# Server").expect("ok"), None);
        assert_eq!(
            parse_info_reply(b"-LOADING busy\r\n").expect("ok"),
            Some(None)
        );
        let body = "# Server\r\nprocess_id:4242\r\n";
        let reply = format!("${}\r\n{body}\r\n", body.len());
        assert_eq!(
            parse_info_reply(reply.as_bytes()).expect("ok"),
            Some(Some(4242))
        );
        assert!(parse_info_reply(b"$x\r\n").is_err());
    }

    #[test]
    fn start_again_on_a_taken_port_says_so() {
        let mut redis = RedisInstance::start().expect("start Redis");
        let port = redis.port();
        redis.stop().expect("stop");
        // Simulate another process grabbing the port while we were down.
        redis.reservation = None;
        let squatter = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("squat");
        let err = redis.start_again().expect_err("port is taken");
        assert!(err.is_port_in_use(), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
        assert!(msg.contains("Address already in use"), "{msg}");
        assert!(msg.contains("while the instance was stopped"), "{msg}");
        drop(squatter);
        redis.start_again().expect("port free again");
        assert_eq!(redis.cli(&["PING"]).expect("ping"), "PONG");
    }

    #[test]
    fn launch_on_a_taken_port_is_reported_as_port_in_use() {
        let mut redis = RedisInstance::start().expect("start Redis");
        redis.stop().expect("stop");
        let squatter = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("squat");
        let port = squatter.local_addr().expect("addr").port();
        let err = redis.launch(port).expect_err("taken");
        assert!(err.is_port_in_use(), "{err:?}");
    }
}
