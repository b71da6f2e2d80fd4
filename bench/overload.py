"""Admission under overload (504 vs 503) and the time from a worker crash to its work's reclaim.

    nice -n 10 python bench/overload.py --out bench/results/overload.json
    nice -n 10 python bench/overload.py --code /path/to/old/checkout --out ...before.json

One redis-server, uvicorn gateway and ``python -m butd.workers.worker`` processes (the packaged
demo model on CPU, one intra-op thread, a reduced input size ``--extraction``) on 127.0.0.1.
``--code`` runs gateway and workers from another checkout (e.g. the code before issue 10).

1. Overload: one worker; ``--clients`` closed-loop clients post new images for ``--seconds``
   with ``BUTD_REQUEST_TIMEOUT_S=--timeout``. Reported: how many answers were 200, 503 (refused
   at once) and 504 (admitted, then not answered in time), the share of 504 among the admitted
   requests, and the latency of the 503s (a refusal should be immediate).
2. Crash: two workers; 8 clients post new images; as soon as the first worker holds pending
   online entries it is SIGKILLed. Reported: seconds from the kill until its pending entries are
   claimed by the survivor (XPENDING polled every 50 ms), until the last request it held is
   answered, and the status codes of the requests it held.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from butd.service.embedded import Child, WorkerSpec, free_port, start_redis, start_worker
from butd.workers import queue as q
from butd.workers.protocol import ONLINE_STREAM


def png(seed: int, w: int = 64, h: int = 48) -> bytes:
    """A small distinct noise PNG (the model resizes every input to the same size anyway)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class Stack:
    def __init__(self, root: Path, code: Path, workers: int, timeout_s: float, extraction: str):
        self.root = root
        self.redis = start_redis(root / "redis")
        os.environ["PYTHONPATH"] = str(code)  # the workers and the gateway run this checkout
        spec = WorkerSpec(
            store_dir=root / "store",
            weights="demo-synthetic",
            device="cpu",
            extra_env={"OMP_NUM_THREADS": "1", "BUTD_EXTRACTION": extraction},
        )
        here = Path.cwd()
        os.chdir(code)  # ``python -m`` puts the working directory first on sys.path
        try:
            self.workers: list[Child] = [
                start_worker(self.redis.url, spec, i) for i in range(workers)
            ]
        finally:
            os.chdir(here)
        env = dict(os.environ, OMP_NUM_THREADS="1", BUTD_REDIS_URL=self.redis.url)
        env.update(BUTD_STORE_DIR=str(root / "store"), BUTD_REQUEST_TIMEOUT_S=str(timeout_s))
        port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "--factory", "butd.service.app:app_from_env"]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        argv += ["--limit-concurrency", "2000"]
        self.gateway = subprocess.Popen(argv, env=env, cwd=code)
        self.url = f"http://127.0.0.1:{port}"
        self.r = q.connect(self.redis.url)

    def wait_ready(self, workers: int, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                body = httpx.get(f"{self.url}/health/ready", timeout=2).json()
                if sum(w["loaded"] for w in body.get("workers", [])) >= workers:
                    return
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError("not ready")

    def stop(self) -> None:
        self.gateway.terminate()
        self.gateway.wait(timeout=30)
        for worker in self.workers:
            worker.stop()
        self.redis.stop()


async def closed_loop(
    url: str, clients: int, seconds: float, seed: int, timeout_s: float
) -> list[tuple[int, float, str]]:
    """(status, latency s, request id) of every request of ``clients`` loops."""
    out: list[tuple[int, float, str]] = []
    bodies = iter([png(seed + i) for i in range(int(seconds * 80) + clients)])  # made up front
    end = time.monotonic() + seconds

    async def loop(http: httpx.AsyncClient) -> None:
        while time.monotonic() < end:
            body = next(bodies)
            start = time.monotonic()
            try:
                resp = await http.post(f"{url}/v1/features", content=body)
                out.append(
                    (
                        resp.status_code,
                        time.monotonic() - start,
                        resp.headers.get("x-request-id", ""),
                    )
                )
            except httpx.TransportError:
                out.append((0, time.monotonic() - start, ""))

    limits = httpx.Limits(max_connections=clients + 10)
    async with httpx.AsyncClient(timeout=timeout_s + 60, limits=limits) as http:
        await asyncio.gather(*(loop(http) for _ in range(clients)))
    return out


def overload(stack: Stack, clients: int, seconds: float, timeout_s: float) -> dict[str, Any]:
    asyncio.run(closed_loop(stack.url, 4, 20, 0, timeout_s))  # warm-up: the worker measures
    results = asyncio.run(closed_loop(stack.url, clients, seconds, 10_000, timeout_s))
    codes: dict[str, int] = {}
    for status, _, _ in results:
        codes[str(status)] = codes.get(str(status), 0) + 1
    admitted = codes.get("200", 0) + codes.get("504", 0)
    refused = [lat for status, lat, _ in results if status == 503]
    return {
        "clients": clients,
        "seconds": seconds,
        "timeout_s": timeout_s,
        "statuses": codes,
        "share_504_of_admitted": codes.get("504", 0) / admitted if admitted else None,
        "share_503_of_all": codes.get("503", 0) / len(results) if results else None,
        "p50_503_latency_s": float(np.median(refused)) if refused else None,
        "p99_503_latency_s": float(np.percentile(refused, 99)) if refused else None,
    }


def held_by(r: Any, consumer: str) -> list[str]:
    rows = r.xpending_range(ONLINE_STREAM, q.GROUP, "-", "+", 100, consumername=consumer)
    return [row["message_id"].decode() for row in rows]


def crash(stack: Stack, timeout_s: float) -> dict[str, Any]:
    victim = stack.workers[0]
    victim_id = next(b.worker_id for b in q.live_workers(stack.r) if b.pid == victim.proc.pid)
    found: dict[str, Any] = {}

    def killer() -> None:
        while True:
            held = held_by(stack.r, victim_id)
            if held:
                os.kill(victim.proc.pid, signal.SIGKILL)
                found.update(t_kill=time.monotonic(), held=held)
                break
            time.sleep(0.02)
        while held_by(stack.r, victim_id):
            time.sleep(0.05)
        found["t_claimed"] = time.monotonic()

    while sum(q.pending_count(stack.r).values()):  # the warm-up's entries are all acked
        time.sleep(0.05)
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    entries_before = time.monotonic()
    results = asyncio.run(closed_loop(stack.url, 8, 40 + timeout_s, 20_000, timeout_s))
    thread.join(timeout=120)
    held = set(found.get("held", []))
    held_requests = {text_id(stack.r, entry_id) for entry_id in held}  # entry ids -> request ids
    statuses = [status for status, _, rid in results if rid in held_requests]
    latencies = [round(lat, 3) for _, lat, rid in results if rid in held_requests]
    return {
        "killed_after_s": found.get("t_kill", 0) - entries_before,
        "entries_held_by_victim": len(held),
        "kill_to_claimed_s": found.get("t_claimed", float("nan")) - found.get("t_kill", 0),
        "held_request_statuses": statuses,
        "held_request_latency_s": latencies,
        "all_statuses": {
            str(s): sum(1 for x, _, _ in results if x == s) for s in {x for x, _, _ in results}
        },
    }


def text_id(r: Any, entry_id: str) -> str:
    rows = r.xrange(ONLINE_STREAM, entry_id, entry_id)
    if not rows:
        return ""
    fields = {k.decode(): v.decode(errors="replace") for k, v in rows[0][1].items()}
    return fields.get("request_id", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=10.0, help="BUTD_REQUEST_TIMEOUT_S")
    parser.add_argument("--extraction", default='{"min_size": 300, "max_size": 500}')
    parser.add_argument("--skip", choices=["overload", "crash"], default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    report: dict[str, Any] = {"code": str(args.code)}
    with tempfile.TemporaryDirectory(prefix="butd-overload-") as tmp:
        if args.skip != "overload":
            stack = Stack(Path(tmp) / "a", args.code, 1, args.timeout, args.extraction)
            try:
                stack.wait_ready(1)
                report["overload"] = overload(stack, args.clients, args.seconds, args.timeout)
            finally:
                stack.stop()
        if args.skip != "crash":
            stack = Stack(Path(tmp) / "b", args.code, 2, args.timeout, args.extraction)
            try:
                stack.wait_ready(2)
                asyncio.run(closed_loop(stack.url, 4, 15, 30_000, args.timeout))  # warm-up
                report["crash"] = crash(stack, args.timeout)
            finally:
                stack.stop()
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
