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
from collections.abc import Callable

import torch

from specdecode.distill.evaluate import head_forward_ms
from specdecode.distill.head_data import load_feature_chunks
from specdecode.distill.train_head import replay_chain
from specdecode.models.runner import Readout
from specdecode.models.draft_head import load_head, pair_head
from specdecode.models.loading import load_model
from specdecode.search.objective import time_verification


def _numbers(kind: type) -> Callable[[str], list]:
    """An argparse type for a comma-separated list, so a typo is a one-line usage error."""
    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head", required=True)
    parser.add_argument("--eval", required=True, help="feature chunks of held-out greedy answers")
    parser.add_argument("--gammas", type=_numbers(int), default="2,3,4,5,6,8")
    parser.add_argument("--confidences", type=_numbers(float), default="0,0.3,0.4,0.5,0.6,0.7")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    target = load_model("default", threads=args.threads)
    head = load_head(args.head).to(torch.float32)
    pair_head(target, head)
    sequences = [s for s in load_feature_chunks(args.eval, target.model.config.hidden_size) if s.prompt_len > 1]
    gammas = args.gammas
    context, kv = sequences[0].ids.long().tolist()[:300], target.runner.new_cache()
    with torch.inference_mode():
        target.runner.forward(kv, context[:-1], Readout.hidden_only())
        verify = [s * 1000 for s in time_verification(target.runner, kv, context[-1], list(range(1, max(gammas) + 2)), 7)]
    step = head_forward_ms(head, sequences[0].hidden, sequences[0].ids.tolist())
    print(f"verify 1..{len(verify)} tokens (ms): {[round(v, 1) for v in verify]}; head step {step:.2f} ms")
    rows = []
    for gamma in gammas:
        for confidence in args.confidences:
            chain = replay_chain(head, sequences, gamma, confidence)
            seconds = sum(verify[d] for d in chain.drafted) + chain.head_steps * step
            rows.append((chain.tokens * verify[0] / seconds, gamma, confidence, chain.tau,
                         chain.head_steps / len(chain.drafted)))
    print("| γ | min_confidence | predicted vs ar | τ | head steps a round |\n|---:|---:|---:|---:|---:|")
    for speed, gamma, confidence, tau, per_round in sorted(rows, reverse=True):
        print(f"| {gamma} | {confidence} | {speed:.2f}× | {tau:.2f} | {per_round:.2f} |")


if __name__ == "__main__":
    main()
