"""Liveness, readiness and Prometheus metrics (no API key: probes and scrapers are open)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.backend import Queue
from service.schemas import ReadyResponse, WorkerInfo
from workers.heads_protocol import TASKS

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


def _readiness(queue: Queue, require_worker: bool = True) -> ReadyResponse:
    try:
        queue.ping()
        beats = queue.live_workers()
    except Exception as exc:
        reason = f"redis does not answer: {exc}"
        return ReadyResponse(ready=False, reason=reason, heads=heads_served([]))
    now = time.time()
    workers = [
        WorkerInfo(
            worker_id=b.worker_id,
            device=b.device,
            model_version=b.model_version or None,
            loaded=b.loaded,
            age_s=round(max(now - b.updated_at, 0.0), 3),
            heads=sorted(b.heads),
        )
        for b in beats
    ]
    heads = heads_served(workers)
    loaded = [w for w in workers if w.loaded]
    if not loaded and not require_worker:
        return ReadyResponse(
            ready=True, reason="no worker (not required)", workers=workers, heads=heads
        )
    if not loaded:
        reason = "no worker heartbeat" if not workers else "no worker has its model loaded"
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
