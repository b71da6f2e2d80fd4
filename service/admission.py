"""Admission that keeps the deadline's promise: how many online requests may be queued now.

A request is admitted only when the requests ahead of it (waiting + being computed) can be
finished by the live workers within its deadline, by the throughput the workers measure:

    rate  = sum over live, non-stuck workers of 1 / seconds_per_image     (images / s)
    limit = min(max_queue_depth, max(1, floor(rate * request_timeout_s * margin)))

The queue depth is compared with ``limit`` atomically with the enqueue (the Lua script of
``butd.workers.queue.enqueue_online_if_room``); over it the answer is an immediate 503 with a
``Retry-After`` of the time the queue needs to drain below the limit. ``margin`` (< 1) leaves
room for the reply, the batch the worker is in and the estimate's error. Until a worker has
timed a batch (``seconds_per_image`` 0) only ``max_queue_depth`` applies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from butd.workers.protocol import Heartbeat


@dataclass(frozen=True)
class Admission:
    """The depth limit for the next enqueue and what it came from.

    Attributes:
        limit: online requests allowed ahead (waiting + in progress) for one more to be queued.
        rate: measured images / s of the live workers (0: not measured yet).
        budget_s: seconds of the deadline the queue may fill (timeout x margin).
    """

    limit: int
    rate: float
    budget_s: float

    def refusal(self, depth: int, retry_after_s: int) -> tuple[str, int]:
        """The 503 message and Retry-After (s) for a request refused at ``depth``."""
        if self.rate <= 0:
            return f"online queue is full: {depth} requests waiting, limit {self.limit}", (
                retry_after_s
            )
        wait_s = (depth + 1) / self.rate
        drain_s = (depth + 1 - self.limit) / self.rate
        message = (
            f"online queue is full: {depth} requests ahead would take ~{wait_s:.1f} s at the "
            f"measured {self.rate:.2f} images/s, more than the {self.budget_s:.1f} s the "
            f"deadline allows (limit {self.limit} requests)"
        )
        return message, max(retry_after_s, math.ceil(drain_s))


def admission(
    workers: Sequence[Heartbeat], *, timeout_s: float, margin: float, max_depth: int
) -> Admission:
    """The depth limit given the live, non-stuck ``workers``' measured throughput."""
    rate = sum(1.0 / b.seconds_per_image for b in workers if b.seconds_per_image > 0)
    budget_s = timeout_s * margin
    if rate <= 0:
        return Admission(max_depth, 0.0, budget_s)
    limit = max(1, min(max_depth, math.floor(rate * budget_s)))
    return Admission(limit, rate, budget_s)
