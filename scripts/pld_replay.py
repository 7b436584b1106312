"""Replay prompt-lookup drafting variants on recorded greedy outputs: τ without a model forward.

Greedy speculative decoding emits exactly ``ar``'s tokens, so how many tokens an n-gram drafter
gets accepted at each step follows from ``ar``'s output alone: the draft is compared with the
tokens ``ar`` produced next. This script generates (or reuses) the greedy ``ar`` continuations of
a prompt file once, then replays every variant of the drafter on them — which occurrence of the
n-gram to copy from (``first``: the earliest, as the reference implementation, `transformers` and
llama.cpp do; ``last``: the most recent), the longest n-gram tried and the draft length — and
prints τ and the rows verified per step by category.

Usage: python scripts/pld_replay.py PROMPTS.jsonl [--max-new-tokens 64] [--cache FILE] [--threads N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from specdecode import SpeculativeDecoder, load_model
from specdecode.bench.dataset import format_prompt, read_prompts
from specdecode.propose.ngram import NgramProposer


def greedy_outputs(prompts_path: str, max_new: int, cache: Path) -> list[dict]:
    """``[{category, prompt_ids, output_ids}]`` for every prompt, generated once and cached."""
    done = {row["key"]: row for row in map(json.loads, cache.read_text().splitlines())} if cache.is_file() else {}
    target = None
    rows = []
    for prompt in read_prompts(prompts_path):
        key = f"{prompt.question_id}|{prompt.category}|{max_new}"
        if key not in done:
            target = target or load_model("default")
            ids = list(target.tokenizer(format_prompt(prompt))["input_ids"])
            out = SpeculativeDecoder(target, "ar").generate(ids, max_new_tokens=max_new, stop_at_eos=False)
            done[key] = dict(key=key, category=prompt.category, prompt_ids=ids, output_ids=out.token_ids)
            with cache.open("a") as handle:
                handle.write(json.dumps(done[key]) + "\n")
            print(f"generated {len(done)} ({prompt.category})", flush=True)
        rows.append(done[key])
    return rows


def replay(proposer: NgramProposer, prompt_ids: list[int], output_ids: list[int]) -> tuple[int, int]:
    """(target forwards, rows verified) that greedy decoding with ``proposer`` takes for ``output_ids``."""
    sequence, produced, forwards, rows = list(prompt_ids), 0, 0, 0
    while produced < len(output_ids):
        room = len(output_ids) - produced
        draft = proposer.propose(sequence, max_tokens=room - 1).tokens
        accepted = 0
        while accepted < len(draft) and draft[accepted] == output_ids[produced + accepted]:
            accepted += 1
        new = output_ids[produced:produced + accepted + 1]
        sequence.extend(new)
        produced += len(new)
        forwards += 1
        rows += len(draft) + 1
    return forwards, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--cache", default=None, help="JSONL of generated outputs (default: next to the prompts)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(args.cache or Path(args.prompts).with_suffix(".greedy-outputs.jsonl"))
    rows = greedy_outputs(args.prompts, args.max_new_tokens, cache)
    categories = sorted({row["category"] for row in rows})
    print(f"\n{len(rows)} prompts, {args.max_new_tokens} tokens each; τ by category, then mean rows per verification\n")
    print("| match | max n-gram | γ | " + " | ".join(categories) + " | overall τ | rows/step |")
    print("|---|---:|---:|" + "---:|" * (len(categories) + 2))
    for match, max_ngram, gamma in itertools.product(("last", "first"), (2, 3, 4), (7, 10)):
        per_category: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
        for row in rows:
            proposer = NgramProposer(gamma, max_ngram, match=match)
            forwards, verified = replay(proposer, row["prompt_ids"], row["output_ids"])
            per_category[row["category"]].append((len(row["output_ids"]), forwards, verified))
        def tau(items):
            return sum(i[0] for i in items) / sum(i[1] for i in items)
        everything = [item for items in per_category.values() for item in items]
        cells = " | ".join(f"{tau(per_category[c]):.2f}" for c in categories)
        rows_per_step = statistics.fmean(i[2] / i[1] for i in everything)
        print(f"| {match} | {max_ngram} | {gamma} | {cells} | {tau(everything):.2f} | {rows_per_step:.1f} |")


if __name__ == "__main__":
    main()
