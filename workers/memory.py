"""Hand freed heap memory back to the OS after a batch (glibc ``malloc_trim``).

A worker decodes images of every size; glibc keeps the freed blocks of each arena for reuse,
so without a trim the RSS creeps up with the largest batches seen and never comes back down
(it levels eventually, at a high mark). ``trim_heap`` releases the free top and the free pages
inside each arena; it costs a few milliseconds per call, so the worker calls it once per
handled batch. On a libc without ``malloc_trim`` (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from functools import lru_cache

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        log.info("malloc_trim is not available in %s: heap trimming is off", name)
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def trim_heap() -> bool:
    """Return free heap pages to the OS; True when something was released."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
