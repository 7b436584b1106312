"""``specdecode distill-draft``: train a small reduced-vocabulary draft for a target by distillation."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from specdecode.bench.dataset import format_prompt, held_out_per_category, read_prompts, split_holdout
from specdecode.distill.evaluate import forward_ms, greedy_agreement
from specdecode.distill.recipe import distill_draft
from specdecode.distill.train import TrainSettings
from specdecode.errors import InvalidSettingError
from specdecode.models.loading import load_model, pair_draft


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "distill-draft", help="distil a small draft model for a target",
        description="Answer training prompts with the target, then train a few of its layers over a "
                    "reduced vocabulary to match its next-token distributions (forward KL). Resumable: "
                    "rerun the same command to continue. Held-out prompts measure the result.")
    parser.add_argument("--target", default="default", help="target: 'default', a .gguf file, a directory or hub id")
    parser.add_argument("--out", required=True, help="directory to write the draft to")
    parser.add_argument("--data", default="../shared/data/specbench_dev.jsonl", help="Spec-Bench style JSONL prompts")
    parser.add_argument("--holdout", type=int, default=10,
                        help="first N prompts of every category are held out for evaluation (default 10)")
    parser.add_argument("--eval-per-category", type=int, default=5, help="held-out prompts per category to measure on")
    parser.add_argument("--layers", default="0,17", help="target layers the draft keeps (default 0,17)")
    parser.add_argument("--draft-vocab", type=int, default=8192, help="reduced vocabulary size (default 8192)")
    parser.add_argument("--samples-per-prompt", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="teacher answer length")
    parser.add_argument("--max-sequences", type=int, default=None,
                        help="answer only the first N (shuffled) prompt samples: a time budget for the teacher")
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    parser.add_argument("--lr", type=float, default=TrainSettings.lr)
    parser.add_argument("--train-head", action="store_true",
                        help="also train the output rows (default: frozen at the target's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        raise InvalidSettingError(f"--layers expects comma-separated layer indices, got {args.layers!r}") from None
    if args.max_sequences is not None and args.max_sequences < 1:
        raise InvalidSettingError(f"--max-sequences must be >= 1, got {args.max_sequences}")
    for name in ("holdout", "draft_vocab", "samples_per_prompt", "max_new_tokens"):
        if getattr(args, name) < (0 if name == "holdout" else 1):
            raise InvalidSettingError(f"--{name.replace('_', '-')} is out of range: {getattr(args, name)}")
    train_prompts, held_out = split_holdout(read_prompts(args.data), args.holdout)
    if not train_prompts:
        raise InvalidSettingError(f"--holdout {args.holdout} leaves no training prompts in {args.data}")
    target = load_model(args.target, threads=args.threads)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             train_head=args.train_head)
    out, log = distill_draft(target, [format_prompt(p) for p in train_prompts], args.out, layers=layers,
                             vocab_size=args.draft_vocab, samples_per_prompt=args.samples_per_prompt,
                             max_new_tokens=args.max_new_tokens, max_sequences=args.max_sequences, train=settings,
                             progress=not args.no_progress)
    report = {"train_prompts": len(train_prompts), "loss_last": sum(log.losses[-20:]) / len(log.losses[-20:])}
    evaluation = held_out_per_category(held_out, args.eval_per_category)
    if evaluation:
        draft = load_model(out, threads=args.threads)
        pair_draft(target, draft)
        ids = [list(target.tokenizer(format_prompt(p))["input_ids"]) for p in evaluation]
        report |= {"eval_prompts": len(ids), "greedy_agreement": round(greedy_agreement(target, draft, ids), 4),
                   "draft_forward_ms": round(forward_ms(draft, ids[0]), 2),
                   "target_forward_ms": round(forward_ms(target, ids[0]), 2)}
        report["cost_ratio"] = round(report["draft_forward_ms"] / report["target_forward_ms"], 3)
    (Path(out) / "eval.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in report.items()), file=sys.stderr)
    return 0
