"""The staleness breaker's judgment (docs/protocol.md §5), without I/O.

The client feeds it the reply of ``read_namespace.lua`` and the monotonic instant the script was
sent; the breaker publishes a :class:`View` judged ahead of time, so the hit path only compares
the monotonic clock with two numbers. No wall clock is ever compared with anything: the
staleness at the read is computed from two Redis ``TIME`` values (``now_ms`` and the watermark's
``written_ms``), then aged on this process's monotonic clock.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, Optional, Sequence, Tuple

from ._config import StalenessConfig
from ._lsn import from_fixed_hex

__all__ = [
    "View",
    "Snapshot",
    "Problem",
    "Breaker",
    "parse_namespace_reply",
    "judge_namespace_reply",
    "WATERMARK_STALE",
    "WATERMARK_MISSING",
    "EPOCH_MISSING",
    "RYW_BACKOFF_INITIAL_MS",
]

log = logging.getLogger("cacheclear")

#: Bypass reasons (also the suffixes of the ``bypassed_*`` counters).
WATERMARK_STALE = "watermark_stale"
WATERMARK_MISSING = "watermark_missing"
EPOCH_MISSING = "epoch_missing"

#: First pause of a waiting ``get_at_least`` between namespace reads, ms; it doubles up to
#: ``refresh_ms`` (docs/protocol.md §5).
RYW_BACKOFF_INITIAL_MS = 5


class View(NamedTuple):
    """One published judgment. Times are ``time.monotonic()`` seconds."""

    #: Reads may use the cache while ``now < open_until`` (0.0: never).
    open_until: float
    #: The namespace is due for a read from this instant (0.0: never read yet).
    refresh_at: float
    #: The namespace's epoch (0 when absent).
    epoch: int
    #: The watermark's LSN (0 when absent).
    lsn: int
    #: Why reads bypass once ``open_until`` has passed.
    reason: str


class Snapshot(NamedTuple):
    """What one namespace read found."""

    #: ``lag_ms + (Redis now − written_ms)`` at the read; ``None`` without a (current) watermark.
    staleness_ms: Optional[int]
    #: The namespace epoch; ``None`` when absent or unreadable.
    epoch: Optional[int]
    #: The watermark's LSN (0 without one).
    lsn: int


def _text(v: Any) -> str:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", "replace")
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, str):
        return v
    raise ValueError(f"unexpected element {v!r}")


def _uint(s: str) -> int:
    if not s.isdigit() or not s.isascii():
        raise ValueError(f"`{s}` is not a non-negative integer")
    return int(s)


class Problem(NamedTuple):
    """Why the epoch or the watermark of a namespace read counts as absent."""

    #: ``"missing"``, ``"unreadable"`` or ``"other_epoch"`` (the watermark only).
    kind: str
    #: A human description for the log.
    detail: str


def parse_namespace_reply(namespace: str, reply: Any) -> Snapshot:
    """Judges ``read_namespace.lua``'s reply ``[watermark, epoch, now_ms]``.

    Malformed fields count as absent (see :func:`judge_namespace_reply`, which also says why;
    :meth:`Breaker.publish` logs it). A watermark of another epoch than the namespace's
    describes an older stream and counts as absent.

    Raises:
        ValueError: the reply is not a list of three strings (a bad Redis reply).
    """
    return judge_namespace_reply(reply)[0]


def judge_namespace_reply(reply: Any) -> Tuple[Snapshot, Optional[Problem], Optional[Problem]]:
    """:func:`parse_namespace_reply` with the problems of the epoch and of the watermark
    (``None`` when the field is usable).

    Raises:
        ValueError: the reply is not a list of three strings (a bad Redis reply).
    """
    if not isinstance(reply, (list, tuple)) or len(reply) != 3:
        raise ValueError(f"read_namespace.lua replied {reply!r}, expected [watermark, epoch, now_ms]")
    watermark, epoch_text, now_text = (_text(x) for x in reply)
    epoch: Optional[int] = None
    epoch_problem: Optional[Problem] = None
    wm_problem: Optional[Problem] = None
    if epoch_text == "":
        epoch_problem = Problem("missing", "missing")
    else:
        try:
            epoch = _uint(epoch_text)
        except ValueError:
            epoch_problem = Problem("unreadable", f"not an integer ({epoch_text!r})")
    try:
        now_ms: Optional[int] = _uint(now_text)
    except ValueError:
        now_ms = None
    wm: Optional[Tuple[int, int, int, int]] = None
    if watermark == "":
        wm_problem = Problem("missing", "missing")
    else:
        try:
            fields = watermark.split(" ")
            if len(fields) < 5:
                raise ValueError("fewer than 5 fields")
            lsn = from_fixed_hex(fields[0])
            int(fields[1])  # commit_time_us (may be negative); unused here
            wm = (lsn, _uint(fields[2]), _uint(fields[3]), _uint(fields[4]))
        except ValueError as e:
            wm_problem = Problem("unreadable", f"malformed ({watermark!r}: {e})")
            wm = None
    if wm is not None and wm[3] != epoch:
        if epoch is not None:
            wm_problem = Problem("other_epoch", f"of epoch {wm[3]}, not the namespace's epoch {epoch}")
        wm = None
    staleness: Optional[int] = None
    if wm is not None and now_ms is not None:
        staleness = wm[1] + max(now_ms - wm[2], 0)
    return Snapshot(staleness, epoch, wm[0] if wm is not None else 0), epoch_problem, wm_problem


class Breaker:
    """One client instance's view of its namespace. ``view`` is replaced as a whole (one
    reference store), so threads never see half of a judgment."""

    __slots__ = ("cfg", "view", "last_attempt", "watermark_key", "epoch_key", "epoch_problem", "watermark_problem")

    def __init__(self, cfg: StalenessConfig) -> None:
        self.cfg = cfg
        self.view = View(0.0, 0.0, 0, 0, WATERMARK_MISSING)
        #: When the last namespace read was attempted (monotonic s), ``None``: never.
        self.last_attempt: Optional[float] = None
        self.watermark_key = "{cacheclear.ns:" + cfg.namespace + "}:watermark"
        self.epoch_key = "{cacheclear.ns:" + cfg.namespace + "}:epoch"
        #: The kind of the last namespace read's epoch / watermark problem (``None``: usable or
        #: not read yet): a WARNING is logged on each transition into a problem, not per read.
        self.epoch_problem: Optional[str] = None
        self.watermark_problem: Optional[str] = None

    def due(self, now: float, interval_s: Optional[float] = None) -> bool:
        """Whether a namespace read may be sent now: none attempted within ``interval_s``
        seconds (default ``refresh_ms``; a waiting ``get_at_least`` passes its backoff)."""
        if self.last_attempt is None:
            return True
        if interval_s is None:
            interval_s = self.cfg.refresh_ms / 1000.0
        return now - self.last_attempt >= interval_s

    def _note(self, redis_key: str, attr: str, problem: Optional[Problem], hint: str) -> None:
        before = getattr(self, attr)
        kind = problem.kind if problem is not None else None
        if kind == before:
            return
        setattr(self, attr, kind)
        if problem is not None:
            log.warning(
                "namespace `%s`: redis key `%s` is %s; reads bypass the cache%s",
                self.cfg.namespace, redis_key, problem.detail, hint,
            )
        else:
            log.info("namespace `%s`: redis key `%s` is readable again", self.cfg.namespace, redis_key)

    def publish(
        self,
        sent: float,
        s: Snapshot,
        epoch_problem: Optional[Problem] = None,
        watermark_problem: Optional[Problem] = None,
    ) -> None:
        """Publishes ``s`` read by a script sent at monotonic ``sent``: reads may use the cache
        while ``staleness_ms`` plus the whole ms since ``sent`` stays within
        ``max_staleness_ms``. Logs a WARNING naming the Redis key when the epoch or the
        watermark turns missing or unreadable (once per transition)."""
        cfg = self.cfg
        typo = (
            " (is staleness.namespace the pipeline's [postgres] namespace — default: its slot "
            "name, `cacheclear` — and has the pipeline started?)"
        )
        self._note(self.epoch_key, "epoch_problem", epoch_problem, typo if epoch_problem and epoch_problem.kind == "missing" else "")
        wm_hint = ""
        if watermark_problem is not None and watermark_problem.kind == "missing":
            wm_hint = typo if epoch_problem is not None else " (is the pipeline running?)"
        self._note(self.watermark_key, "watermark_problem", watermark_problem, wm_hint)
        refresh_at = sent + cfg.refresh_ms / 1000.0
        if s.epoch is None:
            open_until, reason = 0.0, EPOCH_MISSING
        elif s.staleness_ms is None:
            open_until, reason = 0.0, WATERMARK_MISSING
        elif s.staleness_ms > cfg.max_staleness_ms:
            open_until, reason = 0.0, WATERMARK_STALE
        else:
            open_until = sent + (cfg.max_staleness_ms - s.staleness_ms + 1) / 1000.0
            reason = WATERMARK_STALE
        self.view = View(open_until, max(refresh_at, 1e-9), s.epoch or 0, s.lsn, reason)

    def verdict(self, now: float) -> Tuple[bool, int, int, str]:
        """``(open, epoch, lsn, reason)`` at monotonic ``now``."""
        v = self.view
        return (now < v.open_until, v.epoch, v.lsn, v.reason)

    def script_keys(self) -> Sequence[str]:
        """``KEYS`` of ``read_namespace.lua``."""
        return (self.watermark_key, self.epoch_key)
