"""The README's FastAPI example, run as written against the real pipeline (the end-to-end
test's PostgreSQL, Redis and ``cacheclear run``): after ``POST /products/N/price`` the
read-your-writes answer is the new price, every time. (The example used to take the LSN inside
the transaction, before the commit, and returned the old price about half the time.)

Needs ``fastapi``, ``psycopg_pool`` and ``httpx`` (for ``fastapi.testclient``): the ``test``
extra installs them (``pip install "./clients/python[test]"``)."""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any

import pytest

from test_e2e import binary, env  # noqa: E402,F401  (the fixtures)

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_fastapi_example_reads_its_writes(env: Any) -> None:  # noqa: F811
    from fastapi.testclient import TestClient

    pg, rs, _pipeline, _db = env
    found = re.search(r"## Reading a product \(FastAPI\)\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert found, "the README's FastAPI example is gone"
    source = found.group(1)
    assert "postgresql://app@db/shop" in source and "redis://cache:6379/0" in source
    source = source.replace("postgresql://app@db/shop", pg.conninfo).replace("redis://cache:6379/0", rs.url)
    app = types.ModuleType("readme_fastapi_example")
    exec(compile(source, "README.md (FastAPI)", "exec"), app.__dict__)
    stale = []
    with TestClient(app.app) as client:
        for i in range(40):
            pid = 50 + i % 5
            assert client.get(f"/products/{pid}").status_code == 200  # cached
            price = 200_000 + i
            got = client.post(f"/products/{pid}/price", params={"price_cents": price}).json()
            if got["price_cents"] != price:
                stale.append((pid, price, got["price_cents"]))
        stats = app.cache.stats()
    assert stale == [], f"{len(stale)} of 40 read-your-writes reads returned the old price: {stale[:5]}; {stats}"
    assert stats.ryw_waits + stats.hits > 0 and stats.bypassed_epoch_missing == 0
