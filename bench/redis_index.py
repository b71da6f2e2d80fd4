"""Redis memory of the feature index per million images, measured on a private redis-server.

    python bench/redis_index.py [--images 100000] [--per-shard 8] [--namespaces 1]

Indexes ``--images`` synthetic images the way workers do (``FeatureIndex.put_shard``: one
``butd:store:loc:{model_version}`` field sha256 -> "shard:row" and one
``butd:store:alias:{namespace}`` field image_id -> sha256 per image), with COCO-like ids
(``COCO_train2014_000000123456.jpg``) and shard names as workers make them
(``<worker>-<seq>-<uuid>.h5``, ``--per-shard`` images each), then reads ``INFO memory``
(``used_memory``, the allocator's count of what Redis holds) before and after, and
extrapolates linearly to one million images. A second model version over the same images
adds only its location hash (aliases are shared); that figure is printed too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from butd.store.index import FeatureIndex
from butd.store.shards import Alias, ShardEntries, new_shard_name
from tests.redis_proc import RedisProcess


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def index_images(
    index: FeatureIndex, model_version: str, images: int, per_shard: int, namespaces: int
) -> None:
    for start in range(0, images, per_shard):
        name = new_shard_name("butd-worker-7d9f8c6b5-x2kqp")
        contents, aliases = [], []
        for row, i in enumerate(range(start, min(start + per_shard, images))):
            sha = hashlib.sha256(str(i).encode()).hexdigest()
            contents.append((sha, row))
            image_id = f"COCO_train2014_{i:012d}.jpg"
            aliases.append(Alias(f"ns{i % namespaces}", image_id, sha))
        index.put_shard(ShardEntries(name, model_version, 0, contents, aliases))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--per-shard", type=int, default=8)
    parser.add_argument("--namespaces", type=int, default=1)
    args = parser.parse_args()
    proc = RedisProcess()
    try:
        client = proc.client()
        index = FeatureIndex(client)
        base = used(client)
        index_images(index, "mv-a" * 4, args.images, args.per_shard, args.namespaces)
        one = used(client) - base
        index_images(index, "mv-b" * 4, args.images, args.per_shard, args.namespaces)
        two = used(client) - base - one
        scale = 1_000_000 / args.images
        result = {
            "images": args.images,
            "per_shard": args.per_shard,
            "bytes_per_image": round(one / args.images, 1),
            "MiB_per_million_images": round(one * scale / 2**20, 1),
            "MiB_per_million_second_model_version": round(two * scale / 2**20, 1),
            "redis_version": client.info("server")["redis_version"],
        }
    finally:
        proc.stop()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
