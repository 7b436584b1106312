"""``specdecode build-knn`` (a KNN-SSD bundle) and ``specdecode knn-eval`` (a mixed request stream)."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from specdecode.bench.dataset import DEFAULT_TEMPLATE, check_template, format_prompt
from specdecode.bench.runner import BenchConfig
from specdecode.cli.bench import IDENTITY_FAILURE
from specdecode.cli.common import add_model_args, model_kwargs
from specdecode.cli.search import add_draft_args, add_search_args, base_settings, search_options
from specdecode.errors import InvalidSettingError
from specdecode.models.loading import load_model
from specdecode.routing.build import build_bundle, plot_tsne
from specdecode.routing.bundle import MIXED, load_bundle
from specdecode.routing.evaluate import evaluate, category_prompts, mixed_stream, render, write
from specdecode.search.calibration import load_labelled_prompts
from specdecode.search.profile import load_profile


def register(subparsers: argparse._SubParsersAction) -> None:
    build = subparsers.add_parser(
        "build-knn", help="build a KNN-SSD bundle: per-category skip profiles and k-means anchors",
        description="Search one ssd skip profile per category and a mixed one (or reuse searched ones), embed "
                    "each category's prompts with the target, cluster them into anchors, and write the bundle "
                    "directory for --option bundle=DIR, with a t-SNE picture of prompts and anchors.")
    add_model_args(build)
    data = build.add_argument_group("prompts")
    data.add_argument("--data", required=True, help="JSON-lines prompts (Spec-Bench 'turns', or 'prompt'/'text')")
    data.add_argument("--category-field", default="category", help="record field holding the category")
    data.add_argument("--categories", default=None, help="comma-separated categories (default: all in the file)")
    data.add_argument("--prompts-per-category", type=int, default=20,
                      help="first N prompts of each category are embedded for the anchors (default 20)")
    data.add_argument("--search-prompts", type=int, default=8,
                      help="the first N of those calibrate each skip search (default 8)")
    data.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per calibration prompt")
    data.add_argument("--prompt-template", default=DEFAULT_TEMPLATE,
                      help=f"how a first turn becomes the prompt; must contain {{turn}} (default: {DEFAULT_TEMPLATE!r})")
    routing = build.add_argument_group("routing")
    routing.add_argument("--anchors", type=int, default=10, help="k-means anchors per category (default 10)")
    routing.add_argument("--radius-percentile", type=float, default=95.0,
                         help="fallback radius: this percentile of calibration nearest-anchor distances (default 95)")
    routing.add_argument("--radius-margin", type=float, default=2.0, help="... times this margin (default 2)")
    routing.add_argument("--profiles-dir", default=None,
                         help="reuse searched profiles DIR/<category>.json and DIR/mixed.json where present")
    add_search_args(build)
    add_draft_args(build)
    build.add_argument("--out", required=True, help="bundle directory to write")
    build.set_defaults(run=run_build)

    run = subparsers.add_parser(
        "knn-eval", help="compare ar, ssd (mixed / each category's profile) and knn-ssd on a mixed stream",
        description="Build a request stream from held-out prompts of the bundle's categories, switching category "
                    "with probability --mix-ratio, and run ar, ssd with the mixed profile, ssd with each "
                    "category's profile and knn-ssd on it (greedy). Writes knn.md and knn.json next to the "
                    "benchmark report (records.jsonl, table.md, plots).")
    run.add_argument("--bundle", required=True, help="bundle directory written by build-knn")
    run.add_argument("--data", required=True, help="JSON-lines prompts with the bundle's categories")
    run.add_argument("--category-field", default=None, help="record field holding the category (default: the bundle's)")
    run.add_argument("--mix-ratio", type=float, default=1.0,
                     help="probability that the next request comes from another category (default 1)")
    run.add_argument("--per-category", type=int, default=5, help="requests per category (default 5)")
    run.add_argument("--prompt-offset", type=int, default=None,
                     help="skip this many prompts of each category (default: those the bundle was built on)")
    run.add_argument("--stream-seed", type=int, default=0, help="seed of the stream's category order")
    add_model_args(run)
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--repeats", type=int, default=1, help="timed runs per request and method (median)")
    run.add_argument("--warmup", type=int, default=1, help="untimed runs per method before timing")
    run.add_argument("--out", default=None, help="output folder (default: runs/knn-eval-<date-time>)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(run=run_eval)


def run_build(args: argparse.Namespace) -> int:
    for flag in ("prompts_per_category", "search_prompts", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise InvalidSettingError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.search_prompts > args.prompts_per_category:
        raise InvalidSettingError(f"--search-prompts {args.search_prompts} exceeds --prompts-per-category "
                                  f"{args.prompts_per_category}")
    check_template(args.prompt_template)
    options = search_options(args)
    if args.categories is not None:
        categories = [c.strip() for c in args.categories.split(",") if c.strip()]
        if not categories:
            raise InvalidSettingError("--categories is empty")
    else:
        categories = list(dict.fromkeys(label for label, _ in load_labelled_prompts(args.data, args.category_field)))
    chosen = category_prompts(args.data, categories, args.prompts_per_category, 0, args.category_field)
    prompts = {c: [format_prompt(p, args.prompt_template) for p in rows] for c, rows in chosen.items()}
    target = load_model(args.model, **model_kwargs(args))
    reuse = {}
    if args.profiles_dir is not None:
        if not Path(args.profiles_dir).is_dir():
            raise InvalidSettingError(f"--profiles-dir {args.profiles_dir!r} is not a directory")
        for name in [*categories, MIXED]:
            path = Path(args.profiles_dir) / f"{name}.json"
            if path.exists():
                reuse[name] = load_profile(path, target)
    out = Path(args.out)
    metadata = {"data": str(args.data), "category_field": args.category_field,
                "prompt_template": args.prompt_template, "draft_vocab_requested": args.draft_vocab}
    built = build_bundle(target, prompts, base_settings(args), anchors_per_category=args.anchors,
                         search_prompts=args.search_prompts, max_new_tokens=args.max_new_tokens,
                         draft_vocab=args.draft_vocab, reuse=reuse, percentile=args.radius_percentile,
                         margin=args.radius_margin, seed=args.seed, checkpoints=out / "checkpoints",
                         progress=not args.no_progress, search_options=options, metadata=metadata)
    bundle = built.bundle
    bundle.save(out)
    plot_tsne(built, out / "tsne.png", seed=args.seed)
    print(f"wrote {out}: {len(bundle.labels)} anchors over {len(bundle.categories)} categories, "
          f"fallback radius {bundle.radius:.4f}, t-SNE in {out / 'tsne.png'}", file=sys.stderr)
    for name, profile in [*bundle.profiles.items(), (MIXED, bundle.mixed)]:
        skip = profile.settings.skip
        print(f"  {name}: skip attention {list(skip.attention)}, mlp {list(skip.mlp)}"
              + (" (reused)" if name in reuse else ""), file=sys.stderr)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle)
    field = args.category_field or bundle.settings.get("category_field", "category")
    offset = args.prompt_offset
    if offset is None:
        offset = max(dict(bundle.settings.get("prompts_per_category") or {0: 0}).values())
    chosen = category_prompts(args.data, bundle.categories, args.per_category, offset, field)
    stream = mixed_stream(chosen, args.mix_ratio, args.stream_seed)
    config = BenchConfig(max_new_tokens=args.max_new_tokens, repeats=args.repeats, warmup=args.warmup,
                         prompt_template=bundle.settings.get("prompt_template", DEFAULT_TEMPLATE))
    target = load_model(args.model, **model_kwargs(args))
    bundle.check_model(target, f"bundle {args.bundle!r}")
    out = args.out or time.strftime("runs/knn-eval-%Y%m%d-%H%M%S")
    evaluation = evaluate(target, bundle, args.bundle, stream, config, args.mix_ratio, progress=not args.no_progress)
    write(evaluation, out, command=shlex.join(["specdecode", *sys.argv[1:]]))
    print(render(evaluation))
    print(f"wrote {out}", file=sys.stderr)
    return IDENTITY_FAILURE if evaluation.bench.mismatches() else 0
