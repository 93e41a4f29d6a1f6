//! Throwaway Redis instances.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::HarnessError;
use crate::bins::RedisBinaries;
use crate::process::{self, free_port, spawn_error};
use crate::server::{Launch, Server, ServerProcess, ServerSpec};

const HOST: &str = "127.0.0.1";

static SPEC: ServerSpec = ServerSpec {
    name: "Redis",
    temp_prefix: "cacheclear-redis-",
    temp_for: "Redis",
    log_file: "redis.log",
    kill_signal: libc::SIGKILL,
    kill_grace: Duration::ZERO,
    port_in_use: &["Address already in use"],
    first_pause: Duration::from_millis(2),
    max_pause: Duration::from_millis(50),
    restart_hint: "Another process took the port while the instance was stopped; start a new \
                   instance instead.",
};

/// Options for [`RedisInstance::start_with`]. `RedisOptions::default()` is what
/// [`RedisInstance::start`] uses.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Extra `redis-server` command-line arguments, appended after the harness's own (so they
    /// win), e.g. `["--maxmemory", "64mb", "--maxmemory-policy", "volatile-lfu"]`.
    pub extra_args: Vec<String>,
    /// How long to wait for the server to answer after starting it (default 30 s).
    pub startup_timeout: Duration,
    /// TLS only: `--port 0 --tls-port N` with these files (and `--tls-replication yes`; cluster
    /// nodes also `--tls-cluster yes`). Default: none (plaintext).
    pub tls: Option<RedisServerTls>,
    /// `--requirepass` (the `default` user's password; `--masterauth` too, for replicas). The
    /// harness's own commands (`cli`, readiness probe) authenticate with it. Default: none.
    pub password: Option<String>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            extra_args: Vec::new(),
            startup_timeout: Duration::from_secs(30),
            tls: None,
            password: None,
        }
    }
}

/// TLS files of a server started with [`RedisOptions::tls`] (PEM paths, e.g. from
/// `TestCertificates`). `auth_clients` is `--tls-auth-clients`: `true` (`yes`) requires a client
/// certificate signed by `ca_file`, `false` (`optional`) accepts clients without one. The harness's
/// own `redis-cli` presents `client_cert_file`/`client_key_file` when given.
#[derive(Debug, Clone)]
pub struct RedisServerTls {
    /// `--tls-cert-file`.
    pub cert_file: std::path::PathBuf,
    /// `--tls-key-file`.
    pub key_file: std::path::PathBuf,
    /// `--tls-ca-cert-file`: verifies client certificates (and the harness's `redis-cli` trusts it).
    pub ca_file: std::path::PathBuf,
    /// Client certificate for the harness's own `redis-cli`.
    pub client_cert_file: Option<std::path::PathBuf>,
    /// Its key.
    pub client_key_file: Option<std::path::PathBuf>,
    /// `--tls-auth-clients yes` (true) or `optional` (false).
    pub auth_clients: bool,
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

    /// TLS only (see [`RedisOptions::tls`]).
    pub fn tls(mut self, tls: RedisServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// `--requirepass` (see [`RedisOptions::password`]).
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// Adds an ACL user (`--user <name> on ><password> <rules...>`), e.g.
    /// `.acl_user("cacheclear", "pw", &["~*", "&*", "+@all"])`.
    pub fn acl_user(self, name: &str, password: &str, rules: &[&str]) -> Self {
        let mut args = vec![
            "--user".to_owned(),
            name.to_owned(),
            "on".to_owned(),
            format!(">{password}"),
        ];
        args.extend(rules.iter().map(|r| (*r).to_owned()));
        self.args(args)
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
    opts: RedisOptions,
    /// The server process and its temp dir; a cluster node's bus port (`--cluster-port`) is
    /// its extra port.
    process: ServerProcess,
    /// A sentinel: its configuration file (in the temp dir), first argument of the command.
    sentinel_conf: Option<std::path::PathBuf>,
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

    /// Starts a Redis Sentinel (`redis-server sentinel.conf --sentinel`) whose configuration
    /// file holds `conf` (written into the instance's temp dir; sentinel rewrites it).
    pub(crate) fn start_sentinel(
        opts: RedisOptions,
        conf: &str,
    ) -> Result<RedisInstance, HarnessError> {
        Self::start_inner_with(opts, false, Some(conf))
    }

    fn start_inner(opts: RedisOptions, cluster: bool) -> Result<RedisInstance, HarnessError> {
        Self::start_inner_with(opts, cluster, None)
    }

    fn start_inner_with(
        opts: RedisOptions,
        cluster: bool,
        sentinel_conf: Option<&str>,
    ) -> Result<RedisInstance, HarnessError> {
        let bins = RedisBinaries::discover()?;
        let mut redis = RedisInstance {
            bins,
            process: ServerProcess::new(&SPEC, opts.startup_timeout)?,
            opts,
            sentinel_conf: None,
        };
        if let Some(conf) = sentinel_conf {
            let path = redis.process.root().join("sentinel.conf");
            std::fs::write(&path, conf)
                .map_err(|e| HarnessError::io(format!("could not write {}", path.display()), e))?;
            redis.sentinel_conf = Some(path);
        }
        process::launch_retrying_port(None, |port| {
            if cluster {
                redis.process.set_extra_port(free_port()?);
            }
            redis.launch(port)
        })?;
        Ok(redis)
    }

    /// TCP port the server listens on (on 127.0.0.1). Stays the same across
    /// [`RedisInstance::stop`]/[`RedisInstance::start_again`].
    pub fn port(&self) -> u16 {
        self.process.port()
    }

    /// Host to connect to: always `"127.0.0.1"`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// Connection URL for the `redis` crate: `"redis://127.0.0.1:N/"`, `"rediss://…"` for a TLS
    /// instance. No credentials: see [`RedisInstance::url_as`].
    pub fn url(&self) -> String {
        let scheme = if self.opts.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://{HOST}:{}/", self.port())
    }

    /// [`RedisInstance::url`] with user info: `redis[s]://user:password@127.0.0.1:N/` (an empty
    /// `user` authenticates as `default`: `redis://:password@…`).
    pub fn url_as(&self, user: &str, password: &str) -> String {
        self.url()
            .replacen("://", &format!("://{user}:{password}@"), 1)
    }

    /// The options the instance was started with (TLS files, password).
    pub fn options(&self) -> &RedisOptions {
        &self.opts
    }

    /// The cluster bus port (`--cluster-port`) of a Redis Cluster node started by
    /// [`crate::RedisCluster`]; `None` for a standalone server. Stays the same across
    /// [`RedisInstance::stop`]/[`RedisInstance::start_again`].
    pub fn cluster_bus_port(&self) -> Option<u16> {
        self.process.extra_port()
    }

    /// The instance's temp dir (working directory of the server; deleted on drop).
    pub fn dir(&self) -> &Path {
        self.process.root()
    }

    /// The server log (stdout/stderr of `redis-server`, appended across restarts).
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// The last `lines` lines of the server log, for diagnostics in failing tests.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// The binaries this instance uses.
    pub fn binaries(&self) -> &RedisBinaries {
        &self.bins
    }

    /// Starts a replica of `master` (`--replicaof 127.0.0.1 <port>`) and waits until its
    /// replication link is up (`master_link_status:up`, at most 30 s).
    ///
    /// # Errors
    /// As [`RedisInstance::start`]; [`HarnessError::RedisCli`] carrying the last `INFO
    /// replication` when the link does not come up in time.
    pub fn start_replica_of(master: &RedisInstance) -> Result<RedisInstance, HarnessError> {
        let replica = RedisInstance::start_with(RedisOptions::default().args([
            "--replicaof".to_owned(),
            HOST.to_owned(),
            master.port().to_string(),
        ]))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = replica.cli(&["INFO", "replication"])?;
            if info.contains("master_link_status:up") {
                return Ok(replica);
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::RedisCli {
                    port: replica.port(),
                    args: "INFO replication".into(),
                    stderr: info,
                    hint: "; the replication link did not come up within 30 s".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Freezes the server (SIGSTOP): it keeps its connections and answers nothing, like a
    /// replica stuck behind its master. [`RedisInstance::resume`] undoes it.
    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            process::signal(pid, libc::SIGSTOP);
        }
    }

    /// Resumes a server frozen by [`RedisInstance::pause`] (SIGCONT).
    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            process::signal(pid, libc::SIGCONT);
        }
    }

    /// Process id of the server, `None` while stopped.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// True while the server process is running.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Kills the server (SIGKILL: "Redis goes down", nothing is saved) and waits for it. The
    /// port stays reserved: connections to it are refused and no other process can bind it until
    /// [`RedisInstance::start_again`] (a cluster node's bus port too). Stopping a stopped
    /// instance is a no-op.
    ///
    /// # Errors
    /// [`HarnessError::StopTimeout`] if the process does not exit even after SIGKILL.
    pub fn stop(&mut self) -> Result<(), HarnessError> {
        self.process.kill()
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
        self.relaunch()
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
        let mut cmd = Command::new(cli);
        cmd.stdin(Stdio::null())
            .args(["-e", "-h", HOST, "-p", &self.port().to_string()]);
        self.cli_connection_args(&mut cmd);
        let out = cmd
            .args(args)
            .output()
            .map_err(|e| spawn_error(cli, e, None))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stdout = stdout.strip_suffix('\n').unwrap_or(&stdout);
        // redis-cli can exit 0 after "Could not connect" in some versions: check stderr too.
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if out.status.success() && !stderr.starts_with("Could not connect") {
            return Ok(stdout.to_string());
        }
        let hint = if self.process.is_stopped() {
            " (this instance is stopped: call start_again() first)".to_string()
        } else {
            String::new()
        };
        Err(HarnessError::RedisCli {
            port: self.port(),
            args: args.join(" "),
            stderr: if stderr.is_empty() {
                stdout.trim().to_string()
            } else {
                stderr
            },
            hint,
        })
    }
}

impl RedisInstance {
    /// `redis-cli` arguments and environment that reach this instance: `--tls --cacert …
    /// [--cert … --key …]` for TLS, `REDISCLI_AUTH` for a password (never on the command line).
    pub(crate) fn cli_connection_args(&self, cmd: &mut Command) {
        cmd.env_remove("REDISCLI_AUTH");
        if let Some(tls) = &self.opts.tls {
            cmd.arg("--tls").arg("--cacert").arg(&tls.ca_file);
            if let (Some(cert), Some(key)) = (&tls.client_cert_file, &tls.client_key_file) {
                cmd.arg("--cert").arg(cert).arg("--key").arg(key);
            }
        }
        if let Some(password) = &self.opts.password
            && self.sentinel_conf.is_none()
        {
            cmd.env("REDISCLI_AUTH", password);
        }
    }

    /// Readiness through `redis-cli` (TLS or a password): `INFO server`'s `process_id`.
    fn probe_with_cli(&mut self, launch: &Launch) -> Result<bool, HarnessError> {
        if !self.process.is_running() {
            return Ok(false);
        }
        let Ok(info) = self.cli(&["INFO", "server"]) else {
            return Ok(false);
        };
        let pid: Option<u32> = info
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|v| v.trim().parse().ok());
        match pid {
            Some(pid) if pid == launch.pid => Ok(true),
            Some(_) => Err(self
                .process
                .port_in_use(launch, "Another Redis server answers on this port.")),
            None => Ok(false),
        }
    }
}

impl Server for RedisInstance {
    fn process(&mut self) -> &mut ServerProcess {
        &mut self.process
    }

    fn command(&self, port: u16) -> Command {
        let root = self.process.root();
        let mut cmd = Command::new(&self.bins.server);
        cmd.current_dir(root).stdin(Stdio::null());
        if let Some(conf) = &self.sentinel_conf {
            cmd.arg(conf).arg("--sentinel");
        }
        match &self.opts.tls {
            None => {
                cmd.args(["--port", &port.to_string()]);
            }
            Some(tls) => {
                cmd.args(["--port", "0", "--tls-port", &port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(&tls.cert_file)
                    .arg("--tls-key-file")
                    .arg(&tls.key_file)
                    .arg("--tls-ca-cert-file")
                    .arg(&tls.ca_file)
                    .args([
                        "--tls-auth-clients",
                        if tls.auth_clients { "yes" } else { "optional" },
                        "--tls-replication",
                        "yes",
                    ]);
                if self.process.extra_port().is_some() {
                    cmd.args(["--tls-cluster", "yes"]);
                }
            }
        }
        cmd.args(["--bind", HOST])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(root);
        if let Some(password) = &self.opts.password
            && self.sentinel_conf.is_none()
        {
            cmd.args(["--requirepass", password, "--masterauth", password]);
        }
        if let Some(bus_port) = self.process.extra_port() {
            // Relative to --dir: every node keeps its own nodes.conf in its own temp dir.
            cmd.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-port", &bus_port.to_string()]);
        }
        cmd.args(&self.opts.extra_args);
        cmd
    }

    fn probe(&mut self, launch: &Launch) -> Result<bool, HarnessError> {
        if self.opts.tls.is_some() || (self.opts.password.is_some() && self.sentinel_conf.is_none())
        {
            return self.probe_with_cli(launch);
        }
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, launch.port));
        let mut still_ours = || self.process.is_running();
        match server_pid(addr, &mut still_ours) {
            Ok(Some(answering)) if answering == launch.pid => Ok(true),
            // Another Redis answers on this port; ours will fail to bind.
            Ok(Some(_)) => Err(self
                .process
                .port_in_use(launch, "Another Redis server answers on this port.")),
            // Not listening yet, or still loading: keep waiting.
            Ok(None) | Err(_) => Ok(false),
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
        redis.process.release_ports();
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
