"""The language-neutral conformance suite (conformance/README.md) against both Python clients.

One pytest case per ``conformance/scenarios/*.json`` file and client (``async``:
:class:`cacheclear.AsyncClient`, ``sync``: :class:`cacheclear.Client`), on one private Redis:
for each scenario ``FLUSHALL``, ``CONFIG SET maxmemory 0``, fresh client instance(s) from the
scenario's ``client`` section, then its ``steps`` in order. A failed expectation fails the case
with the file name, the step's index (0-based) and what differed. Plus the key rendering vectors
of ``conformance/key_rendering.json``.

The runner plays the application (``read``, ``concurrent``), the pipeline (``invalidate``,
``namespace``: through the protocol's own ``invalidate.lua`` and stored formats) and an observer
(``redis``, ``check``). Pipeline and observer steps use a synchronous Redis connection of their
own. For the async client every step runs on the scenario's event loop (``sleep_ms`` awaits,
``spawn`` is a task, ``during_load`` runs inside the async loader), so a read started by a
spawned step meets the client's in-flight reads as an application's would; for the sync client
``spawn`` is a thread.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import redis
import redis.asyncio

import cacheclear
from cacheclear import (
    AsyncClient,
    BypassOverloaded,
    CacheclearError,
    Client,
    Config,
    InvalidKey,
    LeaseWaitTimeout,
    Loaded,
    LoaderError,
    Template,
    TemplateError,
)
from harness import RedisServer, repo_root

ROOT = repo_root()
SCENARIOS = sorted((ROOT / "conformance" / "scenarios").glob("*.json"))
INVALIDATE_LUA = (ROOT / "crates" / "protocol" / "lua" / "invalidate.lua").read_text()

_ERROR_KINDS = {
    LoaderError: "loader",
    LeaseWaitTimeout: "lease_wait_timeout",
    InvalidKey: "invalid_key",
    BypassOverloaded: "bypass_overloaded",
}


def error_kind(e: BaseException) -> str:
    for cls, kind in _ERROR_KINDS.items():
        if isinstance(e, cls):
            return kind
    return f"{type(e).__name__}: {e}"


def json_eq(a: Any, b: Any) -> bool:
    """JSON equality (``true`` is not ``1``; ``1`` equals ``1.0``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_eq(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_eq(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def raw_reply(reply: Any) -> Any:
    """A Redis reply as the scenario files write it: nil → None, strings → str, arrays → lists."""
    if isinstance(reply, bytes):
        return reply.decode("utf-8", "replace")
    if isinstance(reply, (list, tuple)):
        return [raw_reply(x) for x in reply]
    return reply


class StepFailed(AssertionError):
    pass


class Runner:
    """Runs one scenario file against one client kind."""

    def __init__(self, url: str, path: Path, mode: str) -> None:
        self.url = url
        self.file = path.name
        self.scenario = json.loads(path.read_text())
        self.mode = mode
        self.failures: List[str] = []
        self.failures_lock = threading.Lock()
        self.spawned: List[threading.Thread] = []
        self.spawned_tasks: List["asyncio.Future[None]"] = []
        # The pipeline's and the observer's connection: raw replies (no redis-py callbacks).
        self.admin = redis.Redis.from_url(url, decode_responses=False)
        self.admin.response_callbacks.clear()
        self.config = Config.from_dict(self.scenario.get("client", {}))
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.closers: List[Callable[[], None]] = []

    # ----- clients -----

    def new_client(self) -> Any:
        if self.mode == "async":
            assert self.loop is not None
            client = AsyncClient(redis.asyncio.Redis.from_url(self.url), self.config)
            self.closers.append(lambda: self.loop.run_until_complete(self._aclose(client)))  # type: ignore[union-attr]
            return client
        client = Client(redis.Redis.from_url(self.url), self.config)
        self.closers.append(lambda: client.redis.close())
        return client

    @staticmethod
    async def _aclose(client: AsyncClient) -> None:
        await client.aclose()
        close = getattr(client.redis, "aclose", None) or client.redis.close
        await close()

    # ----- running -----

    def run(self) -> None:
        self.admin.execute_command("FLUSHALL")
        self.admin.execute_command("CONFIG", "SET", "maxmemory", "0")
        if self.mode == "async":
            self.loop = asyncio.new_event_loop()
            # redis.asyncio's pools take the current loop when built (Python 3.9).
            asyncio.set_event_loop(self.loop)
        try:
            self.client = self.new_client()
            if self.loop is not None:
                self.loop.run_until_complete(self.arun_all(self.scenario["steps"]))
            else:
                self.run_steps(self.scenario["steps"], "")
            for t in self.spawned:
                t.join(60)
                if t.is_alive():
                    self.fail("a spawned task did not finish within 60 s")
            if self.failures:
                raise StepFailed("\n".join(self.failures))
        finally:
            for close in self.closers:
                try:
                    close()
                except Exception:
                    pass
            if self.loop is not None:
                self.loop.close()
                asyncio.set_event_loop(None)
            self.admin.execute_command("CONFIG", "SET", "maxmemory", "0")
            self.admin.close()

    def fail(self, message: str) -> None:
        if not message.startswith(self.file):
            message = f"{self.file} [{self.mode}]: {message}"
        with self.failures_lock:
            self.failures.append(message)

    def run_steps(self, steps: List[Dict[str, Any]], where: str) -> None:
        for i, step in enumerate(steps):
            label = f"{where}step {i}"
            try:
                self.run_step(step, label)
            except StepFailed as e:
                raise StepFailed(f"{self.file} [{self.mode}]: {label}: {e}") from None

    async def arun_all(self, steps: List[Dict[str, Any]]) -> None:
        """The async client's scenario: the steps, then every spawned task (60 s at most)."""
        await self.arun_steps(steps, "")
        if self.spawned_tasks:
            done, pending = await asyncio.wait(self.spawned_tasks, timeout=60)
            if pending:
                self.fail("a spawned task did not finish within 60 s")
            for task in pending:
                task.cancel()

    async def arun_steps(self, steps: List[Dict[str, Any]], where: str) -> None:
        for i, step in enumerate(steps):
            label = f"{where}step {i}"
            try:
                await self.arun_step(step, label)
            except StepFailed as e:
                raise StepFailed(f"{self.file} [{self.mode}]: {label}: {e}") from None

    async def arun_step(self, step: Dict[str, Any], label: str) -> None:
        """One step on the event loop: reads, concurrent reads, sleeps and spawns are awaited
        or scheduled there; the rest are short synchronous Redis calls."""
        action, spec, expect = self.parse_step(step)
        if action == "read":
            await self.aread_step(spec, expect or {}, label)
        elif action == "concurrent":
            await self.aconcurrent_step(spec, expect or {})
        elif action == "sleep_ms":
            await asyncio.sleep(spec / 1000.0)
        elif action == "spawn":
            self.aspawn_step(spec, label)
        else:
            self.run_step(step, label)

    @staticmethod
    def parse_step(step: Dict[str, Any]) -> Tuple[str, Any, Any]:
        actions = [k for k in step if k != "expect"]
        if len(actions) != 1:
            raise StepFailed(f"a step has exactly one action key, got {actions}")
        return actions[0], step[actions[0]], step.get("expect")

    def run_step(self, step: Dict[str, Any], label: str) -> None:
        action, spec, expect = self.parse_step(step)
        if action == "read":
            self.read_step(spec, expect or {}, label)
        elif action == "concurrent":
            self.concurrent_step(spec, expect or {})
        elif action == "invalidate":
            self.invalidate_step(spec, expect)
        elif action == "namespace":
            self.namespace_step(spec)
        elif action == "redis":
            reply = raw_reply(self.admin.execute_command(*spec))
            if expect is not None and not json_eq(reply, expect):
                raise StepFailed(f"redis {spec}: expected {expect!r}, got {reply!r}")
        elif action == "sleep_ms":
            time.sleep(spec / 1000.0)
        elif action == "spawn":
            self.spawn_step(spec, label)
        elif action == "check":
            self.check_step(spec)
        else:
            raise StepFailed(f"unknown action `{action}`")

    # ----- application -----

    def make_loader(self, spec: Dict[str, Any], label: str, counter: List[int], lock: threading.Lock) -> Callable[[], Any]:
        load = spec.get("load")
        version = spec.get("version")
        load_ms = spec.get("load_ms", 0) or 0
        fails = spec.get("load_fails", False)
        during = spec.get("during_load") or []

        def finish() -> Any:
            if during:
                try:
                    self.run_steps(during, f"{label} during_load ")
                except StepFailed as e:
                    self.fail(str(e))
            if fails:
                raise RuntimeError("the scenario's loader fails (load_fails)")
            return Loaded(load, version) if version is not None else load

        if self.mode == "async":

            async def aloader() -> Any:
                with lock:
                    counter[0] += 1
                if load_ms:
                    await asyncio.sleep(load_ms / 1000.0)
                if during:
                    try:
                        await self.arun_steps(during, f"{label} during_load ")
                    except StepFailed as e:
                        self.fail(str(e))
                if fails:
                    raise RuntimeError("the scenario's loader fails (load_fails)")
                return Loaded(load, version) if version is not None else load

            return aloader

        def loader() -> Any:
            with lock:
                counter[0] += 1
            if load_ms:
                time.sleep(load_ms / 1000.0)
            return finish()

        return loader

    def call(self, client: Any, spec: Dict[str, Any], loader: Callable[[], Any]) -> Any:
        key = spec["key"]
        if spec.get("at_least") is not None:
            return client.get_at_least(key, spec["at_least"], loader)
        if spec.get("strict"):
            return client.get_with(key, "strict", loader)
        return client.get_or_load(key, loader)

    def read_step(self, spec: Dict[str, Any], expect: Dict[str, Any], label: str) -> None:
        counter, lock = [0], threading.Lock()
        loader = self.make_loader(spec, label, counter, lock)
        outcome: Tuple[bool, Any]
        try:
            outcome = (True, self.call(self.client, spec, loader))
        except CacheclearError as e:
            outcome = (False, e)
        self.check_read(outcome, expect, counter[0] > 0)

    async def aread_step(self, spec: Dict[str, Any], expect: Dict[str, Any], label: str) -> None:
        counter, lock = [0], threading.Lock()
        loader = self.make_loader(spec, label, counter, lock)
        outcome: Tuple[bool, Any]
        try:
            outcome = (True, await self.call(self.client, spec, loader))
        except CacheclearError as e:
            outcome = (False, e)
        self.check_read(outcome, expect, counter[0] > 0)

    def check_read(self, outcome: Tuple[bool, Any], expect: Dict[str, Any], loaded: bool) -> None:
        ok, result = outcome
        if "error" in expect:
            if ok:
                raise StepFailed(f"expected error `{expect['error']}`, the read returned {result!r}")
            if error_kind(result) != expect["error"]:
                raise StepFailed(f"expected error `{expect['error']}`, got {error_kind(result)} ({result})")
        elif not ok:
            raise StepFailed(f"the read failed: {error_kind(result)}: {result}")
        if "value" in expect and ok and not json_eq(result, expect["value"]):
            raise StepFailed(f"expected value {expect['value']!r}, got {result!r}")
        if "loaded" in expect and loaded != expect["loaded"]:
            raise StepFailed(f"expected loaded = {expect['loaded']}, the loader {'ran' if loaded else 'did not run'}")

    def concurrent_setup(self, spec: Dict[str, Any]) -> Tuple[int, int, Dict[str, Any], List[int], threading.Lock, List[Any]]:
        """A ``concurrent`` step's clients, readers per client, read, load counter and its lock."""
        n_clients = spec.get("clients", 1)
        readers = spec.get("readers", 1)
        read = spec["read"]
        if read.get("during_load"):
            raise StepFailed("during_load is not allowed in concurrent")
        clients = [self.new_client() for _ in range(n_clients)]
        return n_clients, readers, read, [0], threading.Lock(), clients

    async def aconcurrent_step(self, spec: Dict[str, Any], expect: Dict[str, Any]) -> None:
        n_clients, readers, read, counter, lock, clients = self.concurrent_setup(spec)

        async def one(client: AsyncClient) -> Tuple[bool, Any]:
            try:
                return (True, await self.call(client, read, self.make_loader(read, "", counter, lock)))
            except CacheclearError as e:
                return (False, e)

        outcomes = list(await asyncio.gather(*(one(cl) for cl in clients for _ in range(readers))))
        self.check_concurrent(outcomes, n_clients * readers, counter[0], expect)

    def concurrent_step(self, spec: Dict[str, Any], expect: Dict[str, Any]) -> None:
        n_clients, readers, read, counter, lock, clients = self.concurrent_setup(spec)
        barrier = threading.Barrier(n_clients * readers)
        results: List[Tuple[bool, Any]] = []

        def reader(client: Client) -> None:
            barrier.wait()
            try:
                r: Tuple[bool, Any] = (True, self.call(client, read, self.make_loader(read, "", counter, lock)))
            except CacheclearError as e:
                r = (False, e)
            with lock:
                results.append(r)

        threads = [threading.Thread(target=reader, args=(cl,)) for cl in clients for _ in range(readers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.check_concurrent(results, n_clients * readers, counter[0], expect)

    @staticmethod
    def check_concurrent(outcomes: List[Tuple[bool, Any]], n: int, loads: int, expect: Dict[str, Any]) -> None:
        if len(outcomes) != n:
            raise StepFailed(f"{len(outcomes)} of {n} reads finished")
        if "loads" in expect and loads != expect["loads"]:
            raise StepFailed(f"expected {expect['loads']} load(s) in total, got {loads}")
        for ok, result in outcomes:
            if "error" in expect:
                if ok or error_kind(result) != expect["error"]:
                    raise StepFailed(f"expected every read to fail with `{expect['error']}`, got {result!r}")
            elif not ok:
                raise StepFailed(f"a read failed: {error_kind(result)}: {result}")
            elif "value" in expect and not json_eq(result, expect["value"]):
                raise StepFailed(f"expected every read to return {expect['value']!r}, one returned {result!r}")

    # ----- pipeline -----

    def invalidate_step(self, spec: Dict[str, Any], expect: Any) -> None:
        keys = spec["keys"]
        lsn = cacheclear.to_fixed_hex(cacheclear.parse_lsn(spec["lsn"]))
        ttl = spec.get("fence_ttl_ms", 600000)
        redis_keys: List[str] = []
        for k in keys:
            redis_keys += [f"{{{k}}}", f"{{{k}}}:lease", f"{{{k}}}:fence"]
        reply = raw_reply(self.admin.eval(INVALIDATE_LUA, len(redis_keys), *redis_keys, ttl, *([lsn] * len(keys))))
        if expect is not None and not json_eq(reply, expect):
            raise StepFailed(f"invalidate.lua replied {reply!r}, expected {expect!r}")

    def namespace_step(self, spec: Dict[str, Any]) -> None:
        name = spec["name"]
        epoch_key = f"{{cacheclear.ns:{name}}}:epoch"
        wm_key = f"{{cacheclear.ns:{name}}}:watermark"
        epoch = spec.get("epoch")
        if "epoch" in spec:
            if epoch is None:
                self.admin.execute_command("DEL", epoch_key)
            else:
                self.admin.execute_command("SET", epoch_key, str(epoch))
        if "watermark" in spec:
            wm = spec["watermark"]
            if wm is None:
                self.admin.execute_command("DEL", wm_key)
            else:
                secs, usecs = raw_reply(self.admin.execute_command("TIME"))
                now_ms = int(secs) * 1000 + int(usecs) // 1000
                wm_epoch = wm.get("epoch", epoch if epoch is not None else 0)
                value = "{} 0 {} {} {}".format(
                    cacheclear.to_fixed_hex(cacheclear.parse_lsn(wm["lsn"])),
                    wm.get("lag_ms", 0),
                    now_ms - wm.get("age_ms", 0),
                    wm_epoch,
                )
                self.admin.execute_command("SET", wm_key, value, "PX", 600000)

    def spawn_step(self, spec: Dict[str, Any], label: str) -> None:
        after = spec.get("after_ms", 0)

        def body() -> None:
            time.sleep(after / 1000.0)
            try:
                self.run_steps(spec["steps"], f"{label} spawn ")
            except Exception as e:  # noqa: BLE001
                self.fail(str(e))

        t = threading.Thread(target=body, daemon=True)
        t.start()
        self.spawned.append(t)

    def aspawn_step(self, spec: Dict[str, Any], label: str) -> None:
        after = spec.get("after_ms", 0)

        async def body() -> None:
            await asyncio.sleep(after / 1000.0)
            try:
                await self.arun_steps(spec["steps"], f"{label} spawn ")
            except Exception as e:  # noqa: BLE001
                self.fail(str(e))

        self.spawned_tasks.append(asyncio.ensure_future(body()))

    # ----- observer -----

    def check_step(self, spec: Dict[str, Any]) -> None:
        for key, want in spec.items():
            exists = self.admin.execute_command("EXISTS", key)
            if want is None:
                if exists:
                    raise StepFailed(f"`{key}` exists (holding {self._show(key)}), expected absent")
                continue
            if not exists:
                raise StepFailed(f"`{key}` is absent, expected {want!r}")
            if "equals" in want:
                got = raw_reply(self.admin.execute_command("GET", key))
                if got != want["equals"]:
                    raise StepFailed(f"`{key}` = {got!r}, expected {want['equals']!r}")
            if "envelope" in want:
                raw = raw_reply(self.admin.execute_command("GET", key))
                try:
                    env = json.loads(raw)
                except (TypeError, ValueError):
                    raise StepFailed(f"`{key}` = {raw!r} is not JSON") from None
                for field, value in want["envelope"].items():
                    if value is None:
                        if env.get(field) is not None:
                            raise StepFailed(f"`{key}` envelope field `{field}` = {env[field]!r}, expected null/absent ({raw})")
                    elif field not in env or not json_eq(env[field], value):
                        raise StepFailed(f"`{key}` envelope field `{field}` = {env.get(field)!r}, expected {value!r} ({raw})")
            if "ttl_ms" in want:
                lo, hi = want["ttl_ms"]
                pttl = self.admin.execute_command("PTTL", key)
                if not lo <= pttl <= hi:
                    raise StepFailed(f"`{key}` PTTL = {pttl}, expected within [{lo}, {hi}]")
            if want.get("exists") is True and not exists:
                raise StepFailed(f"`{key}` does not exist")

    def _show(self, key: str) -> str:
        try:
            return repr(raw_reply(self.admin.execute_command("GET", key)))
        except redis.RedisError:
            return "(not a string)"


@pytest.mark.parametrize("mode", ["async", "sync"])
@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario(redis_server: RedisServer, path: Path, mode: str) -> None:
    Runner(redis_server.url, path, mode).run()


def test_every_scenario_file_is_collected() -> None:
    # An empty glob would silently run nothing.
    assert len(SCENARIOS) >= 18, SCENARIOS


KEY_VECTORS = json.loads((ROOT / "conformance" / "key_rendering.json").read_text())["vectors"]


@pytest.mark.parametrize("vector", KEY_VECTORS, ids=[f"{i}:{v['template']}" for i, v in enumerate(KEY_VECTORS)])
def test_key_rendering(vector: Dict[str, Any]) -> None:
    if vector.get("error"):
        with pytest.raises(TemplateError):
            Template(vector["template"])
        return
    template = Template(vector["template"])
    assert template.render(vector["values"]) == vector["key"]
    # Positional values in column order give the same key.
    assert template.render([vector["values"][c] for c in template.columns]) == vector["key"]
