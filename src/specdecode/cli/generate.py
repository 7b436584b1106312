"""``specdecode generate``: stream one generation to the terminal; ``--json`` for its statistics."""

from __future__ import annotations

import argparse
import json
import sys

from specdecode.api import SpeculativeDecoder, make_settings
from specdecode.cli.common import (
    add_generation_args,
    add_method_args,
    add_model_args,
    generation_kwargs,
    load_draft_arg,
    method_kwargs,
    model_kwargs,
)
from specdecode.errors import PromptError
from specdecode.methods import method_names, validate_options
from specdecode.models.loading import load_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate text with one method")
    parser.add_argument("prompt", help="prompt text ('-' reads standard input)")
    parser.add_argument("--method", default="ar", choices=method_names())
    parser.add_argument("--json", action="store_true", help="print the result and statistics as JSON")
    add_model_args(parser)
    add_generation_args(parser)
    add_method_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    # refuse bad settings before spending seconds on loading the model
    make_settings(**generation_kwargs(args))
    validate_options(args.method, method_kwargs(args))
    if not prompt.strip():
        raise PromptError("prompt is empty")
    target = load_model(args.model, **model_kwargs(args))
    draft = load_draft_arg(args, target)
    decoder = SpeculativeDecoder(target, args.method, draft, **method_kwargs(args))
    generation = decoder.start(prompt, **generation_kwargs(args))
    if args.json:
        print(json.dumps(generation.result().to_dict(), indent=2))
        return 0
    for chunk in generation:
        sys.stdout.write(chunk)
        sys.stdout.flush()
    stats = generation.result().stats
    print(
        f"\n[{args.method}] {stats.new_tokens} tokens in {stats.total_s:.2f}s "
        f"({stats.tokens_per_second:.1f} tok/s), {stats.tokens_per_target_forward:.2f} tokens/target forward",
        file=sys.stderr,
    )
    return 0
