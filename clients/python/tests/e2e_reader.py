"""A reader process of test_e2e.py: reads hot product keys through :class:`cacheclear.AsyncClient`
in several concurrent tasks per key until told to stop, and writes every read (key, start and
end on the system-wide monotonic clock, price) and the client's counters to a JSON file.

Its loader reads PostgreSQL (psycopg) and counts itself in Redis (``INCR test:loads:<id>``), so
the test can count database loads across processes.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict
from typing import Any, Dict, List


def main(redis_url: str, pg_conninfo: str, ids: List[int], tasks_per_key: int, out_path: str,
         ready: Any, stop: Any, namespace: str) -> None:
    asyncio.run(_main(redis_url, pg_conninfo, ids, tasks_per_key, out_path, ready, stop, namespace))


async def _main(redis_url: str, pg_conninfo: str, ids: List[int], tasks_per_key: int, out_path: str,
                ready: Any, stop: Any, namespace: str) -> None:
    import psycopg
    import redis.asyncio

    import cacheclear

    # Generous bounds, so that the test measures the protocol and not the machine's load: the
    # breaker must not bypass on a loaded 2-core machine (bypass loads would count as database
    # loads), a lease must not expire under a slow loader, and a wait must not time out into a
    # load without filling (both are database loads the protocol allows by design; the test
    # asserts none happened). Epochs and fills carrying them are exercised all the same.
    config = cacheclear.Config(
        lease_ms=20_000,
        lease_wait_ms=30_000,
        staleness=cacheclear.StalenessConfig(namespace, max_staleness_ms=60_000),
    )
    client = cacheclear.AsyncClient(redis_url, config)
    counter = redis.asyncio.Redis.from_url(redis_url)
    pg = await psycopg.AsyncConnection.connect(pg_conninfo, autocommit=True)
    pg_lock = asyncio.Lock()
    reads: List[List[Any]] = []
    errors: List[str] = []

    def loader_for(pid: int) -> Any:
        async def load() -> Dict[str, Any]:
            await counter.incr(f"test:loads:{pid}")
            async with pg_lock:
                cur = await pg.execute("SELECT price_cents FROM product WHERE id = %s", (pid,))
                row = await cur.fetchone()
            assert row is not None
            await asyncio.sleep(0.02)  # a slow query: widens the stampede window
            return {"id": pid, "price_cents": row[0]}

        return load

    async def reader(pid: int) -> None:
        key = f"product:{pid}"
        load = loader_for(pid)
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                value = await client.get_or_load(key, load)
            except cacheclear.CacheclearError as e:
                errors.append(f"{key}: {e!r}")
                continue
            reads.append([pid, t0, time.monotonic(), value["price_cents"]])
            await asyncio.sleep(random.uniform(0, 0.004))

    # One read of each key first, then report ready.
    for pid in ids:
        await client.get_or_load(f"product:{pid}", loader_for(pid))
    ready.put(out_path)
    await asyncio.gather(*(reader(pid) for pid in ids for _ in range(tasks_per_key)))
    with open(out_path, "w") as f:
        json.dump({"reads": reads, "errors": errors, "stats": asdict(client.stats())}, f)
    await client.aclose()
    await counter.aclose() if hasattr(counter, "aclose") else await counter.close()
    await pg.close()
