"""Entry point of the ``butd`` command.

Each command group lives in its own module under ``butd.cli`` and exposes
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

# Libraries that log every HTTP request at INFO (``HTTP Request: GET ...``): WARNING unless -v.
QUIET_LOGGERS: tuple[str, ...] = ("httpx", "httpcore", "urllib3", "multipart", "filelock")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="butd", description="Bottom-up region features: extract, store, serve."
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, HTTP requests included"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"butd.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        # Log lines go above a running progress bar instead of through it.
        with logging_redirect_tqdm():
            return int(handler(args) or 0)
    except KeyboardInterrupt:
        return 130


def configure_logging(verbose: bool) -> None:
    """INFO (DEBUG with -v) to stderr; the HTTP libraries' per-request lines only with -v."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
