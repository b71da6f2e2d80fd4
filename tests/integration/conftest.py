"""Integration fixtures: a private redis-server per test (AOF on), never the shared one.

Every test under ``tests/integration`` is marked ``integration`` and skipped when no
``redis-server`` binary is on PATH.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_proc import RedisProcess, redis_server_available

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = None if redis_server_available() else pytest.mark.skip(reason="needs redis-server")
    for item in items:
        if _HERE not in Path(str(item.fspath)).resolve().parents:
            continue
        item.add_marker(pytest.mark.integration)
        if skip is not None:
            item.add_marker(skip)


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[RedisProcess]:
    """A running redis-server with ``appendonly yes``, its dir under ``tmp_path``."""
    directory = tmp_path / "redis"
    directory.mkdir()
    proc = RedisProcess(appendonly=True, directory=directory)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def redis_url(redis_proc: RedisProcess) -> str:
    """URL of the test's private redis-server."""
    return redis_proc.url
