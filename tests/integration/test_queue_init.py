"""``butd queue init`` (the Kubernetes Job that runs before KEDA reads the group)."""

from __future__ import annotations

from typing import Any

from butd.cli.main import main
from butd.workers.protocol import GROUP, STREAMS


def test_queue_init_creates_the_groups_idempotently(redis_proc: Any) -> None:
    r = redis_proc.client()
    assert main(["queue", "init", "--redis-url", redis_proc.url]) == 0
    assert main(["queue", "init", "--redis-url", redis_proc.url]) == 0  # BUSYGROUP is fine
    for stream in STREAMS:
        groups = r.xinfo_groups(stream)
        assert [g["name"] for g in groups] == [GROUP.encode()]
        # What KEDA's lag trigger reads (XINFO GROUPS lag) and its pending trigger (XPENDING).
        assert groups[0]["lag"] == 0 and r.xpending(stream, GROUP)["pending"] == 0


def test_queue_init_gives_up_when_redis_never_answers() -> None:
    url = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    assert main(["queue", "init", "--redis-url", url, "--wait-s", "0"]) == 1
