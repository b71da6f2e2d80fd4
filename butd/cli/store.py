"""``butd store reindex|compact|stats``: maintain a directory of sealed shards and its index.

* ``reindex --dir DIR``: rebuild the Redis index from the shard files alone (after a lost
  Redis, a FLUSHALL, or files copied in). Run it with workers stopped, or run it again.
* ``compact --dir DIR --min-rows N``: merge shards with fewer than N images, dropping
  duplicate contents, moving the index entries (compare-and-set) and retiring the old files.
* ``stats --dir DIR``: shard, image and byte counts per model version, plus index counts.

The Redis URL is ``--redis-url`` or the gateway's ``REDIS_URL`` / ``BUTD_REDIS_URL``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``store`` command group to the ``butd`` parser."""
    parser = subparsers.add_parser(
        "store",
        help="reindex, compact or inspect a shard directory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    reindex = sub.add_parser("reindex", help="rebuild the Redis index from the shard files")
    compact = sub.add_parser("compact", help="merge small shards, drop duplicates")
    stats = sub.add_parser("stats", help="counts per model version (files and index)")
    for p in (reindex, compact, stats):
        p.add_argument("--dir", required=True, type=Path, help="directory of sealed shards")
        p.add_argument("--redis-url", default=None, help="Redis URL (default: env REDIS_URL)")
    compact.add_argument("--min-rows", type=int, default=10_000, help="merge shards under this")
    compact.add_argument("--max-rows", type=int, default=100_000, help="images per merged shard")
    compact.add_argument(
        "--grace-s", type=float, default=0.0, help="keep retired shards this long (seconds)"
    )
    compact.add_argument(
        "--no-index", action="store_true", help="do not touch Redis (run reindex afterwards)"
    )
    stats.add_argument("--no-index", action="store_true", help="files only, no Redis")
    reindex.set_defaults(handler=run_reindex)
    compact.set_defaults(handler=run_compact)
    stats.set_defaults(handler=run_stats)


def _redis_url(args: argparse.Namespace) -> str:
    if args.redis_url:
        return str(args.redis_url)
    from butd.service.settings import Settings

    url = Settings().redis_url
    if not url:
        raise SystemExit("no Redis: pass --redis-url or set REDIS_URL")
    return url


def run_reindex(args: argparse.Namespace) -> int:
    """Handler of ``butd store reindex``."""
    import redis

    from butd.store.index import reindex

    client = redis.Redis.from_url(_redis_url(args))
    result = reindex(args.dir, client)
    print(json.dumps(result.__dict__))
    return 0


def run_compact(args: argparse.Namespace) -> int:
    """Handler of ``butd store compact``."""
    from butd.store.compact import compact
    from butd.store.index import FeatureIndex

    relocate = None
    if not args.no_index:
        relocate = FeatureIndex.from_url(_redis_url(args)).relocate
    result = compact(
        args.dir,
        min_rows=args.min_rows,
        max_rows=args.max_rows,
        relocate=relocate,
        grace_s=args.grace_s,
    )
    summary = {
        "merged": len(result.merged),
        "written": [info.name for info in result.written],
        "duplicates": result.duplicates,
        "purged": result.purged,
    }
    print(json.dumps(summary))
    return 0


def file_stats(directory: Path) -> dict[str, dict[str, int]]:
    """``{model_version: {"shards", "images", "regions", "bytes"}}`` from the files."""
    from butd.store.h5 import FeatureFile
    from butd.store.shards import list_shards

    out: dict[str, dict[str, int]] = {}
    for name in list_shards(directory):
        path = directory / name
        with FeatureFile(path) as ff:
            row = out.setdefault(
                ff.model_version, {"shards": 0, "images": 0, "regions": 0, "bytes": 0}
            )
            row["shards"] += 1
            row["images"] += len(ff)
            row["regions"] += int(ff.num_boxes().sum())
        row["bytes"] += path.stat().st_size
    return out


def run_stats(args: argparse.Namespace) -> int:
    """Handler of ``butd store stats``: JSON on stdout."""
    report: dict[str, Any] = {"files": file_stats(args.dir)}
    if not args.no_index:
        from butd.store.index import FeatureIndex

        report["index"] = FeatureIndex.from_url(_redis_url(args)).stats()
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0
