"""Memory under load: gateway and worker RSS over a long mixed soak, and a burst of huge images.

    nice -n 10 python bench/soak.py --minutes 10 --out bench/results/soak.json
    nice -n 10 python bench/soak.py --burst-only [--full-decode] --out bench/results/burst.json

One redis-server, one ``python -m butd.workers.worker`` (the packaged demo model ``demo-synthetic``
on CPU, one intra-op thread) and one uvicorn gateway, all on 127.0.0.1 in a temp dir.

1. Burst: 8 concurrent uploads of distinct 7000 x 7000 PNGs (a smooth gradient: ~150 KB each,
   49 MP decoded). Reported: the gateway's and the worker's peak RSS (``VmHWM``) and the status
   codes. ``--full-decode`` runs the gateway as it was before issue 10 (every upload fully
   decoded, no pixel budget): the "before" figure.
2. Soak (unless ``--burst-only``): ``--clients`` closed-loop clients for ``--minutes``: new
   images of four sizes (320x240 .. 2000x1500, JPEG and PNG), repeats (cache hits), truncated
   files (422), and every 60 s a batch job of 40 files. The RSS of both processes is sampled
   every 5 s with the worker's image count (its heartbeat); growth per 1,000 images is the
   least-squares slope of RSS over images after the first fifth of the run (warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from butd.service.embedded import Child, WorkerSpec, free_port, start_redis, start_worker
from butd.workers import queue as q

SIZES = [(320, 240), (640, 480), (1280, 960), (2000, 1500)]


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))  # type: ignore[return-value]


def encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def smooth(w: int, h: int, seed: int) -> np.ndarray:
    """A gradient with a seeded corner: compresses well, decodes to w*h*3 bytes."""
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    arr = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2).astype(np.uint8)
    arr[:4, :4] = [seed % 256, seed // 256 % 256, 7]
    return arr


class Stack:
    """redis-server + one worker + a uvicorn gateway, in ``root``."""

    def __init__(self, root: Path, gateway_env: dict[str, str]) -> None:
        self.root = root
        self.redis = start_redis(root / "redis")
        (root / "data").mkdir()
        spec = WorkerSpec(
            store_dir=root / "store",
            weights="demo-synthetic",
            device="cpu",
            extra_env={"OMP_NUM_THREADS": "1", "BUTD_BATCH_SIZE": "8"},
        )
        self.worker: Child = start_worker(self.redis.url, spec, 0)
        env = dict(os.environ, OMP_NUM_THREADS="1", BUTD_REDIS_URL=self.redis.url)
        env.update(BUTD_STORE_DIR=str(root / "store"), BUTD_ALLOWED_ROOTS=str(root / "data"))
        env.update(gateway_env)
        port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "--factory", "butd.service.app:app_from_env"]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        self.gateway = subprocess.Popen(argv, env=env)
        self.url = f"http://127.0.0.1:{port}"
        self.r = q.connect(self.redis.url)

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the stack never became ready")

    def sample(self) -> dict[str, float]:
        g_rss, g_hwm = rss_mib(self.gateway.pid)
        w_rss, w_hwm = rss_mib(self.worker.proc.pid)
        images = sum(b.images for b in q.live_workers(self.r))
        return {"gateway_rss": g_rss, "gateway_hwm": g_hwm, "worker_rss": w_rss,
                "worker_hwm": w_hwm, "images": images}  # fmt: skip

    def stop(self) -> None:
        self.gateway.terminate()
        self.gateway.wait(timeout=30)
        self.worker.stop()
        self.redis.stop()


async def burst(url: str, n: int = 8, side: int = 7000) -> list[int]:
    """``n`` concurrent uploads of distinct ``side`` x ``side`` PNGs; their status codes."""
    bodies = [encode(smooth(side, side, 1000 + i), "PNG") for i in range(n)]
    async with httpx.AsyncClient(timeout=900) as client:
        posts = [client.post(f"{url}/v1/features", content=b) for b in bodies]
        return [r.status_code for r in await asyncio.gather(*posts)]


def mixed_body(rng: random.Random, seen: list[bytes], counter: list[int]) -> bytes:
    roll = rng.random()
    if roll < 0.15 and seen:
        return rng.choice(seen)  # a cache hit
    counter[0] += 1
    w, h = rng.choice(SIZES)
    data = encode(smooth(w, h, counter[0]), rng.choice(["JPEG", "PNG"]))
    if roll < 0.20:
        return data[: len(data) // 2]  # truncated: 422 from the worker
    seen.append(data)
    del seen[:-200]
    return data


async def soak(stack: Stack, minutes: float, clients: int) -> dict[str, Any]:
    rng, seen, counter = random.Random(0), [], [0]
    statuses: dict[int, int] = {}
    samples: list[dict[str, float]] = []
    end = time.monotonic() + 60 * minutes

    async def client_loop(http: httpx.AsyncClient) -> None:
        while time.monotonic() < end:
            body = mixed_body(rng, seen, counter)
            try:
                code = (await http.post(f"{stack.url}/v1/features", content=body)).status_code
            except httpx.TransportError:
                code = 0
            statuses[code] = statuses.get(code, 0) + 1

    async def jobs_and_samples(http: httpx.AsyncClient) -> None:
        start, next_job, jobs = time.monotonic(), 0.0, 0
        while time.monotonic() < end:
            if time.monotonic() >= next_job:
                folder = stack.root / "data" / f"job{jobs}"
                folder.mkdir()
                for i in range(40):
                    w, h = SIZES[i % len(SIZES)]
                    (folder / f"{i}.jpg").write_bytes(
                        encode(smooth(w, h, 50_000 + 40 * jobs + i), "JPEG")
                    )
                resp = await http.post(f"{stack.url}/v1/jobs", json={"paths": [str(folder)]})
                statuses[1000 + resp.status_code] = statuses.get(1000 + resp.status_code, 0) + 1
                jobs, next_job = jobs + 1, time.monotonic() + 60
            samples.append({"t": time.monotonic() - start, **stack.sample()})
            await asyncio.sleep(5)

    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(jobs_and_samples(http), *(client_loop(http) for _ in range(clients)))
    return {"statuses": statuses, "samples": samples}


def growth_per_1000(samples: list[dict[str, float]], key: str) -> float:
    """Least-squares slope of ``key`` (MiB) over images x 1000, after the first fifth."""
    late = samples[len(samples) // 5 :]
    x = np.array([s["images"] for s in late], dtype=float)
    y = np.array([s[key] for s in late], dtype=float)
    if len(late) < 3 or np.ptp(x) == 0:
        return float("nan")
    return float(np.polyfit(x, y, 1)[0] * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--burst-only", action="store_true")
    parser.add_argument("--skip-burst", action="store_true")
    parser.add_argument("--full-decode", action="store_true", help="the gateway before issue 10")
    parser.add_argument("--worker-env", nargs="*", default=[], help="extra KEY=VALUE for it")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    gateway_env = {"BUTD_REQUEST_TIMEOUT_S": "600"}
    if args.full_decode:
        gateway_env.update(BUTD_FULL_DECODE_CHECK="true", BUTD_DECODE_PIXEL_BUDGET=str(10**15))
    os.environ.update(dict(kv.split("=", 1) for kv in args.worker_env))  # inherited by the worker
    with tempfile.TemporaryDirectory(prefix="butd-soak-") as tmp:
        stack = Stack(Path(tmp), gateway_env)
        try:
            stack.wait_ready()
            report: dict[str, Any] = {}
            if not args.skip_burst:
                before = stack.sample()
                codes = asyncio.run(burst(stack.url))
                report["burst"] = {"before": before, "after": stack.sample(), "statuses": codes}
            if not args.burst_only:
                report["soak"] = asyncio.run(soak(stack, args.minutes, args.clients))
                samples = report["soak"]["samples"]
                report["growth_mib_per_1000_images"] = {
                    k: growth_per_1000(samples, k) for k in ("gateway_rss", "worker_rss")
                }
        finally:
            stack.stop()
    report["args"] = vars(args) | {"out": str(args.out)}
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text)
    print(json.dumps({k: v for k, v in report.items() if k != "soak"}, indent=1))


if __name__ == "__main__":
    main()
