"""Pieces shared by the asyncio and the threaded client: loader results, counters, the
protocol's scripts, Redis reply classification and the single-flight acceptance rule."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any, Generic, List, NamedTuple, Optional, Tuple, TypeVar

import redis.exceptions

from ._errors import InvalidConfig, LoaderError
from ._lsn import LsnLike, as_lsn, from_fixed_hex

__all__ = ["Loaded", "Stats", "Script", "SCRIPTS"]

log = logging.getLogger("cacheclear")

T = TypeVar("T")


class Loaded(Generic[T]):
    """What a loader may return instead of a bare value: the value and the version it was
    read at.

    Args:
        value: the value read from the database; it is stored as JSON, so return JSON-native
            data (dict, list, str, int, float, bool, None). A hit returns what ``json.loads``
            gives back (a tuple comes back as a list, ``int`` dict keys as strings).
        version: for reads on a **read replica**: ``pg_last_wal_replay_lsn()`` taken *before*
            the read, as PostgreSQL's ``X/X`` text (or an ``int`` LSN). The fill is refused when
            the key's fence (the newest invalidated commit) is newer. ``None`` (default) for
            reads on the primary, where the lease alone guards the fill. Never pass a version
            taken after the read.
    """

    __slots__ = ("value", "version")

    def __init__(self, value: T, version: Optional[LsnLike] = None) -> None:
        self.value = value
        self.version = version

    def __repr__(self) -> str:
        return f"Loaded({self.value!r}, version={self.version!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Loaded) and (self.value, self.version) == (other.value, other.version)


def unpack_loaded(key: str, result: Any) -> Tuple[Any, Optional[int]]:
    """``(value, version as int or None)`` of a loader's result.

    Raises:
        LoaderError: the version is not an LSN (the loader's fault; nothing is cached).
    """
    if type(result) is Loaded:
        if result.version is None:
            return result.value, None
        try:
            return result.value, as_lsn(result.version)
        except ValueError as e:
            raise LoaderError(key, e, "its Loaded.version is not an LSN") from e
    return result, None


class ReadState:
    """What one public read has already reported: an unreadable cached value is logged and
    counted once per read, however often the read GETs it (first GET, under the lease, polls)."""

    __slots__ = ("decode_reported",)

    def __init__(self, decode_reported: bool) -> None:
        self.decode_reported = decode_reported


class LoaderMisuse(TypeError):
    """A loader used the wrong way (an awaitable returned to the synchronous client): the
    client's own message, safe to put into :class:`LoaderError`'s text."""


def loader_error(key: str, e: BaseException) -> LoaderError:
    """The :class:`LoaderError` for a loader's exception ``e``: its text is kept out of the
    message (it may hold credentials or row data), except the client's own :class:`LoaderMisuse`."""
    return LoaderError(key, e, str(e) if isinstance(e, LoaderMisuse) else None)


@dataclass
class Stats:
    """Counters of one client instance (a snapshot from ``client.stats()``). Exact for
    :class:`cacheclear.AsyncClient`; for the threaded :class:`cacheclear.Client` an increment
    may rarely be lost under contention (they are for metrics, not for logic)."""

    #: Reads served from Redis (first GET, re-read under the lease, or a poll).
    hits: int = 0
    #: Reads whose first GET missed (absent, undecodable, older epoch) and went to the lease.
    misses: int = 0
    #: Loader runs under a lease (those that may fill).
    loads: int = 0
    #: Fills Redis accepted.
    fills: int = 0
    #: Fills refused because the lease was gone (expired, or deleted by an invalidation).
    fills_refused_lease_lost: int = 0
    #: Fills refused because the fence is newer than the loader's version.
    fills_refused_fenced: int = 0
    #: Lease or fill refused by Redis for OOM (maxmemory): loaded, not cached.
    fills_skipped_oom: int = 0
    #: Misses that found the lease held by another process and waited.
    lease_waits: int = 0
    #: Waits that ran out after ``lease_wait_ms``.
    lease_wait_timeouts: int = 0
    #: Loads without filling after a wait ran out.
    unfilled_loads: int = 0
    #: Redis commands that failed or replied unexpectedly.
    redis_errors: int = 0
    #: Loads run because Redis failed (``on_redis_error = fallback``).
    fallbacks: int = 0
    #: Cached values that were not a readable format-1 envelope (misses).
    decode_errors: int = 0
    #: Cached values of an older epoch than the namespace's (misses).
    epoch_misses: int = 0
    #: Misses that joined another caller's in-process load (single-flight).
    coalesced: int = 0
    #: Followers that could not take the load they joined (it started before them and its
    #: fill was refused) and read again.
    coalesce_retries: int = 0
    #: Strict reads (loader only).
    strict_loads: int = 0
    #: Loader failures.
    loader_errors: int = 0
    #: Namespace reads (``read_namespace.lua``).
    namespace_reads: int = 0
    #: Reads that bypassed the cache because the watermark was too old.
    bypassed_watermark_stale: int = 0
    #: ... because there was no (current) watermark.
    bypassed_watermark_missing: int = 0
    #: ... because there was no epoch.
    bypassed_epoch_missing: int = 0
    #: Bypasses that waited for a free load slot.
    bypass_waits: int = 0
    #: Reads refused with BypassOverloaded.
    bypass_overloaded: int = 0
    #: Cached values served while the breaker was open (``on_bypass_full = serve_stale``).
    stale_served: int = 0
    #: ``get_at_least`` reads that waited for the watermark.
    ryw_waits: int = 0
    #: ``get_at_least`` reads that loaded without filling (the wait ran out, or no breaker).
    ryw_loads: int = 0
    #: XFetch early refreshes.
    early_refreshes: int = 0

    def copy(self) -> "Stats":
        """A snapshot."""
        return Stats(**{f.name: getattr(self, f.name) for f in fields(self)})


class Script:
    """One of the protocol's Lua scripts, loaded from ``crates/protocol/lua/`` (shipped in the
    package as ``cacheclear/lua/*.lua``; never copied into Python source)."""

    __slots__ = ("name", "text", "sha")

    def __init__(self, name: str) -> None:
        self.name = name
        self.text = _read_lua(name)
        self.sha = hashlib.sha1(self.text.encode("utf-8")).hexdigest()


def _read_lua(name: str) -> str:
    try:
        return resources.files("cacheclear").joinpath("lua", name).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError, OSError) as e:
        raise RuntimeError(
            f"the protocol script cacheclear/lua/{name} is missing from this installation "
            "(the package ships crates/protocol/lua/*.lua; reinstall from the repository)"
        ) from e


class _Scripts:
    def __init__(self) -> None:
        self.fill = Script("fill.lua")
        self.release = Script("release.lua")
        self.read_namespace = Script("read_namespace.lua")


SCRIPTS = _Scripts()

# ---- Redis reply classification ----

#: Exceptions that mean "Redis failed" (connection, timeout, error reply).
REDIS_FAILURES = (redis.exceptions.RedisError, OSError)


def is_oom(e: BaseException) -> bool:
    """Redis's ``-OOM command not allowed when used memory > 'maxmemory'``."""
    if not isinstance(e, redis.exceptions.ResponseError):
        return False
    if type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return text.startswith("OOM") or "command not allowed when used memory" in text


def is_noscript(e: BaseException) -> bool:
    """Redis's ``-NOSCRIPT`` (the script cache was flushed or Redis restarted / failed over)."""
    return isinstance(e, redis.exceptions.NoScriptError) or (
        isinstance(e, redis.exceptions.ResponseError) and str(e).startswith("NOSCRIPT")
    )


class UnexpectedReply(redis.exceptions.RedisError):
    """A Redis reply of a shape the protocol does not allow (raised internally, then treated as
    a Redis failure naming the key)."""


def lease_acquired(reply: Any) -> bool:
    """Reads ``SET … NX PX``'s reply: ``True`` taken, ``False`` held elsewhere.

    Raises:
        UnexpectedReply: any other reply.
    """
    if reply is None:
        return False
    if reply is True or reply == b"OK" or reply == "OK":
        return True
    raise UnexpectedReply(f"SET NX replied {reply!r}")


def read_fence(key: str, reply: Any) -> Optional[int]:
    """The fence LSN from ``GET {K}:fence`` (0 when absent); ``None`` (logged) when unreadable."""
    if reply is None:
        return 0
    try:
        return from_fixed_hex(reply)
    except ValueError:
        log.warning("cache key `%s`: unreadable fence %r; the value's read position stays unknown", key, reply)
        return None


def script_int(reply: Any) -> Optional[int]:
    """An integer script reply, or ``None`` for anything else."""
    if isinstance(reply, int) and not isinstance(reply, bool):
        return reply
    return None


class LeaseHeld(NamedTuple):
    """A lease this client took: its token and the key's fence at that moment (``0`` when
    there was none, ``None`` when unreadable): the envelope's ``read_after``."""

    token: str
    read_after: Optional[int]


def new_token() -> str:
    """A lease token: 32 lower-case hex digits, 128 random bits."""
    return os.urandom(16).hex()


def now_ms() -> int:
    """Wall-clock Unix ms (only written into envelopes' ``expiry_ms``, never compared)."""
    return int(time.time() * 1000)


_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with its user and password (and a ``password=`` query parameter) replaced by
    ``***``, for logs and errors."""
    try:
        scheme, rest = url.split("://", 1)
    except ValueError:
        return "<redis url>"
    at = rest.rfind("@")
    if at >= 0:
        rest = "***@" + rest[at + 1:]
    return _QUERY_PASSWORD.sub(r"\1***", f"{scheme}://{rest}")


def _secrets(url: str) -> List[str]:
    out: List[str] = []
    rest = url.split("://", 1)[-1]
    at = rest.rfind("@")
    if at >= 0:
        out.extend(p for p in rest[:at].split(":") if p)
    out.extend(m.group(0).split("=", 1)[1] for m in _QUERY_PASSWORD.finditer(url) if "=" in m.group(0))
    return [p for p in out if p]


def redis_from_url(factory: Any, url: str, config: Any) -> Any:
    """``factory(url, socket_timeout=…, socket_connect_timeout=…)`` (``redis.Redis.from_url`` or
    its asyncio twin).

    Raises:
        InvalidConfig: the URL does not parse (``field == "redis_url"``; neither the message
            nor the exception chain holds the user or the password).
    """
    try:
        return factory(
            url,
            socket_timeout=config.redis_timeout_ms / 1000.0,
            socket_connect_timeout=config.redis_connect_timeout_ms / 1000.0,
        )
    except (ValueError, TypeError) as e:
        detail = str(e)
        for secret in _secrets(url):
            detail = detail.replace(secret, "***")
        error = InvalidConfig(
            "redis_url",
            redact_url(url),
            f"not a Redis URL ({detail}); expected redis://[[user]:password@]host[:port][/db], "
            "rediss://… or unix://…",
        )
    raise error


def ms(seconds: float) -> int:
    """Whole milliseconds of a duration in seconds."""
    return int(seconds * 1000)


# ---- single-flight results ----

#: Kinds of a flight's published result: the value, an error every follower shares, or "the
#: leader vanished (cancelled): read again".
OK, ERROR, RETRY = 0, 1, 2

#: ``(kind, value or exception, obs)``. ``obs`` is the client's sequence number taken when the
#: observation behind the value began: the GET that hit was sent, the loader started, or the
#: FILL that Redis accepted was sent. A follower that joined at sequence ``j`` takes the value
#: only if ``j < obs``: the value then reflects every invalidation applied before the follower
#: started (a fill accepted after the join proves no invalidation came between the lease and the
#: fill), so coalescing never hands a read an answer older than its own start.
FlightResult = Tuple[int, Any, int]
