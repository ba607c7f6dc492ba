"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer
from tests.system_tools import POSTMAP


@pytest.fixture(scope="module")
def postfix_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Postfix config directory for postmap (it needs a readable main.cf, nothing more)."""
    if not Path(POSTMAP).is_file():
        pytest.fail("postmap not found: run `make test` to install Postfix", pytrace=False)
    directory = tmp_path_factory.mktemp("postfix-etc")
    (directory / "main.cf").write_text("compatibility_level = 3.7\n")
    return directory


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of its own for one test, stopped (by PID) after it."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
