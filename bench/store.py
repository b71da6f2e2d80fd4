"""Latency of reading one stored record by id: Redis index lookup + shard row read.

    python bench/store.py [--images 2000] [--per-shard 100] [--reads 4000] [--redis-url URL]

Writes ``--images`` synthetic records (10..100 boxes x 2048 fp16, the store's layout) into
sealed shards of ``--per-shard`` images in a temp dir, indexes them in Redis (a private
redis-server on a free port unless ``--redis-url`` is given), warms the page cache and the
open-handle cache with one pass, then times ``--reads`` random reads:

* ``lookup+read``: ``FeatureIndex.lookup`` (alias -> sha -> location) plus
  ``ShardReaders.get`` (one image's rows of every dataset, fp16 features);
* ``lookup``: the Redis lookup alone (one round trip: a Lua script reads alias then location);
* ``read_row``: ``FeatureFile.read_row`` on an open file (all datasets of one image);
* ``h5 slice``: raw ``features[r0:r1]`` of one image on an open h5py dataset.

Prints wall-clock p50 / p99 and the client's CPU per call, in milliseconds, as JSON.
Target: lookup+read p50 <= 2 ms (warm cache). On a loaded host the wall-clock tail is
scheduling delay (a process that blocks on the Redis socket waits for a core); the CPU column
is the work itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from butd.store.h5 import FeatureFile
from butd.store.index import FeatureIndex
from butd.store.records import FeatureRecord, StoredRow
from butd.store.shards import Location, ShardReaders, seal_shard

MV = "bench-mv"
D = 2048


def synthetic(start: int, count: int, rng: np.random.Generator) -> list[StoredRow]:
    """Records with 10..100 boxes, fp16 features >= 0 (like real pooled features)."""
    out = []
    for i in range(start, start + count):
        n = int(rng.integers(10, 101))
        xy = rng.uniform(0, 300, (n, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + rng.uniform(5, 300, (n, 2)).astype(np.float32)], 1)
        record = FeatureRecord(
            image_id=f"bench/{i:07d}.jpg",
            image_w=640,
            image_h=640,
            boxes=boxes,
            features=rng.exponential(0.6, (n, D)).astype(np.float16),
            objects_id=rng.integers(0, 1600, n).astype(np.int64),
            objects_conf=rng.random(n, dtype=np.float32),
            attrs_id=rng.integers(0, 400, n).astype(np.int64),
            attrs_conf=rng.random(n, dtype=np.float32),
            model_version=MV,
        )
        out.append(StoredRow(record, f"{i:064x}", "bench"))
    return out


def build(directory: Path, index: FeatureIndex, images: int, per_shard: int) -> float:
    """Seal and index the records; returns images/s of seal + index."""
    rng = np.random.default_rng(0)
    spent = 0.0
    for start in range(0, images, per_shard):
        recs = synthetic(start, min(per_shard, images - start), rng)
        t0 = time.perf_counter()
        info = seal_shard(directory, recs, model_version=MV, meta={"feature_dim": D})
        for row, rec in enumerate(recs):
            loc = Location(info.name, row)
            index.put(MV, rec.content_sha256, loc, [("bench", rec.image_id)])
        spent += time.perf_counter() - t0
    return images / spent


def timed(fn: Callable[[int], object], keys: list[int]) -> dict[str, float]:
    """Wall-clock p50 / p99 / mean of ``fn(key)`` and this process's CPU per call, in ms."""
    times = np.empty(len(keys))
    cpu0 = time.process_time()
    for j, key in enumerate(keys):
        t0 = time.perf_counter()
        fn(key)
        times[j] = time.perf_counter() - t0
    cpu = (time.process_time() - cpu0) / len(keys)
    ms = times * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "mean_ms": round(float(ms.mean()), 4),
        "client_cpu_ms": round(cpu * 1e3, 4),  # this process's CPU per call (no waiting)
    }


def measure(directory: Path, index: FeatureIndex, images: int, reads: int) -> dict[str, object]:
    readers = ShardReaders(directory, max_open=1024)
    ids = [f"bench/{i:07d}.jpg" for i in range(images)]
    keys = np.random.default_rng(1).integers(0, images, reads).tolist()

    def lookup_read(i: int) -> FeatureRecord:
        loc = index.lookup(MV, "bench", ids[i])
        assert loc is not None
        return readers.get(loc)

    for i in range(images):  # warm: page cache, open handles, Redis connection
        lookup_read(i)
    locs = [index.lookup(MV, "bench", image_id) for image_id in ids]
    files = {name: FeatureFile(directory / name) for name in {loc.shard for loc in locs if loc}}
    feats = {name: ff._file["features"] for name, ff in files.items()}
    offsets = {name: ff._offsets for name, ff in files.items()}

    def raw_slice(i: int) -> np.ndarray:
        loc = locs[i]
        assert loc is not None
        off = offsets[loc.shard]
        return feats[loc.shard][int(off[loc.row]) : int(off[loc.row + 1])]

    result = {
        "lookup+read": timed(lookup_read, keys),
        "lookup": timed(lambda i: index.lookup(MV, "bench", ids[i]), keys),
        "read_row": timed(lambda i: files[locs[i].shard].read_row(locs[i].row), keys),
        "h5 slice": timed(raw_slice, keys),
    }
    for ff in files.values():
        ff.close()
    readers.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--reads", type=int, default=4000)
    parser.add_argument("--redis-url", default=None, help="default: a private redis-server")
    args = parser.parse_args()
    proc = None
    if args.redis_url is None:
        from tests.redis_proc import RedisProcess

        proc = RedisProcess()
    url = args.redis_url or proc.url  # type: ignore[union-attr]
    try:
        with tempfile.TemporaryDirectory(prefix="butd-bench-store-") as tmp:
            index = FeatureIndex.from_url(url, prefix=f"bench-{time.time_ns()}")
            write_rate = build(Path(tmp), index, args.images, args.per_shard)
            size = sum(p.stat().st_size for p in Path(tmp).glob("*.h5"))
            report = {
                "images": args.images,
                "per_shard": args.per_shard,
                "store_mib": round(size / 2**20, 1),
                "seal+index_images_per_s": round(write_rate, 1),
                **measure(Path(tmp), index, args.images, args.reads),
            }
            for key in index.index_keys():
                index.client.delete(key)
        print(json.dumps(report, indent=2))
    finally:
        if proc is not None:
            proc.stop()


if __name__ == "__main__":
    main()
