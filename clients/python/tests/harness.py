"""Private servers for the tests, started the way the Rust harness (crates/harness) does it:
a ``redis-server`` on a free port on 127.0.0.1 in its own temp dir (no persistence), and a
PostgreSQL cluster (``initdb`` + ``postgres`` from ``$CACHECLEAR_PG_BIN``, ``pg_config
--bindir`` or ``/usr/lib/postgresql/*/bin``) with ``wal_level = logical`` and trust auth, run
as the ``postgres`` user when we are root (the temp dir is handed to that user; ``$TMPDIR`` must
be traversable by it, e.g. ``/tmp``).

Servers are direct children of the test process with a parent-death signal (SIGKILL / SIGQUIT),
so they never outlive it; ``stop()`` kills them and removes their directory. The system's own
PostgreSQL (5432) and Redis (6379) are never used.
"""

from __future__ import annotations

import ctypes
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import List, Optional

HOST = "127.0.0.1"


def repo_root() -> Path:
    """The repository root (the directory holding ``conformance/`` and ``crates/``)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "conformance" / "scenarios").is_dir() and (parent / "crates").is_dir():
            return parent
    raise RuntimeError(f"no repository root (with conformance/scenarios) above {here}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int):  # type: ignore[no-untyped-def]
    def pre() -> None:
        # Runs in the child after any setuid (which would clear it).
        _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return pre


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class RedisServer:
    """A private ``redis-server``: ``--port N --bind 127.0.0.1 --save "" --appendonly no``."""

    def __init__(self, extra_args: Optional[List[str]] = None) -> None:
        binary = shutil.which("redis-server", path=os.environ.get("CACHECLEAR_REDIS_BIN") or None)
        if binary is None:
            raise RuntimeError("redis-server not found (PATH or $CACHECLEAR_REDIS_BIN): apt-get install redis-server")
        self.dir = Path(tempfile.mkdtemp(prefix="cacheclear-py-redis-"))
        self.log = self.dir / "redis.log"
        last_error = ""
        for _ in range(5):
            self.port = free_port()
            args = [
                binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
                "--dir", str(self.dir), "--daemonize", "no", "--logfile", str(self.log),
            ] + list(extra_args or [])
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent(signal.SIGKILL),
            )
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    with socket.create_connection((HOST, self.port), timeout=0.5) as s:
                        s.sendall(b"PING\r\n")
                        if s.recv(16).startswith(b"+PONG"):
                            return
                except OSError:
                    pass
                time.sleep(0.01)
            last_error = _tail(self.log)
            self._kill()
        shutil.rmtree(self.dir, ignore_errors=True)
        raise RuntimeError(f"redis-server did not start; log:\n{last_error}")

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        self._kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def pg_bin_dir() -> Path:
    env = os.environ.get("CACHECLEAR_PG_BIN")
    if env:
        return Path(env)
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        d = Path(out.stdout.strip())
        if (d / "initdb").exists() and (d / "postgres").exists():
            return d
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
    )
    for d in reversed(candidates):
        if (Path(d) / "initdb").exists():
            return Path(d)
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, postgres) not found in $CACHECLEAR_PG_BIN, "
        "pg_config --bindir or /usr/lib/postgresql/*/bin: apt-get install postgresql"
    )


class PgServer:
    """A private PostgreSQL cluster on a free port, ``wal_level = logical``, trust auth for
    every local user including replication, ``fsync = off``. URL user ``postgres``."""

    def __init__(self) -> None:
        bindir = pg_bin_dir()
        self.dir = Path(tempfile.mkdtemp(prefix="cacheclear-py-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        user = group = None
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root, but there is no `postgres` user to run PostgreSQL as") from None
            user, group = pw.pw_uid, pw.pw_gid
            os.chown(self.dir, user, group)
            env.update(USER="postgres", LOGNAME="postgres", HOME=str(self.dir))
        self._user, self._group, self._env = user, group, env
        init = subprocess.run(
            [str(bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync",
             "-E", "UTF8", "--locale=C"],
            cwd=self.dir, env=env, user=user, group=group, capture_output=True, text=True,
        )
        if init.returncode != 0:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise RuntimeError(
                f"initdb failed ({init.returncode}); is TMPDIR ({tempfile.gettempdir()}) traversable by the "
                f"postgres user?\n{init.stdout}\n{init.stderr}"
            )
        socket_dir = str(self.dir) if len(str(self.dir)) + 22 < 108 else ""
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(
                "\n# --- added by the cacheclear Python test harness ---\n"
                f"listen_addresses = '{HOST}'\nunix_socket_directories = '{socket_dir}'\n"
                "wal_level = logical\nmax_wal_senders = 10\nmax_replication_slots = 10\nfsync = off\n"
            )
        with open(self.data / "pg_hba.conf", "w") as f:
            f.write(
                "local all all trust\nlocal replication all trust\n"
                f"host all all {HOST}/32 trust\nhost replication all {HOST}/32 trust\n"
            )
        last = ""
        for _ in range(5):
            self.port = free_port()
            logf = open(self.log, "ab")
            self.proc = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(self.data), "-p", str(self.port)],
                cwd=self.dir, env=env, user=user, group=group, stdin=subprocess.DEVNULL,
                stdout=logf, stderr=logf, preexec_fn=_die_with_parent(signal.SIGQUIT),
            )
            logf.close()
            if self._wait_ready(60):
                return
            last = _tail(self.log)
            self._kill()
        shutil.rmtree(self.dir, ignore_errors=True)
        raise RuntimeError(f"postgres did not start; log:\n{last}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        pidfile = self.data / "postmaster.pid"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                lines = pidfile.read_text().splitlines()
                if lines and int(lines[0]) == self.proc.pid and len(lines) > 7 and lines[7].strip() == "ready":
                    with socket.create_connection((HOST, self.port), timeout=0.5):
                        return True
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        return False

    @property
    def url(self) -> str:
        return f"postgres://postgres@{HOST}:{self.port}/postgres"

    @property
    def conninfo(self) -> str:
        return f"host={HOST} port={self.port} user=postgres dbname=postgres"

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        self._kill()
        shutil.rmtree(self.dir, ignore_errors=True)
