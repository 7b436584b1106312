"""Flags shared by several subcommands, and their translation into library arguments."""

from __future__ import annotations

import argparse
from typing import Any

from specdecode.errors import InvalidSettingError
from specdecode.methods import parse_option_value
from specdecode.models.loading import DRAFT_QUANTIZE, LoadedModel, load_draft


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument("--model", default="default", help="target: 'default', a .gguf file, a directory or hub id")
    group.add_argument("--draft", default=None,
                       help="draft model for sps / mtad: 'default-draft' (shipped for the default target) or the forms of --model")
    group.add_argument("--dtype", default=None,
                       help="float32 (default), bfloat16, float16, float64, or auto: bf16 on CUDA; on a CPU "
                            "whichever of float32 and bf16 runs this model faster here (timed once, cached)")
    group.add_argument("--quantize", default=None, choices=["fp16", "int8"],
                       help="run the linear layers on float16 or int8 weights (CPU, fbgemm): faster, a different target")
    group.add_argument("--draft-quantize", default="auto", choices=DRAFT_QUANTIZE,
                       help="the draft's weights: auto (as loaded or float16 copies, whichever runs its steps faster "
                            "here; timed at load), none, fp16, int8 — a speed choice: the target's output is unchanged")
    group.add_argument("--eager", action="store_true",
                       help="the model's own kernels and forward: no fast CPU runtime "
                            "(screened head, tuned products, native decoder)")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when present)")
    group.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=int, default=128)
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    group.add_argument("--top-k", type=int, default=0, help="0 = off")
    group.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")


def add_method_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method options (only those the method takes)")
    group.add_argument("--gamma", type=int, default=None, help="draft length (sps, pld)")
    group.add_argument("--adaptive-gamma", action="store_true", default=None, help="adapt the draft length (sps)")
    group.add_argument("--max-ngram", type=int, default=None, help="longest n-gram to look up (pld)")
    group.add_argument("--min-ngram", type=int, default=None, help="shortest n-gram to look up (pld)")
    group.add_argument("--beams", type=int, default=None, help="beam width B of the joint draft (mtad, mtjd)")
    group.add_argument("--threshold", type=float, default=None,
                       help="acceptance threshold tau on the joint ratio (mtad); draft confidence stop (ssd)")
    group.add_argument("--profile", default=None, metavar="PATH", help="saved profile of a searched method (ssd)")
    group.add_argument("--bundle", default=None, metavar="DIR", help="KNN-SSD bundle from build-knn (knn-ssd)")
    group.add_argument("--head", default=None, metavar="DIR",
                       help="draft head from train-head, or 'default-head' (eagle, eagle-tree, eagle-mtad)")
    group.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="any other method option, e.g. --option threshold=0.5 (repeatable)")


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop=tuple(args.stop), stop_at_eos=not args.ignore_eos)


def method_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Method options the user actually set (so methods never see options they do not take)."""
    named = ("gamma", "adaptive_gamma", "max_ngram", "min_ngram", "beams", "threshold", "profile", "bundle", "head")
    options = {name: getattr(args, name) for name in named if getattr(args, name, None) is not None}
    for item in args.option:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InvalidSettingError(f"--option expects KEY=VALUE, got {item!r}")
        options[key.replace("-", "_")] = parse_option_value(raw)
    return options


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(dtype=args.dtype, device=args.device, threads=args.threads, quantize=args.quantize,
                fast=not args.eager)


def load_draft_arg(args: argparse.Namespace, target: LoadedModel) -> LoadedModel | None:
    """``--draft`` for ``target`` on the weights ``--draft-quantize`` names (None without ``--draft``)."""
    if not args.draft:
        return None
    load = {key: value for key, value in model_kwargs(args).items() if key != "quantize"}
    return load_draft(args.draft, target, quantize=args.draft_quantize, **load)
