"""A counting semaphore weighted by pixels: bounds the memory of concurrent full decodes.

``PixelBudget.hold(pixels, timeout_s)`` waits until ``pixels`` fit in what the holders have
left of ``budget`` and keeps them until the block ends; a decode of w x h pixels holds w * h.
Requests larger than the whole budget are refused outright (the settings validator keeps the
budget at least ``max_pixels``, so that only happens with a misconfiguration).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class BudgetTimeoutError(Exception):
    """No room in the budget within the wait allowed."""


class PixelBudget:
    """At most ``budget`` pixels held at once, across threads.

    Args:
        budget: total pixels; > 0.
    """

    def __init__(self, budget: int) -> None:
        if budget < 1:
            raise ValueError(f"budget must be >= 1 pixel; got {budget}")
        self.budget = budget
        self.held = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int, timeout_s: float) -> Iterator[None]:
        """Hold ``pixels`` for the block; wait up to ``timeout_s`` for room.

        Raises:
            BudgetTimeoutError: no room within ``timeout_s`` or ``pixels > budget``.
        """
        if pixels > self.budget:
            raise BudgetTimeoutError(f"{pixels} pixels exceed the whole budget of {self.budget}")
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.held + pixels > self.budget:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    if self.held + pixels <= self.budget:
                        break
                    raise BudgetTimeoutError(
                        f"{pixels} pixels waited {timeout_s:g} s for room in a decode budget "
                        f"of {self.budget} pixels ({self.held} held)"
                    )
            self.held += pixels
        try:
            yield
        finally:
            with self._cond:
                self.held -= pixels
                self._cond.notify_all()
