"""``butd queue init``: create the streams and their consumer group (idempotent).

Run before anything reads the group: KEDA's redis-streams scaler fails on a group that does not
exist yet (deploy/k8s/base/queue-init.yaml runs this as a Job). Redis is found at ``REDIS_URL``
(``butd.workers.settings.WorkerSettings``); it retries until Redis answers or ``--wait-s`` passes.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add ``butd queue init``."""
    queue = subparsers.add_parser("queue", help="set up the Redis streams")
    sub = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    init = sub.add_parser("init", help="create the streams and the consumer group (idempotent)")
    init.add_argument("--redis-url", default=None, help="Redis URL (env REDIS_URL)")
    init.add_argument(
        "--wait-s", type=float, default=60.0, help="keep retrying this long while Redis is down"
    )
    init.set_defaults(handler=run_init)


def run_init(args: argparse.Namespace) -> int:
    import redis

    from butd.workers import queue as q
    from butd.workers.protocol import GROUP, STREAMS
    from butd.workers.settings import WorkerSettings

    url = args.redis_url or WorkerSettings().redis_url
    deadline = time.monotonic() + args.wait_s
    while True:
        try:
            q.ensure_groups(q.connect(url))
            break
        except redis.ConnectionError as exc:
            if time.monotonic() > deadline:
                logger.error("redis at %s does not answer: %s", url, exc)
                return 1
            time.sleep(1.0)
    logger.info("consumer group %r ready on %s", GROUP, ", ".join(STREAMS))
    return 0
