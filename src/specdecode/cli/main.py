"""``specdecode`` entry point. Each subcommand lives in its own module exposing ``register``; only
the module of the command being run is imported (``specdecode generate`` loads neither the bench
nor the offline builders and their scikit-learn), all of them for ``specdecode --help``.

Errors a user can cause (:class:`SpecDecodeError`) print one line and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from specdecode.errors import SpecDecodeError

# command -> the module under specdecode.cli that registers it: register(subparsers) sets args.run
SUBCOMMANDS = {
    "demo": "demo", "generate": "generate", "bench": "bench", "search": "search", "distill-draft": "distill",
    "train-head": "train_head", "build-knn": "knn", "knn-eval": "knn", "serve": "serve",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one ``error: ...`` line and exit status 2, as every other bad
    input does (argparse's own error prints the whole usage block first). Subcommand parsers
    inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for ``command`` alone, or for every command when it is not one of them."""
    parser = OneLineParser(
        prog="specdecode", description="Speculative decoding for Hugging Face causal LMs."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    modules = [SUBCOMMANDS[command]] if command in SUBCOMMANDS else dict.fromkeys(SUBCOMMANDS.values())
    for module in modules:
        importlib.import_module(f"specdecode.cli.{module}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((arg for arg in argv if not arg.startswith("-")), None))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a bad flag (2, one line: OneLineParser)
        return int(exc.code or 0)
    try:
        return int(args.run(args) or 0)
    except SpecDecodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
