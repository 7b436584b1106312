"""``specdecode search``: Bayesian-optimise an ``ssd`` skip profile on calibration prompts."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from specdecode.cli.common import add_model_args, model_kwargs
from specdecode.errors import InvalidSettingError
from specdecode.models.loading import load_model
from specdecode.artifacts.profile import SelfDraftSettings
from specdecode.search.build import OBJECTIVES, build_profile, draft_vocabulary
from specdecode.search.calibration import calibrate, load_prompts


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search", help="search an ssd skip profile (Bayesian optimisation)",
        description="Search the attention / MLP sub-layers the self-draft skips, maximising ssd tokens/s on "
                    "calibration prompts, and write the result as a profile for --option profile=PATH.")
    add_model_args(parser)
    data = parser.add_argument_group("calibration")
    data.add_argument("--data", required=True, help="JSON-lines prompts (Spec-Bench 'turns', or 'prompt'/'text')")
    data.add_argument("--category", default=None, help="use only records of this category (default: all)")
    data.add_argument("--category-field", default="category", help="record field holding the category")
    data.add_argument("--prompts", type=int, default=8, help="calibration prompts (default 8)")
    data.add_argument("--prompt-offset", type=int, default=0, help="skip this many prompts first (held-out splits)")
    data.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    add_search_args(parser)
    add_draft_args(parser)
    parser.add_argument("--checkpoint", default=None, help="resumable state (default: OUT.checkpoint.json)")
    parser.add_argument("--vocab-data", default=None,
                        help="text to rank draft tokens on: JSON-lines prompts, all categories (default: --data)")
    parser.add_argument("--out", required=True, help="profile file to write (JSON)")
    parser.set_defaults(run=run)


def add_search_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the skip-set search (``build-knn`` has its own: it searches whole configurations)."""
    search = parser.add_argument_group("search")
    search.add_argument("--iterations", type=int, default=40, help="optimiser suggestions after the random starts")
    search.add_argument("--init-points", type=int, default=8, help="random skip sets to start from (default 8)")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--max-density", type=float, default=0.5,
                        help="random starts skip each sub-layer with probability up to this (default 0.5)")
    search.add_argument("--min-skip", type=int, default=0,
                        help="skip at least this many of the 2*L sub-layers (a draft budget; default 0)")
    search.add_argument("--objective", choices=OBJECTIVES, default="simulated",
                        help="simulated: replayed acceptance x timed cost model, deterministic (default); "
                             "measured: wall-clock tokens/s of real runs, noisy on a shared CPU")
    search.add_argument("--no-measure", action="store_true", help="do not time the best profile with real runs")
    search.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_draft_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the self-draft being searched."""
    draft = parser.add_argument_group("draft")
    draft.add_argument("--threshold", type=float, default=0.8, help="stop drafting below this top-1 probability")
    draft.add_argument("--max-draft", type=int, default=12, help="longest draft (default 12)")
    draft.add_argument("--draft-vocab", type=int, default=0,
                       help="reduced-vocabulary draft head over the N most frequent tokens (0: full head)")
    draft.add_argument("--int8", action="store_true", help="int8 weights for the draft forward")


def search_options(args: argparse.Namespace) -> dict[str, object]:
    """``build_profile`` keyword arguments from the search flags (the seed is passed on its own)."""
    if args.draft_vocab < 0:
        raise InvalidSettingError(f"--draft-vocab must be >= 0, got {args.draft_vocab}")
    if args.min_skip < 0:
        raise InvalidSettingError(f"--min-skip must be >= 0, got {args.min_skip}")
    return dict(objective=args.objective, iterations=args.iterations, init_points=args.init_points,
                max_density=args.max_density, min_skip=args.min_skip, measure=not args.no_measure)


def base_settings(args: argparse.Namespace) -> SelfDraftSettings:
    return SelfDraftSettings(threshold=args.threshold, max_draft=args.max_draft, int8=args.int8)


def run(args: argparse.Namespace) -> int:
    for name in ("prompts", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise InvalidSettingError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.prompt_offset < 0:
        raise InvalidSettingError(f"--prompt-offset must be >= 0, got {args.prompt_offset}")
    options = search_options(args)
    texts = load_prompts(args.data, args.category, args.category_field)
    chosen = texts[args.prompt_offset: args.prompt_offset + args.prompts]
    if len(chosen) < args.prompts:
        raise InvalidSettingError(
            f"--prompts {args.prompts} with --prompt-offset {args.prompt_offset} needs "
            f"{args.prompts + args.prompt_offset} prompts; {args.data} has {len(texts)}"
            + (f" of category {args.category!r}" if args.category else "")
        )
    target = load_model(args.model, **model_kwargs(args))
    calibration = calibrate(target, chosen, args.max_new_tokens)
    vocab = None
    if args.draft_vocab:
        vocab = draft_vocabulary(target, calibration, args.draft_vocab, load_prompts(args.vocab_data or args.data))
    base = replace(base_settings(args), vocab_ids=vocab)
    out = Path(args.out)
    checkpoint = args.checkpoint or out.with_name(out.name + ".checkpoint.json")
    metadata = {"data": str(args.data), "category": args.category, "prompt_offset": args.prompt_offset,
                "draft_vocab_requested": args.draft_vocab}
    profile = build_profile(target, calibration, base, seed=args.seed, checkpoint=checkpoint,
                            progress=not args.no_progress, metadata=metadata, **options)
    profile.save(out)
    skip, found = profile.settings.skip, profile.search
    print(f"wrote {out}: skip attention {list(skip.attention)}, mlp {list(skip.mlp)}; "
          f"{args.objective} score {found['best_score']:.2f} (best random start {found['best_initial_score']:.2f})",
          file=sys.stderr)
    if profile.measured:
        m = profile.measured
        print(f"measured: {m['tokens_per_second']:.2f} tok/s vs ar {m['ar_tokens_per_second']:.2f} "
              f"({m['speedup']:.2f}x), tau {m['tau']:.2f}, acceptance {m['acceptance_rate']:.2f}", file=sys.stderr)
    return 0
