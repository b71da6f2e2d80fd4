"""One ``butd serve`` per store: a second one stops at once, naming the first, starting nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from butd.service.store_lock import LOCK_NAME, StoreBusyError, store_lock

REPO = Path(__file__).resolve().parents[2]
_HOLD = (
    "import sys, time; from pathlib import Path; from butd.service.store_lock import store_lock\n"
    "with store_lock(Path(sys.argv[1]), host='127.0.0.1', port=8123):\n"
    "    print('held', flush=True); time.sleep(120)\n"
)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the store ``tmp_path / 'store'`` (as a running butd serve)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "store")], env=env,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait(10)


def test_a_second_serve_on_the_store_stops_before_starting_anything(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "BUTD_REDIS_URL")}
    env["PYTHONPATH"] = str(REPO)
    argv = [sys.executable, "-m", "butd.cli.main", "serve", "--store-dir",
            str(tmp_path / "store"), "--port", "0"]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"pid {holder.pid}" in done.stderr and "http://127.0.0.1:8123" in done.stderr
    assert "--store-dir OTHER_DIR --port OTHER_PORT" in done.stderr
    assert not (tmp_path / "store" / "redis").exists()  # no redis-server was started


def test_the_lock_is_free_again_once_its_holder_dies(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    store = tmp_path / "store"
    with (
        pytest.raises(StoreBusyError, match=f"pid {holder.pid}"),
        store_lock(store, host="h", port=1),
    ):
        pass
    holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the flock
    holder.wait(10)
    with store_lock(store, host="127.0.0.1", port=9000) as path:
        assert path == store / LOCK_NAME and f'"pid": {os.getpid()}' in path.read_text()
    assert path.read_text() == ""
