"""GET by id with the shard store in a bucket: milliseconds and bytes fetched per read.

    python bench/objects.py [--images 512] [--reads 300] [--block-kib 64,256,1024]

Starts a local S3 server (moto, loopback), seals ``--images`` synthetic records (10..100 boxes
x 2048 fp16, ``bench.store.synthetic``) into shards of 8 images (what a worker seals per job
piece at BATCH_SIZE 8) and of 256 images (after ``butd store compact``), uploads them with
``butd.store.objects.BucketShards``, then reads random rows through ``BucketShardReaders`` (the
gateway's reader) for each block size:

* ``cold``: the first read of a shard (opens it: HDF5 metadata + the image's rows);
* ``warm``: reads from shards whose handle is already open (only the image's rows).

Reports ms per read, bytes fetched per read, ranged GETs per read, and the record's own size
(features + boxes + labels). The index lookup (one Redis round trip) is not included: see
``bench/store.py``. On loopback a GET costs ~1-3 ms of moto's Python; a real S3 GET adds
~10-30 ms of first-byte latency per request, so the GET count is the figure to carry over.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.store import MV, synthetic
from butd.store.objects import BucketShardReaders, BucketShards
from butd.store.records import FeatureRecord
from butd.store.shards import seal_shard
from tests.s3_server import S3Server


def record_bytes(rec: FeatureRecord) -> int:
    arrays = (rec.boxes, rec.features, rec.objects_id, rec.objects_conf, rec.attrs_id)
    return int(sum(a.nbytes for a in arrays) + rec.attrs_conf.nbytes)


def upload(url: str, images: int, per_shard: int, tmp: Path) -> list[tuple[str, int, int]]:
    """Seal and upload; returns (shard, row, record bytes) of every image."""
    bucket = BucketShards(url)
    rng = np.random.default_rng(0)
    rows = []
    for start in range(0, images, per_shard):
        recs = synthetic(start, min(per_shard, images - start), rng)
        info = seal_shard(tmp, recs, model_version=MV, meta={"feature_dim": 2048})
        bucket.upload(tmp / info.name)
        rows += [(info.name, row, record_bytes(rec.record)) for row, rec in enumerate(recs)]
    return rows


def measure(url: str, rows: list[tuple[str, int, int]], reads: int, block: int) -> dict[str, Any]:
    readers = BucketShardReaders(BucketShards(url), max_open=4096, block_size=block)
    order = np.random.default_rng(1).integers(0, len(rows), reads).tolist()
    opened: set[str] = set()
    stats: dict[str, list[tuple[float, int, int, int]]] = {"cold": [], "warm": []}
    for i in order:
        shard, row, size = rows[i]
        b0, g0, t0 = readers.bytes_fetched, readers.gets, time.perf_counter()
        readers.read(shard, row)
        took = time.perf_counter() - t0
        kind = "warm" if shard in opened else "cold"
        opened.add(shard)
        stats[kind].append((took * 1e3, readers.bytes_fetched - b0, readers.gets - g0, size))
    readers.close()
    out = {}
    for kind, values in stats.items():
        if not values:
            continue
        arr = np.array(values, dtype=np.float64)
        out[kind] = {
            "reads": len(values),
            "p50_ms": round(float(np.percentile(arr[:, 0], 50)), 2),
            "mean_ms": round(float(arr[:, 0].mean()), 2),
            "bytes_per_read": int(arr[:, 1].mean()),
            "gets_per_read": round(float(arr[:, 2].mean()), 2),
            "record_bytes": int(arr[:, 3].mean()),
        }
    return out


def get_baseline(url: str, rows: list[tuple[str, int, int]], n: int = 30) -> dict[str, float]:
    """ms of one bare 64 KiB ranged GET from a shard of this set (the server's own cost)."""
    bucket = BucketShards(url)
    shard = rows[0][0]
    path = f"{bucket.root}/{shard}"
    times = []
    for k in range(n):
        t0 = time.perf_counter()
        bucket.fs.cat_file(path, start=k * 1024, end=k * 1024 + 65536)
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "p50_ms": round(float(np.percentile(times, 50)), 2),
        "object_bytes": bucket.fs.size(path),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--reads", type=int, default=300)
    parser.add_argument("--block-kib", default="64,256,1024")
    args = parser.parse_args()
    blocks = [int(b) * 1024 for b in args.block_kib.split(",")]
    results: dict[str, Any] = {}
    with S3Server() as s3, tempfile.TemporaryDirectory() as tmp:
        os.environ.update(s3.env())
        s3.make_bucket("bench")
        for per_shard in (8, 256):
            url = f"s3://bench/shards-{per_shard}"
            rows = upload(url, args.images, per_shard, Path(tmp))
            key = f"{per_shard} images/shard, one bare 64 KiB ranged GET"
            results[key] = get_baseline(url, rows)
            print(key, json.dumps(results[key]), flush=True)
            for block in blocks:
                key = f"{per_shard} images/shard, block {block // 1024} KiB"
                results[key] = measure(url, rows, args.reads, block)
                print(key, json.dumps(results[key]), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
