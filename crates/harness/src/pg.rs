//! Throwaway PostgreSQL instances.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::HarnessError;
use crate::bins::PgBinaries;
use crate::process::{
    self, kill_on_parent_exit, scrub_pg_env, spawn_error, spawn_tied_to_process, status_text, tail,
};
use crate::server::{LOG_TAIL_LINES, Launch, Server, ServerProcess, ServerSpec};

const HOST: &str = "127.0.0.1";
const USER: &str = "postgres";
const DBNAME: &str = "postgres";

static SPEC: ServerSpec = ServerSpec {
    name: "PostgreSQL",
    temp_prefix: "cacheclear-pg-",
    temp_for: "PostgreSQL",
    log_file: "postgres.log",
    // SIGQUIT = immediate shutdown: the postmaster takes its backends down with it.
    kill_signal: libc::SIGQUIT,
    kill_grace: Duration::from_secs(5),
    port_in_use: &["Address already in use"],
    first_pause: Duration::from_millis(10),
    max_pause: Duration::from_millis(100),
    restart_hint: "Another process took the port while the instance was stopped; start a new \
                   instance instead.",
};

/// Options for [`PgInstance::start_with`]. `PgOptions::default()` is what [`PgInstance::start`]
/// uses.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Extra `postgresql.conf` lines, appended after the harness's own settings (so they win),
    /// e.g. `"max_slot_wal_keep_size = '64MB'"`. Each entry is written as one line.
    pub extra_conf: Vec<String>,
    /// How long to wait for the server to accept connections after starting it (default 60 s;
    /// generous because parallel test processes on a small machine slow startup down).
    pub startup_timeout: Duration,
    /// How long [`PgInstance::stop`] waits for a fast shutdown before escalating to an
    /// immediate shutdown and then SIGKILL (default 30 s).
    pub shutdown_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            extra_conf: Vec::new(),
            startup_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

impl PgOptions {
    /// Adds one `postgresql.conf` line (builder style).
    pub fn conf(mut self, line: impl Into<String>) -> Self {
        self.extra_conf.push(line.into());
        self
    }
}

/// A private PostgreSQL server: its own cluster (initdb) in a temporary directory, listening on a
/// free port on 127.0.0.1, configured for logical replication, trust authentication for every
/// local user including replication connections.
///
/// Settings: `wal_level = logical`, `max_wal_senders = 10`, `max_replication_slots = 10`,
/// `listen_addresses = '127.0.0.1'`, `unix_socket_directories` = the temp dir (or none if that
/// path is too long for a socket), `fsync = off`, then [`PgOptions::extra_conf`].
///
/// Lifetime: the `postgres` server process is a direct child of this process (not started
/// through `pg_ctl`, so it cannot escape). Dropping the instance shuts the server down
/// immediately (SIGQUIT, then SIGKILL after 5 s), waits for it and deletes the directory. If
/// this process dies without running `Drop` (SIGKILL, `abort`), Linux sends the server SIGQUIT
/// (parent-death signal), so it does not outlive us; only the directory
/// (`$TMPDIR/cacheclear-pg-*`) is left behind then. Install a Ctrl-C handler that drops the
/// instance if you want the directory gone on Ctrl-C too.
///
/// When this process runs as root, `initdb` and `postgres` run as the `postgres` user (PostgreSQL
/// refuses to run as root) and the temp dir is owned by that user.
///
/// All methods block; from async code call them in `spawn_blocking` or before the runtime work.
#[derive(Debug)]
pub struct PgInstance {
    bins: PgBinaries,
    run_as: Option<(u32, u32)>,
    data_dir: PathBuf,
    opts: PgOptions,
    process: ServerProcess,
}

impl PgInstance {
    /// Creates and starts an instance with default options (see [`PgInstance`] for settings).
    /// Takes about 1–2 s (mostly `initdb`).
    ///
    /// # Errors
    /// Missing binaries ([`HarnessError::BinaryNotFound`]), no `postgres` user when running as
    /// root, `initdb` failure, a server that exits or does not accept connections in time
    /// (the error carries the tail of the server log), or ports that keep being taken.
    pub fn start() -> Result<PgInstance, HarnessError> {
        Self::start_with(PgOptions::default())
    }

    /// Like [`PgInstance::start`], with extra `postgresql.conf` lines and timeouts.
    ///
    /// # Errors
    /// As [`PgInstance::start`]; a bad `extra_conf` line shows up as
    /// [`HarnessError::ServerExited`] with PostgreSQL's complaint in the log tail.
    pub fn start_with(opts: PgOptions) -> Result<PgInstance, HarnessError> {
        let bins = PgBinaries::discover()?;
        let run_as = if process::running_as_root() {
            Some(process::lookup_user(USER).ok_or(HarnessError::NoPostgresUser)?)
        } else {
            None
        };
        let server = ServerProcess::new(&SPEC, opts.startup_timeout)?;
        let root = server.root().to_path_buf();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&root, Some(uid), Some(gid)).map_err(|e| {
                HarnessError::io(
                    format!(
                        "could not hand {} to the `postgres` user (chown)",
                        root.display()
                    ),
                    e,
                )
            })?;
        }
        let mut pg = PgInstance {
            bins,
            run_as,
            data_dir: root.join("data"),
            opts,
            process: server,
        };
        pg.initdb()?;
        pg.write_config()?;
        process::launch_retrying_port(None, |port| pg.launch(port))?;
        Ok(pg)
    }

    /// TCP port the server listens on (on 127.0.0.1). Stays the same across
    /// [`PgInstance::stop`]/[`PgInstance::restart`].
    pub fn port(&self) -> u16 {
        self.process.port()
    }

    /// Host to connect to: always `"127.0.0.1"`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// User to connect as: `"postgres"` (superuser, replication allowed, no password).
    pub fn user(&self) -> &str {
        USER
    }

    /// Database to connect to: `"postgres"`.
    pub fn dbname(&self) -> &str {
        DBNAME
    }

    /// libpq / tokio-postgres key=value connection string:
    /// `"host=127.0.0.1 port=N user=postgres dbname=postgres"`.
    pub fn conn_string(&self) -> String {
        format!(
            "host={HOST} port={} user={USER} dbname={DBNAME}",
            self.port()
        )
    }

    /// Connection URL: `"postgres://postgres@127.0.0.1:N/postgres"`.
    pub fn url(&self) -> String {
        format!("postgres://{USER}@{HOST}:{}/{DBNAME}", self.port())
    }

    /// The cluster's data directory (inside the instance's temp dir; deleted on drop).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log (stderr of `postgres`, appended across restarts).
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// The last `lines` lines of the server log, for diagnostics in failing tests.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// The binaries this instance uses.
    pub fn binaries(&self) -> &PgBinaries {
        &self.bins
    }

    /// Process id of the postmaster, `None` while stopped.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// True while the server process is running (it may still be refusing connections if it
    /// crashed and is restarting).
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Runs `sql` with `psql -X -A -t -v ON_ERROR_STOP=1 -c <sql>` as user `postgres` against
    /// database `postgres`, and returns its stdout with surrounding whitespace trimmed.
    ///
    /// With `-A -t`, a single-column query returns bare values, one row per line (`"logical"`,
    /// `"1\n2"`); columns are separated by `|`; commands print their tag (`"INSERT 0 1"`). Several
    /// `;`-separated statements run in one transaction-less batch and each prints its result.
    ///
    /// # Errors
    /// [`HarnessError::Sql`] with psql's stderr (SQL error, or server unreachable);
    /// [`HarnessError::Spawn`] if psql cannot be run.
    pub fn psql(&self, sql: &str) -> Result<String, HarnessError> {
        self.psql_in(DBNAME, sql)
    }

    /// Like [`PgInstance::psql`], against database `dbname` (e.g. one made with `CREATE DATABASE`).
    ///
    /// # Errors
    /// As [`PgInstance::psql`].
    pub fn psql_in(&self, dbname: &str, sql: &str) -> Result<String, HarnessError> {
        let out = self
            .psql_command(dbname, sql, Duration::from_secs(10))
            .output()
            .map_err(|e| spawn_error(&self.bins.psql, e, None))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
        let hint = if self.process.is_stopped() {
            " (this instance is stopped: call restart() first)".to_string()
        } else {
            String::new()
        };
        Err(HarnessError::Sql {
            port: self.port(),
            sql: sql.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            hint,
        })
    }

    /// Stops the server with a fast shutdown (SIGINT: clients disconnected, checkpoint written),
    /// escalating to an immediate shutdown and SIGKILL after [`PgOptions::shutdown_timeout`].
    /// The data and the port are kept: the port stays reserved (connections are refused, nobody
    /// else can bind it) until [`PgInstance::restart`]. Stopping a stopped instance is a no-op.
    ///
    /// # Errors
    /// [`HarnessError::StopTimeout`] if the server survives even SIGKILL.
    pub fn stop(&mut self) -> Result<(), HarnessError> {
        let grace = self.opts.shutdown_timeout;
        self.process.stop(libc::SIGINT, grace)
    }

    /// Starts the server again on the same port with the same data (after [`PgInstance::stop`],
    /// or stops it first if it is running). Waits until it accepts connections.
    ///
    /// # Errors
    /// As [`PgInstance::start`]; [`HarnessError::PortInUse`] if another process took the port
    /// while the instance was stopped (the port cannot change, connection strings hold it).
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop()?;
        self.relaunch()
    }

    /// The temp dir.
    fn root(&self) -> &Path {
        self.process.root()
    }

    /// `program` in the temp dir, as the `postgres` user when we are root.
    fn program(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        scrub_pg_env(&mut cmd);
        cmd.current_dir(self.root()).stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
            cmd.env("USER", USER)
                .env("LOGNAME", USER)
                .env("HOME", self.root());
        }
        cmd
    }

    fn psql_command(&self, dbname: &str, sql: &str, connect_timeout: Duration) -> Command {
        let mut cmd = Command::new(&self.bins.psql);
        scrub_pg_env(&mut cmd);
        cmd.env(
            "PGCONNECT_TIMEOUT",
            connect_timeout.as_secs().max(2).to_string(),
        )
        .stdin(Stdio::null())
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args([
            "-h",
            HOST,
            "-p",
            &self.port().to_string(),
            "-U",
            USER,
            "-d",
            dbname,
        ])
        .args(["-c", sql]);
        cmd
    }

    fn initdb(&self) -> Result<(), HarnessError> {
        let log_path = self.root().join("initdb.log");
        let log = File::create(&log_path)
            .map_err(|e| HarnessError::io(format!("could not create {}", log_path.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| HarnessError::io("could not duplicate the initdb log handle", e))?;
        let mut cmd = self.program(&self.bins.initdb);
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args([
                "-A",
                "trust",
                "-U",
                USER,
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .stdout(log)
            .stderr(log_err);
        kill_on_parent_exit(&mut cmd, libc::SIGKILL);
        let command_line = process::describe(&cmd);
        let mut child =
            spawn_tied_to_process(cmd).map_err(|e| self.spawn_failed(&self.bins.initdb, e))?;
        let status = child
            .wait()
            .map_err(|e| HarnessError::io("could not wait for initdb", e))?;
        if status.success() {
            return Ok(());
        }
        if self.run_as.is_some() && !ancestors_searchable_by_others(self.root()) {
            return Err(HarnessError::TempDirNotAccessible {
                path: self.root().to_path_buf(),
            });
        }
        Err(HarnessError::CommandFailed {
            command: command_line,
            status: status_text(Some(status)),
            output: tail(&log_path, 0, LOG_TAIL_LINES),
            hint: "initdb could not create the cluster; check free disk space in TMPDIR and that \
                   the PostgreSQL installation is complete"
                .into(),
        })
    }

    fn write_config(&self) -> Result<(), HarnessError> {
        let conf_path = self.data_dir.join("postgresql.conf");
        let root = self.root().to_string_lossy();
        // sun_path is 108 bytes; the socket is "<dir>/.s.PGSQL.NNNNN" and its lock file adds ".lock".
        let socket_dir = if root.len() + 22 < 108 {
            root.replace('\'', "''")
        } else {
            String::new()
        };
        let mut text = format!(
            "\n# --- added by cacheclear-harness ---\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{socket_dir}'\n\
             wal_level = logical\n\
             max_wal_senders = 10\n\
             max_replication_slots = 10\n\
             fsync = off\n"
        );
        if !self.opts.extra_conf.is_empty() {
            text.push_str("# --- PgOptions::extra_conf ---\n");
            for line in &self.opts.extra_conf {
                text.push_str(line);
                text.push('\n');
            }
        }
        let append = |path: &Path, text: &str, truncate: bool| -> Result<(), HarnessError> {
            let mut f = OpenOptions::new()
                .write(true)
                .append(!truncate)
                .truncate(truncate)
                .open(path)
                .map_err(|e| HarnessError::io(format!("could not open {}", path.display()), e))?;
            f.write_all(text.as_bytes())
                .map_err(|e| HarnessError::io(format!("could not write {}", path.display()), e))
        };
        append(&conf_path, &text, false)?;
        append(
            &self.data_dir.join("pg_hba.conf"),
            "# written by cacheclear-harness: trust everything local, including replication\n\
             local all         all                trust\n\
             local replication all                trust\n\
             host  all         all  127.0.0.1/32  trust\n\
             host  replication all  127.0.0.1/32  trust\n",
            true,
        )
    }
}

impl Server for PgInstance {
    fn process(&mut self) -> &mut ServerProcess {
        &mut self.process
    }

    fn command(&self, port: u16) -> Command {
        let mut cmd = self.program(&self.bins.postgres);
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(port.to_string());
        cmd
    }

    /// Explains a failure to start `program` (as the `postgres` user when we are root).
    fn spawn_failed(&self, program: &Path, e: std::io::Error) -> HarnessError {
        // The chdir into the temp dir happens as the target user: an unsearchable parent (e.g.
        // TMPDIR under /root) shows up as EACCES from spawn.
        if self.run_as.is_some()
            && e.kind() == std::io::ErrorKind::PermissionDenied
            && !ancestors_searchable_by_others(self.root())
        {
            return HarnessError::TempDirNotAccessible {
                path: self.root().to_path_buf(),
            };
        }
        spawn_error(program, e, self.run_as.map(|_| USER))
    }

    fn probe(&mut self, launch: &Launch) -> Result<bool, HarnessError> {
        // Like `pg_ctl -w`: the postmaster writes "ready" into postmaster.pid once it has
        // bound its sockets and finished recovery. Only then is psql worth a try (it could
        // otherwise reach a squatter on the port and hang until its connect timeout).
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, launch.port));
        if !postmaster_ready(&self.data_dir, launch.pid)
            || TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err()
        {
            return Ok(false);
        }
        // Ask the server for its data directory: proves it is ready AND that it is ours
        // (not another server that grabbed the port while ours failed to bind).
        let out = self
            .psql_command(DBNAME, "SHOW data_directory", Duration::from_secs(5))
            .output()
            .map_err(|e| spawn_error(&self.bins.psql, e, None))?;
        if !out.status.success() {
            return Ok(false);
        }
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if dir == self.data_dir.to_string_lossy() {
            return Ok(true);
        }
        // Someone else's server answers on "our" port; ours will fail to bind.
        Err(self
            .process
            .port_in_use(launch, "Another PostgreSQL server answers on this port."))
    }
}

/// Whether `<data_dir>/postmaster.pid` belongs to `pid` and says the server is ready
/// (line 1: pid, line 8: status, as `pg_ctl -w` reads it).
fn postmaster_ready(data_dir: &Path, pid: u32) -> bool {
    let Ok(text) = std::fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return false;
    };
    let lines: Vec<&str> = text.lines().collect();
    lines.first().and_then(|l| l.trim().parse::<u32>().ok()) == Some(pid)
        && lines.get(7).is_some_and(|l| l.trim() == "ready")
}

/// Whether every ancestor of `dir` is searchable (x) by "others". Used only to explain an initdb
/// failure when running as root; not a precise permission check (ignores groups and ACLs).
fn ancestors_searchable_by_others(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    dir.ancestors().skip(1).all(|a| {
        std::fs::metadata(a)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_on_a_taken_port_says_so_and_launch_detects_taken_ports() {
        let mut pg = PgInstance::start().expect("start PostgreSQL");
        let port = pg.port();
        pg.stop().expect("stop");
        pg.process.release_ports();
        let squatter = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("squat");
        let err = pg.restart().expect_err("port is taken");
        assert!(err.is_port_in_use(), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("Address already in use"), "{msg}");
        assert!(msg.contains("while the instance was stopped"), "{msg}");
        drop(squatter);
        pg.restart().expect("port free again");
        assert_eq!(pg.psql("SELECT 1").expect("psql"), "1");
    }
}
