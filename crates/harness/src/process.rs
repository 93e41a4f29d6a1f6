//! Process and port plumbing shared by the servers (see `server.rs` for their lifecycle).

use std::collections::VecDeque;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::HarnessError;

/// Ports handed out by [`free_port`] recently, so two threads of this process never get the same
/// port while neither server has bound it yet. Other processes are handled by retrying.
static RECENT_PORTS: Mutex<VecDeque<u16>> = Mutex::new(VecDeque::new());
const RECENT_PORTS_KEPT: usize = 1024;

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is found by binding `127.0.0.1:0` and closing the socket again, so another process
/// may take it before you bind it: treat a bind failure as "pick another port". Within this
/// process the same port is not returned twice in a row (the last 1024 ports are remembered).
///
/// # Errors
/// [`HarnessError::NoFreePort`] if no socket can be bound on the loopback interface.
pub fn free_port() -> Result<u16, HarnessError> {
    let mut last_err = None;
    for _ in 0..64 {
        let port = match TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| l.local_addr()) {
            Ok(addr) => addr.port(),
            Err(e) => {
                last_err = Some(e);
                continue;
            }
        };
        let mut recent = RECENT_PORTS.lock().unwrap_or_else(|p| p.into_inner());
        if recent.contains(&port) {
            continue;
        }
        if recent.len() >= RECENT_PORTS_KEPT {
            recent.pop_front();
        }
        recent.push_back(port);
        return Ok(port);
    }
    Err(HarnessError::NoFreePort {
        source: last_err.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::AddrInUse,
                "the kernel kept returning ports this process already handed out",
            )
        }),
    })
}

/// Arranges for `cmd`'s process to receive `signal` when this process exits (Linux
/// `PR_SET_PDEATHSIG`; a no-op on other systems). Returns `cmd` for chaining.
///
/// Caveat: the kernel ties the signal to the *thread* that spawns the child, not the process.
/// Spawn such commands with [`spawn_tied_to_process`], which spawns from a thread that lives as
/// long as the process; spawning from a short-lived thread (e.g. a tokio blocking-pool thread)
/// would kill the child when that thread exits. The protection does not reach grandchildren
/// (e.g. anything a `pg_ctl` or `runuser` wrapper forks), which is why the harness runs
/// `postgres` and `redis-server` directly as its children.
pub fn kill_on_parent_exit(cmd: &mut Command, signal: libc::c_int) -> &mut Command {
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id();
        // SAFETY: the closure only makes async-signal-safe system calls (prctl, getppid) and
        // builds io::Errors from raw codes, which does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl: then nobody would signal us.
                if libc::getppid() as u32 != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = signal;
    cmd
}

/// Launch attempts before a taken port is reported as [`HarnessError::PortInUse`].
pub(crate) const PORT_ATTEMPTS: u32 = 5;

/// Runs `launch(port)`, retrying while the port turns out to be taken
/// ([`HarnessError::PortInUse`]), up to [`PORT_ATTEMPTS`] times: with `same_port = None` on a
/// fresh free port each time (a first start), with `Some((port, hint))` on that same port after
/// 200 ms (a restart: clients hold the port), reporting `hint` if it stays taken. The final
/// error carries the number of attempts.
pub(crate) fn launch_retrying_port(
    same_port: Option<(u16, &'static str)>,
    mut launch: impl FnMut(u16) -> Result<(), HarnessError>,
) -> Result<(), HarnessError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let port = match same_port {
            Some((port, _)) => port,
            None => free_port()?,
        };
        match launch(port) {
            Err(HarnessError::PortInUse { .. }) if attempt < PORT_ATTEMPTS => {
                if same_port.is_some() {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            Err(HarnessError::PortInUse {
                server,
                port,
                hint,
                log_tail,
                ..
            }) => {
                return Err(HarnessError::PortInUse {
                    server,
                    port,
                    attempts: attempt,
                    hint: same_port.map_or(hint, |(_, restart_hint)| restart_hint),
                    log_tail,
                });
            }
            other => return other,
        }
    }
}

type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from a dedicated thread that lives as long as the process, so a parent-death
/// signal set with [`kill_on_parent_exit`] fires when the *process* exits, not when the calling
/// thread does. Falls back to spawning on the calling thread if that thread cannot be created.
///
/// # Errors
/// The `io::Error` of `Command::spawn`.
pub fn spawn_tied_to_process(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("cacheclear-harness-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .ok()
            .map(|_| tx)
    });
    let mut cmd = cmd;
    if let Some(tx) = spawner {
        let (reply_tx, reply_rx) = mpsc::channel();
        match tx.send((cmd, reply_tx)) {
            Ok(()) => {
                return reply_rx
                    .recv()
                    .unwrap_or_else(|_| Err(io::Error::other("the harness spawner thread died")));
            }
            Err(mpsc::SendError((returned, _))) => cmd = returned,
        }
    }
    cmd.spawn()
}

/// Sends `signal` to `pid`, ignoring "no such process".
pub(crate) fn signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// Waits up to `timeout` for `child` to exit. `Ok(None)` means it is still running.
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Stops `child`: `first_signal`, then after `grace` SIGKILL, then waits up to 10 s more.
/// Returns the error message case as `Err(total waited)` if it still did not exit.
pub(crate) fn terminate(
    child: &mut Child,
    first_signal: libc::c_int,
    grace: Duration,
) -> Result<(), Duration> {
    if let Ok(Some(_)) = child.try_wait() {
        return Ok(());
    }
    if first_signal != libc::SIGKILL {
        signal(child.id(), first_signal);
        if let Ok(Some(_)) = wait_timeout(child, grace) {
            return Ok(());
        }
    }
    let _ = child.kill();
    let last = Duration::from_secs(10);
    match wait_timeout(child, last) {
        Ok(Some(_)) => Ok(()),
        // ECHILD and friends: someone else reaped it; it is gone.
        Err(_) => Ok(()),
        Ok(None) => Err(grace + last),
    }
}

/// A loopback port held while its server is stopped: a TCP socket bound to 127.0.0.1:port that
/// never listens. Connections to the port are refused (as if nothing were there), but other
/// processes cannot take the port, and the kernel does not hand it out for `bind(0)` or as an
/// outgoing connection's ephemeral port. Best effort: if the port cannot be bound exclusively
/// (e.g. old connections in TIME_WAIT), it is bound with SO_REUSEADDR, which still keeps it out
/// of the ephemeral range; if even that fails there is no reservation.
#[derive(Debug)]
pub(crate) struct PortReservation {
    _socket: OwnedFd,
}

impl PortReservation {
    pub(crate) fn new(port: u16) -> Option<Self> {
        Self::bind(port, false).or_else(|| Self::bind(port, true))
    }

    fn bind(port: u16, reuse_addr: bool) -> Option<Self> {
        // SAFETY: plain socket syscalls on a fresh fd that we own; `addr` outlives the call.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return None;
            }
            let socket = OwnedFd::from_raw_fd(fd);
            if reuse_addr {
                let one: libc::c_int = 1;
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_REUSEADDR,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_port = port.to_be();
            addr.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
            let rc = libc::bind(
                fd,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            (rc == 0).then_some(PortReservation { _socket: socket })
        }
    }
}

/// The length of a file, 0 if it does not exist.
pub(crate) fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The text of `path` from byte `from` on (lossy UTF-8), at most the last 64 KiB of it.
pub(crate) fn read_from(path: &Path, from: u64) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = from.max(len.saturating_sub(64 * 1024));
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last `lines` lines of `path` (from byte `from` on), or a placeholder if it is empty.
pub(crate) fn tail(path: &Path, from: u64, lines: usize) -> String {
    let text = read_from(path, from);
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let out = all[start..].join("\n");
    if out.trim().is_empty() {
        format!("(nothing in {})", path.display())
    } else {
        out
    }
}

/// The uid and primary gid of the user `name`, via the system user database.
pub(crate) fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: `pwd` and `buf` outlive the call; getpwnam_r writes only within them.
        let (rc, found) = unsafe {
            let mut pwd: libc::passwd = std::mem::zeroed();
            let mut result: *mut libc::passwd = std::ptr::null_mut();
            let rc = libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            );
            (rc, (!result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid)))
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        return if rc == 0 { found } else { None };
    }
}

/// True when this process runs with effective uid 0.
pub(crate) fn running_as_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Removes every `PG*` variable (PGDATA, PGPORT, PGSSLMODE, PGOPTIONS, ...) from `cmd`'s
/// environment so the user's settings cannot redirect or break our private instance.
pub(crate) fn scrub_pg_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Renders a command line for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let s = a.to_string_lossy();
            if s.is_empty() || s.contains(' ') {
                format!("'{s}'")
            } else {
                s.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `status` as text for error messages.
pub(crate) fn status_text(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => s.to_string(),
        },
        None => "unknown exit status".into(),
    }
}

/// Maps a spawn failure to a user-grade error.
pub(crate) fn spawn_error(
    program: &Path,
    source: io::Error,
    as_user: Option<&str>,
) -> HarnessError {
    let hint = match (source.kind(), as_user) {
        (io::ErrorKind::PermissionDenied, Some(user)) => format!(
            "the process could not switch to the `{user}` user or `{user}` may not execute the \
             program; check that this process may change user (CAP_SETUID/CAP_SETGID) and that \
             the program is executable by `{user}`"
        ),
        (io::ErrorKind::NotFound, _) => {
            "the program disappeared or is not executable; check the installation".into()
        }
        _ => "check that the program is installed correctly and executable".into(),
    };
    HarnessError::Spawn {
        program: program.display().to_string(),
        source,
        hint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    #[test]
    fn free_port_does_not_repeat_within_the_process() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let p = free_port().expect("free port");
            assert!(p > 0);
            assert!(seen.insert(p), "port {p} handed out twice");
        }
    }

    #[test]
    fn reservation_refuses_connections_and_blocks_binds() {
        let port = free_port().expect("free port");
        let r = PortReservation::new(port).expect("reserve");
        let err = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert!(TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err());
        drop(r);
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("free again");
        drop(l);
    }

    #[test]
    fn tail_returns_last_lines_or_placeholder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("log");
        assert!(tail(&p, 0, 3).contains("nothing in"));
        std::fs::write(&p, "a\nb\nc\nd\n").expect("write");
        assert_eq!(tail(&p, 0, 2), "c\nd");
        assert_eq!(tail(&p, 6, 10), "d");
    }

    #[test]
    fn killed_with_parent_thread_tie_survives_thread_exit() {
        // A child spawned through the spawner outlives the thread that asked for it.
        let handle = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            kill_on_parent_exit(&mut cmd, libc::SIGKILL);
            spawn_tied_to_process(cmd).expect("spawn sleep")
        });
        let mut child = handle.join().expect("thread");
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "child died with its thread"
        );
        assert!(terminate(&mut child, libc::SIGTERM, Duration::from_secs(5)).is_ok());
    }
}
