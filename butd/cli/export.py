"""``butd export FILE.h5 --format FMT --out PATH``: a feature file in the layout a consumer reads.

Which format for which project (ids are written the way that project looks them up):

  h5-dense    bottom-up-attention-vqa: train36.hdf5 + train36_imgid2idx.pkl (int ids, pickle
              protocol 2). Needs exactly K regions per image: extract with
              --min-boxes 36 --max-boxes 36 (an adaptive file is refused; --allow-padding
              pads with zero rows, which that dataset reads as regions)
  h5-ragged   ban-vqa (adaptive 10-100): train.hdf5 with pos_boxes + train_imgid2idx.pkl
  tsv         generate_tsv.py rows (int ids): detection_features_converter.py,
              ban-vqa's adaptive converter, self-critical.pytorch scripts/make_bu_data.py
  lxmert-tsv  LXMERT obj36 rows; img_id = the file stem (COCO_val2014_000000000042)
  npz         MILVLG bottom-up-attention.pytorch writer layout: x (N, D), one file per image
              named by stem
  npz-mcan    MCAN-vqa / OpenVQA loaders: x (D, N) (they call x.transpose((1, 0))), file
              names they parse an int id from
  h5-grid     grid-feature caption code (RSTNet/DLCT style): <image_id>_grids (G*G, D) per
              image, from a `butd extract --grid-size G` file

Ids: --ids consumer (default) converts the stored ids to each consumer's keys (the COCO integer
of COCO_{split}_{012d}.jpg or of an integer file name; the stem) and refuses ids it cannot
convert, naming the rule, the id and the fix; --ids stored writes the stored ids unchanged.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

logger = logging.getLogger(__name__)

FORMATS = ("h5-dense", "h5-ragged", "tsv", "lxmert-tsv", "npz", "npz-mcan", "h5-grid")


def register(subparsers: Any) -> None:
    """Add the ``export`` command to the ``butd`` parser."""
    parser = subparsers.add_parser(
        "export",
        help="export a feature file for bottom-up-attention-vqa, ban-vqa, self-critical, "
        "LXMERT, MILVLG or MCAN/OpenVQA",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", help="ragged feature file (.h5) written by butd extract")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    parser.add_argument("--out", required=True, help="output file (a directory for npz*)")
    parser.add_argument(
        "--k", type=int, default=36, help="h5-dense: boxes per image (keep top-K by conf)"
    )
    parser.add_argument(
        "--allow-padding",
        action="store_true",
        help="h5-dense: pad images with fewer than K regions with zero rows (warns with the "
        "count; bottom-up-attention-vqa reads the padding as regions)",
    )
    parser.add_argument(
        "--ids",
        choices=("consumer", "stored"),
        default="consumer",
        help="consumer: ids as the format's consumer keys them (default); stored: unchanged",
    )
    parser.add_argument(
        "--no-compress", action="store_true", help="npz*: np.savez instead of savez_compressed"
    )
    parser.set_defaults(handler=run_export)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"ids": args.ids}
    if args.fmt == "h5-dense":
        if args.k <= 0:
            raise SystemExit(f"--k must be positive; got {args.k}")
        options.update(k=args.k, allow_padding=args.allow_padding)
    if args.fmt.startswith("npz"):
        options["compress"] = not args.no_compress
    return options


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``butd export``; returns the exit status (2 on a refused export)."""
    from tqdm import tqdm

    from butd.store.exporters import EXPORTERS, PaddingError
    from butd.store.h5 import FeatureFile, FeatureFileError
    from butd.store.image_ids import ImageIdError

    options = _options(args)
    start = time.perf_counter()
    with FeatureFile(args.file) as ff:
        try:
            with tqdm(total=len(ff), unit="img", desc=args.fmt) as bar:
                count = EXPORTERS[args.fmt](ff, args.out, progress=bar.update, **options)
        except (ImageIdError, PaddingError, FeatureFileError) as exc:
            # a refused conversion of ids, padding, or h5-grid of a file without grids
            print(f"butd export: {exc}", file=sys.stderr)
            return 2
    logger.info(
        "exported %d images from %s to %s (%s) in %.1f s",
        count,
        args.file,
        args.out,
        args.fmt,
        time.perf_counter() - start,
    )
    return 0
