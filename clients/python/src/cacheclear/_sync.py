"""The synchronous, thread-safe client (:class:`Client`) on ``redis``."""

from __future__ import annotations

import inspect
import itertools
import logging
import random
import threading
import time
from time import monotonic
from typing import Any, Callable, Dict, Optional, Tuple, TypeVar, Union

import redis

from . import _common as c
from ._breaker import RYW_BACKOFF_INITIAL_MS, Breaker, judge_namespace_reply
from ._common import OK, ERROR, RETRY, REDIS_FAILURES, SCRIPTS, Loaded, Script, Stats
from ._config import (
    BypassFullPolicy,
    Config,
    ReadPolicy,
    RedisErrorPolicy,
    WaitTimeoutPolicy,
)
from ._envelope import decode_envelope, encode_envelope
from ._errors import (
    BypassOverloaded,
    CacheclearError,
    EncodeError,
    InvalidConfig,
    InvalidKey,
    LeaseWaitTimeout,
    LoaderError,
    RedisError,
)
from ._lsn import LsnLike, as_lsn, to_fixed_hex
from ._ttl import backoff_pause_ms, jittered_ttl_ms, next_backoff_ms, xfetch_should_refresh

__all__ = ["Client", "Loader"]

log = logging.getLogger("cacheclear")

T = TypeVar("T")

#: A loader for :class:`Client`: a plain callable without arguments returning the value or a
#: :class:`Loaded`.
Loader = Callable[[], Union[T, Loaded[T]]]

_HELD = "held"
_OOM = "oom"


class _Flight:
    """One in-process load of a key; ``event`` is created when the first follower arrives
    (under the client's flight lock), ``result`` is set before the event."""

    __slots__ = ("event", "result")

    def __init__(self) -> None:
        self.event: Optional[threading.Event] = None
        self.result: Optional[c.FlightResult] = None


class Client:
    """The cacheclear cache-aside client for synchronous (threaded) applications: Django,
    Flask, workers. Thread-safe: share one instance per process.

    Args:
        redis_client_or_url: a ``redis.Redis`` (or ``RedisCluster``) you own, or a URL
            (``redis://[user:password@]host:port/db``, ``rediss://…``) from which the client
            builds its own connection pool with ``socket_timeout = redis_timeout_ms`` and
            ``socket_connect_timeout = redis_connect_timeout_ms`` (closed by :meth:`close`).
            With your own client, set its ``socket_timeout``: it bounds every command.
        config: the options (:class:`cacheclear.Config`); default ``Config()``.

    One instance per process is the intended use: its single-flight table (threads reading the
    same missing key share one load), namespace snapshot and counters are per instance.

    The constructor does not connect: an unreachable Redis or a wrong password is only found
    at the first read (which then logs a WARNING and applies ``on_redis_error``). Call
    :meth:`check` at start to fail fast.

    Raises:
        InvalidConfig: ``config`` is not a :class:`cacheclear.Config`, or the URL does not parse
            (``field == "redis_url"``; the message holds no password).
    """

    def __init__(self, redis_client_or_url: Union[str, "redis.Redis"], config: Optional[Config] = None) -> None:
        if config is None:
            config = Config()
        if not isinstance(config, Config):
            raise InvalidConfig("config", config, "a cacheclear.Config")
        self._cfg = config
        self._url: Optional[str] = None
        if isinstance(redis_client_or_url, str):
            self._url = c.redact_url(redis_client_or_url)
            self._redis = c.redis_from_url(redis.Redis.from_url, redis_client_or_url, config)
            self._owns = True
        else:
            self._redis = redis_client_or_url
            self._owns = False
        self._stats = Stats()
        self._flights: Dict[str, _Flight] = {}
        self._seq = itertools.count(1)
        self._flights_lock = threading.Lock()
        self._strict = config.strict_key_prefixes
        self._breaker = Breaker(config.staleness) if config.staleness is not None else None
        self._ns_lock = threading.Lock()
        self._bypass_sem: Optional[threading.BoundedSemaphore] = (
            threading.BoundedSemaphore(config.staleness.max_bypass_loads) if config.staleness is not None else None
        )

    # ----- public API -----

    @property
    def config(self) -> Config:
        """The configuration in force."""
        return self._cfg

    @property
    def redis(self) -> "redis.Redis":
        """The Redis client in use."""
        return self._redis

    def check(self) -> None:
        """Checks that Redis answers with these credentials, for a fail-fast start: ``PING``, then
        ``SCRIPT LOAD`` of the protocol's scripts (``fill.lua``, ``release.lua``,
        ``read_namespace.lua``). With a staleness config it also reads the namespace once, so a
        missing or unreadable epoch or watermark is logged (a WARNING naming the Redis key) at
        start; that is not an error, as the pipeline may start later.

        Raises:
            RedisError: Redis failed (unreachable, wrong password or ACL, timeout); ``op`` is
                ``"PING"`` or ``"SCRIPT LOAD"``, ``key`` is ``""``, the ``redis`` exception is
                ``__cause__``.
        """
        r = self._redis
        try:
            r.ping()
        except REDIS_FAILURES as e:
            raise RedisError("", "PING", f"{type(e).__name__}: {e}") from e
        for script in (SCRIPTS.fill, SCRIPTS.release, SCRIPTS.read_namespace):
            try:
                sha = r.script_load(script.text)
            except REDIS_FAILURES as e:
                raise RedisError("", "SCRIPT LOAD", f"{script.name}: {type(e).__name__}: {e}") from e
            if isinstance(sha, bytes):
                sha = sha.decode("ascii", "replace")
            if sha != script.sha:
                raise RedisError("", "SCRIPT LOAD", f"{script.name}: replied {sha!r}, expected {script.sha}")
        if self._breaker is not None:
            with self._ns_lock:
                self._read_namespace(self._breaker)

    def stats(self) -> Stats:
        """A snapshot of this instance's counters."""
        return self._stats.copy()

    def close(self) -> None:
        """Closes the Redis connection pool if the client built it from a URL (a client you
        passed in stays open)."""
        if self._owns:
            self._redis.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        target = self._url if self._url is not None else type(self._redis).__name__
        return f"Client(redis={target!r}, config={self._cfg!r})"

    def get_or_load(self, key: str, loader: Loader[T], *, strict: bool = False) -> T:
        """Reads cache key ``key`` through Redis, running ``loader`` on a miss
        (docs/protocol.md §4).

        1. ``strict=True``, or a key under ``strict_key_prefixes``: run the loader, touch
           nothing else.
        2. With a staleness bound: while the breaker is open, run the loader without filling.
        3. ``GET {K}``: a format-1 envelope (of the namespace's epoch or newer) is a hit.
        4. Miss: concurrent misses of ``key`` in this client share one load (single-flight);
           the leader takes the lease (``SET {K}:lease <token> NX PX lease_ms`` with
           ``GET {K}:fence``), re-reads under it, runs the loader and fills through
           ``fill.lua`` with TTL ``ttl_base_ms × (1 ± ttl_jitter)``. The loaded value is
           returned whatever the fill replied. A failed or cancelled loader releases the lease
           (``release.lua``) and caches nothing.
        5. Lease held by another process: poll ``GET`` and retry the lease with jittered
           doubling backoff (``backoff_initial_ms`` → ``backoff_max_ms``) for up to
           ``lease_wait_ms``, then apply ``on_wait_timeout``.

        Args:
            key: the cache key ``K`` (render it with :class:`cacheclear.Template`).
            loader: reads the database: a callable returning the value or
                :class:`cacheclear.Loaded`. It runs at most once per call, and only when this
                call must read the database; concurrent callers of one key share one run, so
                every loader of a key must read the same thing.
            strict: read strictly (never cached) for this call.

        Returns:
            the cached payload (as ``json.loads`` gives it) or the loader's value.

        Raises:
            InvalidKey: ``key`` is not a non-empty ``str``, or contains ``{`` / ``}`` (nothing ran).
            LoaderError: the loader raised (its exception is ``__cause__``).
            LeaseWaitTimeout: ``on_wait_timeout = "error"`` and the wait ran out.
            RedisError: Redis failed and ``on_redis_error = "error"``.
            BypassOverloaded: the breaker is open and too many bypass loads run.
            EncodeError: the value has no JSON form.
        """
        if type(key) is not str or not key or "{" in key or "}" in key:
            raise InvalidKey(key)
        if strict or (self._strict and key.startswith(self._strict)):
            self._stats.strict_loads += 1
            return self._run_loader(key, loader)
        epoch: Optional[int] = None
        b = self._breaker
        if b is not None:
            now = monotonic()
            v = b.view
            if now < v.open_until and now < v.refresh_at:
                epoch = v.epoch
            else:
                is_open, epoch, _lsn, reason = self._gate(now)
                if not is_open:
                    return self._bypass(key, reason, loader)
        vkey = "{" + key + "}"
        try:
            raw = self._redis.execute_command("GET", vkey)
        except REDIS_FAILURES as e:
            self._redis_error(key, "GET", e)
            return (self._redis_failed(key, "GET", e, loader))[0]
        if raw is not None:
            env = decode_envelope(raw)
            if env is not None:
                if epoch is None or (env.get("epoch") or 0) >= epoch:
                    if self._cfg.xfetch_beta is not None:
                        return self._maybe_refresh(key, env, epoch, loader)
                    self._stats.hits += 1
                    return env["payload"]  # type: ignore[no-any-return]
                self._stats.epoch_misses += 1
            else:
                self._decode_error(key)
                return self._miss_coalesced(key, epoch, loader, c.ReadState(True))
        return self._miss_coalesced(key, epoch, loader, c.ReadState(False))

    def get_with(self, key: str, policy: Union[ReadPolicy, str], loader: Loader[T]) -> T:
        """:meth:`get_or_load` with an explicit :class:`cacheclear.ReadPolicy` (``"cached"`` or
        ``"strict"``) for this call.

        Raises:
            As :meth:`get_or_load`; ``ValueError`` for an unknown policy.
        """
        return self.get_or_load(key, loader, strict=ReadPolicy(policy) is ReadPolicy.STRICT)

    def get_strict(self, loader: Loader[T]) -> T:
        """Runs ``loader`` and returns its value, touching no cache: for data that must never
        be stale (balances, stock, checkout totals). Its version, if any, is ignored.

        Raises:
            LoaderError: the loader raised (with ``key == ""``).
        """
        self._stats.strict_loads += 1
        return self._run_loader("", loader)

    def get_at_least(self, key: str, lsn: LsnLike, loader: Loader[T]) -> T:
        """Read-your-writes: reads ``key`` through the cache only once the namespace's watermark
        has passed ``lsn`` — the ``pg_current_wal_lsn()`` the application read after its commit
        (``X/X`` text or an ``int``) — so that commit's invalidation has been applied. Until
        then it re-reads the namespace with a backoff from 5 ms doubling to ``refresh_ms``
        (one namespace read in flight per client: concurrent waiters share it) for up to
        ``read_your_writes_wait_ms``, then runs the loader without filling. Never joins another
        caller's in-flight read. Without a staleness config there is no watermark: the loader
        runs (counted in ``ryw_loads``).

        Raises:
            As :meth:`get_or_load`; ``ValueError`` if ``lsn`` is not an LSN.
        """
        if type(key) is not str or not key or "{" in key or "}" in key:
            raise InvalidKey(key)
        min_lsn = as_lsn(lsn)
        if self._strict and key.startswith(self._strict):
            self._stats.strict_loads += 1
            return self._run_loader(key, loader)
        b = self._breaker
        if b is None:
            self._stats.ryw_loads += 1
            return self._run_loader(key, loader)
        deadline = monotonic() + b.cfg.read_your_writes_wait_ms / 1000.0
        waited = False
        # The pause between namespace reads while waiting: 5 ms doubling to refresh_ms (the
        # pipeline moves the watermark within milliseconds of applying a commit).
        max_pause = b.cfg.refresh_ms / 1000.0
        pause = min(RYW_BACKOFF_INITIAL_MS / 1000.0, max_pause)
        slept: Optional[float] = None
        while True:
            now = monotonic()
            v = b.view
            if slept is not None:
                is_open, epoch, wm_lsn, reason = self._refresh_for_ryw(slept)
            elif now < v.open_until and now < v.refresh_at:
                is_open, epoch, wm_lsn, reason = b.verdict(now)
            else:
                is_open, epoch, wm_lsn, reason = self._gate(now)
            if not is_open:
                return self._bypass(key, reason, loader)
            if wm_lsn >= min_lsn:
                return self._read_uncoalesced(key, epoch, loader)
            now = monotonic()
            if now >= deadline:
                self._stats.ryw_loads += 1
                return self._run_loader(key, loader)
            if not waited:
                waited = True
                self._stats.ryw_waits += 1
            slept = min(pause, deadline - now)
            time.sleep(slept)
            pause = min(pause * 2, max_pause)

    # ----- the read path -----

    def _tick(self) -> int:
        return next(self._seq)

    def _read_uncoalesced(self, key: str, epoch: Optional[int], loader: Loader[T]) -> T:
        rs = c.ReadState(False)
        try:
            env = self._get_env(key, epoch, rs)
        except REDIS_FAILURES as e:
            return (self._redis_failed(key, "GET", e, loader))[0]
        if env is not None:
            self._stats.hits += 1
            return env["payload"]  # type: ignore[no-any-return]
        return (self._miss(key, epoch, loader, rs))[0]

    def _miss_coalesced(
        self, key: str, epoch: Optional[int], loader: Loader[T], rs: c.ReadState
    ) -> T:
        """A miss: lead this client's load of ``key``, or follow the one in flight."""
        while True:
            with self._flights_lock:
                flight = self._flights.get(key)
                event: Optional[threading.Event] = None
                if flight is None:
                    flight = _Flight()
                    self._flights[key] = flight
                    lead = True
                else:
                    lead = False
                    joined = self._tick()
                    event = flight.event
                    if event is None:
                        event = flight.event = threading.Event()
            if lead:
                try:
                    value, obs = self._miss(key, epoch, loader, rs)
                except Exception as e:
                    self._finish(key, flight, (ERROR, e, 0))
                    raise
                except BaseException:
                    # Cancelled: the followers read again, one of them leads.
                    self._finish(key, flight, (RETRY, None, 0))
                    raise
                self._finish(key, flight, (OK, value, obs))
                return value
            self._stats.coalesced += 1
            assert event is not None
            event.wait()
            assert flight.result is not None
            kind, result, obs = flight.result
            if kind == OK:
                if joined < obs:
                    return result  # type: ignore[no-any-return]
                self._stats.coalesce_retries += 1
            elif kind == ERROR:
                raise result
            # Read again: the value may be there now.
            try:
                env = self._get_env(key, epoch, rs)
            except REDIS_FAILURES as e:
                return (self._redis_failed(key, "GET", e, loader))[0]
            if env is not None:
                self._stats.hits += 1
                return env["payload"]  # type: ignore[no-any-return]

    def _finish(self, key: str, flight: _Flight, result: c.FlightResult) -> None:
        with self._flights_lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.result = result
            event = flight.event
        if event is not None:
            event.set()

    def _miss(
        self, key: str, epoch: Optional[int], loader: Loader[T], rs: Optional[c.ReadState] = None
    ) -> Tuple[T, int]:
        """Lease, wait or load. Returns ``(value, obs)`` (see ``_common.FlightResult``)."""
        cfg = self._cfg
        st = self._stats
        st.misses += 1
        started = monotonic()
        deadline = started + cfg.lease_wait_ms / 1000.0
        backoff = float(cfg.backoff_initial_ms)
        waiting = False
        while True:
            try:
                lease = self._try_lease(key)
            except REDIS_FAILURES as e:
                return self._redis_failed(key, "lease", e, loader)
            if lease == _OOM:
                # Redis is full: "don't cache" (not a Redis failure, whatever the policy).
                return self._load_unfilled(key, loader)
            if isinstance(lease, c.LeaseHeld):
                token, read_after = lease
                obs = self._tick()
                try:
                    env = self._get_env(key, epoch, rs)
                except BaseException as e:
                    self._release_bg(key, token)
                    if isinstance(e, REDIS_FAILURES):
                        return self._redis_failed(key, "GET", e, loader)
                    raise
                if env is not None:
                    # Another holder filled between our GET and our lease.
                    self._release_protected(key, token)
                    st.hits += 1
                    return env["payload"], obs
                return self._load_and_fill(key, token, read_after, epoch, loader)
            if not waiting:
                waiting = True
                st.lease_waits += 1
            now = monotonic()
            if now >= deadline:
                st.lease_wait_timeouts += 1
                waited_ms = c.ms(now - started)
                if cfg.on_wait_timeout is WaitTimeoutPolicy.ERROR:
                    raise LeaseWaitTimeout(key, waited_ms)
                log.debug("cache key `%s`: lease wait timed out after %d ms; loading without filling", key, waited_ms)
                st.unfilled_loads += 1
                return self._load_unfilled(key, loader)
            pause = backoff_pause_ms(backoff, random.random()) / 1000.0
            time.sleep(min(pause, deadline - now))
            backoff = next_backoff_ms(backoff, cfg.backoff_max_ms)
            obs = self._tick()
            try:
                env = self._get_env(key, epoch, rs)
            except REDIS_FAILURES as e:
                return self._redis_failed(key, "poll", e, loader)
            if env is not None:
                st.hits += 1
                return env["payload"], obs

    def _load_and_fill(
        self, key: str, token: str, read_after: Optional[int], epoch: Optional[int], loader: Loader[T]
    ) -> Tuple[T, int]:
        """The lease holder's part: load, then fill-and-release, or release on failure."""
        cfg = self._cfg
        st = self._stats
        st.loads += 1
        obs = self._tick()
        started = monotonic()
        try:
            result = _call(loader)
            value, version = c.unpack_loaded(key, result)
        except LoaderError:
            st.loader_errors += 1
            self._release_protected(key, token)
            raise
        except Exception as e:
            st.loader_errors += 1
            # Only the exception's type: its text may hold a connection string or row data.
            log.warning(
                "loader for cache key `%s` failed (%s); releasing the lease, caching nothing",
                key, type(e).__qualname__,
            )
            self._release_protected(key, token)
            raise c.loader_error(key, e) from e
        except BaseException:
            self._release_protected(key, token)
            raise
        delta_ms = c.ms(monotonic() - started)
        ttl_ms = jittered_ttl_ms(cfg.ttl_base_ms, cfg.ttl_jitter, random.random())
        try:
            body = encode_envelope(
                value,
                version=version,
                read_after=read_after,
                delta_ms=delta_ms,
                expiry_ms=c.now_ms() + ttl_ms,
                epoch=epoch,
            )
        except (TypeError, ValueError) as e:
            self._release_protected(key, token)
            raise EncodeError(key, e) from e
        fill_obs = self._tick()
        vkey = "{" + key + "}"
        try:
            reply = self._script(
                SCRIPTS.fill,
                (vkey, vkey + ":lease", vkey + ":fence"),
                (token, "" if version is None else to_fixed_hex(version), body, ttl_ms),
            )
        except REDIS_FAILURES as e:
            if c.is_oom(e):
                # maxmemory reached and nothing evictable: "don't cache", not a failure.
                st.fills_skipped_oom += 1
                log.warning("cache key `%s`: redis is out of memory (maxmemory); value not cached", key)
            else:
                self._redis_error(key, "FILL", e)
            self._release_protected(key, token)
            return value, obs
        except BaseException:
            # Cancelled with the FILL in flight: it is checked against lease and fence like any
            # fill; release (compare-and-delete) in the background all the same.
            self._release_bg(key, token)
            raise
        r = c.script_int(reply)
        if r == 1:
            st.fills += 1
            return value, fill_obs
        if r == 0:
            st.fills_refused_lease_lost += 1
            log.debug("cache key `%s`: fill refused: lease lost (expired or invalidated); not cached", key)
        elif r == -1:
            st.fills_refused_fenced += 1
            log.debug("cache key `%s`: fill refused: the fence is newer than the version read; not cached", key)
        else:
            st.redis_errors += 1
            log.warning("cache key `%s`: unexpected fill.lua reply %r; not cached", key, reply)
            self._release_protected(key, token)
        return value, obs

    def _maybe_refresh(self, key: str, env: Dict[str, Any], epoch: Optional[int], loader: Loader[T]) -> T:
        """A hit with XFetch on: one reader near the expiry reloads early; the others, and a
        failed reload, serve the cached payload."""
        st = self._stats
        beta = self._cfg.xfetch_beta
        assert beta is not None
        if xfetch_should_refresh(c.now_ms(), env["delta_ms"], env["expiry_ms"], beta, 1.0 - random.random()):
            try:
                lease = self._try_lease(key)
            except REDIS_FAILURES:
                lease = _HELD
            if isinstance(lease, c.LeaseHeld):
                token, read_after = lease
                st.early_refreshes += 1
                try:
                    return (self._load_and_fill(key, token, read_after, epoch, loader))[0]
                except CacheclearError as e:
                    log.warning("cache key `%s`: early refresh failed (%s); serving the cached value", key, e)
        st.hits += 1
        return env["payload"]  # type: ignore[no-any-return]

    def _run_loader(self, key: str, loader: Loader[T]) -> T:
        """Runs the loader outside the lease protocol (strict reads, fallbacks, bypasses)."""
        try:
            result = _call(loader)
        except Exception as e:
            self._stats.loader_errors += 1
            raise c.loader_error(key, e) from e
        return result.value if type(result) is Loaded else result  # type: ignore[no-any-return,return-value]

    def _load_unfilled(self, key: str, loader: Loader[T]) -> Tuple[T, int]:
        obs = self._tick()
        return self._run_loader(key, loader), obs

    def _redis_failed(self, key: str, op: str, e: BaseException, loader: Loader[T]) -> Tuple[T, int]:
        """Applies ``on_redis_error`` after a failed Redis step (already counted)."""
        if self._cfg.on_redis_error is RedisErrorPolicy.ERROR:
            raise RedisError(key, op, f"{type(e).__name__}: {e}") from e
        self._stats.fallbacks += 1
        return self._load_unfilled(key, loader)

    # ----- Redis steps -----

    def _get_env(
        self, key: str, epoch: Optional[int], rs: Optional[c.ReadState] = None
    ) -> Optional[Dict[str, Any]]:
        """``GET {K}`` decoded; a miss is ``None``. Redis failures are counted and raised. An
        unreadable value is logged and counted once per read (``rs``)."""
        try:
            raw = self._redis.execute_command("GET", "{" + key + "}")
        except REDIS_FAILURES as e:
            self._redis_error(key, "GET", e)
            raise
        if raw is None:
            return None
        env = decode_envelope(raw)
        if env is None:
            if rs is None or not rs.decode_reported:
                self._decode_error(key)
                if rs is not None:
                    rs.decode_reported = True
            return None
        if epoch is not None and (env.get("epoch") or 0) < epoch:
            self._stats.epoch_misses += 1
            return None
        return env

    def _try_lease(self, key: str) -> Union[str, c.LeaseHeld]:
        """``SET {K}:lease <token> NX PX lease_ms`` pipelined with ``GET {K}:fence``.
        Returns ``(token, read_after)``, ``_HELD`` or ``_OOM``; raises Redis failures."""
        token = c.new_token()
        vkey = "{" + key + "}"
        pipe = self._redis.pipeline(transaction=False)
        pipe.execute_command("SET", vkey + ":lease", token, "NX", "PX", self._cfg.lease_ms)
        pipe.execute_command("GET", vkey + ":fence")
        try:
            set_reply, fence_reply = pipe.execute(raise_on_error=False)
            if isinstance(set_reply, BaseException):
                if c.is_oom(set_reply):
                    self._stats.fills_skipped_oom += 1
                    log.warning("cache key `%s`: redis is out of memory (maxmemory); not caching", key)
                    return _OOM
                raise set_reply
            if not c.lease_acquired(set_reply):
                return _HELD
            if isinstance(fence_reply, BaseException):
                raise fence_reply
        except REDIS_FAILURES as e:
            self._redis_error(key, "lease", e)
            # The SET may have been applied before the failure; no second round trip to a
            # failing Redis here: such a lease ends after lease_ms.
            raise
        finally:
            pipe.reset()
        return c.LeaseHeld(token, c.read_fence(key, fence_reply))

    def _script(self, script: Script, keys: Tuple[str, ...], args: Tuple[Any, ...]) -> Any:
        """``EVALSHA``; on ``NOSCRIPT`` (restarted or failed-over Redis) loads it and retries."""
        r = self._redis
        try:
            return r.evalsha(script.sha, len(keys), *keys, *args)
        except REDIS_FAILURES as e:
            if not c.is_noscript(e):
                raise
        sha = r.script_load(script.text)
        if isinstance(sha, bytes):
            sha = sha.decode("ascii", "replace")
        if sha != script.sha:
            raise c.UnexpectedReply(f"SCRIPT LOAD of {script.name} replied {sha!r}, expected {script.sha}")
        return r.evalsha(script.sha, len(keys), *keys, *args)

    def _release(self, key: str, token: str) -> None:
        """``release.lua``: compare-and-delete of our token (never a plain DEL)."""
        try:
            self._script(SCRIPTS.release, ("{" + key + "}:lease",), (token,))
        except REDIS_FAILURES as e:
            # The lease's own TTL (lease_ms) ends it.
            self._redis_error(key, "RELEASE", e)

    def _release_bg(self, key: str, token: str) -> None:
        # Threads are not cancelled mid-call: release now.
        self._release(key, token)

    def _release_protected(self, key: str, token: str) -> None:
        self._release(key, token)

    def _redis_error(self, key: str, op: str, e: BaseException) -> None:
        self._stats.redis_errors += 1
        log.warning("redis %s for cache key `%s` failed: %s: %s", op, key, type(e).__name__, e)

    def _decode_error(self, key: str) -> None:
        self._stats.decode_errors += 1
        log.warning("cache key `%s`: the cached value is not a readable format-1 envelope; treating it as a miss", key)

    # ----- the staleness breaker -----

    def _gate(self, now: float) -> Tuple[bool, int, int, str]:
        """The breaker's verdict, reading the namespace first when due (one read at a time).
        While the snapshot lets reads use the cache, a read due while another is in flight
        goes on with the snapshot; while it would bypass, callers wait for the read."""
        b = self._breaker
        assert b is not None
        lock = self._ns_lock
        if now < b.view.open_until:
            if lock.acquire(blocking=False):
                try:
                    if b.due(monotonic()):
                        self._read_namespace(b)
                finally:
                    lock.release()
        else:
            with lock:
                if b.due(monotonic()):
                    self._read_namespace(b)
        return b.verdict(monotonic())

    def _refresh_for_ryw(self, max_age_s: float) -> Tuple[bool, int, int, str]:
        """For a waiting ``get_at_least``: reads the namespace unless a read was sent within
        ``max_age_s`` (its backoff). One read in flight per client: concurrent waiters block on
        the lock and reuse the read that just completed."""
        b = self._breaker
        assert b is not None
        with self._ns_lock:
            if b.due(monotonic(), max_age_s):
                self._read_namespace(b)
        return b.verdict(monotonic())

    def _read_namespace(self, b: Breaker) -> None:
        sent = monotonic()
        b.last_attempt = sent
        self._stats.namespace_reads += 1
        try:
            reply = self._script(SCRIPTS.read_namespace, tuple(b.script_keys()), ())
            snapshot, epoch_problem, watermark_problem = judge_namespace_reply(reply)
        except (ValueError, *REDIS_FAILURES) as e:
            self._stats.redis_errors += 1
            log.warning(
                "reading namespace `%s` (%s, %s) failed: %s; the last snapshot keeps ageing",
                b.cfg.namespace, b.watermark_key, b.epoch_key, e,
            )
            return
        b.publish(sent, snapshot, epoch_problem, watermark_problem)

    def _bypass(self, key: str, reason: str, loader: Loader[T]) -> T:
        """The breaker is open: run the loader without filling, at most ``max_bypass_loads``
        at once in this client, else ``on_bypass_full``."""
        b = self._breaker
        assert b is not None
        st = self._stats
        setattr(st, "bypassed_" + reason, getattr(st, "bypassed_" + reason) + 1)
        sem = self._bypass_sem
        assert sem is not None
        if not sem.acquire(blocking=False):
            policy = b.cfg.on_bypass_full
            overloaded = BypassOverloaded(key, b.cfg.namespace, reason, b.cfg.max_bypass_loads)
            if policy is BypassFullPolicy.FAIL:
                st.bypass_overloaded += 1
                raise overloaded
            if policy is BypassFullPolicy.SERVE_STALE:
                try:
                    env = self._get_env(key, None)
                except REDIS_FAILURES:
                    env = None
                if env is not None:
                    st.stale_served += 1
                    return env["payload"]  # type: ignore[no-any-return]
            st.bypass_waits += 1
            if not sem.acquire(timeout=self._cfg.lease_wait_ms / 1000.0):
                st.bypass_overloaded += 1
                raise overloaded
        try:
            return self._run_loader(key, loader)
        finally:
            sem.release()


def _call(loader: Callable[[], Any]) -> Any:
    result = loader()
    if inspect.isawaitable(result):
        close = getattr(result, "close", None)
        if close is not None:
            close()  # no "coroutine was never awaited" warning
        raise c.LoaderMisuse("the loader returned an awaitable: use cacheclear.AsyncClient for async loaders")
    return result
