"""Entry point of the ``butd`` command.

Each command group lives in its own module under ``service.cli`` and exposes
``register(subparsers) -> None``; the handlers import heavy packages (torch) lazily, so
``butd --help`` and the gateway stay light.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Command-group modules, in the order ``butd --help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "serve",
    "worker",
    "extract",
    "export",
    "jobs",
    "queue",
    "store",
    "weights",
    "train",
    "heads",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="butd", description="Bottom-up region features: extract, store, serve."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"service.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
