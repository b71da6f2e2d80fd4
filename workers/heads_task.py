"""Caption and VQA heads inside a worker: a thread answering ``butd:heads`` requests.

A worker started with ``CAPTION_MODEL`` and/or ``VQA_MODEL`` (directories written by ``butd
heads train``) loads them once (``butd.heads.inference.load_head``) and starts a ``HeadsServer``:

read one request (``butd.workers.heads_protocol``) -> read its stored record (feature index ->
sealed shard row, polled for up to ``record_wait_s``: an online answer precedes its seal) ->
run the head under ``torch.inference_mode`` -> push the answer -> ack.

The heads run on the worker's torch device (the extractor's: ``cuda:0`` on a GPU worker,
``cpu`` otherwise): ``load_heads`` moves them there and ``butd.heads.inference`` builds each
request's
inputs on the head's device; answers come back as Python numbers. Torch is imported by name
(``importlib``), so this module stays out of mypy's torch import graph, as ``butd.workers.worker``
does.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from butd.store.index import FeatureIndex
from butd.store.objects import open_readers
from butd.store.records import FeatureRecord
from butd.workers import queue as q
from butd.workers.heads_protocol import HEADS_STREAM, HeadsRequest, HeadsResult, post_heads_result
from butd.workers.protocol import ProtocolError
from butd.workers.settings import WorkerSettings
from butd.workers.streams import ensure_group

if TYPE_CHECKING:
    Client = redis.Redis

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedHead:
    """A trained head: the module (eval mode, on the worker's device) and its ``meta``."""

    model: Any
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        """The head's name from its checkpoint ("updown", "ban", ...)."""
        return str(self.meta.get("head", self.meta.get("task", "")))


def load_heads(paths: dict[str, Path | None], device: str = "cpu") -> dict[str, LoadedHead]:
    """Load the configured heads onto ``device``, keyed by task; an unset path is skipped.

    Args:
        paths: checkpoint directory per task ("caption", "vqa"); None = not served.
        device: torch device string ("cpu", "cuda:0"), the worker's extraction device.

    Raises:
        ValueError: a checkpoint's task differs from the setting that names it.
    """
    loaded: dict[str, LoadedHead] = {}
    for task, path in paths.items():
        if path is None:
            continue
        inference: Any = importlib.import_module("butd.heads.inference")
        model, meta = inference.load_head(path, device=device)
        if meta.get("task") != task:
            raise ValueError(f"{path} holds a {meta.get('task')!r} head, not a {task!r} head")
        loaded[task] = LoadedHead(model, meta)
        log.info("loaded %s head %s from %s on %s", task, loaded[task].name, path, device)
    return loaded


def run_head(head: LoadedHead, request: HeadsRequest, record: FeatureRecord) -> HeadsResult:
    """Caption or answer ``record`` with ``head`` (torch.inference_mode, on the head's device)."""
    torch: Any = importlib.import_module("torch")
    inference: Any = importlib.import_module("butd.heads.inference")
    common = {
        "request_id": request.request_id,
        "status": "ok",
        "model_version": record.model_version,
        "head": head.name,
        "note": str(head.meta.get("note", "")),
        "boxes": record.boxes.astype(float).tolist(),
        "image_w": int(record.image_w),
        "image_h": int(record.image_h),
    }
    with torch.inference_mode():
        if request.task == "caption":
            out = inference.caption(
                head.model, head.meta, record, beam_size=request.beam_size, max_len=request.max_len
            )
            return HeadsResult(
                **common,
                words=list(out.words),
                log_prob=float(out.log_prob),
                attention=out.attention.float().tolist(),  # (T, N)
            )
        got = inference.answer(head.model, head.meta, record, request.question, top=request.top)
        return HeadsResult(
            **common,
            answers=[(str(a), float(s)) for a, s in got.answers],
            attention=got.attention.float().reshape(1, -1).tolist(),
        )


class HeadsServer(threading.Thread):
    """Answers heads requests from ``butd:heads`` until ``stop``.

    Args:
        redis_url: Redis holding the stream, the results and the feature index.
        store_dir: the store directory (sealed shards under ``store_dir/shards``).
        store_url: the bucket prefix of the sealed shards instead (``butd.store.objects``), or None.
        heads: loaded heads by task ("caption", "vqa").
        consumer: the consumer name in the group (the worker's id).
        record_wait_s: how long to poll the index for a record not sealed yet, seconds.
        result_ttl_s: how long an answer waits in Redis for the gateway, seconds.
        block_ms: longest blocking read while idle, ms (bounds how late ``stop`` is noticed).
    """

    def __init__(
        self,
        redis_url: str,
        store_dir: Path,
        heads: dict[str, LoadedHead],
        *,
        consumer: str,
        record_wait_s: float = 5.0,
        result_ttl_s: int = 600,
        block_ms: int = 1000,
        store_url: str | None = None,
    ) -> None:
        super().__init__(name="heads", daemon=True)
        self.r = q.connect(redis_url)
        self.index = FeatureIndex(self.r)
        self.readers = open_readers(Path(store_dir) / "shards", store_url)
        self.heads = heads
        self.consumer = consumer
        self.record_wait_s = record_wait_s
        self.result_ttl_s = result_ttl_s
        self.block_ms = block_ms
        self.stopping = threading.Event()

    def stop(self) -> None:
        """Leave the loop after the request in hand."""
        self.stopping.set()

    def run(self) -> None:
        """Read, answer, ack; Redis errors are logged and retried after a pause."""
        log.info("heads server %s: serving %s", self.consumer, sorted(self.heads))
        group_ok = False  # (re)created after a start or an outage (Redis may have lost it)
        while not self.stopping.is_set():
            try:
                if not group_ok:
                    ensure_group(self.r, HEADS_STREAM)
                    group_ok = True
                for entry in q.read_entries(
                    self.r, [HEADS_STREAM], self.consumer, count=1, block_ms=self.block_ms
                ):
                    self.handle(entry)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("heads server: redis unreachable (%s); retrying", exc)
                group_ok = False
                self.stopping.wait(1.0)
            except Exception:  # e.g. NOGROUP after Redis lost its data: never die silently
                log.exception("heads server: unexpected error; retrying")
                group_ok = False
                self.stopping.wait(1.0)
        self.readers.close()

    def handle(self, entry: q.Entry) -> None:
        """Answer one entry (any failure becomes an error answer), then ack it."""
        try:
            request = HeadsRequest.from_fields(entry.fields or {})
        except ProtocolError as exc:
            log.error("heads: malformed entry %s: %s", entry.entry_id, exc)
            q.ack(self.r, HEADS_STREAM, [entry.entry_id])
            return
        start = time.perf_counter()
        result = self.answer(request)
        post_heads_result(self.r, result, ttl_s=self.result_ttl_s)
        q.ack(self.r, HEADS_STREAM, [entry.entry_id])
        log.info(
            "heads %s %s: %s in %.1f ms",
            request.task,
            request.request_id,
            result.status,
            1e3 * (time.perf_counter() - start),
        )

    def answer(self, request: HeadsRequest) -> HeadsResult:
        """The result of one request (never raises for a bad request or record)."""
        rid = request.request_id
        if request.deadline_ms and time.time() * 1000 > request.deadline_ms:
            return HeadsResult(rid, "expired", reason="deadline passed before a worker read it")
        head = self.heads.get(request.task)
        if head is None:
            reason = f"no {request.task} model configured on worker {self.consumer}"
            return HeadsResult(rid, "unavailable", reason=reason)
        record = self.record(request.model_version, request.content_sha256)
        if record is None:
            reason = (
                f"no stored record of sha256 {request.content_sha256} "
                f"under model {request.model_version}"
            )
            return HeadsResult(rid, "error", reason=reason)
        try:
            return run_head(head, request, record)
        except Exception as exc:  # a bad record fails only its own request
            log.exception("heads %s failed", rid)
            return HeadsResult(rid, "error", reason=f"{type(exc).__name__}: {exc}")

    def record(self, model_version: str, sha256: str) -> FeatureRecord | None:
        """The stored record, polled for up to ``record_wait_s`` (reply precedes the seal)."""
        deadline = time.monotonic() + self.record_wait_s
        while True:
            location = self.index.lookup_content(model_version, sha256)
            if location is not None:
                return self.readers.get(location)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)


def start_heads(settings: WorkerSettings, device: str = "cpu") -> HeadsServer | None:
    """Load the heads ``settings`` name onto ``device``, start their server; None if none is set.

    Args:
        settings: the worker's settings (``caption_model``, ``vqa_model``, Redis, store).
        device: torch device string the worker's extractor runs on ("cpu", "cuda:0").
    """
    paths = {"caption": settings.caption_model, "vqa": settings.vqa_model}
    heads = load_heads(paths, device=device)
    if not heads:
        return None
    server = HeadsServer(
        settings.redis_url,
        settings.store_dir,
        heads,
        consumer=settings.worker_id,
        record_wait_s=settings.heads_record_wait_s,
        result_ttl_s=settings.result_ttl_s,
        store_url=settings.store_url,
    )
    server.start()
    return server
