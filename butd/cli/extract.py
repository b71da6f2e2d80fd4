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
        description="Files and directories; resumable (an id already in FILE is skipped when its "
        "file has the same sha256, refused when the bytes differ); a bad image is reported and "
        "skipped while the rest completes.",
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
    _id_arguments(extract)
    extract.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    extract.add_argument(
        "--float32", action="store_true", help="store float32 features (default float16)"
    )
    extract.set_defaults(handler=run_extract)

    show = subparsers.add_parser(
        "show",
        help="draw an image's regions with their labels, or a captioner's attention per word",
    )
    show.add_argument("image", type=Path, metavar="IMAGE")
    show.add_argument("--out", required=True, type=Path, metavar="PNG")
    show.add_argument(
        "--attention",
        action="store_true",
        help="caption the regions with --captioner and draw one panel per word, "
        "regions shaded by their attention weight",
    )
    show.add_argument(
        "--captioner",
        type=Path,
        metavar="DIR",
        help="trained caption head (DIR/last.pt); default with the demo detector: the packaged "
        "synthetic demo caption head",
    )
    show.add_argument(
        "--all",
        action="store_true",
        help="draw every region (default: only those whose confidence reaches the threshold, "
        "--conf-thresh or the model's)",
    )
    show.add_argument("--beam-size", type=int, default=5, metavar="N")
    show.add_argument("--max-len", type=int, default=20, metavar="T")
    _model_arguments(show)
    show.set_defaults(handler=run_show)


def _id_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image-ids",
        choices=("path", "stem", "coco", "map"),
        default="path",
        help="how a file becomes its id: path = relative to the directory argument (default); "
        "stem = file name without extension; coco = COCO_{split}_{012d}.jpg and integer names "
        "-> the integer (what COCO/VQA annotations and generate_tsv readers use); map = --id-map",
    )
    parser.add_argument(
        "--id-map", type=Path, metavar="FILE.json", help='map rule: {"rel/path.jpg": "id", ...}'
    )


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
    parser.add_argument(
        "--grid-size",
        type=int,
        default=None,
        metavar="G",
        help="also store a G x G grid of res5 features per image from the same pass "
        "(e.g. 7: the 49 x 2048 grid-feature layout; default: regions only)",
    )


def _load_extractor(args: argparse.Namespace, batch_size: int = 8) -> Any:
    from butd.detector.extractor import Extractor

    overrides = {
        key: value
        for key, value in (
            ("min_boxes", args.min_boxes),
            ("max_boxes", args.max_boxes),
            ("conf_thresh", args.conf_thresh),
            ("precision", args.precision),
            ("grid_size", args.grid_size),
        )
        if value is not None
    }
    return Extractor.from_weights(
        args.weights, device=args.device, batch_size=batch_size, **overrides
    )


def run_extract(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from butd.detector.files import extract_files, find_images, load_boxes_file
    from butd.store.h5 import FeatureFileError
    from butd.store.h5_writer import FeatureFileWriter
    from butd.store.image_ids import IdPolicy, ImageIdError

    try:
        policy = IdPolicy.load(args.image_ids, args.id_map)
        items = find_images(args.paths, policy)
    except (ImageIdError, ValueError, OSError) as exc:
        print(f"butd extract: {exc}", file=sys.stderr)
        return 2
    boxes = load_boxes_file(args.boxes) if args.boxes else None
    extractor = _load_extractor(args, args.batch_size)
    spec = extractor.spec
    try:
        writer = FeatureFileWriter(
            args.out,
            model_version=extractor.model_version,
            config={"extraction": extractor.config.to_json(), "model": spec.description},
            objects_vocab=spec.objects_vocab,
            attributes_vocab=spec.attributes_vocab,
            feature_dtype="float32" if args.float32 else "float16",
            feature_dim=spec.arch.feature_dim,
            grid_size=extractor.config.grid_size,
            id_policy=policy.metadata(item.path.name for item in items),
        )
    except FeatureFileError as exc:
        print(f"butd extract: {exc}", file=sys.stderr)
        return 2
    with writer:
        stored = writer.stored_sha256()
        todo = sum(1 for item in items if item.image_id not in stored)
        with tqdm(total=todo, unit="img", desc="extract", file=sys.stderr) as bar:
            summary = extract_files(
                extractor,
                items,
                writer.append,
                stored=stored,
                boxes=boxes,
                batch_size=args.batch_size,
                progress=bar.update,
            )
    print(
        f"{args.out}: {summary.extracted} extracted, {summary.skipped} already present "
        f"(same bytes), {len(summary.refused)} refused (stored from other bytes), "
        f"{len(summary.failed)} failed ({summary.seconds:.1f}s; model {spec.description!r}, "
        f"version {extractor.model_version})"
    )
    _list("failed", summary.failed)
    _list("refused", summary.refused)
    return 1 if summary.refused else 0


def _list(what: str, reasons: dict[str, str], shown: int = 20) -> None:
    """The first ``shown`` images and why, on stderr."""
    for image_id, reason in sorted(reasons.items())[:shown]:
        print(f"  {what} {image_id}: {reason}", file=sys.stderr)
    if len(reasons) > shown:
        print(f"  ... and {len(reasons) - shown} more {what}", file=sys.stderr)


def run_show(args: argparse.Namespace) -> int:
    from butd.detector.show import draw_regions
    from butd.images import decode_image

    if args.attention and args.captioner is None:
        from butd.heads.demo import DEMO_DETECTOR, demo_head

        if args.weights not in (None, DEMO_DETECTOR):
            print("butd show --attention needs --captioner DIR", file=sys.stderr)
            return 2
        args.captioner = demo_head("caption")
    image = decode_image(args.image.read_bytes())
    head: Any = None
    if args.attention:
        from butd.heads.inference import load_head

        head = load_head(args.captioner)
        grid = int(head[1]["config"].get("grid_size", 0))
        if grid and args.grid_size is None:  # a grid head reads the grid of this extraction
            args.grid_size = grid
    extractor = _load_extractor(args)
    record = extractor.extract([image], [args.image.name])[0]
    spec = extractor.spec
    if args.attention:
        return _show_attention(args, image, record, head)
    threshold = None if args.all else extractor.config.conf_thresh
    drawing = draw_regions(
        image, record, spec.objects_vocab, spec.attributes_vocab, min_conf=threshold
    )
    drawing.image.save(args.out)
    shown = f"{drawing.drawn} of {record.num_boxes} regions"
    if threshold is not None:
        shown += f" (confidence >= {threshold:g}; --all draws every one)"
    if drawing.unlabelled:
        shown += f"; {drawing.unlabelled} labels left out for lack of room"
    print(f"{args.out}: {shown}")
    return 0


def _show_attention(args: argparse.Namespace, image: Any, record: Any, head: Any) -> int:
    """Caption ``record`` with the loaded ``head`` (model, meta); save one panel per word:
    regions shaded by their weight, or a heat map of the grid attention for a grid head."""
    from PIL import Image

    from butd.heads.decoding import Captioner
    from butd.heads.inference import caption
    from butd.heads.visualise import attention_panels, grid_attention_panels

    model, meta = head
    if not isinstance(model, Captioner):
        print(f"{args.captioner} is a {meta.get('task')} head, not a captioner", file=sys.stderr)
        return 2
    dim = int(meta["config"]["feature_dim"])
    if dim != record.features.shape[1]:
        print(
            f"{args.captioner} expects {dim}-d features; the detector gives "
            f"{record.features.shape[1]}-d",
            file=sys.stderr,
        )
        return 2
    result = caption(model, meta, record, beam_size=args.beam_size, max_len=args.max_len)
    if not result.words:
        print(f"{args.captioner} produced an empty caption; nothing to draw", file=sys.stderr)
        return 1
    g = int(meta["config"].get("grid_size", 0))
    if g:
        weights = result.attention.numpy()  # (T, G*G)
        grid = grid_attention_panels(image, result.words, weights, g)
    else:
        weights = result.attention[:, : record.num_boxes].numpy()  # (T, N)
        grid = attention_panels(image, record.boxes, result.words, weights)
    Image.fromarray(grid[..., ::-1]).save(args.out)
    print(f"{args.out}: {' '.join(result.words)} ({len(result.words)} panels)")
    return 0
