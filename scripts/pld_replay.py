"""Replay prompt-lookup drafting variants on recorded greedy outputs: τ without a model forward.

Greedy speculative decoding emits exactly ``ar``'s tokens, so how many tokens an n-gram drafter
gets accepted at each step follows from ``ar``'s output alone: the draft is compared with the
tokens ``ar`` produced next. This script generates (or reuses) the greedy ``ar`` continuations of
a prompt file once, then replays every variant of the drafter on them — which occurrence of the
n-gram to copy from (``first``: the earliest, as the reference implementation, `transformers` and
llama.cpp do; ``last``: the most recent), the longest n-gram tried and the draft length — and
prints τ and the rows verified per step by category. With ``--cost`` (a ``forward_cost.py`` JSON)
it also estimates each variant's decoding time from the measured cost of a forward of r tokens
(the fast mode's layers, and its head screened 4 rows at a time up to the block of the first
mismatch), including ``adaptive`` draft lengths: longer after a fully accepted draft, shorter
after a rejection.

Usage: python scripts/pld_replay.py PROMPTS.jsonl [--max-new-tokens 64] [--cache FILE] [--threads N]
       [--cost results/forward-cost/forward_cost.json]
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
    done = {row["key"]: row for row in map(json.loads, filter(None, cache.read_text(encoding="utf-8").split("\n")))} if cache.is_file() else {}
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


class StepCost:
    """Milliseconds of a greedy verification of r rows whose first mismatch is row a (0-based; a == r − 1
    when every draft token was accepted), interpolated from a ``forward_cost.py`` table."""

    def __init__(self, path: str, mode: str = "float32 fast (exact)", block: int = 4) -> None:
        rows = json.loads(Path(path).read_text())["modes"][mode]["rows"]
        self.tokens = [row["tokens"] for row in rows]
        self.layers = [row["layers_ms"] for row in rows]
        self.head = [row["head_ms"] for row in rows]
        self.block = block

    def _at(self, values: list[float], rows: int) -> float:
        for (t0, v0), (t1, v1) in zip(zip(self.tokens, values), zip(self.tokens[1:], values[1:])):
            if rows <= t1:
                return v0 + (v1 - v0) * (rows - t0) / (t1 - t0)
        return values[-1] * rows / self.tokens[-1]

    def __call__(self, rows: int, first_mismatch: int) -> float:
        screened = min(rows, self.block * (first_mismatch // self.block + 1))
        full_blocks, rest = divmod(screened, self.block)
        head = full_blocks * self._at(self.head, self.block) + (self._at(self.head, rest) if rest else 0.0)
        return self._at(self.layers, rows) + head


def replay(proposer: NgramProposer, prompt_ids: list[int], output_ids: list[int], cost: StepCost | None = None,
           adaptive: tuple[int, int] | None = None) -> tuple[int, int, float]:
    """(target forwards, rows verified, estimated ms) that greedy decoding with ``proposer`` takes
    for ``output_ids``; ``adaptive = (shortest, longest)`` grows the draft length by 2 after a fully
    accepted draft and sets it to the accepted length + 1 (at least ``shortest``) otherwise."""
    sequence, produced, forwards, rows, elapsed = list(prompt_ids), 0, 0, 0, 0.0
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
        if cost is not None:
            elapsed += cost(len(draft) + 1, accepted)
        if adaptive is not None and draft:
            shortest, longest = adaptive
            full = accepted == len(draft)
            proposer.num_tokens = min(longest, proposer.num_tokens + 2) if full else max(shortest, accepted + 1)
    return forwards, rows, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--cache", default=None, help="JSONL of generated outputs (default: next to the prompts)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cost", default=None, help="forward_cost.py JSON: also estimate decoding time")
    args = parser.parse_args()
    cost = StepCost(args.cost) if args.cost else None
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(args.cache or Path(args.prompts).with_suffix(".greedy-outputs.jsonl"))
    rows = greedy_outputs(args.prompts, args.max_new_tokens, cache)
    categories = sorted({row["category"] for row in rows})
    print(f"\n{len(rows)} prompts, {args.max_new_tokens} tokens each; τ by category, then mean rows per verification\n")
    estimate = " estimated decode s | vs `ar` |" if cost else ""
    print("| match | max n-gram | γ | " + " | ".join(categories) + " | overall τ | rows/step |" + estimate)
    print("|---|---:|---:|" + "---:|" * (len(categories) + 2) + ("---:|---:|" if cost else ""))
    ar_seconds = sum(len(row["output_ids"]) for row in rows) * cost(1, 0) / 1000 if cost else 0.0
    variants = [(m, n, g, None) for m, n, g in itertools.product(("last", "first"), (2, 3, 4), (7, 10))]
    variants += [("last", 3, "4…16", (4, 16)), ("last", 3, "2…16", (2, 16))]
    for match, max_ngram, gamma, adaptive in variants:
        per_category: dict[str, list[tuple[int, int, int, float]]] = defaultdict(list)
        for row in rows:
            proposer = NgramProposer(adaptive[0] if adaptive else gamma, max_ngram, match=match)
            forwards, verified, elapsed = replay(proposer, row["prompt_ids"], row["output_ids"], cost, adaptive)
            per_category[row["category"]].append((len(row["output_ids"]), forwards, verified, elapsed))
        def tau(items):
            return sum(i[0] for i in items) / sum(i[1] for i in items)
        everything = [item for items in per_category.values() for item in items]
        cells = " | ".join(f"{tau(per_category[c]):.2f}" for c in categories)
        rows_per_step = statistics.fmean(i[2] / i[1] for i in everything)
        timing = ""
        if cost:
            seconds = sum(i[3] for i in everything) / 1000
            timing = f" {seconds:.1f} | {ar_seconds / seconds:.2f}× |"
        print(f"| {match} | {max_ngram} | {gamma} | {cells} | {tau(everything):.2f} | {rows_per_step:.1f} |{timing}")


if __name__ == "__main__":
    main()
