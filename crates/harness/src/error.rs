//! The one error type of the harness. Every message says what failed and what to do about it,
//! because the `cacheclear demo` command shows these messages to users verbatim.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while starting, using or stopping a throwaway server.
///
/// The `Display` text of every variant is a complete sentence for an end user: it names the
/// failing step, includes the relevant evidence (searched paths, the tail of the server log,
/// stderr of the failing command) and ends with a suggestion.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A required executable was not found.
    #[error("{what} not found (searched: {searched}): {hint}")]
    BinaryNotFound {
        /// Which program(s) were missing, e.g. "PostgreSQL server binaries (initdb, postgres)".
        what: String,
        /// The places that were searched, human readable.
        searched: String,
        /// What to install or which environment variable to set.
        hint: String,
    },

    /// We run as root, PostgreSQL refuses to, and there is no `postgres` user to run it as.
    #[error(
        "running as root, but PostgreSQL refuses to run as root and there is no `postgres` system \
         user to run it as: create one (`useradd --system --user-group postgres`, or install the \
         `postgresql` package which creates it) or run as an ordinary user"
    )]
    NoPostgresUser,

    /// The operating system could not give us a free loopback TCP port.
    #[error(
        "could not find a free TCP port on 127.0.0.1: {source}; check that the loopback \
         interface is up and that the process may open sockets"
    )]
    NoFreePort {
        /// The underlying socket error.
        #[source]
        source: io::Error,
    },

    /// A file-system or process operation failed.
    #[error("{action}: {source}")]
    Io {
        /// What we were doing, e.g. "could not create a temporary directory in /tmp".
        action: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// An external program could not be started at all.
    #[error("could not run `{program}`: {source}; {hint}")]
    Spawn {
        /// The program path.
        program: String,
        /// The underlying error from `exec`/`fork`.
        #[source]
        source: io::Error,
        /// What to check.
        hint: String,
    },

    /// An external helper program (e.g. `initdb`) ran and failed.
    #[error("`{command}` failed ({status}); its output ends with:\n{output}\n{hint}")]
    CommandFailed {
        /// The command line, for the user to re-run by hand.
        command: String,
        /// Exit status as text ("exit status: 1", "signal: 9").
        status: String,
        /// The tail of the command's output.
        output: String,
        /// What to check.
        hint: String,
    },

    /// The temporary directory is not reachable by the `postgres` user (only when running as root).
    #[error(
        "PostgreSQL runs as the `postgres` user, which cannot reach its data directory under \
         {path}: a parent directory is not searchable by other users; set TMPDIR to a \
         world-searchable directory such as /tmp"
    )]
    TempDirNotAccessible {
        /// The temporary directory that was created for the instance.
        path: PathBuf,
    },

    /// The server did not start accepting connections within the startup timeout.
    #[error(
        "{server} did not accept connections on 127.0.0.1:{port} within {timeout:?}; the machine \
         may be overloaded (raise the startup_timeout option) or the server is stuck. Its log \
         ended with:\n{log_tail}"
    )]
    StartTimeout {
        /// "PostgreSQL" or "Redis".
        server: &'static str,
        /// The port it was asked to listen on.
        port: u16,
        /// How long we waited.
        timeout: Duration,
        /// Last lines of the server log (the log itself is deleted with the instance's temp dir).
        log_tail: String,
    },

    /// The server process exited while starting, for a reason other than a taken port.
    #[error(
        "{server} exited during startup on port {port} ({status}). Its log ended with:\n{log_tail}"
    )]
    ServerExited {
        /// "PostgreSQL" or "Redis".
        server: &'static str,
        /// The port it was asked to listen on.
        port: u16,
        /// Exit status as text.
        status: String,
        /// Last lines of the server log (the log itself is deleted with the instance's temp dir).
        log_tail: String,
    },

    /// The server could not listen because another process holds the port.
    #[error(
        "{server} could not listen on 127.0.0.1:{port}: the port is in use by another process \
         (gave up after {attempts} attempt(s)). {hint} The server log ends with:\n{log_tail}"
    )]
    PortInUse {
        /// "PostgreSQL" or "Redis".
        server: &'static str,
        /// The last port tried.
        port: u16,
        /// How many ports / attempts were tried.
        attempts: u32,
        /// What to do.
        hint: &'static str,
        /// Last lines of the server log.
        log_tail: String,
    },

    /// A server did not stop, even after being killed.
    #[error(
        "{server} (pid {pid}) on port {port} did not exit within {timeout:?}, even after SIGKILL; \
         kill it by hand (`kill -9 {pid}`)"
    )]
    StopTimeout {
        /// "PostgreSQL" or "Redis".
        server: &'static str,
        /// Its port.
        port: u16,
        /// Its process id.
        pid: u32,
        /// How long we waited in total.
        timeout: Duration,
    },

    /// `psql` reported an error (bad SQL, or the server is not reachable).
    #[error("psql on 127.0.0.1:{port} failed: {stderr}{hint}\nstatement: {sql}")]
    Sql {
        /// The instance's port.
        port: u16,
        /// The SQL text that was sent.
        sql: String,
        /// psql's stderr, trimmed.
        stderr: String,
        /// Extra advice (e.g. "the instance is stopped"), starting with a separator, or empty.
        hint: String,
    },

    /// `redis-cli` reported an error (error reply, or the server is not reachable).
    #[error("redis-cli {args} on 127.0.0.1:{port} failed: {stderr}{hint}")]
    RedisCli {
        /// The instance's port.
        port: u16,
        /// The arguments, space separated.
        args: String,
        /// redis-cli's stderr (or stdout when stderr is empty), trimmed.
        stderr: String,
        /// Extra advice, starting with a separator, or empty.
        hint: String,
    },

    /// A Redis Cluster did not reach the expected state in time (slots assigned and
    /// `cluster_state:ok` on every node, replicas in sync, or a failover's new role).
    #[error(
        "Redis Cluster on 127.0.0.1 ports {ports}: {what} did not happen within {timeout:?}; last \
         observation: {detail}. The machine may be overloaded (raise the startup_timeout option) \
         or a node is stuck. The node logs end with:\n{log_tail}"
    )]
    ClusterNotReady {
        /// The client ports of the cluster's nodes, comma separated.
        ports: String,
        /// What we waited for, e.g. "cluster_state:ok with all 16384 slots on every node".
        what: String,
        /// How long we waited.
        timeout: Duration,
        /// The last thing that did not match (a node's reply or error).
        detail: String,
        /// The last lines of every node's log, each headed by its port.
        log_tail: String,
    },
}

impl HarnessError {
    pub(crate) fn io(action: impl Into<String>, source: io::Error) -> Self {
        HarnessError::Io {
            action: action.into(),
            source,
        }
    }

    /// True when this error means "the port was taken by someone else" (the harness retries
    /// these itself; exposed for callers that pick their own ports).
    pub fn is_port_in_use(&self) -> bool {
        matches!(self, HarnessError::PortInUse { .. })
    }
}
