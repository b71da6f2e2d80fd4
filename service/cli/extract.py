"""``butd extract`` (images -> feature file) and ``butd show`` (regions drawn on an image)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    extract = subparsers.add_parser(
        "extract",
        help="extract region features of image files into an HDF5 feature file",
        description="Files and directories; resumable (ids already in FILE are skipped); "
        "a bad image is reported and skipped while the rest completes.",
    )
    extract.add_argument("paths", nargs="+", metavar="PATH", help="image files or directories")
    extract.add_argument("--out", required=True, type=Path, metavar="FILE.h5")
    _model_arguments(extract)
    extract.add_argument(
        "--boxes",
        type=Path,
        metavar="FILE.json",
        help='features for given boxes: {"a.jpg": [[x1, y1, x2, y2], ...]}',
    )
    extract.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    extract.add_argument(
        "--float32", action="store_true", help="store float32 features (default float16)"
    )
    extract.set_defaults(handler=run_extract)

    show = subparsers.add_parser("show", help="draw an image's regions with their labels")
    show.add_argument("image", type=Path, metavar="IMAGE")
    show.add_argument("--out", required=True, type=Path, metavar="PNG")
    _model_arguments(show)
    show.set_defaults(handler=run_show)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights",
        default=None,
        metavar="NAME|PATH",
        help="registry name or canonical weights file (default: the packaged demo model)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--min-boxes", type=int, default=None, metavar="N")
    parser.add_argument("--max-boxes", type=int, default=None, metavar="N")
    parser.add_argument("--conf-thresh", type=float, default=None, metavar="X")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None)


def _load_extractor(args: argparse.Namespace, batch_size: int = 8) -> Any:
    from detector.extractor import Extractor

    overrides = {
        key: value
        for key, value in (
            ("min_boxes", args.min_boxes),
            ("max_boxes", args.max_boxes),
            ("conf_thresh", args.conf_thresh),
            ("precision", args.precision),
        )
        if value is not None
    }
    return Extractor.from_weights(
        args.weights, device=args.device, batch_size=batch_size, **overrides
    )


def run_extract(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from detector.files import extract_files, find_images, load_boxes_file
    from store.h5 import FeatureFileWriter

    items = find_images(args.paths)
    boxes = load_boxes_file(args.boxes) if args.boxes else None
    extractor = _load_extractor(args, args.batch_size)
    spec = extractor.spec
    with FeatureFileWriter(
        args.out,
        model_version=extractor.model_version,
        config={"extraction": extractor.config.to_json(), "model": spec.description},
        objects_vocab=spec.objects_vocab,
        attributes_vocab=spec.attributes_vocab,
        feature_dtype="float32" if args.float32 else "float16",
        feature_dim=spec.arch.feature_dim,
    ) as writer:
        done = writer.ids()
        todo = sum(1 for item in items if item.image_id not in done)
        with tqdm(total=todo, unit="img", desc="extract", file=sys.stderr) as bar:
            summary = extract_files(
                extractor,
                items,
                writer.append,
                done=done,
                boxes=boxes,
                batch_size=args.batch_size,
                progress=bar.update,
            )
    print(
        f"{args.out}: {summary.extracted} extracted, {summary.skipped} already present, "
        f"{len(summary.failed)} failed ({summary.seconds:.1f}s; model {spec.description!r}, "
        f"version {extractor.model_version})"
    )
    for image_id, reason in sorted(summary.failed.items()):
        print(f"  failed {image_id}: {reason}", file=sys.stderr)
    return 0


def run_show(args: argparse.Namespace) -> int:
    from detector.show import draw_regions
    from store.images import decode_image

    image = decode_image(args.image.read_bytes())
    extractor = _load_extractor(args)
    record = extractor.extract([image], [args.image.name])[0]
    spec = extractor.spec
    draw_regions(image, record, spec.objects_vocab, spec.attributes_vocab).save(args.out)
    print(f"{args.out}: {record.num_boxes} regions ({spec.description})")
    return 0
