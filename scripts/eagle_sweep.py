"""Choose ``eagle``'s draft length γ and confidence stop without the benchmark's prompts.

Greedy chain drafting is replayed with the runtime's own ``EagleProposer`` on held-out greedy
answers whose target features were recorded (``train-head``'s ``OUT/work/eval`` chunks): no target
forward runs, because greedy decoding emits the target's own text whatever is drafted. Each step
is priced with costs timed in the same process: a k-token greedy verification of the target (the
forward greedy methods run, screened head) and one head step. Prints predicted speed against
``ar`` (prefill excluded) per (γ, ``min_confidence``), best first.

    python scripts/eagle_sweep.py --head runs/head6 --eval runs/head6/work/eval --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specdecode.cli.train_head import head_forward_ms
from specdecode.distill.head_data import load_feature_chunks
from specdecode.models.cache import KVCache, forward
from specdecode.models.draft_head import load_head, pair_head
from specdecode.models.loading import load_model
from specdecode.propose.eagle import EagleProposer
from specdecode.sampling import SamplingSettings
from specdecode.search.objective import greedy_verification


def verification_ms(target, context: list[int], max_tokens: int, repeats: int = 7) -> list[float]:
    """Median ms of a k-token greedy verification after ``context``, k = 1..max_tokens."""
    kv = KVCache()
    with torch.inference_mode():
        forward(target.model, kv, context, logits_to_keep=0)
        costs = []
        for k in range(1, max_tokens + 1):
            samples = []
            for _ in range(repeats + 1):
                begin = time.perf_counter()
                greedy_verification(target.model, kv, context[-1:] * k)
                samples.append(time.perf_counter() - begin)
                kv.crop(len(context))
            costs.append(statistics.median(samples[1:]) * 1000)
    return costs


@torch.inference_mode()
def replay(head, sequences, gamma: int, min_confidence: float) -> tuple[list[int], int, int]:
    """Draft lengths per step, tokens emitted and head steps, over every answer."""
    drafts, tokens, head_steps = [], 0, 0
    for seq in sequences:
        ids, hidden = seq.ids.long().tolist(), seq.hidden.to(head.fc.weight.dtype)
        if len(ids) - seq.prompt_len < 2:
            continue
        proposer = EagleProposer(head, SamplingSettings(), None, gamma, min_confidence)
        proposer.on_prefill(hidden[: seq.prompt_len - 1])
        n = seq.prompt_len
        while n < len(ids):
            draft = proposer.propose(ids[:n], len(ids) - n).tokens
            accepted = 0
            while accepted < len(draft) and draft[accepted] == ids[n + accepted]:
                accepted += 1
            advance = min(accepted + 1, len(ids) - n)
            proposer.observe_hidden(hidden[n - 1: n - 1 + advance])
            n += advance
            drafts.append(len(draft))
            tokens += advance
        head_steps += proposer.stats.forwards
    return drafts, tokens, head_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head", required=True)
    parser.add_argument("--eval", required=True, help="feature chunks of held-out greedy answers")
    parser.add_argument("--gammas", default="2,3,4,5,6,8")
    parser.add_argument("--confidences", default="0,0.3,0.4,0.5,0.6,0.7")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    target = load_model("default", threads=args.threads)
    head = load_head(args.head).to(torch.float32)
    pair_head(target, head)
    sequences = [s for s in load_feature_chunks(args.eval, target.model.config.hidden_size) if s.prompt_len > 1]
    gammas = [int(g) for g in args.gammas.split(",")]
    context = sequences[0].ids.long().tolist()[:300]
    verify = verification_ms(target, context, max(gammas) + 1)
    step = head_forward_ms(head, sequences[0].hidden, sequences[0].ids.tolist())
    print(f"verify 1..{len(verify)} tokens (ms): {[round(v, 1) for v in verify]}; head step {step:.2f} ms")
    rows = []
    for gamma in gammas:
        for confidence in (float(c) for c in args.confidences.split(",")):
            drafts, tokens, head_steps = replay(head, sequences, gamma, confidence)
            seconds = sum(verify[d] for d in drafts) + head_steps * step
            rows.append((tokens * verify[0] / seconds, gamma, confidence, tokens / len(drafts), head_steps / len(drafts)))
    print("| γ | min_confidence | predicted vs ar | τ | head steps a round |\n|---:|---:|---:|---:|---:|")
    for speed, gamma, confidence, tau, per_round in sorted(rows, reverse=True):
        print(f"| {gamma} | {confidence} | {speed:.2f}× | {tau:.2f} | {per_round:.2f} |")


if __name__ == "__main__":
    main()
