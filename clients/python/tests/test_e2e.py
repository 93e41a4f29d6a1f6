"""End to end: a real ``cacheclear run`` pipeline (binary from ``$CACHECLEAR_BIN``) on a private
PostgreSQL and Redis, four reader processes reading hot product keys through
:class:`cacheclear.AsyncClient`, and this process updating their prices.

Asserts:

(a) no read returns a value older than its invalidation once that was applied: after each
    UPDATE the test waits until ``{product:N}:fence`` passes the WAL position taken just before
    the UPDATE (the commit's end LSN is beyond it), notes that instant, and every read that
    *starts* afterwards must return the new price (prices only grow, so "older" is "lower");
(b) one database load per hot key per invalidation: loads (counted across processes with a Redis
    INCR in the loader) ≤ invalidations + 1 per key, while stampedes really happened (readers of
    other processes waited on the lease, readers of one process shared a load).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import redis

import e2e_reader
from harness import PgServer, RedisServer, _die_with_parent

HOT = [1, 2, 3, 4]
READERS = 4
TASKS_PER_KEY = 3
ROUNDS = 8
NAMESPACE = "cacheclear"  # the pipeline's default: its slot name

SCHEMA = """
CREATE TABLE product (
    id int PRIMARY KEY,
    category_id int NOT NULL,
    name text NOT NULL,
    slug text NOT NULL,
    price_cents bigint NOT NULL
);
ALTER TABLE product REPLICA IDENTITY FULL;
INSERT INTO product SELECT g, 1 + g % 10, 'product ' || g, 'product-' || g, 1000 + g FROM generate_series(1, 100) g;
"""


def config_toml(pg: PgServer, r: RedisServer) -> str:
    # As crates/cli/tests/common/mod.rs (config_toml) and README's configuration section.
    return f"""[postgres]
url = "{pg.url}"
status_interval_ms = 100

[redis]
url = "{r.url}"

[metrics]
listen = ""

[[rules]]
table = "public.product"
keys = ["product:{{id}}", "category:{{category_id}}:products"]
"""


@pytest.fixture(scope="module")
def binary() -> str:
    path = os.environ.get("CACHECLEAR_BIN")
    if not path:
        pytest.fail(
            "CACHECLEAR_BIN is not set: the end-to-end test runs the real pipeline. Build it "
            "(cargo build -p cacheclear) and run with CACHECLEAR_BIN=target/debug/cacheclear, or run "
            "`cargo test -p cacheclear --test python_client`, which sets it."
        )
    if not os.access(path, os.X_OK):
        pytest.fail(f"CACHECLEAR_BIN={path} is not an executable file")
    return path


class Pipeline:
    def __init__(self, binary: str, config: Path, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CACHECLEAR__")}
        env["CACHECLEAR_LOG"] = "info"
        env["NO_COLOR"] = "1"
        self.log = log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(
                [binary, "run", "--config", str(config)], stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                env=env, preexec_fn=_die_with_parent(signal.SIGKILL),
            )

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def env(binary: str) -> Iterator[Tuple[PgServer, RedisServer, Pipeline, Any]]:
    import psycopg

    pg = PgServer()
    r = RedisServer()
    work = Path(tempfile.mkdtemp(prefix="cacheclear-py-e2e-"))
    pipeline = None
    try:
        db = psycopg.connect(pg.conninfo, autocommit=True)
        db.execute(SCHEMA)
        config = work / "cacheclear.toml"
        config.write_text(config_toml(pg, r))
        pipeline = Pipeline(binary, config, work / "cacheclear.log")
        wait_streaming(db, pipeline, redis.Redis.from_url(r.url))
        yield pg, r, pipeline, db
        db.close()
    finally:
        if pipeline is not None:
            pipeline.stop()
        r.stop()
        pg.stop()
        for p in work.iterdir():
            p.unlink()
        work.rmdir()


def wait_streaming(db: Any, pipeline: Pipeline, r: redis.Redis, timeout: float = 60) -> None:
    """Until the pipeline streams from its slot and has applied everything it had (the new
    slot's table-wide eviction included), and its watermark of the current epoch is in Redis
    (as crates/cli/tests/common/mod.rs, wait_streaming)."""
    deadline = time.monotonic() + timeout

    def check_alive() -> None:
        if pipeline.proc.poll() is not None:
            pytest.fail(f"cacheclear run exited with {pipeline.proc.returncode}:\n{pipeline.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"the pipeline did not stream within {timeout} s:\n{pipeline.tail()}")

    while True:
        check_alive()
        row = db.execute("SELECT active FROM pg_replication_slots WHERE slot_name = 'cacheclear'").fetchone()
        if row and row[0]:
            break
        time.sleep(0.05)
    mark = db.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    while True:
        check_alive()
        db.execute("SELECT pg_logical_emit_message(false, 'cacheclear.test', '')")
        confirmed = db.execute(
            "SELECT confirmed_flush_lsn > %s::pg_lsn FROM pg_replication_slots WHERE slot_name = 'cacheclear'", (str(mark),)
        ).fetchone()
        if confirmed and confirmed[0]:
            break
        time.sleep(0.1)
    while True:
        check_alive()
        wm, epoch = r.get(f"{{cacheclear.ns:{NAMESPACE}}}:watermark"), r.get(f"{{cacheclear.ns:{NAMESPACE}}}:epoch")
        if wm and epoch and wm.split(b" ")[-1] == epoch:
            return
        time.sleep(0.05)


def fence_of(r: redis.Redis, pid: int) -> str:
    v = r.get(f"{{product:{pid}}}:fence")
    return v.decode() if v else ""


def test_readers_in_processes_see_every_applied_invalidation_with_one_load_each(env: Any) -> None:
    import cacheclear

    pg, rs, pipeline, db = env
    r = redis.Redis.from_url(rs.url)
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    out_dir = Path(tempfile.mkdtemp(prefix="cacheclear-py-e2e-out-"))
    outs = [str(out_dir / f"reader-{i}.json") for i in range(READERS)]
    procs = [
        ctx.Process(target=e2e_reader.main, args=(rs.url, pg.conninfo, HOT, TASKS_PER_KEY, out, ready, stop, NAMESPACE))
        for out in outs
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=60)
        initial = {pid: 1000 + pid for pid in HOT}
        # (pid, price, applied_at): the instant the invalidation was seen applied.
        updates: List[Tuple[int, int, float]] = []
        rng = random.Random(14)
        price = dict(initial)
        for _ in range(ROUNDS):
            for pid in HOT:
                # Two updates in a row: the second lands while the stampede after the first is
                # still loading (the loader reads, then takes 20 ms), so a fill of the older row
                # would come after the newer invalidation: the stale set the lease prevents.
                for gap in (0.0, rng.uniform(0.0, 0.012)):
                    time.sleep(gap)
                    price[pid] += 100
                    before = db.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
                    before_hex = cacheclear.to_fixed_hex(cacheclear.parse_lsn(str(before)))
                    db.execute("UPDATE product SET price_cents = %s WHERE id = %s", (price[pid], pid))
                    deadline = time.monotonic() + 30
                    while fence_of(r, pid) <= before_hex:
                        if time.monotonic() > deadline:
                            pytest.fail(f"product:{pid}'s invalidation was not applied within 30 s:\n{pipeline.tail()}")
                        time.sleep(0.001)
                    updates.append((pid, price[pid], time.monotonic()))
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        stop.set()
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
                p.join()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    results: List[Dict[str, Any]] = [json.loads(Path(out).read_text()) for out in outs]
    for out in outs:
        os.unlink(out)
    out_dir.rmdir()

    reads = [tuple(x) for res in results for x in res["reads"]]
    errors = [e for res in results for e in res["errors"]]
    assert errors == [], errors[:5]
    assert len(reads) > 1000, f"only {len(reads)} reads"

    # (a) A read that started after an invalidation was seen applied returns that update's
    # price or a newer one (never an older one), and only prices that were committed.
    committed = {pid: {initial[pid]} for pid in HOT}
    for pid, price, _ in updates:
        committed[pid].add(price)
    per_pid = {pid: sorted((t, price) for p, price, t in updates if p == pid) for pid in HOT}
    stale: List[str] = []
    checked_after_update = 0
    for pid, t0, _t1, price in reads:
        assert price in committed[pid], f"product:{pid} read a price never committed: {price}"
        required = initial[pid]
        for applied_at, p in per_pid[pid]:
            if applied_at <= t0:
                required = p
            else:
                break
        if required != initial[pid]:
            checked_after_update += 1
        if price < required:
            stale.append(f"product:{pid}: read started {t0:.6f} got {price}, but {required} was applied before")
    assert stale == [], f"{len(stale)} stale read(s): {stale[:5]}"
    assert checked_after_update > 500

    # (b) One database load per hot key per invalidation (+ the first fill), and the stampedes
    # that made it non-trivial: waits on another process's lease, and shared in-process loads.
    stats = {k: sum(res["stats"][k] for res in results) for k in results[0]["stats"]}
    assert stats["lease_wait_timeouts"] == 0 and stats["unfilled_loads"] == 0, stats
    for pid in HOT:
        loads = int(r.get(f"test:loads:{pid}") or 0)
        invalidations = sum(1 for p, _, _ in updates if p == pid)
        assert 1 <= loads <= invalidations + 1, f"product:{pid}: {loads} loads for {invalidations} invalidations; {stats}"
    assert stats["lease_waits"] > 0, stats
    assert stats["coalesced"] > 0, stats
    assert stats["bypassed_watermark_stale"] + stats["bypassed_watermark_missing"] + stats["bypassed_epoch_missing"] == 0, stats
    assert stats["fills"] >= len(HOT), stats
    print(f"e2e: {len(reads)} reads, {len(updates)} updates, loads per key "
          f"{[int(r.get(f'test:loads:{pid}') or 0) for pid in HOT]}, counters {stats}")

    # The cached values carry the namespace's epoch and the last price.
    epoch = int(r.get(f"{{cacheclear.ns:{NAMESPACE}}}:epoch"))
    for pid in HOT:
        raw = r.get(f"{{product:{pid}}}")
        if raw is not None:
            envelope = json.loads(raw)
            assert envelope["epoch"] == epoch and envelope["payload"]["price_cents"] == initial[pid] + 200 * ROUNDS
            # Filled after the last invalidation: it read after that fence.
            assert cacheclear.parse_lsn(envelope["read_after"]) == cacheclear.from_fixed_hex(fence_of(r, pid))
