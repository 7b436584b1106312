"""``specdecode build-knn`` (a KNN-SSD bundle) and ``specdecode knn-eval`` (a mixed request stream)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from specdecode.artifacts.bundle import MIXED, load_bundle
from specdecode.artifacts.profile import load_profile
from specdecode.bench.dataset import DEFAULT_TEMPLATE, check_template, format_prompt
from specdecode.bench.knn_eval import category_prompts, contenders, evaluate, mixed_stream, routing_check
from specdecode.bench.knn_report import render, render_routing_check, write
from specdecode.bench.runner import BenchConfig
from specdecode.cli.bench import IDENTITY_FAILURE
from specdecode.cli.common import add_model_args, model_kwargs
from specdecode.errors import InvalidSettingError
from specdecode.models.loading import load_model
from specdecode.routing.anchors import check_categories
from specdecode.routing.build import add_domain, build_bundle
from specdecode.routing.domain_search import describe
from specdecode.routing.options import VOCAB_SOURCES, BuildOptions, SearchSpace
from specdecode.routing.plot import plot_tsne
from specdecode.search.calibration import load_labelled_prompts
from specdecode.search.config_search import DraftSpace


def register(subparsers: argparse._SubParsersAction) -> None:
    build = subparsers.add_parser(
        "build-knn", help="build a KNN-SSD bundle (per-domain draft configurations and k-means anchors), or "
                          "add / remove a domain of one",
        description="For every domain: answer its build prompts with the target (greedy), search its whole draft "
                    "configuration (skip set, draft vocabulary from its own target text, int8, threshold, maximum "
                    "draft) with Bayesian optimisation on the model as loaded, embed its prompts and cluster them "
                    "into anchors; then search the mixed fallback configuration (vocabulary: the union of the "
                    "domains'). Writes the bundle directory for --option bundle=DIR, with a t-SNE picture. "
                    "--add DOMAIN adds one domain to an existing bundle (--out) without re-searching the others; "
                    "--remove DOMAIN removes one. A rerun of an interrupted build resumes from its checkpoints.")
    add_model_args(build)
    data = build.add_argument_group("prompts")
    data.add_argument("--data", default=None, help="JSON-lines prompts (Spec-Bench 'turns', or 'prompt'/'text')")
    data.add_argument("--category-field", default="category", help="record field holding the domain")
    data.add_argument("--categories", default=None, help="comma-separated domains (default: all in the file)")
    data.add_argument("--prompts-per-category", type=int, default=20,
                      help="first N prompts of each domain build it (default 20)")
    data.add_argument("--search-prompts", type=int, default=None,
                      help="the first N of those score its configuration search; the others rank its vocabulary "
                           "during the search (default 6)")
    data.add_argument("--answer-tokens", type=int, default=None,
                      help="greedy target tokens per build prompt: the vocabulary text (default 48)")
    data.add_argument("--search-tokens", "--max-new-tokens", dest="search_tokens", type=int, default=None,
                      help="of those, tokens the search replays per prompt (default 32)")
    data.add_argument("--prompt-template", default=None,
                      help=f"how a first turn becomes the prompt; must contain {{turn}} (default: {DEFAULT_TEMPLATE!r}; "
                           "--add uses the bundle's)")
    routing = build.add_argument_group("routing")
    routing.add_argument("--anchors", type=int, default=None, help="k-means anchors per domain (default 10)")
    routing.add_argument("--radius-percentile", type=float, default=None,
                         help="a domain's fallback radius: this percentile of its build prompts' distances to its "
                              "anchors (default 95)")
    routing.add_argument("--radius-margin", type=float, default=None, help="... times this margin (default 2)")
    routing.add_argument("--profiles-dir", default=None,
                         help="reuse configurations DIR/<domain>.json and DIR/mixed.json where present")
    search = build.add_argument_group("search")
    search.add_argument("--iterations", type=int, default=24, help="optimiser suggestions after the starts (default 24)")
    search.add_argument("--init-points", type=int, default=8, help="starts: the default configuration, then random")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--max-density", type=float, default=0.25,
                        help="random starts skip each sub-layer with probability up to this (default 0.25)")
    search.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="time budget of the whole build, shared out between the searches still to run "
                             "(each search still does its starts)")
    search.add_argument("--measure", action="store_true", help="time each winner with real ssd runs")
    search.add_argument("--no-measure", dest="measure", action="store_false", help=argparse.SUPPRESS)
    search.add_argument("--no-progress", action="store_true", help="no progress output")
    space = build.add_argument_group("configuration space")
    space.add_argument("--vocab-sizes", default="256,512,1024,2048,4096,8192,16384",
                       help="draft vocabulary sizes to choose from (0: full head)")
    space.add_argument("--vocab-sources", default=",".join(VOCAB_SOURCES),
                       help=f"what a domain's vocabulary is ranked on, to choose from: {', '.join(VOCAB_SOURCES)}")
    space.add_argument("--int8", choices=("search", "on", "off"), default="search",
                       help="int8 weights for the draft: searched (default), always, never")
    space.add_argument("--threshold-range", default="0.3,0.95", help="confidence threshold range (0.05 steps)")
    space.add_argument("--max-draft-range", default="2,16", help="maximum draft length range")
    space.add_argument("--threshold", type=float, default=None, help="fix the threshold (no search)")
    space.add_argument("--max-draft", type=int, default=None, help="fix the maximum draft length (no search)")
    space.add_argument("--draft-vocab", type=int, default=None, help="fix the vocabulary size (0: full head)")
    edit = build.add_argument_group("editing a bundle")
    edit.add_argument("--add", default=None, metavar="DOMAIN",
                      help="add this domain (records of --data whose category is DOMAIN) to the bundle at --out")
    edit.add_argument("--remove", default=None, metavar="DOMAIN", help="remove this domain from the bundle at --out")
    edit.add_argument("--replace", action="store_true", help="with --add: rebuild a domain the bundle already has")
    build.add_argument("--out", required=True, help="bundle directory to write (to edit, with --add / --remove)")
    build.set_defaults(run=run_build)

    run = subparsers.add_parser(
        "knn-eval", help="compare ar, ssd (mixed / each domain's configuration) and knn-ssd on a mixed stream",
        description="Build a request stream from held-out prompts of the bundle's domains (and optionally of "
                    "domains not in it, --unseen), switching domain with probability --mix-ratio, and run ar, ssd "
                    "with the mixed configuration, ssd with each domain's and knn-ssd on it (greedy), one request "
                    "at a time with a checkpoint after each (a rerun resumes). Writes knn.md, knn.json, the "
                    "cross-domain heat-map and a t-SNE picture next to the benchmark report.")
    run.add_argument("--bundle", required=True, help="bundle directory written by build-knn")
    run.add_argument("--data", required=True, help="JSON-lines prompts with the bundle's domains")
    run.add_argument("--category-field", default=None, help="record field holding the domain (default: the bundle's)")
    run.add_argument("--mix-ratio", type=float, default=1.0,
                     help="probability that the next request comes from another domain (default 1)")
    run.add_argument("--per-category", type=int, default=5, help="requests per domain (default 5)")
    run.add_argument("--prompt-offset", type=int, default=None,
                     help="skip this many prompts of each bundle domain (default: those the bundle was built on)")
    run.add_argument("--unseen", default=None, metavar="DOMAINS",
                     help="comma-separated domains of --data that are not in the bundle, added to the stream "
                          "(their first prompts, minus --exclude)")
    run.add_argument("--exclude", default=None, metavar="FILE",
                     help="JSON-lines prompts never to use (e.g. a held-out set kept for later)")
    run.add_argument("--compare-bundle", default=None, metavar="DIR",
                     help="also run knn-ssd with this bundle (e.g. the shipped one), as knn-ssd[other]")
    run.add_argument("--stream-seed", type=int, default=0, help="seed of the stream's domain order")
    add_model_args(run)
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--repeats", type=int, default=1, help="timed runs per request and method (median)")
    run.add_argument("--warmup", type=int, default=1, help="untimed runs per method before timing")
    run.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                     help="stop starting new requests after this many seconds (the report covers those done)")
    run.add_argument("--out", default=None, help="output folder (default: runs/knn-eval-<date-time>)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(run=run_eval)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidSettingError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise InvalidSettingError(f"{flag} is empty")
    return values


def _range(text: str, flag: str, kind: type) -> tuple:
    try:
        low, high = (kind(v) for v in text.split(","))
    except ValueError:
        raise InvalidSettingError(f"{flag} must be LOW,HIGH, got {text!r}") from None
    return low, high


def _options(args: argparse.Namespace, previous: dict) -> BuildOptions:
    def pick(value, key, default):
        return value if value is not None else previous.get(key, default)

    sizes = (args.draft_vocab,) if args.draft_vocab is not None else _ints(args.vocab_sizes, "--vocab-sizes")
    if any(s < 0 for s in sizes):
        raise InvalidSettingError(f"vocabulary sizes must be >= 0, got {', '.join(map(str, sizes))}")
    sources = tuple(s.strip() for s in args.vocab_sources.split(",") if s.strip())
    threshold = (args.threshold, args.threshold) if args.threshold is not None else _range(
        args.threshold_range, "--threshold-range", float)
    max_draft = (args.max_draft, args.max_draft) if args.max_draft is not None else _range(
        args.max_draft_range, "--max-draft-range", int)
    int8 = {"search": (False, True), "on": (True,), "off": (False,)}[args.int8]
    space = SearchSpace(sizes, sources, int8, threshold, max_draft)
    DraftSpace({"check": [0]}, sizes, int8, threshold, max_draft)  # validates the ranges
    options = BuildOptions(
        anchors_per_category=pick(args.anchors, "anchors_per_category", 10),
        search_prompts=pick(args.search_prompts, "search_prompts", 6),
        answer_tokens=pick(args.answer_tokens, "answer_tokens", 48),
        search_tokens=pick(args.search_tokens, "search_tokens", 32),
        space=space, iterations=args.iterations, init_points=args.init_points, max_density=args.max_density,
        seed=args.seed, percentile=pick(args.radius_percentile, "radius_percentile", 95.0),
        margin=pick(args.radius_margin, "radius_margin", 2.0), budget_s=args.budget, measure=args.measure)
    if options.search_tokens > options.answer_tokens:
        options = replace(options, answer_tokens=options.search_tokens)
    options.validate()
    return options


def run_build(args: argparse.Namespace) -> int:
    if args.add and args.remove:
        raise InvalidSettingError("--add and --remove are separate edits: give one")
    if args.remove:
        bundle = load_bundle(args.out)
        edited = bundle.without_domain(args.remove)
        edited.save(args.out)
        print(f"removed {args.remove!r} from {args.out}: revision {edited.revision}, domains "
              f"{', '.join(edited.categories)}", file=sys.stderr)
        return 0
    if args.data is None:
        raise InvalidSettingError("--data is required to build a bundle or add a domain")
    for flag in ("prompts_per_category", "search_prompts", "answer_tokens", "search_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InvalidSettingError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.budget is not None and args.budget <= 0:
        raise InvalidSettingError(f"--budget must be > 0 seconds, got {args.budget}")
    if args.add:
        return _run_add(args)
    options = _options(args, {})
    if args.profiles_dir is not None and not Path(args.profiles_dir).is_dir():
        raise InvalidSettingError(f"--profiles-dir {args.profiles_dir!r} is not a directory")
    if options.search_prompts >= args.prompts_per_category:
        raise InvalidSettingError(f"--search-prompts {options.search_prompts} must be below --prompts-per-category "
                                  f"{args.prompts_per_category} (the other build prompts rank the vocabulary)")
    template = args.prompt_template or DEFAULT_TEMPLATE
    check_template(template)
    if args.categories is not None:
        categories = [c.strip() for c in args.categories.split(",") if c.strip()]
        if not categories:
            raise InvalidSettingError("--categories is empty")
    else:
        categories = list(dict.fromkeys(label for label, _ in load_labelled_prompts(args.data, args.category_field)))
    chosen = category_prompts(args.data, categories, args.prompts_per_category, 0, args.category_field)
    check_categories({c: len(p) for c, p in chosen.items()}, options.anchors_per_category)
    prompts = {c: [format_prompt(p, template) for p in rows] for c, rows in chosen.items()}
    target = load_model(args.model, **model_kwargs(args))
    reuse = {}
    if args.profiles_dir is not None:
        for name in [*categories, MIXED]:
            path = Path(args.profiles_dir) / f"{name}.json"
            if path.exists():
                reuse[name] = load_profile(path, target)
    out = Path(args.out)
    metadata = {"data": str(args.data), "category_field": args.category_field, "prompt_template": template,
                "threads": torch.get_num_threads()}
    built = build_bundle(target, prompts, options, reuse=reuse, checkpoints=out / "checkpoints",
                         progress=not args.no_progress, metadata=metadata)
    bundle = built.bundle
    bundle.save(out)
    plot_tsne(built, out / "tsne.png", seed=args.seed)
    print(f"wrote {out}: revision {bundle.revision}, {len(bundle.labels)} anchors over {len(bundle.categories)} "
          f"domains, t-SNE in {out / 'tsne.png'}", file=sys.stderr)
    for name, profile in [*bundle.profiles.items(), (MIXED, bundle.mixed)]:
        print(f"  {name}: {describe(profile.settings)}" + (" (reused)" if name in reuse else ""), file=sys.stderr)
    return 0


def _run_add(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.out)
    options = _options(args, bundle.settings)
    template = bundle.settings.get("prompt_template", DEFAULT_TEMPLATE)
    if args.prompt_template is not None and args.prompt_template != template:
        raise InvalidSettingError(f"--prompt-template differs from the bundle's ({template!r}): a domain's anchors "
                                  "must embed prompts as the others' do")
    chosen = category_prompts(args.data, [args.add], args.prompts_per_category, 0, args.category_field)
    if options.search_prompts >= args.prompts_per_category:
        raise InvalidSettingError(f"--search-prompts {options.search_prompts} must be below --prompts-per-category "
                                  f"{args.prompts_per_category}")
    texts = [format_prompt(p, template) for p in chosen[args.add]]
    target = load_model(args.model, **model_kwargs(args))
    bundle.check_model(target, f"bundle {args.out!r}")
    out = Path(args.out)
    metadata = {"data": str(args.data), "category_field": args.category_field, "prompt_template": template,
                "threads": torch.get_num_threads()}
    edited, _ = add_domain(target, bundle, args.add, texts, options, checkpoints=out / "checkpoints",
                           progress=not args.no_progress, metadata=metadata, replace_existing=args.replace)
    edited.save(out)
    print(f"added {args.add!r} to {out}: revision {edited.revision}, domains {', '.join(edited.categories)}; "
          f"{describe(edited.profiles[args.add].settings)}", file=sys.stderr)
    return 0


def _exclusions(path: str | None) -> set[str]:
    if path is None:
        return set()
    return {text for _, text in load_labelled_prompts(path)}


def run_eval(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle)
    if args.compare_bundle is not None:
        load_bundle(args.compare_bundle)  # refuse a broken one before any work
    if args.budget is not None and args.budget <= 0:
        raise InvalidSettingError(f"--budget must be > 0 seconds, got {args.budget}")
    field = args.category_field or bundle.settings.get("category_field", "category")
    offset = args.prompt_offset
    if offset is None:
        offset = max(dict(bundle.settings.get("prompts_per_category") or {0: 0}).values())
    exclude = _exclusions(args.exclude)
    chosen = category_prompts(args.data, bundle.categories, args.per_category, offset, field, exclude)
    unseen = [c.strip() for c in (args.unseen or "").split(",") if c.strip()]
    clash = [c for c in unseen if c in bundle.categories]
    if clash:
        raise InvalidSettingError(f"--unseen {', '.join(clash)}: the bundle has that domain")
    if unseen:
        chosen.update(category_prompts(args.data, unseen, args.per_category, 0, field, exclude, at_most=True))
    stream = mixed_stream(chosen, args.mix_ratio, args.stream_seed)
    template = bundle.settings.get("prompt_template", DEFAULT_TEMPLATE)
    config = BenchConfig(max_new_tokens=args.max_new_tokens, repeats=args.repeats, warmup=args.warmup,
                         prompt_template=template)
    target = load_model(args.model, **model_kwargs(args))
    bundle.check_model(target, f"bundle {args.bundle!r}")
    out = Path(args.out or time.strftime("runs/knn-eval-%Y%m%d-%H%M%S"))
    print(f"knn-eval: {len(stream)} requests ({', '.join(f'{c} {len(p)}' for c, p in chosen.items())}), "
          f"{len(contenders(bundle, args.bundle, args.compare_bundle))} methods each, "
          + (f"time budget {args.budget:.0f}s" if args.budget else "no time budget")
          + f"; checkpoints in {out / 'checkpoints'}", file=sys.stderr)
    evaluation = evaluate(target, bundle, args.bundle, stream, config, args.mix_ratio, progress=not args.no_progress,
                          checkpoints=out / "checkpoints", budget_s=args.budget, compare=args.compare_bundle)
    write(evaluation, out, command=shlex.join(["specdecode", *sys.argv[1:]]))
    everything = category_prompts(args.data, bundle.categories, 1, offset, field, exclude, at_most=True,
                                  every=True)
    if unseen:
        everything.update(category_prompts(args.data, unseen, 1, 0, field, exclude, at_most=True, every=True))
    check = routing_check(target, bundle, everything, unseen, template, out / "tsne.png")
    (out / "routing.json").write_text(json.dumps(check, indent=2) + "\n")
    with open(out / "knn.md", "a", encoding="utf-8") as handle:
        handle.write(render_routing_check(check))
    print(render(evaluation) + render_routing_check(check))
    print(f"wrote {out}", file=sys.stderr)
    return IDENTITY_FAILURE if evaluation.bench.mismatches() else 0
