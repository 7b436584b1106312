"""``specdecode train-head``: batched on-policy feature data → a trained draft head → held-out figures."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from specdecode.bench.dataset import format_prompt, held_out_per_category, read_prompts, split_holdout
from specdecode.distill.evaluate import forward_ms, head_forward_ms
from specdecode.distill.head_data import collect_head_data, load_feature_chunks
from specdecode.distill.train_head import HeadTrainSettings, evaluate_head, train_head
from specdecode.errors import InvalidSettingError
from specdecode.models.draft_head import DraftHead, load_head, pair_head
from specdecode.models.frequent_vocab import frequent_token_ids
from specdecode.models.loading import load_model
from specdecode.models.vocab_map import tokenizer_digest


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-head", help="train a feature-level draft head (EAGLE-style) for a target",
        description="Features come from one teacher-forced forward over each training prompt's text, and from "
                    "the target answering the training prompts in batches (greedy and sampled) and from BOS, "
                    "keeping its hidden states; a one-layer head is trained on them (forward KL over a reduced "
                    "vocabulary, multi-step unroll) and measured on held-out prompts. Resumable: rerun the "
                    "same command to continue.")
    parser.add_argument("--target", default="default")
    parser.add_argument("--out", required=True, help="directory to write the head to")
    parser.add_argument("--data", default="../shared/data/specbench_dev.jsonl", help="Spec-Bench style JSONL prompts")
    parser.add_argument("--holdout", type=int, default=10, help="first N prompts of every category never trained on")
    parser.add_argument("--exclude", action="append", default=[], metavar="JSONL",
                        help="prompts (by question_id) never trained on, e.g. a benchmark's held-out set (repeatable)")
    parser.add_argument("--teacher-forced", action=argparse.BooleanOptionalAction, default=True,
                        help="also take features from one teacher-forced forward over each training prompt's full "
                             "text (off-policy rows, EAGLE-1 style; default on)")
    parser.add_argument("--extra-data", action="append", default=[], metavar="DIR",
                        help="also train on the feature chunks of an earlier run (its OUT/work/data, e.g. made "
                             "with another --seed); repeatable")
    parser.add_argument("--eval-per-category", type=int, default=1, help="held-out prompts per category to measure on")
    parser.add_argument("--depth", type=int, default=1, help="decoder layers in the head (default 1)")
    parser.add_argument("--draft-vocab", type=int, default=16384, help="reduced output vocabulary (default 16384)")
    parser.add_argument("--rows", type=int, default=16, help="rows per batched generate (default 16)")
    parser.add_argument("--samples-per-prompt", type=int, default=3, help="sampled answers per prompt (+1 greedy)")
    parser.add_argument("--unconditional", type=int, default=96, help="sampled rows from BOS alone")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--data-minutes", type=float, default=25.0, help="time budget of data generation")
    parser.add_argument("--train-minutes", type=float, default=35.0, help="time budget of training")
    parser.add_argument("--max-steps", type=int, default=HeadTrainSettings.max_steps,
                        help="stop training after this many optimiser steps, if the budget lasts")
    parser.add_argument("--unroll", type=int, default=HeadTrainSettings.unroll)
    parser.add_argument("--feature-weight", type=float, default=HeadTrainSettings.feature_weight)
    parser.add_argument("--argmax-weight", type=float, default=HeadTrainSettings.argmax_weight,
                        help="weight of a cross-entropy on the target's top token, added to the KL (default 0)")
    parser.add_argument("--init", default=None, metavar="HEAD_DIR",
                        help="continue training this saved head (default-head: the shipped one); its vocabulary "
                             "replaces --draft-vocab")
    parser.add_argument("--lr", type=float, default=HeadTrainSettings.lr)
    parser.add_argument("--windows", type=int, default=HeadTrainSettings.windows)
    parser.add_argument("--window", type=int, default=HeadTrainSettings.window)
    parser.add_argument("--compare", action="append", default=[], metavar="HEAD_DIR",
                        help="also measure this saved head on the same held-out answers (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.depth < 1 or args.draft_vocab < 2 or args.holdout < 1:
        raise InvalidSettingError("--depth, --draft-vocab and --holdout must be positive")
    settings = HeadTrainSettings(budget_s=args.train_minutes * 60, max_steps=args.max_steps, unroll=args.unroll,
                                 lr=args.lr, feature_weight=args.feature_weight, argmax_weight=args.argmax_weight,
                                 windows=args.windows, window=args.window, seed=args.seed)
    settings.validate()  # before minutes of data generation, not after
    started = time.perf_counter()
    train_prompts, held_out = split_holdout(read_prompts(args.data), args.holdout)
    excluded = {p.question_id for path in args.exclude for p in read_prompts(path)}
    train_prompts = [p for p in train_prompts if p.question_id not in excluded]
    if not train_prompts:
        raise InvalidSettingError(f"--holdout {args.holdout} leaves no training prompts in {args.data}")
    target = load_model(args.target, threads=args.threads)
    if target.tokenizer is None:
        raise InvalidSettingError(f"target {args.target!r} has no tokenizer")
    init = None
    if args.init:  # refused before the data stage, not after it
        init = load_head(args.init).to(next(target.model.parameters()).dtype)
        pair_head(target, init)
    extra = [s for d in args.extra_data for s in load_feature_chunks(d, target.model.config.hidden_size)]
    encode = lambda prompts: [list(target.tokenizer(format_prompt(p))["input_ids"]) for p in prompts]  # noqa: E731
    out, work = Path(args.out), Path(args.out) / "work"
    progress = not args.no_progress
    data_started = time.perf_counter()
    sequences = collect_head_data(target, encode(train_prompts), work / "data", rows=args.rows,
                                  samples_per_prompt=args.samples_per_prompt, unconditional=args.unconditional,
                                  max_new_tokens=args.max_new_tokens, budget_s=args.data_minutes * 60,
                                  seed=args.seed, progress=progress,
                                  teacher_forced=encode(train_prompts) if args.teacher_forced else None)
    sequences += extra
    data_seconds = time.perf_counter() - data_started
    evaluation = held_out_per_category(held_out, args.eval_per_category)
    eval_sequences = collect_head_data(target, encode(evaluation), work / "eval", rows=args.rows, samples_per_prompt=0,
                                       unconditional=0, max_new_tokens=64, seed=args.seed, progress=progress)
    torch.manual_seed(args.seed)
    if init is not None:
        head, vocab = init, init.vocab_ids.tolist()
    else:
        vocab = frequent_token_ids([s.ids.tolist() for s in sequences], min(args.draft_vocab, target.vocab_size),
                                   always_include=sorted(target.eos_token_ids)).tolist()
        head = DraftHead.from_target(target, vocab, depth=args.depth, tokenizer_sha=tokenizer_digest(target.tokenizer))
    before = evaluate_head(head, eval_sequences)
    log = train_head(head, sequences, settings, checkpoint=work / "checkpoint.pt", progress=progress)
    after = evaluate_head(head, eval_sequences)
    compared = {}
    for path in args.compare:
        other = load_head(path)
        pair_head(target, other)
        compared[str(path)] = evaluate_head(other, eval_sequences)
    report = {
        "target": target.name, "target_fingerprint": target.fingerprint, "train_prompts": len(train_prompts),
        "excluded_prompts": sorted(excluded, key=str), "extra_data": args.extra_data,
        "sequences": len(sequences), "positions": sum(len(s.hidden) for s in sequences),
        "teacher_forced_sequences": sum(s.prompt_len == 0 for s in sequences),
        "teacher_forced_positions": sum(len(s.hidden) for s in sequences if s.prompt_len == 0),
        "answer_tokens": sum(len(s.ids) - s.prompt_len for s in sequences),
        "data_seconds_this_run": round(data_seconds, 1), "train_steps": log.steps,
        "train_seconds": round(log.seconds, 1), "train_positions_seen": log.positions,
        "loss_first_last": [log.losses[0], sum(log.losses[-20:]) / len(log.losses[-20:])] if log.losses else None,
        # one batch's KL swings by ±0.7: the mean of the last ten logged batches (every 10th step)
        "kl_by_unroll_step_last_10": [round(sum(k) / len(k), 4) for k in zip(*log.kl_by_step[-10:])] or None,
        "eval_prompts": len(eval_sequences), "untrained": before, "held_out": after, "compared": compared,
        "head_forward_ms": round(head_forward_ms(head, eval_sequences[0].hidden, eval_sequences[0].ids.tolist()), 2),
        "target_forward_ms": round(forward_ms(target, eval_sequences[0].ids.tolist()), 2),
        "settings": asdict(settings), "vocab_size": len(vocab), "depth": args.depth,
        "command": " ".join(sys.argv), "total_seconds_this_run": round(time.perf_counter() - started, 1),
    }
    report["head_cost_ratio"] = round(report["head_forward_ms"] / report["target_forward_ms"], 3)
    head.save(out, extra={"training": report})
    (out / "train_log.json").write_text(json.dumps({"losses": log.losses, "kl_by_step": log.kl_by_step}))
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out}: " + json.dumps({k: report[k] for k in ("held_out", "compared", "head_cost_ratio", "positions")}),
          file=sys.stderr)
    return 0
