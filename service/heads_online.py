"""Caption / VQA requests through the workers: admission, one round trip, errors mapped once.

``HeadsService.ask`` reads like the data flow (``docs/api.md``, "Captions and answers"): a
live worker serving the head? (503 with the reason, else) -> room in ``butd:heads``? (503 +
Retry-After) -> enqueue -> wait up to ``request_timeout_s`` (504) -> the worker's answer
(``unavailable`` -> 503, ``error`` -> 422). The stored record the head reads is found by the
route first (``butd.service.routes.heads``): by id, by hash, or extracted from an upload.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from butd.service.backend import Queue
from butd.service.errors import OverloadedError, ResultTimeoutError, ServiceError, WorkerError
from butd.service.online import ModelVersions
from butd.service.settings import Settings
from butd.workers.heads_protocol import HeadsRequest, HeadsResult, HeadTask

logger = logging.getLogger(__name__)

_SETTING = {"caption": "CAPTION_MODEL", "vqa": "VQA_MODEL"}


class HeadUnavailableError(ServiceError):
    """No live worker serves the requested head (none was configured with it)."""

    status_code = 503
    code = "head_unavailable"


class HeadsService:
    """Sends caption / VQA requests to the workers serving heads."""

    def __init__(self, queue: Queue, settings: Settings, models: ModelVersions) -> None:
        self.queue = queue
        self.settings = settings
        self.models = models

    def ask(
        self, task: HeadTask, model_version: str, sha256: str, request_id: str, **params: Any
    ) -> HeadsResult:
        """The answer of a worker's ``task`` head on the stored record ``(model_version,
        sha256)``; ``params`` are ``HeadsRequest`` fields (question, beam_size, max_len, top).

        Raises:
            HeadUnavailableError: no live worker serves ``task`` (503).
            OverloadedError: the heads queue is full (503 + Retry-After).
            ResultTimeoutError: no answer within ``request_timeout_s`` (504).
            WorkerError: the head failed on this record (422).
        """
        self.check_available(task)
        timeout = self.settings.request_timeout_s
        request = HeadsRequest(
            request_id=request_id,
            task=task,
            model_version=model_version,
            content_sha256=sha256,
            deadline_ms=int((time.time() + timeout) * 1000),
            **params,
        )
        limit = self.settings.max_queue_depth
        depth = self.queue.enqueue_heads(request, max_depth=limit)
        if depth is not None:
            raise OverloadedError(
                f"heads queue is full: {depth} requests waiting, limit {limit}",
                retry_after_s=self.settings.retry_after_s,
            )
        result = self.queue.wait_heads(request_id, timeout)
        if result is None or result.status == "expired":
            raise ResultTimeoutError(f"no worker answered the {task} request within {timeout:g} s")
        if result.status == "unavailable":
            raise HeadUnavailableError(result.reason)
        if result.status == "error":
            raise WorkerError(f"the {task} head failed on this image: {result.reason}")
        return result

    def check_available(self, task: HeadTask) -> None:
        """Refuse (503) when no live worker announces ``task`` in its heartbeat."""
        beats = self.models.loaded_workers()
        if not any(task in b.heads for b in beats):
            name = "caption" if task == "caption" else "VQA"
            raise HeadUnavailableError(
                f"no {name} model configured on any worker ({len(beats)} live); "
                f"start a worker with {_SETTING[task]}=DIR (written by `butd heads train`)"
            )
