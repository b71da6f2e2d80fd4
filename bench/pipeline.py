"""The worker's non-network ceiling: JPEG files in, sealed and indexed shards out, with Redis.

    python bench/pipeline.py [--images 160] [--cores 1,2] [--out FILE.md]
    python bench/pipeline.py --fill-only          # the batch-fill table alone (no worker)

An in-process worker (``butd.workers.worker.Worker``) on a private redis-server drains one job of
real photos (``skimage.data``, JPEG-encoded at COCO-like sizes, ``bench/coco_sizes.py``) and
seals their records; the clock runs from the job's creation to its last ack. Each run is a
child process pinned to ``cores`` CPUs (redis-server included), for two stand-ins:

* ``network``: ``bench/standin.StandInNetwork`` replaces the network only; the exact resize
  and the selection rule run on the CPU, as on a CPU worker.
* ``host``: ``bench/standin.HostOnlyExtractor`` also removes what a GPU worker runs on the
  device (resize, selection): the rest is the host's share of a GPU worker, whose images/s is
  the most any GPU can get out of this worker per core.

and two paths: ``sequential`` (``LOAD_THREADS=0``: load, extract, seal one after another) and
``pipelined`` (loader threads, finisher thread: ``workers/pipeline.py``). The batch fill of the
same size mix (images per RoI-head call, pieces of ``BATCH_SIZE``) is printed for per-shape
batching (before) and mixed-shape batching (now).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.coco_sizes import batch_fill, coco_like_sizes  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "camera", "horse", "cat")


def photo_rgb(name: str) -> Any:
    import numpy as np
    from skimage import data

    rgb = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if rgb.ndim == 2:
        rgb = np.stack([rgb] * 3, axis=2)
    return rgb[:, :, :3].astype(np.uint8) if rgb.dtype != np.uint8 else rgb[:, :, :3]


def write_images(directory: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """One JPEG (quality 90) per size: the photos in turn, resized to (w, h)."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    photos = [Image.fromarray(photo_rgb(n)).convert("RGB") for n in PHOTOS]
    paths = []
    for i, size in enumerate(sizes):
        buf = io.BytesIO()
        photos[i % len(photos)].resize(size).save(buf, format="JPEG", quality=90)
        path = directory / f"{i:05d}.jpg"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


# --- one measured run (child process) ---------------------------------------------------


def make_extractor(standin: str, batch_size: int) -> Any:
    from bench.standin import host_only_extractor, standin_extractor

    if standin == "host":
        return host_only_extractor(batch_size)
    return standin_extractor(batch_size=batch_size)


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """Pin to ``args.cores`` CPUs, then ``worker_rate`` of the chosen stand-in."""
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cores]))
    import torch

    # Pipelined: the loader threads are the parallelism; intra-op threads would only spin
    # against them. Sequential: the intra-op threads are all the parallelism there is.
    torch.set_num_threads(1 if args.load_threads else args.cores)
    paths = sorted(Path(args.images_dir).glob("*.jpg"))[: args.count]
    extractor = make_extractor(args.standin, args.batch_size)
    return worker_rate(extractor, paths, args.batch_size, args.load_threads, args.profile)


def worker_rate(
    extractor: Any, paths: list[Path], batch_size: int, load_threads: int, profile: str = ""
) -> dict[str, Any]:
    """An in-process worker with a private redis-server drains a job of ``paths``.

    The first ``batch_size`` images are a warm-up job; the clock runs from the creation of the
    second job to its last ack.

    Returns:
        images, seconds, images_per_s, images_per_cpu_s (CPU of this process and of redis).
    """
    from butd.store.index import FeatureIndex
    from butd.store.shard_store import StoreWriter
    from butd.workers import queue as q
    from butd.workers.protocol import JobItem
    from butd.workers.settings import WorkerSettings
    from butd.workers.worker import Worker
    from tests.redis_proc import RedisProcess

    redis_proc = RedisProcess(appendonly=True)
    try:
        r = q.connect(redis_proc.url)
        q.ensure_groups(r)
        with tempfile.TemporaryDirectory() as store:
            spec = extractor.spec
            sink = StoreWriter(
                store,
                FeatureIndex(r),
                writer_id="bench",
                meta={
                    "objects_vocab": spec.objects_vocab,
                    "attributes_vocab": spec.attributes_vocab,
                    "feature_dim": spec.arch.feature_dim,
                },
            )
            settings = WorkerSettings(
                _env_file=None,
                redis_url=redis_proc.url,
                store_dir=Path(store),
                worker_id="bench",
                batch_size=batch_size,
                idle_block_ms=50,
                load_threads=load_threads,
            )
            worker = Worker(settings, extractor, sink, client=r)
            try:
                items = [JobItem(str(p), p.name) for p in paths]
                drain_job(worker, r, items[:batch_size], "warmup")
                cpu = time.process_time() + redis_cpu_s(redis_proc.pid)
                took = drain_job(worker, r, items[batch_size:], "bench", profile)
                cpu = time.process_time() + redis_cpu_s(redis_proc.pid) - cpu
            finally:
                worker.sealer.close()
                worker.pipeline.close()
    finally:
        redis_proc.stop()
    n = len(paths) - batch_size
    return {"images": n, "seconds": took, "images_per_s": n / took, "images_per_cpu_s": n / cpu}


def redis_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) redis-server has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drain_job(worker: Any, r: Any, items: list[Any], job_id: str, profile: str = "") -> float:
    """Seconds from creating the job to its last ack."""
    from butd.workers import queue as q
    from butd.workers.protocol import JOBS_STREAM

    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    start = time.perf_counter()
    q.create_job(r, job_id, items, namespace="bench", shard_size=64)
    while not q.job_status(r, job_id).finished:
        worker.step()
    worker.pipeline.drain()
    while q.pending_count(r)[JOBS_STREAM]:
        time.sleep(0.001)
    took = time.perf_counter() - start
    if prof is not None:
        prof.disable()
        prof.dump_stats(profile)
    status = q.job_status(r, job_id)
    if status.failed:
        raise RuntimeError(f"{status.failed} images failed: {status.errors}")
    return took


def measure(images_dir: Path, count: int, cores: int, standin: str, threads: int) -> dict[str, Any]:
    """``worker_rate`` of one child run."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        f"--images-dir={images_dir}",
        f"--count={count}",
        f"--cores={cores}",
        f"--standin={standin}",
        f"--load-threads={threads}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(cores)}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


# --- report ---------------------------------------------------------------------------------


def fill_table(batch_size: int, n: int) -> list[str]:
    """Markdown rows: RoI-head calls and fill, per-shape versus mixed batching."""
    rows = [
        "| size mix | images | batching | RoI-head calls | images per call | fill |",
        "|---|---|---|---|---|---|",
    ]
    for mix in ("coco", "skimage"):
        sizes = coco_like_sizes(n, seed=0) if mix == "coco" else skimage_sizes(n)
        for mode in ("per-shape", "mixed"):
            calls, per_call = batch_fill(sizes, batch_size, mixed=mode == "mixed")
            fill = per_call / batch_size
            rows.append(f"| {mix} | {n} | {mode} | {calls} | {per_call:.2f} | {100 * fill:.0f} % |")
    return rows


def skimage_sizes(n: int) -> list[tuple[int, int]]:
    """The real sizes of the skimage photos, in turn."""
    sizes = [(photo_rgb(p).shape[1], photo_rgb(p).shape[0]) for p in PHOTOS]
    return [sizes[i % len(sizes)] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=160, help="images per run (network stand-in)")
    ap.add_argument("--cores", default="1,2", help="CPU counts to pin to, comma-separated")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None, help="also write the report here (.md)")
    ap.add_argument("--fill-only", action="store_true", help="only the batch-fill table")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--images-dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--standin", default="network", help=argparse.SUPPRESS)
    ap.add_argument("--load-threads", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--profile", default="", help="child: write cProfile stats here")
    args = ap.parse_args()
    if args.child:
        args.cores = int(args.cores)
        print(json.dumps(run_child(args)))
        return
    lines = [f"# Worker pipeline on CPU ({datetime.date.today()})", ""]
    lines += [f"Batch fill (pieces of {args.batch_size} images; RoI head shared across shapes):"]
    lines += ["", *fill_table(args.batch_size, 400), ""]
    print("\n".join(lines), flush=True)
    if not args.fill_only:
        lines += run_all(args)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


def run_all(args: argparse.Namespace) -> list[str]:
    counts = {"network": args.images, "host": 4 * args.images}
    rows = [
        "| stand-in | cores | sequential img/s | pipelined img/s | pipelined img per CPU-s |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(rows), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = coco_like_sizes(max(counts.values()) + args.batch_size, seed=1)
        images_dir = Path(tmp) / "images"
        write_images(images_dir, sizes)
        for standin, count in counts.items():
            for cores in (int(c) for c in args.cores.split(",")):
                seq = measure(images_dir, count + args.batch_size, cores, standin, 0)
                piped = measure(images_dir, count + args.batch_size, cores, standin, -1)
                row = (
                    f"| {standin} | {cores} | {seq['images_per_s']:.1f} | "
                    f"{piped['images_per_s']:.1f} | {piped['images_per_cpu_s']:.1f} |"
                )
                rows.append(row)
                print(row, flush=True)
    return ["", *rows]


if __name__ == "__main__":
    main()
