"""Findings of a fresh user's trial: read-your-writes polling, namespace warnings and names,
Redis URLs and ``check()``, key and template errors as ``CacheclearError``s, loader error text
kept out of messages and logs, one report per unreadable value."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, List

import pytest
import redis
import redis.asyncio

from cacheclear import (
    AsyncClient,
    CacheclearError,
    Client,
    Config,
    InvalidConfig,
    InvalidKey,
    KeyRenderError,
    LoaderError,
    RedisError,
    StalenessConfig,
    Template,
)
from cacheclear._common import SCRIPTS
from harness import RedisServer, free_port

NS = "shop"
EPOCH_KEY = "{cacheclear.ns:shop}:epoch"
WM_KEY = "{cacheclear.ns:shop}:watermark"
CACHED = b'{"format":1,"version":null,"delta_ms":1,"expiry_ms":4102444800000,"payload":"cached","epoch":7}'


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def set_watermark(r: redis.Redis, lsn: int, epoch: int = 7) -> None:
    secs, micros = r.time()
    r.set(EPOCH_KEY, str(epoch))
    r.set(WM_KEY, f"{lsn:016X} 0 0 {secs * 1000 + micros // 1000} {epoch}", px=600_000)


# ----- 2. read-your-writes re-reads the namespace with a backoff from 5 ms -----

RYW = Config(staleness=StalenessConfig(NS, max_staleness_ms=60_000, refresh_ms=1_000, read_your_writes_wait_ms=3_000))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_ryw_sees_a_watermark_advanced_during_the_wait_before_refresh_ms(
    redis_server: RedisServer, r: redis.Redis, mode: str
) -> None:
    set_watermark(r, 0x10)
    r.set("{p:1}", CACHED, px=60_000)
    loads: List[int] = []

    def advance_later() -> None:
        time.sleep(0.05)
        set_watermark(r, 0x20)

    if mode == "sync":
        client = Client(redis.Redis.from_url(redis_server.url), RYW)
        assert client.get_or_load("p:1", lambda: loads.append(1)) == "cached"
        assert client.stats().namespace_reads == 1
        t = threading.Thread(target=advance_later)
        t.start()
        got = client.get_at_least("p:1", "0/20", lambda: loads.append(1))
        t.join()
        st = client.stats()
    else:

        async def main() -> Any:
            client = AsyncClient(redis.asyncio.Redis.from_url(redis_server.url), RYW)
            assert await client.get_or_load("p:1", lambda: loads.append(1)) == "cached"
            assert client.stats().namespace_reads == 1
            t = threading.Thread(target=advance_later)
            t.start()
            got = await client.get_at_least("p:1", 0x20, lambda: loads.append(1))
            t.join()
            return got, client.stats()

        got, st = run(main())
    # Served from the cache, after several namespace reads within the wait (5, 10, 20, 40, 80 ms
    # pauses), not one read after refresh_ms (1 s): before the fix, namespace_reads was 2.
    assert got == "cached" and loads == []
    assert st.hits == 2 and st.ryw_waits == 1 and st.ryw_loads == 0
    assert st.namespace_reads >= 3


def test_ryw_waiters_share_one_namespace_read_in_flight(redis_server: RedisServer, r: redis.Redis) -> None:
    set_watermark(r, 0x10)
    r.set("{p:1}", CACHED, px=60_000)
    cfg = Config(staleness=StalenessConfig(NS, max_staleness_ms=60_000, refresh_ms=1_000, read_your_writes_wait_ms=150))

    async def main() -> Any:
        client = AsyncClient(redis.asyncio.Redis.from_url(redis_server.url), cfg)
        await client.get_or_load("p:1", lambda: "db")
        # The watermark never reaches 0x20: every waiter backs off 5, 10, 20, 40, 75 ms (≈ 6
        # reads with the one at the deadline) and then loads without filling.
        got = await asyncio.gather(*(client.get_at_least("p:1", 0x20, lambda: "db") for _ in range(10)))
        return got, client.stats()

    got, st = run(main())
    assert got == ["db"] * 10 and st.ryw_loads == 10 and st.ryw_waits == 10
    # One waiter alone makes about 6 reads; ten that did not share would make about 60.
    assert 3 <= st.namespace_reads - 1 <= 15


def test_ryw_wait_runs_out_and_loads(redis_server: RedisServer, r: redis.Redis) -> None:
    set_watermark(r, 0x10)
    cfg = Config(staleness=StalenessConfig(NS, max_staleness_ms=60_000, refresh_ms=1_000, read_your_writes_wait_ms=100))
    client = Client(redis.Redis.from_url(redis_server.url), cfg)
    assert client.get_at_least("p:1", 0x20, lambda: "db") == "db"
    st = client.stats()
    assert st.ryw_loads == 1 and st.namespace_reads >= 3
    assert r.get("{p:1}") is None  # not filled


# ----- 3. namespace warnings and names -----


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(1 for rec in caplog.records if rec.levelno == logging.WARNING and text in rec.getMessage())


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_missing_namespace_keys_are_logged_once_per_transition(
    redis_server: RedisServer, r: redis.Redis, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    caplog.set_level(logging.INFO, logger="cacheclear")
    cfg = Config(staleness=StalenessConfig("shpo", max_staleness_ms=60_000, refresh_ms=1))
    typo_epoch, typo_wm = "`{cacheclear.ns:shpo}:epoch`", "`{cacheclear.ns:shpo}:watermark`"

    if mode == "sync":
        client = Client(redis.Redis.from_url(redis_server.url), cfg)
        for _ in range(4):
            assert client.get_or_load("p:1", lambda: "db") == "db"
            time.sleep(0.005)
        reads = client.stats().namespace_reads
    else:

        async def main() -> int:
            client = AsyncClient(redis.asyncio.Redis.from_url(redis_server.url), cfg)
            for _ in range(4):
                assert await client.get_or_load("p:1", lambda: "db") == "db"
                await asyncio.sleep(0.005)
            return client.stats().namespace_reads

        reads = run(main())
    assert reads >= 2
    assert _warnings(caplog, typo_epoch) == 1 and _warnings(caplog, typo_wm) == 1
    assert "[postgres] namespace" in caplog.text

    # Readable, then the watermark vanishes: one more warning for it, none for the epoch.
    caplog.clear()
    client = Client(redis.Redis.from_url(redis_server.url), Config(staleness=StalenessConfig(NS, max_staleness_ms=60_000, refresh_ms=1)))
    set_watermark(r, 0x10)
    for _ in range(3):
        client.get_or_load("p:2", lambda: "db")
        time.sleep(0.005)
    assert _warnings(caplog, WM_KEY) == 0 and _warnings(caplog, EPOCH_KEY) == 0
    r.delete(WM_KEY)
    for _ in range(3):
        client.get_or_load("p:2", lambda: "db")
        time.sleep(0.005)
    assert _warnings(caplog, WM_KEY) == 1 and _warnings(caplog, EPOCH_KEY) == 0
    r.set(WM_KEY, "garbage")
    for _ in range(3):
        client.get_or_load("p:2", lambda: "db")
        time.sleep(0.005)
    assert _warnings(caplog, WM_KEY) == 2 and "malformed" in caplog.text
    r.set(EPOCH_KEY, "x")
    client.get_or_load("p:2", lambda: "db")
    assert _warnings(caplog, EPOCH_KEY) == 1 and client.stats().bypassed_epoch_missing >= 1


def test_namespace_names_are_validated_as_the_pipeline_does() -> None:
    for bad in ["", "a{b", "a}b", "{cacheclear}", 42, None, "\ud800"]:
        with pytest.raises(InvalidConfig) as e:
            StalenessConfig(bad)  # type: ignore[arg-type]
        assert e.value.field == "staleness.namespace"
        with pytest.raises(InvalidConfig):
            Config.from_dict({"staleness": {"namespace": bad}})
    for ok in ["cacheclear", "shop.eu-1", "a b", "é", "x:y"]:
        assert StalenessConfig(ok).namespace == ok


# ----- 4. Redis URLs and check() -----


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_malformed_redis_url_is_invalid_config_without_the_password(cls: Any) -> None:
    for url in ["localhost:6379", "redis://app:s3cret@host:abc/0", "http://app:s3cret@host/0",
                "redis://h/0?password=s3cret&socket_timeout=abc", "redis://app:s3cret@[::1"]:
        with pytest.raises(InvalidConfig) as e:
            cls(url)
        err = e.value
        assert isinstance(err, CacheclearError) and err.field == "redis_url" and err.key == ""
        assert "s3cret" not in str(err) and "s3cret" not in repr(err.value)
        assert err.__cause__ is None and err.__context__ is None


def test_check_pings_and_loads_the_scripts(redis_server: RedisServer, r: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cacheclear")
    r.script_flush()
    client = Client(redis_server.url, Config(staleness=StalenessConfig("nope")))
    client.check()
    shas = [SCRIPTS.fill.sha, SCRIPTS.release.sha, SCRIPTS.read_namespace.sha]
    assert r.script_exists(*shas) == [True, True, True]
    # With a staleness config the namespace is read once: a missing one is logged, not raised.
    assert client.stats().namespace_reads == 1 and "{cacheclear.ns:nope}:epoch" in caplog.text
    client.close()

    r.script_flush()

    async def main() -> None:
        async with AsyncClient(redis_server.url) as c:
            await c.check()

    run(main())
    assert r.script_exists(*shas) == [True, True, True]


def test_check_finds_a_wrong_password_or_no_redis(redis_server: RedisServer, r: redis.Redis) -> None:
    r.execute_command("ACL", "SETUSER", "trial", "on", ">right-pw", "~*", "+@all")
    try:
        url = f"redis://trial:wrong-pw@127.0.0.1:{redis_server.port}/0"
        client = Client(url)  # no connection yet: nothing raised
        with pytest.raises(RedisError) as e:
            client.check()
        assert e.value.op == "PING" and e.value.key == "" and "wrong-pw" not in str(e.value)
        assert isinstance(e.value.__cause__, redis.exceptions.RedisError)
        # A read with the wrong password falls back to the loader (on_redis_error = fallback).
        assert client.get_or_load("p:1", lambda: "db") == "db" and client.stats().fallbacks == 1
        client.close()
        Client(f"redis://trial:right-pw@127.0.0.1:{redis_server.port}/0").check()

        async def main() -> None:
            async with AsyncClient(url) as c:
                with pytest.raises(RedisError):
                    await c.check()

        run(main())
    finally:
        r.execute_command("ACL", "DELUSER", "trial")
    with pytest.raises(RedisError) as e:
        Client(f"redis://127.0.0.1:{free_port()}/0", Config(redis_connect_timeout_ms=200)).check()
    assert e.value.op == "PING"


# ----- 5. non-str keys -----


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_non_str_key_says_it_must_be_a_str(redis_server: RedisServer, r: redis.Redis, mode: str) -> None:
    for key in [42, None, b"p:1"]:
        if mode == "sync":
            with pytest.raises(InvalidKey) as e:
                Client(redis.Redis.from_url(redis_server.url)).get_or_load(key, lambda: 1)  # type: ignore[arg-type]
        else:

            async def main() -> None:
                await AsyncClient(redis.asyncio.Redis.from_url(redis_server.url)).get_at_least(key, 1, lambda: 1)  # type: ignore[arg-type]

            with pytest.raises(InvalidKey) as e:
                run(main())
        msg = str(e.value)
        assert "must be a non-empty str" in msg and type(key).__name__ in msg and "contains" not in msg
        assert e.value.key == repr(key)
    assert "contains `{`" in str(pytest.raises(InvalidKey, Client(redis.Redis.from_url(redis_server.url)).get_or_load, "a{b", lambda: 1).value)


# ----- 6. Template.render errors -----


def test_template_render_errors_are_cacheclear_errors_naming_the_column() -> None:
    t = Template("product:{id}")
    for bad in [1.5, True, None, b"1", "\ud800"]:
        with pytest.raises(KeyRenderError) as e:
            t.render({"id": bad})  # type: ignore[dict-item]
        err = e.value
        assert isinstance(err, CacheclearError) and isinstance(err, ValueError) and isinstance(err, TypeError)
        assert err.column == "id" and "column `id`" in str(err) and err.template == "product:{id}" and err.key == ""
    with pytest.raises(KeyRenderError) as e:
        t.render({"name": "x"})
    assert e.value.column == "id" and "no value" in str(e.value)
    with pytest.raises(KeyRenderError) as e:
        t.render(["1", "2"])
    assert e.value.column is None
    with pytest.raises(KeyRenderError):
        t.render(42)  # type: ignore[arg-type]


# ----- 7. the loader's exception text stays out of messages and logs -----


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_loader_error_text_is_not_logged(
    redis_server: RedisServer, r: redis.Redis, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="cacheclear")

    class DbError(Exception):
        pass

    def boom() -> Any:
        raise DbError('connection to "db" failed: password=hunter2')

    def call(key: str, strict: bool = False) -> Any:
        if mode == "sync":
            c = Client(redis.Redis.from_url(redis_server.url))
            return c.get_strict(boom) if strict else c.get_or_load(key, boom)

        async def main() -> Any:
            c = AsyncClient(redis.asyncio.Redis.from_url(redis_server.url))
            return await (c.get_strict(boom) if strict else c.get_or_load(key, boom))

        return run(main())

    for strict in [False, True]:
        e = pytest.raises(LoaderError, call, "p:1", strict).value
        assert isinstance(e.__cause__, DbError) and "hunter2" in str(e.__cause__)
        assert "hunter2" not in str(e) and "DbError" in str(e) and e.cause_type.endswith("DbError")
    assert "hunter2" not in caplog.text
    assert _warnings(caplog, "`p:1`") == 1 and "DbError" in caplog.text


# ----- 8. an unreadable value is reported once per read -----


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_unreadable_value_is_counted_and_logged_once_per_read(
    redis_server: RedisServer, r: redis.Redis, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    caplog.set_level(logging.WARNING, logger="cacheclear")
    r.set("{p:1}", b"not an envelope")  # GET, then the re-read under the lease
    r.set("{p:2}", b"not an envelope")  # GET, then polls while another process holds the lease
    r.set("{p:2}:lease", "someone-else", px=60_000)
    cfg = Config(lease_wait_ms=100)
    if mode == "sync":
        c = Client(redis.Redis.from_url(redis_server.url), cfg)
        assert c.get_or_load("p:1", lambda: "db1") == "db1"
        assert c.stats().decode_errors == 1
        assert c.get_or_load("p:2", lambda: "db2") == "db2"
        st = c.stats()
    else:

        async def main() -> Any:
            c = AsyncClient(redis.asyncio.Redis.from_url(redis_server.url), cfg)
            assert await c.get_or_load("p:1", lambda: "db1") == "db1"
            assert c.stats().decode_errors == 1
            assert await c.get_or_load("p:2", lambda: "db2") == "db2"
            return c.stats()

        st = run(main())
    assert st.decode_errors == 2 and st.lease_waits == 1
    assert _warnings(caplog, "not a readable format-1 envelope") == 2
