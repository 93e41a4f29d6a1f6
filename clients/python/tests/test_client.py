"""Behaviour of both clients beyond the conformance scenarios, against a private Redis: Redis
failures and policies (and no secret in any message), bad replies, NOSCRIPT, cancellation,
the single-flight acceptance rule, encoding and version errors, bypass policies, XFetch."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any, List

import pytest
import redis
import redis.asyncio

from cacheclear import (
    AsyncClient,
    BypassOverloaded,
    Client,
    Config,
    EncodeError,
    InvalidKey,
    Loaded,
    LoaderError,
    RedisError,
    StalenessConfig,
)
from harness import RedisServer, free_port


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ----- Redis failures -----


def test_redis_down_falls_back_or_fails_without_leaking_the_password(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://app:s3cret-pw@127.0.0.1:{free_port()}/0"
    caplog.set_level(logging.DEBUG, logger="cacheclear")
    with Client(url, Config(redis_timeout_ms=200, redis_connect_timeout_ms=200)) as client:
        assert client.get_or_load("product:1", lambda: {"p": 1}) == {"p": 1}
        assert client.stats().fallbacks == 1 and client.stats().redis_errors >= 1
        assert "s3cret" not in repr(client) and "***@127.0.0.1" in repr(client)
    strict = Config(on_redis_error="error", redis_timeout_ms=200, redis_connect_timeout_ms=200)
    with Client(url, strict) as client:
        loads: List[int] = []
        with pytest.raises(RedisError) as e:
            client.get_or_load("product:1", lambda: loads.append(1))
        assert e.value.key == "product:1" and e.value.op == "GET" and "`product:1`" in str(e.value)
        assert loads == [] and "s3cret" not in str(e.value)

    async def main() -> None:
        async with AsyncClient(url, strict) as client:
            with pytest.raises(RedisError) as e:
                await client.get_or_load("product:2", lambda: 1)
            assert e.value.key == "product:2" and "s3cret" not in str(e.value)
            assert "s3cret" not in repr(client)

    run(main())
    assert "s3cret" not in caplog.text and "product:1" in caplog.text


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_bad_replies_name_the_key(redis_server: RedisServer, r: redis.Redis, mode: str) -> None:
    # `{K}` holding a hash: GET fails with WRONGTYPE.
    r.hset("{product:7}", "a", "b")
    cfg = Config(on_redis_error="error")
    if mode == "sync":
        with pytest.raises(RedisError) as e:
            Client(redis.Redis.from_url(redis_server.url), cfg).get_or_load("product:7", lambda: 1)
        err = e.value
        # With the default policy the loader answers and nothing is written.
        assert Client(redis.Redis.from_url(redis_server.url)).get_or_load("product:7", lambda: 2) == 2
    else:

        async def main() -> RedisError:
            client = AsyncClient(redis.asyncio.Redis.from_url(redis_server.url), cfg)
            with pytest.raises(RedisError) as e:
                await client.get_or_load("product:7", lambda: 1)
            return e.value

        err = run(main())
    assert "WRONGTYPE" in str(err) and "`product:7`" in str(err) and err.op == "GET"
    assert r.type("{product:7}") == b"hash"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_noscript_reloads_and_unreadable_fence(redis_server: RedisServer, r: redis.Redis, mode: str) -> None:
    r.set("{p:1}:fence", "garbage")

    def read(key: str, value: Any) -> Any:
        if mode == "sync":
            return Client(redis.Redis.from_url(redis_server.url)).get_or_load(key, lambda: value)

        async def main() -> Any:
            return await AsyncClient(redis.asyncio.Redis.from_url(redis_server.url)).get_or_load(key, lambda: value)

        return run(main())

    assert read("p:0", 0) == 0
    r.script_flush()
    assert r.script_exists("63c07f197b333d4a91e19a96bb7f85fd55d51ddf") == [False]
    assert read("p:1", {"v": 1}) == {"v": 1}
    env = json.loads(r.get("{p:1}"))
    # Filled after the reload; the unreadable fence leaves read_after out.
    assert env["payload"] == {"v": 1} and "read_after" not in env
    assert r.get("{p:1}:fence") == b"garbage"


# ----- cancellation, loader failures, bad values -----


def test_async_cancellation_releases_the_lease(redis_server: RedisServer, r: redis.Redis) -> None:
    async def main() -> None:
        client = AsyncClient(redis.asyncio.Redis.from_url(redis_server.url))
        started = asyncio.Event()

        async def slow() -> int:
            started.set()
            await asyncio.sleep(30)
            return 1

        task = asyncio.ensure_future(client.get_or_load("p:1", slow))
        await started.wait()
        assert r.exists("{p:1}:lease") == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await client.aclose()
        assert r.exists("{p:1}:lease") == 0 and r.exists("{p:1}") == 0
        # The next reader does not wait for lease_ms.
        t0 = time.monotonic()
        assert await client.get_or_load("p:1", lambda: 2) == 2
        assert time.monotonic() - t0 < 0.5

    run(main())


class Stop(BaseException):
    pass


def test_sync_base_exception_in_loader_releases_the_lease(redis_server: RedisServer, r: redis.Redis) -> None:
    client = Client(redis.Redis.from_url(redis_server.url))

    def loader() -> int:
        assert r.exists("{p:1}:lease") == 1
        raise Stop()

    with pytest.raises(Stop):
        client.get_or_load("p:1", loader)
    assert r.exists("{p:1}:lease") == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_loader_errors_encode_errors_and_versions(redis_server: RedisServer, r: redis.Redis, mode: str) -> None:
    def call(key: str, loader: Any, strict: bool = False) -> Any:
        if mode == "sync":
            c = Client(redis.Redis.from_url(redis_server.url))
            return c.get_strict(loader) if strict else c.get_or_load(key, loader)

        async def main() -> Any:
            c = AsyncClient(redis.asyncio.Redis.from_url(redis_server.url))
            return await (c.get_strict(loader) if strict else c.get_or_load(key, loader))

        return run(main())

    def boom() -> Any:
        raise KeyError("row 9")

    e = pytest.raises(LoaderError, call, "p:9", boom).value
    assert e.key == "p:9" and isinstance(e.__cause__, KeyError) and "`p:9`" in str(e)
    e = pytest.raises(LoaderError, call, "", boom, True).value
    assert e.key == ""
    e2 = pytest.raises(EncodeError, call, "p:8", lambda: {1, 2}).value
    assert e2.key == "p:8"
    e = pytest.raises(LoaderError, call, "p:7", lambda: Loaded(1, version="not an lsn")).value
    assert isinstance(e.__cause__, ValueError)
    assert call("p:6", lambda: Loaded({"x": 1}, version="1/A")) == {"x": 1}
    assert json.loads(r.get("{p:6}"))["version"] == "1/A"
    for k in ["p:9", "p:8", "p:7"]:
        assert r.exists("{%s}" % k, "{%s}:lease" % k) == 0
    with pytest.raises(InvalidKey):
        call("a{b", lambda: 1)
    if mode == "sync":

        async def coro() -> int:
            return 1

        e = pytest.raises(LoaderError, call, "p:5", coro).value
        assert isinstance(e.__cause__, TypeError) and "AsyncClient" in str(e.__cause__)


# ----- single-flight never hands a read an answer older than its start -----


def test_follower_joining_after_an_invalidation_does_not_get_the_old_row(redis_server: RedisServer, r: redis.Redis) -> None:
    invalidate = r.register_script(
        open(__import__("harness").repo_root() / "crates" / "protocol" / "lua" / "invalidate.lua").read()
    )

    async def main() -> None:
        client = AsyncClient(redis.asyncio.Redis.from_url(redis_server.url))
        row = {"price": 100}
        loads: List[int] = []
        leader_read = asyncio.Event()
        go = asyncio.Event()

        async def loader() -> dict:
            loads.append(1)
            value = dict(row)  # reads the row...
            if len(loads) == 1:
                leader_read.set()
                await go.wait()  # ...and is slow to return
            return value

        leader = asyncio.ensure_future(client.get_or_load("p:1", loader))
        await leader_read.wait()
        # The row changes and its invalidation is applied while the leader still loads.
        row["price"] = 200
        invalidate(keys=["{p:1}", "{p:1}:lease", "{p:1}:fence"], args=[600000, "00000000000000C8"])
        follower = asyncio.ensure_future(client.get_or_load("p:1", loader))
        await asyncio.sleep(0.05)
        go.set()
        assert await leader == {"price": 100}  # its read overlapped the change: allowed
        assert await follower == {"price": 200}  # started after the invalidation: must see it
        assert len(loads) == 2 and client.stats().coalesce_retries == 1
        assert json.loads(r.get("{p:1}"))["payload"] == {"price": 200}

    run(main())


def test_sync_followers_share_one_load(redis_server: RedisServer, r: redis.Redis) -> None:
    client = Client(redis.Redis.from_url(redis_server.url))
    loads: List[int] = []
    lock = threading.Lock()

    def loader() -> int:
        with lock:
            loads.append(1)
        time.sleep(0.2)
        return 5

    out: List[Any] = []
    threads = [threading.Thread(target=lambda: out.append(client.get_or_load("hot", loader))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [5] * 16 and loads == [1]
    assert client.stats().coalesced + client.stats().hits >= 15


# ----- the breaker's bypass policies -----


def test_bypass_policies(redis_server: RedisServer, r: redis.Redis) -> None:
    # No watermark, no epoch: the breaker stays open.
    r.set("{p:1}", b'{"format":1,"version":null,"delta_ms":1,"expiry_ms":4102444800000,"payload":"cached","epoch":1}')

    async def main(policy: str) -> List[Any]:
        cfg = Config(lease_wait_ms=100, staleness=StalenessConfig("shop", max_bypass_loads=1, on_bypass_full=policy))
        client = AsyncClient(redis.asyncio.Redis.from_url(redis_server.url), cfg)

        async def slow() -> str:
            await asyncio.sleep(0.3)
            return "db"

        results = await asyncio.gather(client.get_or_load("p:1", slow), client.get_or_load("p:1", slow), return_exceptions=True)
        assert client.stats().bypassed_epoch_missing == 2
        return results

    assert run(main("serve_stale")) == ["db", "cached"]
    results = run(main("fail"))
    assert results[0] == "db" and isinstance(results[1], BypassOverloaded) and results[1].reason == "epoch_missing"
    results = run(main("wait"))  # waits lease_wait_ms (100) < the slow load (300): overloaded
    assert results[0] == "db" and isinstance(results[1], BypassOverloaded)
    assert r.get("{p:1}") is not None and r.exists("{p:1}:lease") == 0

    cfg = Config(lease_wait_ms=100, staleness=StalenessConfig("shop", max_bypass_loads=1, on_bypass_full="fail"))
    client = Client(redis.Redis.from_url(redis_server.url), cfg)
    assert client.get_or_load("p:1", lambda: "db") == "db"  # bypassed, not cached


# ----- XFetch -----


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_xfetch_refreshes_a_value_near_its_expiry(redis_server: RedisServer, r: redis.Redis, mode: str) -> None:
    # The envelope says it expired already (its TTL in Redis is still long): β refreshes it.
    r.set("{p:1}", b'{"format":1,"version":null,"delta_ms":100,"expiry_ms":1000,"payload":"old"}', px=60000)
    r.set("{p:2}", b'{"format":1,"version":null,"delta_ms":1,"expiry_ms":4102444800000,"payload":"far"}', px=60000)
    cfg = Config(xfetch_beta=1.0)
    if mode == "sync":
        c = Client(redis.Redis.from_url(redis_server.url), cfg)
        assert c.get_or_load("p:1", lambda: "new") == "new"
        assert c.get_or_load("p:2", lambda: "never") == "far"
        assert c.stats().early_refreshes == 1
    else:

        async def main() -> None:
            c = AsyncClient(redis.asyncio.Redis.from_url(redis_server.url), cfg)
            assert await c.get_or_load("p:1", lambda: "new") == "new"
            assert await c.get_or_load("p:2", lambda: "never") == "far"
            assert c.stats().early_refreshes == 1

        run(main())
    assert json.loads(r.get("{p:1}"))["payload"] == "new"
