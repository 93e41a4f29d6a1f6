"""Client options, their defaults (docs/protocol.md §4–5, the Rust client's) and validation."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

from ._errors import InvalidConfig

__all__ = [
    "Config",
    "StalenessConfig",
    "WaitTimeoutPolicy",
    "RedisErrorPolicy",
    "BypassFullPolicy",
    "ReadPolicy",
]

#: Ten years in ms: the largest accepted TTL / wait (Redis rejects absurd ``PX`` values).
MAX_TTL_MS = 10 * 365 * 24 * 3_600 * 1_000


class WaitTimeoutPolicy(str, enum.Enum):
    """What a miss does when another process holds the lease and no value appeared within
    ``lease_wait_ms``."""

    #: Run the loader and return its value without writing Redis (default). The lease holder
    #: still fills. Costs one extra database read per waiting process per timeout.
    LOAD_WITHOUT_FILLING = "load_without_filling"
    #: Raise :class:`cacheclear.LeaseWaitTimeout` without running the loader.
    ERROR = "error"


class RedisErrorPolicy(str, enum.Enum):
    """What a read does when Redis fails (connection refused or lost, timeout, error reply,
    unexpected reply)."""

    #: Run the loader and return its value without caching (default): the database is the
    #: source of truth. With Redis down, every read reaches the database.
    FALLBACK = "fallback"
    #: Raise :class:`cacheclear.RedisError` (shed load instead of hitting the database).
    ERROR = "error"


class BypassFullPolicy(str, enum.Enum):
    """What a read does when the staleness breaker is open and ``max_bypass_loads`` database
    loads of this process are already running."""

    #: Wait for a free slot up to ``lease_wait_ms``, then raise
    #: :class:`cacheclear.BypassOverloaded` (default).
    WAIT = "wait"
    #: Serve the cached value if there is one (counted in ``stale_served``), else wait.
    SERVE_STALE = "serve_stale"
    #: Raise :class:`cacheclear.BypassOverloaded` at once.
    FAIL = "fail"


class ReadPolicy(str, enum.Enum):
    """How one read treats the cache."""

    #: Cache-aside through Redis (the default).
    CACHED = "cached"
    #: Run the loader, never read or write Redis: balances, stock, checkout totals.
    STRICT = "strict"


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise InvalidConfig(name, value, expected)


def _is_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class StalenessConfig:
    """The staleness breaker, epochs and read-your-writes of one pipeline namespace
    (docs/protocol.md §5).

    The client reads the namespace's watermark and epoch (``read_namespace.lua``) at most every
    ``refresh_ms`` per client instance and estimates the staleness as
    ``lag_ms + (Redis now − written_ms)`` plus the time since, on the process's monotonic clock.
    While it exceeds ``max_staleness_ms``, or the watermark or the epoch is absent, reads bypass
    the cache (run the loader, never fill). Values filled under an older epoch are misses.
    A served value is then at most ``max_staleness_ms + refresh_ms`` behind the commit that
    invalidated it.

    Attributes:
        namespace: the pipeline's ``[postgres] namespace`` (default there: the slot name,
            ``cacheclear``). Non-empty, without ``{`` / ``}`` (as the pipeline requires). A name
            the pipeline does not write turns the cache off (every read bypasses it): the
            client logs a WARNING naming the missing Redis key (``{cacheclear.ns:<name>}:epoch``,
            ``…:watermark``) once each time it goes missing.
        max_staleness_ms: the bound, ms. Default 5 000.
        refresh_ms: how often the namespace is read, ms (1 ..= ``max_staleness_ms``).
            Default 250. A waiting ``get_at_least`` reads it more often: with a backoff from
            5 ms doubling to ``refresh_ms``.
        max_bypass_loads: database loads this client runs at once while the breaker is open.
            Default 32.
        on_bypass_full: see :class:`BypassFullPolicy`. Default ``"wait"``.
        read_your_writes_wait_ms: how long ``get_at_least`` waits for the watermark to pass
            the caller's LSN (re-reading the namespace with a backoff from 5 ms doubling to
            ``refresh_ms``) before it loads without filling, ms. Default 1 000.
    """

    namespace: str
    max_staleness_ms: int = 5_000
    refresh_ms: int = 250
    max_bypass_loads: int = 32
    on_bypass_full: Union[BypassFullPolicy, str] = BypassFullPolicy.WAIT
    read_your_writes_wait_ms: int = 1_000

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "on_bypass_full", BypassFullPolicy(self.on_bypass_full))
        except ValueError:
            raise InvalidConfig(
                "staleness.on_bypass_full", self.on_bypass_full, "one of wait, serve_stale, fail"
            ) from None
        ns = self.namespace
        # As the pipeline's NamespaceLayout::new and the Rust client: non-empty, no `{` / `}`
        # (they would break the hash tag `{cacheclear.ns:N}`); and valid UTF-8 text (a Rust
        # string cannot hold lone surrogates, so no pipeline can have such a namespace).
        _check(
            isinstance(ns, str) and ns != "" and "{" not in ns and "}" not in ns and _is_utf8(ns),
            "staleness.namespace",
            ns,
            "non-empty, without `{` or `}` (the pipeline's postgres.namespace, default its slot name)",
        )
        _check(
            _is_int(self.max_staleness_ms) and 1 <= self.max_staleness_ms <= MAX_TTL_MS,
            "staleness.max_staleness_ms",
            self.max_staleness_ms,
            "between 1 ms and 10 years",
        )
        _check(
            _is_int(self.refresh_ms) and 1 <= self.refresh_ms <= self.max_staleness_ms,
            "staleness.refresh_ms",
            self.refresh_ms,
            "between 1 ms and max_staleness_ms",
        )
        _check(
            _is_int(self.max_bypass_loads) and self.max_bypass_loads >= 1,
            "staleness.max_bypass_loads",
            self.max_bypass_loads,
            "at least 1",
        )
        _check(
            _is_int(self.read_your_writes_wait_ms) and 0 <= self.read_your_writes_wait_ms <= MAX_TTL_MS,
            "staleness.read_your_writes_wait_ms",
            self.read_your_writes_wait_ms,
            "between 0 and 10 years",
        )


@dataclass(frozen=True)
class Config:
    """Client options. ``Config()`` gives the documented defaults (those of docs/protocol.md
    and the Rust client); every field is checked when the ``Config`` is built.

    Attributes:
        lease_ms: lease TTL, ms (``SET {K}:lease <token> NX PX lease_ms``). Must exceed a slow
            load: a loader that outlives its lease cannot fill. Default 2 000.
        lease_wait_ms: how long a miss waits for another process's lease holder before
            ``on_wait_timeout`` applies, ms. Default 2 500 (longer than ``lease_ms``, so a
            waiter takes over the lease of a holder that died).
        backoff_initial_ms: first pause between polls while waiting, ms (≥ 1). Default 5.
        backoff_max_ms: longest pause between polls, ms; pauses double up to it, with jitter
            in ``[b/2, b]``. Default 100.
        ttl_base_ms: value TTL base, ms (1 ms ..= 10 years). Default 600 000 (10 minutes).
        ttl_jitter: relative TTL spread in ``[0, 1)``: each fill's TTL is
            ``ttl_base_ms × (1 ± ttl_jitter)``, uniform. Default 0.05.
        xfetch_beta: XFetch early refresh with this β (finite, ≥ 0), or ``None`` (default: off).
        on_wait_timeout: see :class:`WaitTimeoutPolicy`. Default ``"load_without_filling"``.
        on_redis_error: see :class:`RedisErrorPolicy`. Default ``"fallback"``.
        strict_key_prefixes: keys starting with any of these are always read strictly (loader
            only, Redis untouched). Default empty. Example: ``("balance:",)``.
        redis_timeout_ms: socket timeout of each Redis command, ms, applied when the client
            builds its own Redis connection from a URL. Default 500.
        redis_connect_timeout_ms: Redis connect timeout, ms, for a URL. Default 1 000.
        staleness: the staleness breaker of one namespace (:class:`StalenessConfig`), or
            ``None`` (default: off; values are served however long the pipeline has been down).

    Raises:
        InvalidConfig: a field out of range (the message names the field and the range).
    """

    lease_ms: int = 2_000
    lease_wait_ms: int = 2_500
    backoff_initial_ms: int = 5
    backoff_max_ms: int = 100
    ttl_base_ms: int = 600_000
    ttl_jitter: float = 0.05
    xfetch_beta: Optional[float] = None
    on_wait_timeout: Union[WaitTimeoutPolicy, str] = WaitTimeoutPolicy.LOAD_WITHOUT_FILLING
    on_redis_error: Union[RedisErrorPolicy, str] = RedisErrorPolicy.FALLBACK
    strict_key_prefixes: Tuple[str, ...] = field(default_factory=tuple)
    redis_timeout_ms: int = 500
    redis_connect_timeout_ms: int = 1_000
    staleness: Optional[StalenessConfig] = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "on_wait_timeout", WaitTimeoutPolicy(self.on_wait_timeout))
        except ValueError:
            raise InvalidConfig(
                "on_wait_timeout", self.on_wait_timeout, "one of load_without_filling, error"
            ) from None
        try:
            object.__setattr__(self, "on_redis_error", RedisErrorPolicy(self.on_redis_error))
        except ValueError:
            raise InvalidConfig("on_redis_error", self.on_redis_error, "one of fallback, error") from None
        prefixes = self.strict_key_prefixes
        _check(
            not isinstance(prefixes, str)
            and isinstance(prefixes, (list, tuple))
            and all(isinstance(p, str) for p in prefixes),
            "strict_key_prefixes",
            prefixes,
            "a list or tuple of strings",
        )
        object.__setattr__(self, "strict_key_prefixes", tuple(prefixes))
        _check(
            _is_int(self.lease_ms) and 1 <= self.lease_ms <= MAX_TTL_MS,
            "lease_ms",
            self.lease_ms,
            "between 1 ms and 10 years",
        )
        _check(
            _is_int(self.lease_wait_ms) and 0 <= self.lease_wait_ms <= MAX_TTL_MS,
            "lease_wait_ms",
            self.lease_wait_ms,
            "between 0 and 10 years",
        )
        _check(
            _is_int(self.backoff_initial_ms) and self.backoff_initial_ms >= 1,
            "backoff_initial_ms",
            self.backoff_initial_ms,
            "at least 1 ms",
        )
        _check(
            _is_int(self.backoff_max_ms) and self.backoff_max_ms >= self.backoff_initial_ms,
            "backoff_max_ms",
            self.backoff_max_ms,
            "at least backoff_initial_ms",
        )
        _check(
            _is_int(self.ttl_base_ms) and 1 <= self.ttl_base_ms <= MAX_TTL_MS,
            "ttl_base_ms",
            self.ttl_base_ms,
            "between 1 ms and 10 years",
        )
        _check(
            isinstance(self.ttl_jitter, (int, float))
            and not isinstance(self.ttl_jitter, bool)
            and 0.0 <= self.ttl_jitter < 1.0,
            "ttl_jitter",
            self.ttl_jitter,
            "in [0, 1)",
        )
        if self.xfetch_beta is not None:
            b = self.xfetch_beta
            _check(
                isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and b >= 0,
                "xfetch_beta",
                b,
                "finite and ≥ 0 (1.0 is the usual choice), or None",
            )
        _check(
            _is_int(self.redis_timeout_ms) and self.redis_timeout_ms >= 1,
            "redis_timeout_ms",
            self.redis_timeout_ms,
            "at least 1 ms",
        )
        _check(
            _is_int(self.redis_connect_timeout_ms) and self.redis_connect_timeout_ms >= 1,
            "redis_connect_timeout_ms",
            self.redis_connect_timeout_ms,
            "at least 1 ms",
        )
        _check(
            self.staleness is None or isinstance(self.staleness, StalenessConfig),
            "staleness",
            self.staleness,
            "a cacheclear.StalenessConfig or None",
        )

    def replace(self, **changes: Any) -> "Config":
        """A copy with ``changes`` applied (and checked)."""
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> "Config":
        """Builds a config from a mapping with the field names above (as in a settings file or
        a conformance scenario's ``client`` section); ``staleness`` may be a mapping with
        :class:`StalenessConfig`'s field names.

        Raises:
            InvalidConfig: an unknown field, or a value out of range.
        """
        known = {f.name for f in fields(cls)}
        opts = dict(options)
        for name in opts:
            if name not in known:
                raise InvalidConfig(name, opts[name], f"unknown field; known: {', '.join(sorted(known))}")
        st = opts.get("staleness")
        if isinstance(st, Mapping):
            sknown = {f.name for f in fields(StalenessConfig)}
            for name in st:
                if name not in sknown:
                    raise InvalidConfig(
                        f"staleness.{name}", st[name], f"unknown field; known: {', '.join(sorted(sknown))}"
                    )
            if "namespace" not in st:
                raise InvalidConfig("staleness.namespace", None, "required")
            opts["staleness"] = StalenessConfig(**st)
        if "strict_key_prefixes" in opts and isinstance(opts["strict_key_prefixes"], Sequence):
            if not isinstance(opts["strict_key_prefixes"], str):
                opts["strict_key_prefixes"] = tuple(opts["strict_key_prefixes"])
        return cls(**opts)

    def is_strict_key(self, key: str) -> bool:
        """Whether ``key`` falls under :attr:`strict_key_prefixes`."""
        return bool(self.strict_key_prefixes) and key.startswith(self.strict_key_prefixes)
