"""Latency the gateway + queue add over a direct Extractor call, cache reads, job throughput.

    python bench/service.py [--rate 50] [--duration 10] [--job-images 300] [--workers 1 2]

(``--workers`` with no count skips the batch-job part.)

Everything runs on 127.0.0.1 with its own redis-server (temp dir) and the tiny test model on
CPU (``tests/tiny_weights.py``) under ``FAST_EXTRACTION`` (images resized to 48..64 px, 200
RPN proposals before NMS and ``--proposals`` after, 4..10 regions): a model whose direct extract
takes a few ms, so what is measured is the serving overhead and 50 requests/s fit within one
worker. The offered rate must stay below the workers' capacity (about 1 / direct_p50 images/s
per worker, more with batching), else the figures measure queueing, not overhead.

1. Online, open model: requests are *scheduled* at fixed intervals (``--rate`` per second for
   ``--duration`` seconds) whatever the completions; latency runs from the scheduled time to the
   response (no coordinated omission). Every request carries new bytes (a cache miss). The
   direct cost of each image (``decode_image`` + ``Extractor.extract`` in this process, one
   thread, median of 5) is subtracted: "added" = end-to-end - direct, per request.
   Then ``sequential``: the same with one request at a time (no queueing): the fixed cost.
2. Cache hits: sequential GET /v1/features/sha256/{hash} and POST of already-stored bytes.
3. Batch jobs: a directory of ``--job-images`` new images per run, images/s from the job's own
   clock (first shard taken to last item counted), with 1 and 2 workers.

The gateway runs in a uvicorn subprocess, workers are ``python -m butd.workers.worker`` processes;
all use one intra-op thread (OMP_NUM_THREADS=1), as does the direct baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from butd.images import decode_image
from butd.service.embedded import (
    Child,
    RedisServer,
    WorkerSpec,
    free_port,
    start_redis,
    start_worker,
)

BASE_IMAGES = 16


def fast_extraction(proposals: int) -> dict[str, Any]:
    """``ExtractionConfig`` overrides of the fast model (baseline and workers alike).

    Args:
        proposals: RPN proposals kept after NMS (regions scored by the heads).
    """
    return {
        "min_size": 48,  # shorter side, px: a 160x120 image runs at 64x48
        "max_size": 64,  # longer side cap, px
        "rpn_pre_nms_topk": 200,
        "rpn_post_nms_topk": proposals,
        "min_boxes": 4,
        "max_boxes": 10,
    }


def base_images(n: int = BASE_IMAGES, w: int = 160, h: int = 120) -> list[np.ndarray]:
    """Random RGB images; variants of these differ by one pixel (same compute, new bytes)."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def encode(pixels: np.ndarray, variant: int) -> bytes:
    """PNG bytes of ``pixels`` with pixel (0, 0) set from ``variant`` (a distinct sha256)."""
    arr = pixels.copy()
    arr[0, 0] = [variant % 256, (variant // 256) % 256, (variant // 65536) % 256]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def direct_costs(
    weights: Path, images: list[np.ndarray], device: str, proposals: int
) -> list[float]:
    """Seconds of decode + extract per base image, in this process, one thread (median of 5)."""
    import torch

    from butd.detector.extractor import Extractor

    torch.set_num_threads(1)
    ext = Extractor.from_weights(weights, device=device, **fast_extraction(proposals))
    costs = []
    for i, pixels in enumerate(images):
        data = encode(pixels, 0)
        ext.extract([decode_image(data)], [str(i)])  # warm-up
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            ext.extract([decode_image(data)], [str(i)])
            runs.append(time.perf_counter() - start)
        costs.append(statistics.median(runs))
    return costs


@dataclass
class Stack:
    """redis-server + workers + a uvicorn gateway subprocess."""

    root: Path
    weights: Path
    device: str = "cpu"
    proposals: int = 4
    max_queue: int = 10_000
    seal_linger_ms: int = 200
    redis: RedisServer | None = None
    workers: list[Child] | None = None
    gateway: subprocess.Popen[bytes] | None = None
    url: str = ""

    def env(self) -> dict[str, str]:
        assert self.redis is not None
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env.update(
            BUTD_REDIS_URL=self.redis.url,
            BUTD_STORE_DIR=str(self.root / "store"),
            BUTD_ALLOWED_ROOTS=str(self.root / "data"),
            BUTD_MAX_QUEUE_DEPTH=str(self.max_queue),
        )
        return env

    def start(self, workers: int) -> None:
        self.redis = start_redis(self.root / "redis")
        self.workers = []
        self.set_workers(workers)
        port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "--factory", "butd.service.app:app_from_env"]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        self.gateway = subprocess.Popen(argv, env=self.env())
        self.url = f"http://127.0.0.1:{port}"
        wait_ready(self.url, workers)

    def set_workers(self, count: int) -> None:
        assert self.redis is not None and self.workers is not None
        spec = WorkerSpec(
            store_dir=self.root / "store",
            weights=str(self.weights),
            device=self.device,
            extra_env={
                "OMP_NUM_THREADS": "1",
                "BUTD_BATCH_WAIT_MS": "2",
                "BUTD_SEAL_LINGER_MS": str(self.seal_linger_ms),
                "BUTD_BATCH_SIZE": "8",
                "BUTD_EXTRACTION": json.dumps(fast_extraction(self.proposals)),
            },
        )
        while len(self.workers) < count:
            self.workers.append(start_worker(self.redis.url, spec, len(self.workers)))

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.terminate()
            self.gateway.wait(timeout=30)
        for worker in self.workers or []:
            worker.stop()
        if self.redis is not None:
            self.redis.stop()


def wait_ready(url: str, workers: int, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            body = httpx.get(f"{url}/health/ready", timeout=2).json()
            if sum(1 for w in body.get("workers", []) if w["loaded"]) >= workers:
                return
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"gateway at {url} not ready with {workers} worker(s)")


async def open_loop(
    url: str, payloads: list[bytes], rate: float
) -> tuple[list[float], list[int], float]:
    """Send ``payloads`` at ``rate``/s from scheduled times; (latencies s, statuses, lag s)."""
    latencies: list[float] = [float("nan")] * len(payloads)
    statuses: list[int] = [0] * len(payloads)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(i: int, scheduled: float) -> None:
            headers = {"content-type": "image/png"}
            resp = await client.post("/v1/features", content=payloads[i], headers=headers)
            latencies[i] = time.perf_counter() - scheduled
            statuses[i] = resp.status_code

        t0 = time.perf_counter() + 0.2
        tasks, worst_lag = [], 0.0
        for i in range(len(payloads)):
            scheduled = t0 + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            worst_lag = max(worst_lag, time.perf_counter() - scheduled)
            tasks.append(asyncio.create_task(one(i, scheduled)))
        await asyncio.gather(*tasks)
    return latencies, statuses, worst_lag


PHASES = ("queue", "compute", "reply")


def sequential(
    url: str, images: list[np.ndarray], direct: list[float], n: int = 100
) -> dict[str, float]:
    """Added latency with no queueing: ``n`` new images one at a time, 20 ms apart (ms)."""
    added = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(n):
            data = encode(images[i % len(images)], 20_000_000 + i)
            start = time.perf_counter()
            resp = client.post("/v1/features", content=data, headers={"content-type": "image/png"})
            took = time.perf_counter() - start
            assert resp.status_code == 200, resp.text
            added.append(took - direct[i % len(images)])
            time.sleep(0.02)
    return {
        "sequential_added_p50_ms": 1e3 * percentile(added, 50),
        "sequential_added_p99_ms": 1e3 * percentile(added, 99),
    }


def gateway_share(url: str) -> dict[str, float]:
    """Mean ms per POST spent in the gateway outside the worker wait, in the wait, and in each
    phase of the wait the worker reports.

    From /metrics: ``butd_http_request_seconds`` of /v1/features minus
    ``butd_online_wait_seconds`` (enqueue to result: queue + worker batch + result hand-off),
    and ``butd_online_{queue,compute,reply}_seconds`` (enqueue to batch formed, batch formed
    to records computed, answer pushed to answer decoded in the gateway).
    """
    sums: dict[str, float] = {}
    wanted = {
        'butd_http_request_seconds_sum{route="/v1/features"}',
        'butd_http_request_seconds_count{route="/v1/features"}',
        "butd_online_wait_seconds_sum",
        *(f"butd_online_{p}_seconds_sum" for p in PHASES),
        *(f"butd_online_{p}_seconds_count" for p in PHASES),
    }
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            sums[name.split("{")[0]] = float(value)
    count = sums.get("butd_http_request_seconds_count", 0.0) or 1.0
    wait = sums.get("butd_online_wait_seconds_sum", 0.0)
    total = sums.get("butd_http_request_seconds_sum", 0.0)
    out = {
        "gateway_only_mean_ms": 1e3 * (total - wait) / count,
        "enqueue_to_result_mean_ms": 1e3 * wait / count,
    }
    for p in PHASES:
        n = sums.get(f"butd_online_{p}_seconds_count", 0.0)
        out[f"{p}_mean_ms"] = 1e3 * sums.get(f"butd_online_{p}_seconds_sum", 0.0) / (n or 1.0)
    return out


def cache_reads(url: str, payloads: list[bytes], rounds: int = 6) -> dict[str, float]:
    """Sequential cache hits over a working set of 32 stored images (ms).

    The first GET of each image reads its shard (cold: ``get_cold_p50_ms``); later ones are
    answered from the gateway's record cache (warm). ``health_live_p50_ms`` is the floor: one
    HTTP round trip through uvicorn and the middleware, no Redis, no store. Each GET is
    followed by a POST of the same bytes, answered from the cache (hash, index lookup, read,
    JSON) without a worker.
    """
    import hashlib

    work = payloads[:32]
    cold, warm, posts = [], [], []
    with httpx.Client(base_url=url, timeout=30) as client:
        for r in range(rounds):
            for data in work:
                sha = hashlib.sha256(data).hexdigest()
                start = time.perf_counter()
                resp = client.get(f"/v1/features/sha256/{sha}")
                (cold if r == 0 else warm).append(time.perf_counter() - start)
                assert resp.status_code == 200, resp.text
                start = time.perf_counter()
                headers = {"content-type": "image/png"}
                resp = client.post("/v1/features", content=data, headers=headers)
                posts.append(time.perf_counter() - start)
                assert resp.json()["cached"] is True
        lives = []
        for _ in range(100):
            start = time.perf_counter()
            client.get("/health/live")
            lives.append(time.perf_counter() - start)
    return {
        "health_live_p50_ms": 1e3 * percentile(lives, 50),
        "get_cold_p50_ms": 1e3 * percentile(cold, 50),
        "get_warm_p50_ms": 1e3 * percentile(warm, 50),
        "get_warm_p99_ms": 1e3 * percentile(warm, 99),
        "post_hit_p50_ms": 1e3 * percentile(posts, 50),
        "post_hit_p99_ms": 1e3 * percentile(posts, 99),
    }


def job_rate(url: str, root: Path, images: list[np.ndarray], count: int, tag: int) -> float:
    """Images/s of one batch job over ``count`` new images (the job's own clock)."""
    folder = root / "data" / f"job{tag}"
    folder.mkdir(parents=True)
    for k in range(count):
        (folder / f"{k:05d}.png").write_bytes(encode(images[k % len(images)], 1_000_000 * tag + k))
    with httpx.Client(base_url=url, timeout=60) as client:
        job = client.post("/v1/jobs", json={"paths": [str(folder)], "namespace": f"j{tag}"})
        job_id = job.json()["job_id"]
        while True:
            status = client.get(f"/v1/jobs/{job_id}").json()
            if status["state"] in ("done", "failed", "cancelled"):
                break
            time.sleep(0.2)
    assert status["done"] == count, status
    return float(status["images_per_s"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.tiny_weights import make_tiny_weights

    images = base_images()
    results: dict[str, Any] = {"rate": args.rate, "duration_s": args.duration}
    with tempfile.TemporaryDirectory(prefix="butd-bench-") as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        weights = make_tiny_weights(root / "tiny.safetensors")
        direct = direct_costs(weights, images, args.device, args.proposals)
        results["direct_p50_ms"] = 1e3 * statistics.median(direct)
        stack = Stack(
            root,
            weights,
            args.device,
            args.proposals,
            max_queue=args.max_queue,
            seal_linger_ms=args.seal_linger_ms,
        )
        try:
            stack.start(workers=1)
            n = int(args.rate * args.duration)
            warm = [encode(images[i % len(images)], 10_000_000 + i) for i in range(10)]
            asyncio.run(open_loop(stack.url, warm, 5.0))
            payloads = [encode(images[i % len(images)], i + 1) for i in range(n)]
            lat, statuses, lag = asyncio.run(open_loop(stack.url, payloads, args.rate))
            added = [lat[i] - direct[i % len(images)] for i in range(len(lat))]
            ok = [a for a, s in zip(added, statuses, strict=True) if s == 200]
            results.update(
                requests=len(lat),
                ok=len(ok),
                errors={str(s): statuses.count(s) for s in set(statuses) if s != 200},
                e2e_p50_ms=1e3 * percentile(lat, 50),
                e2e_p99_ms=1e3 * percentile(lat, 99),
                added_p50_ms=1e3 * percentile(ok, 50),
                added_p99_ms=1e3 * percentile(ok, 99),
                generator_max_lag_ms=1e3 * lag,
            )
            results.update(gateway_share(stack.url))
            results.update(sequential(stack.url, images, direct))
            stored = [payloads[i] for i, s in enumerate(statuses) if s == 200] or warm
            results.update(cache_reads(stack.url, stored))
            for count in args.workers:
                stack.set_workers(count)
                wait_ready(stack.url, count)
                results[f"job_images_per_s_{count}w"] = job_rate(
                    stack.url, root, images, args.job_images, count
                )
        finally:
            stack.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0, help="online requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of online load")
    parser.add_argument("--job-images", type=int, default=300, help="images per batch job")
    parser.add_argument(
        "--workers", type=int, nargs="*", default=[1, 2], help="batch-job runs (none: skip)"
    )
    parser.add_argument("--device", default="cpu", help="worker and baseline device")
    parser.add_argument(
        "--proposals", type=int, default=4, help="RPN proposals kept (fewer = faster model)"
    )
    parser.add_argument(
        "--max-queue", type=int, default=10_000, help="gateway BUTD_MAX_QUEUE_DEPTH (503 above)"
    )
    parser.add_argument(
        "--seal-linger-ms", type=int, default=200, help="workers' BUTD_SEAL_LINGER_MS"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    results = run(args)
    width = max(len(k) for k in results)
    for key, value in results.items():
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        sys.stdout.write(f"{key:<{width}}  {shown}\n")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
