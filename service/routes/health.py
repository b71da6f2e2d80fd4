"""Liveness, readiness and Prometheus metrics (no API key: probes and scrapers are open)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from butd.service.backend import Queue
from butd.service.schemas import ReadyResponse, WorkerInfo
from butd.workers.heads_protocol import TASKS
from butd.workers.protocol import Heartbeat

router = APIRouter(tags=["health"])


@router.get("/health/live", summary="The gateway process answers")
async def live() -> dict[str, str]:
    """Always 200 while the process serves HTTP (restart it when this fails)."""
    return {"status": "alive"}


def heads_served(workers: Sequence[WorkerInfo]) -> dict[str, int]:
    """Loaded workers announcing each head: every known task and any other announced, by name.

    A task no loaded worker serves counts 0 (its route answers 503 ``head_unavailable``).
    """
    loaded = [w for w in workers if w.loaded]
    tasks = sorted({*TASKS, *(h for w in loaded for h in w.heads)})
    return {task: sum(task in w.heads for w in loaded) for task in tasks}


def _worker_info(beat: Heartbeat, now: float) -> WorkerInfo:
    return WorkerInfo(
        worker_id=beat.worker_id,
        device=beat.device,
        model_version=beat.model_version or None,
        loaded=beat.loaded,
        age_s=round(max(now - beat.updated_at, 0.0), 3),
        heads=sorted(beat.heads),
        stuck=beat.stalled(now),
        progress_age_s=round(max(now - beat.progress_at, 0.0), 3) if beat.progress_at else None,
        working_on=beat.working_on,
    )


def _not_ready_reason(workers: Sequence[WorkerInfo]) -> str:
    if not workers:
        return "no worker heartbeat"
    stuck = [w for w in workers if w.loaded and w.stuck]
    if stuck:
        return "; ".join(
            f"worker {w.worker_id} is stuck: its loop has not moved for {w.progress_age_s:.0f} s"
            f" (on {w.working_on or 'nothing'})"
            for w in stuck
        )
    return "no worker has its model loaded"


def _readiness(queue: Queue, require_worker: bool = True) -> ReadyResponse:
    try:
        queue.ping()
        beats = queue.live_workers()
    except Exception as exc:
        reason = f"redis does not answer: {exc}"
        return ReadyResponse(ready=False, reason=reason, heads=heads_served([]))
    now = time.time()
    workers = [_worker_info(b, now) for b in beats]
    heads = heads_served(workers)
    loaded = [w for w in workers if w.loaded and not w.stuck]
    if not loaded and not require_worker:
        return ReadyResponse(
            ready=True, reason="no worker (not required)", workers=workers, heads=heads
        )
    if not loaded:
        reason = _not_ready_reason(workers)
        return ReadyResponse(ready=False, reason=reason, workers=workers, heads=heads)
    version = loaded[0].model_version
    return ReadyResponse(ready=True, model_version=version, workers=workers, heads=heads)


@router.get(
    "/health/ready",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse}},
    summary="Redis answers and a worker with a loaded model has a fresh heartbeat",
)
async def ready(request: Request, require_worker: bool = True) -> JSONResponse:
    """200 when requests can be served now; 503 with the reason otherwise.

    ``require_worker=false``: 200 as soon as Redis answers (jobs are accepted with no worker
    up); the readiness probe of a deployment whose workers scale to zero uses it.
    """
    body = await run_in_threadpool(_readiness, request.app.state.queue, require_worker)
    content: dict[str, Any] = body.model_dump()
    return JSONResponse(content, status_code=200 if body.ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Text exposition format (queue depth, pending, workers, latencies, responses)."""
    data = await run_in_threadpool(request.app.state.metrics.render)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
