"""``specdecode`` entry point. Each subcommand lives in its own module exposing ``register``.

Errors a user can cause (:class:`SpecDecodeError`) print one line and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from specdecode.cli import bench, demo, distill, generate, knn, search, serve, train_head
from specdecode.errors import SpecDecodeError

# each module: register(subparsers) -> sets args.run
SUBCOMMANDS = [demo, generate, bench, search, distill, train_head, knn, serve]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specdecode", description="Speculative decoding for Hugging Face causal LMs."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
