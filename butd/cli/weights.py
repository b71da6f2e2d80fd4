"""``butd weights``: list the known weight files, fetch one, convert a downloaded file.

    butd weights list
    butd weights fetch NAME [--dir DIR] [--keep-source] [--no-progress]
    butd weights convert SRC --out DST [--format auto|airsplay|hf|milvlg|caffe] [--trust-pickle]

Handlers import ``butd.detector.weights`` (torch) lazily so ``butd --help`` stays light.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

FORMAT_CHOICES = ("auto", "airsplay", "hf", "milvlg", "caffe")


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``weights`` command group to the ``butd`` parser."""
    parser = subparsers.add_parser(
        "weights",
        help="list, fetch and convert weight files",
        description="Known weight files, download + verify + convert, and conversion of files "
        "you downloaded yourself into butd's canonical .safetensors format (docs/weights.md).",
    )
    actions = parser.add_subparsers(dest="weights_action", metavar="ACTION")
    parser.set_defaults(handler=lambda _args: _print_help(parser))

    p_list = actions.add_parser("list", help="known weight files and whether they are fetched")
    p_list.add_argument("--dir", type=Path, default=None, help="weights directory")
    p_list.set_defaults(handler=_list)

    p_fetch = actions.add_parser("fetch", help="download, verify and convert a registry entry")
    p_fetch.add_argument("name", help="registry name (see `butd weights list`)")
    p_fetch.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="weights directory (default $BUTD_WEIGHTS_DIR or ~/.cache/butd/weights)",
    )
    p_fetch.add_argument("--keep-source", action="store_true", help="keep the original download")
    p_fetch.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_fetch.set_defaults(handler=_fetch)

    p_conv = actions.add_parser("convert", help="convert a downloaded checkpoint to canonical")
    p_conv.add_argument("src", type=Path, help=".pkl / .bin / .pth / .caffemodel checkpoint")
    p_conv.add_argument("--out", type=Path, required=True, help="canonical .safetensors to write")
    p_conv.add_argument("--format", choices=FORMAT_CHOICES, default="auto", dest="fmt")
    p_conv.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow an unrestricted torch.load for files the safe loaders refuse",
    )
    p_conv.set_defaults(handler=_convert)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _list(args: argparse.Namespace) -> int:
    from butd.detector.weights.canonical import is_canonical_file
    from butd.detector.weights.registry import REGISTRY, canonical_path

    print(f"{'name':<22} {'format':<11} {'boxes':<7} {'state':<11} description")
    for entry in REGISTRY.values():
        path = canonical_path(entry, args.dir)
        if is_canonical_file(path):
            state = "ready"
        elif entry.kind == "packaged":
            state = "not built"
        else:
            state = "not fetched" if entry.convertible else "unsupported"
        print(
            f"{entry.name:<22} {entry.format:<11} {entry.boxes or '-':<7} {state:<11} "
            f"{entry.description}"
        )
        if entry.note:
            print(f"{'':<22}   note: {entry.note}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from butd.detector.weights.canonical import WeightsError, load
    from butd.detector.weights.fetch import fetch
    from butd.detector.weights.registry import get_entry

    try:
        out = fetch(
            get_entry(args.name),
            args.dir,
            progress=not args.no_progress,
            keep_source=args.keep_source,
        )
        loaded = load(out)
    except WeightsError as exc:
        print(f"error: {exc}")
        return 1
    print(f"{args.name}: {out}")
    print(f"  canonical sha256 {loaded.sha256}")
    print(f"  source sha256    {loaded.source_sha256} ({loaded.source_format})")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from butd.detector.weights.canonical import WeightsError, load
    from butd.detector.weights.formats import convert

    try:
        out = convert(args.src, args.out, fmt=args.fmt, trust_pickle=args.trust_pickle)
        loaded = load(out)
    except WeightsError as exc:
        print(f"error: {exc}")
        return 1
    print(f"{args.src} ({loaded.source_format}) -> {out}")
    print(f"  canonical sha256 {loaded.sha256}")
    print(f"  source sha256    {loaded.source_sha256}")
    return 0
