"""``butd export FILE.h5 --format FMT --out PATH``: a feature file to a consumer's format.

Formats (``store.exporters``): ``h5-dense`` (hengyuan-hu fixed K, ``--k``), ``h5-ragged``
(BAN ``pos_boxes``), ``tsv`` (generate_tsv.py), ``lxmert-tsv``, ``npz`` (MILVLG, one file per
image; ``--out`` is a directory), ``h5-grid`` (``<image_id>_grids`` (G*G, D) per image, from a
``butd extract --grid-size G`` file).
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

FORMATS = ("h5-dense", "h5-ragged", "tsv", "lxmert-tsv", "npz", "h5-grid")


def register(subparsers: Any) -> None:
    """Add the ``export`` command to the ``butd`` parser."""
    parser = subparsers.add_parser(
        "export",
        help="export a feature file as dense/ragged HDF5, TSV, LXMERT TSV or npz",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", help="ragged feature file (.h5) written by butd extract")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    parser.add_argument("--out", required=True, help="output file (a directory for npz)")
    parser.add_argument(
        "--k", type=int, default=36, help="h5-dense: boxes per image (pad / keep top-K by conf)"
    )
    parser.add_argument(
        "--no-compress", action="store_true", help="npz: np.savez instead of savez_compressed"
    )
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``butd export``; returns the exit status."""
    from tqdm import tqdm

    from store.exporters import EXPORTERS
    from store.h5 import FeatureFile, FeatureFileError

    options: dict[str, Any] = {}
    if args.fmt == "h5-dense":
        if args.k <= 0:
            raise SystemExit(f"--k must be positive; got {args.k}")
        options["k"] = args.k
    if args.fmt == "npz":
        options["compress"] = not args.no_compress
    start = time.perf_counter()
    with FeatureFile(args.file) as ff, tqdm(total=len(ff), unit="img", desc=args.fmt) as bar:
        try:
            count = EXPORTERS[args.fmt](ff, args.out, progress=bar.update, **options)
        except FeatureFileError as exc:  # e.g. h5-grid of a file extracted without grids
            logger.error("%s", exc)
            return 1
    logger.info(
        "exported %d images from %s to %s (%s) in %.1f s",
        count,
        args.file,
        args.out,
        args.fmt,
        time.perf_counter() - start,
    )
    return 0
