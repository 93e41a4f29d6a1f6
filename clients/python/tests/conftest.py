"""Shared fixtures: one private Redis for the suite, and `r`, a raw connection to it flushed
(and `maxmemory` reset) for each test that takes it."""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Iterator

import pytest
import redis

sys.path.insert(0, os.path.dirname(__file__))

from harness import RedisServer  # noqa: E402

# PostgreSQL runs as the `postgres` user when we are root: its temp dirs must be traversable.
if os.geteuid() == 0 and not os.environ.get("TMPDIR"):
    os.environ["TMPDIR"] = "/tmp"
    tempfile.tempdir = None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_server.url)
    conn.flushall()
    conn.config_set("maxmemory", 0)
    yield conn
    conn.close()
