"""``specdecode bench``: compare methods and `transformers` peers on a Spec-Bench prompt file."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from specdecode.bench import BenchConfig, load_prompts, render_table, run_bench, summary_lines, write_report
from specdecode.bench.dataset import DEFAULT_TEMPLATE
from specdecode.bench.peers import peer_names, peer_options
from specdecode.cli.common import add_model_args, load_draft_arg, model_kwargs
from specdecode.methods import method_names, method_options
from specdecode.models.loading import load_model

IDENTITY_FAILURE = 3  # exit status when one of our lossless methods differs from ar


def _catalogue() -> str:
    def line(name: str, options: list[str]) -> str:
        return f"  {name:<15} {', '.join(options) or '(no options)'}"

    return "\n".join([
        "Contenders are NAME or NAME:key=value,key=value, e.g. --method pld:gamma=10,max_ngram=3",
        "--peer hf-pld:num_tokens=10. Our `ar` always runs: every speedup is relative to it.",
        "",
        "methods (--method):",
        *(line(name, method_options(name)) for name in method_names()),
        "",
        "transformers peers (--peer):",
        *(line(name, peer_options(name)) for name in peer_names()),
        "",
        "llama.cpp peers (--peer; pip install 'specdecode[llamacpp]'; the same GGUF file):",
        line("llama.cpp", []),
        line("llama.cpp-pld", ["num_tokens"]),
        "",
        "Append @eager to one of our methods to run it without the fast CPU runtime (ar@eager: the",
        "plain float32 loop; with --quantize, the float32 reference of the divergence table).",
        "",
        "Every run generates exactly --max-new-tokens tokens (EOS does not stop ours nor transformers'),",
        "from the same prompt token ids. Outputs (written only once the run has finished): table.md,",
        "records.jsonl, summary.json, speedup_per_category.png, tau_distribution.png, COMMAND.txt.",
        f"Exit status {IDENTITY_FAILURE}: a lossless method's greedy output differed from ar in a float32/float64 run (a bug).",
    ])


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="benchmark methods and transformers peers on Spec-Bench prompts",
        description="Run every method and peer on the same prompts, interleaved per prompt, after a warm-up.",
        epilog=_catalogue(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = parser.add_argument_group("prompts")
    data.add_argument("--data", required=True, help="Spec-Bench JSONL file (question_id, category, turns)")
    data.add_argument("--category", action="append", default=[],
                      help="category to include (repeatable; 'mt_bench' = all 8 MT-bench ones; default: all)")
    data.add_argument("--per-category", type=int, default=None, help="first N questions of each category")
    data.add_argument("--prompt-template", default=DEFAULT_TEMPLATE,
                      help=f"how a first turn becomes the prompt; must contain {{turn}} (default: {DEFAULT_TEMPLATE!r})")
    contenders = parser.add_argument_group("contenders")
    contenders.add_argument("--method", action="append", default=[], metavar="SPEC",
                            help="one of our methods (repeatable; default: ar and pld)")
    contenders.add_argument("--peer", action="append", default=[], metavar="SPEC",
                            help="a transformers generate peer (repeatable; default: none)")
    add_model_args(parser)
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed of the first prompt (+1 per prompt)")
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--repeats", type=int, default=1, help="timed runs per prompt and method (median)")
    run_group.add_argument("--warmup", type=int, default=1, help="untimed runs per method before timing")
    run_group.add_argument("--out", default=None, help="output folder (default: runs/bench-<date-time>)")
    run_group.add_argument("--no-progress", action="store_true", help="no progress bar")
    batch = parser.add_argument_group("throughput (batched decoding)")
    batch.add_argument("--concurrency", default=None, metavar="LIST",
                       help="e.g. 1,4,16: instead of one request at a time, serve the prompts in waves of c "
                            "concurrent requests decoded together and report aggregate tokens/s per method and c")
    batch.add_argument("--adaptive-drafts", action="store_true",
                       help="with --concurrency: keep only the draft tokens expected to pay for their rows in the batch")
    parser.set_defaults(run=run)


def command_line(args: argparse.Namespace) -> str:
    """The parsed arguments as one explicit command that reproduces the run."""
    parts = ["specdecode", "bench", "--data", args.data]
    for flag, values in (("--category", args.category), ("--method", args.method), ("--peer", args.peer)):
        for value in values:
            parts += [flag, value]
    options = [("--per-category", args.per_category), ("--model", args.model), ("--draft", args.draft),
               ("--dtype", args.dtype), ("--quantize", args.quantize), ("--device", args.device),
               ("--threads", args.threads),
               ("--max-new-tokens", args.max_new_tokens), ("--temperature", args.temperature),
               ("--top-k", args.top_k), ("--top-p", args.top_p), ("--seed", args.seed),
               ("--repeats", args.repeats), ("--warmup", args.warmup), ("--out", args.out)]
    if args.eager:
        parts.append("--eager")
    if args.concurrency:
        parts += ["--concurrency", args.concurrency]
    if args.adaptive_drafts:
        parts.append("--adaptive-drafts")
    if args.prompt_template != DEFAULT_TEMPLATE:
        options.append(("--prompt-template", args.prompt_template))
    for flag, value in options:
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    args.out = args.out or time.strftime("runs/bench-%Y%m%d-%H%M%S")
    config = BenchConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, repeats=args.repeats, warmup=args.warmup,
                         prompt_template=args.prompt_template)
    prompts = load_prompts(args.data, args.category or None, args.per_category)
    if args.concurrency or args.adaptive_drafts:
        return _run_throughput(args, config, prompts)
    target = load_model(args.model, **model_kwargs(args))
    draft = load_draft_arg(args, target)
    result = run_bench(target, prompts, args.method or ["ar", "pld"], args.peer, draft, config,
                       progress=not args.no_progress)
    written = write_report(result, args.out, command=command_line(args))
    print(render_table(result))
    print(f"wrote {len(written)} files to {args.out}", file=sys.stderr)
    ours_failed = [label for label in result.mismatches()
                   if not next(c.peer for c in result.contenders if c.label == label)]
    for line in summary_lines(result):
        if "IDENTITY CHECK FAILED" in line:
            print(f"!!! {line}", file=sys.stderr)
    return IDENTITY_FAILURE if ours_failed else 0


def _run_throughput(args: argparse.Namespace, config: BenchConfig, prompts: list) -> int:
    from specdecode.bench.throughput import lossless_failures, parse_concurrency, run_throughput, write_throughput
    from specdecode.errors import InvalidSettingError

    if not args.concurrency:
        raise InvalidSettingError("--adaptive-drafts needs --concurrency")
    if args.peer:
        raise InvalidSettingError("--concurrency runs our methods only (transformers' assisted generation refuses "
                                  "batches): drop --peer")
    levels = parse_concurrency(args.concurrency)
    target = load_model(args.model, **model_kwargs(args))
    draft = load_draft_arg(args, target)
    rows, meta = run_throughput(target, prompts, args.method or ["ar", "pld"], levels, draft, config,
                                adaptive_drafts=args.adaptive_drafts, progress=not args.no_progress)
    written = write_throughput(rows, meta, config, len(prompts), args.out, command_line(args))
    print(written[0].read_text())
    print(f"wrote {len(written)} files to {args.out}", file=sys.stderr)
    failed = lossless_failures(rows, meta)
    if failed:
        print(f"!!! batched greedy tokens differ from solo for: {', '.join(failed)}", file=sys.stderr)
    return IDENTITY_FAILURE if failed else 0
