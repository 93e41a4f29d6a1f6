"""The client's hit path against a raw Redis GET + json.loads of the same value, in the same
process and run, on the same connection count and concurrency. Prints ops/s and p50/p99 latency
of both and ``hit_vs_raw_get`` (client ops/s ÷ raw ops/s; target ≥ 0.9).

Starts its own private redis-server (tests/harness.py); never touches another Redis.

    python clients/python/bench/hit_path.py [--seconds 2] [--rounds 3] [--concurrency 32]

Rounds alternate raw and client (raw, client, raw, client, …) so drift (CPU frequency, other
load) hits both alike; the figures are the medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import threading
import time
from typing import Any, Callable, List, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import redis  # noqa: E402
import redis.asyncio  # noqa: E402

import cacheclear  # noqa: E402
from harness import RedisServer  # noqa: E402

KEYS = 1000


def never() -> Any:
    raise AssertionError("the benchmark reads only hits: the loader must not run")


def pct(sorted_lat: List[float], q: float) -> float:
    return sorted_lat[min(len(sorted_lat) - 1, int(q * len(sorted_lat)))] * 1e6


async def async_round(kind: str, r: "redis.asyncio.Redis", client: cacheclear.AsyncClient, seconds: float, concurrency: int) -> Tuple[float, float, float]:
    keys = [f"product:{i}" for i in range(KEYS)]
    vkeys = ["{" + k + "}" for k in keys]
    lat: List[float] = []
    stop_at = time.perf_counter() + seconds
    count = 0

    async def worker(seed: int) -> None:
        nonlocal count
        rng = random.Random(seed)
        n = 0
        pc = time.perf_counter
        if kind == "raw":
            while True:
                i = rng.randrange(KEYS)
                t0 = pc()
                v = json.loads(await r.get(vkeys[i]))["payload"]
                t1 = pc()
                lat.append(t1 - t0)
                n += 1
                if t1 >= stop_at:
                    break
        else:
            while True:
                i = rng.randrange(KEYS)
                t0 = pc()
                v = await client.get_or_load(keys[i], never)
                t1 = pc()
                lat.append(t1 - t0)
                n += 1
                if t1 >= stop_at:
                    break
        assert v is not None
        count += n

    start = time.perf_counter()
    await asyncio.gather(*(worker(s) for s in range(concurrency)))
    elapsed = time.perf_counter() - start
    lat.sort()
    return count / elapsed, pct(lat, 0.5), pct(lat, 0.99)


def sync_round(kind: str, r: redis.Redis, client: cacheclear.Client, seconds: float, threads: int) -> Tuple[float, float, float]:
    keys = [f"product:{i}" for i in range(KEYS)]
    vkeys = ["{" + k + "}" for k in keys]
    lats: List[List[float]] = [[] for _ in range(threads)]
    counts = [0] * threads
    stop_at = time.perf_counter() + seconds

    def worker(t: int) -> None:
        rng = random.Random(t)
        lat = lats[t]
        pc = time.perf_counter
        get: Callable[[int], Any]
        if kind == "raw":
            get = lambda i: json.loads(r.get(vkeys[i]))["payload"]  # noqa: E731
        else:
            get = lambda i: client.get_or_load(keys[i], never)  # noqa: E731
        n = 0
        while True:
            i = rng.randrange(KEYS)
            t0 = pc()
            get(i)
            t1 = pc()
            lat.append(t1 - t0)
            n += 1
            if t1 >= stop_at:
                break
        counts[t] = n

    start = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - start
    lat = sorted(x for l in lats for x in l)
    return sum(counts) / elapsed, pct(lat, 0.5), pct(lat, 0.99)


def report(name: str, raw: List[Tuple[float, float, float]], cli: List[Tuple[float, float, float]]) -> float:
    def med(rows: List[Tuple[float, float, float]], i: int) -> float:
        return statistics.median(r[i] for r in rows)

    ratio = med(cli, 0) / med(raw, 0)
    print(f"{name}:")
    print(f"  raw GET + json.loads : {med(raw, 0):>9.0f} ops/s  p50 {med(raw, 1):7.1f} µs  p99 {med(raw, 2):7.1f} µs")
    print(f"  client hit path      : {med(cli, 0):>9.0f} ops/s  p50 {med(cli, 1):7.1f} µs  p99 {med(cli, 2):7.1f} µs")
    print(f"  hit_vs_raw_get = {ratio:.3f}  (per round: {', '.join(f'{c[0] / r[0]:.3f}' for r, c in zip(raw, cli))}; target ≥ 0.9)")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="length of one round, s")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per side")
    ap.add_argument("--concurrency", type=int, default=32, help="asyncio tasks (= pool connections)")
    ap.add_argument("--threads", type=int, default=1, help="threads of the sync comparison")
    args = ap.parse_args()

    server = RedisServer()
    try:
        payload = {"id": 0, "name": "product", "price_cents": 1999, "tags": ["a", "b"], "stock": 7}
        r = redis.Redis.from_url(server.url)
        # A namespace as the pipeline writes it, so the breaker variant has an epoch and a fresh
        # watermark (lag 0); values filled with it carry the epoch (both clients read them).
        r.set("{cacheclear.ns:bench}:epoch", "1")
        t = r.time()
        now_ms = int(t[0]) * 1000 + int(t[1]) // 1000
        r.set("{cacheclear.ns:bench}:watermark", f"{0:016X} 0 0 {now_ms} 1", px=600000)
        staleness = cacheclear.StalenessConfig("bench", max_staleness_ms=600_000)
        filler = cacheclear.Client(redis.Redis.from_url(server.url), cacheclear.Config(staleness=staleness))
        for i in range(KEYS):
            filler.get_or_load(f"product:{i}", lambda i=i: dict(payload, id=i))
        assert filler.stats().fills == KEYS
        print(f"redis-server {r.info()['redis_version']} on 127.0.0.1:{server.port}; {KEYS} keys; "
              f"python {sys.version.split()[0]}, redis-py {redis.__version__}, {os.cpu_count()} CPUs")

        async def run_async(config: cacheclear.Config, name: str) -> float:
            pool = redis.asyncio.ConnectionPool.from_url(server.url, max_connections=args.concurrency)
            ar = redis.asyncio.Redis(connection_pool=pool)
            client = cacheclear.AsyncClient(ar, config)  # the same pool: same connections
            await async_round("raw", ar, client, 0.3, args.concurrency)  # warm-up
            await async_round("client", ar, client, 0.3, args.concurrency)
            raw, cli = [], []
            for _ in range(args.rounds):
                raw.append(await async_round("raw", ar, client, args.seconds, args.concurrency))
                cli.append(await async_round("client", ar, client, args.seconds, args.concurrency))
            s = client.stats()
            assert s.loads == 0 and s.misses == 0, s
            await ar.aclose() if hasattr(ar, "aclose") else await ar.close()
            return report(f"{name} (asyncio, {args.concurrency} tasks on {args.concurrency} connections)", raw, cli)

        asyncio.run(run_async(cacheclear.Config(), "AsyncClient"))
        asyncio.run(run_async(
            cacheclear.Config(staleness=staleness),
            "AsyncClient with the staleness breaker",
        ))

        pool = redis.ConnectionPool.from_url(server.url, max_connections=max(args.threads, 1))
        sr = redis.Redis(connection_pool=pool)
        client = cacheclear.Client(sr)
        sync_round("raw", sr, client, 0.3, args.threads)
        sync_round("client", sr, client, 0.3, args.threads)
        raw, cli = [], []
        for _ in range(args.rounds):
            raw.append(sync_round("raw", sr, client, args.seconds, args.threads))
            cli.append(sync_round("client", sr, client, args.seconds, args.threads))
        assert client.stats().loads == 0
        report(f"Client (sync, {args.threads} thread(s) on {max(args.threads, 1)} connection(s))", raw, cli)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
