"""`qembed <verb>`: a thin argument parser over the library. Each verb lives in its own module
that defines `add_parser(subparsers)` and sets `func` (a callable taking the parsed args); a sub-verb also sets
`command` (e.g. "data convert"), the name its error messages start with."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from qembed.cli.common import QembedParser, UsageError
from qembed.errors import QembedError
from qembed.progress import forced_mode

# One module per verb (or verb group); order is the order of `qembed --help`.
VERB_MODULES = [
    "qembed.cli.demo",
    "qembed.cli.embed",
    "qembed.cli.rerank",
    "qembed.cli.data",
    "qembed.cli.eval",
    "qembed.cli.mteb",
    "qembed.cli.synth",
    "qembed.cli.filter",
    "qembed.cli.review",
    "qembed.cli.mine",
    "qembed.cli.train",
    "qembed.cli.merge",
    "qembed.cli.index",
    "qembed.cli.serve",
    "qembed.cli.adapt",
]


def build_parser() -> argparse.ArgumentParser:
    parser = QembedParser(prog="qembed", description="Qwen3-style embedding and reranking toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs and full tracebacks")
    subparsers = parser.add_subparsers(dest="verb", required=True, metavar="<verb>", parser_class=QembedParser)
    for name in VERB_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:  # one line, like every other bad input
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    try:
        with forced_mode(getattr(args, "progress_mode", None)):
            result = args.func(args)
    except QembedError as exc:
        if args.verbose:
            raise
        print(f"qembed {getattr(args, 'command', None) or args.verb}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"qembed {getattr(args, 'command', None) or args.verb}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
