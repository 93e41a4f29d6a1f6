"""Session fixtures: one private Redis for the suite (each test flushes what it uses)."""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Iterator

import pytest

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
