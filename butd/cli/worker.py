"""``butd worker``: one long-lived extraction worker (one per GPU) on the Redis streams.

Settings come from the environment (``butd.workers.settings.WorkerSettings``: ``REDIS_URL``,
``BUTD_STORE_DIR``, ``BUTD_WEIGHTS``, ``DEVICE``, ``BATCH_SIZE``, ...); the flags below override
the most common ones. Torch is imported only when the command runs.
"""

from __future__ import annotations

import argparse
from typing import Any

# flag -> WorkerSettings field
_FLAGS: dict[str, str] = {
    "redis_url": "Redis URL of the queue (env REDIS_URL)",
    "store_dir": "feature store directory shared with the gateway (env BUTD_STORE_DIR)",
    "weights": "registry name or canonical weights file (env BUTD_WEIGHTS)",
    "device": "cpu, cuda, cuda:N or auto (env DEVICE)",
    "batch_size": "most images per model call (env BATCH_SIZE)",
    "batch_wait_ms": "longest wait for an online batch to fill, ms (env BATCH_WAIT_MS)",
    "claim_idle_ms": "reclaim entries pending longer than this, ms (env CLAIM_IDLE_MS)",
    "max_deliveries": "dead-letter an entry after this many deliveries (env MAX_DELIVERIES)",
    "worker_id": "consumer name in the group (default host-pid; env BUTD_WORKER_ID)",
}
_INTS = {"batch_size", "batch_wait_ms", "claim_idle_ms", "max_deliveries"}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="run an extraction worker on the Redis queue (one per GPU)",
        description="Loads the model once, serves online requests first, then batch-job "
        "shards; SIGTERM finishes the batch in hand and exits 0. Settings: docs/workers.md.",
    )
    for name, text in _FLAGS.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=int if name in _INTS else str,
            default=None,
            help=text,
        )
    parser.set_defaults(handler=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    from butd.workers.settings import WorkerSettings
    from butd.workers.worker import build_worker

    overrides = {name: getattr(args, name) for name in _FLAGS if getattr(args, name) is not None}
    settings = WorkerSettings(**overrides)
    return build_worker(settings).run()
