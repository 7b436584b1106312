"""Where `eagle-mtad`'s rounds fail: each round's first draft token against the target's nucleus,
and the accepted length the same drafts would get under other thresholds.

Wraps `JointRatioAcceptance.__call__` and `HeadDrafter.root` for the run (a diagnostic, not a
benchmark: timings are not read). Chains only (`tree=false`).

    python scripts/mtad_rounds.py --data results/prompts/tune-14.jsonl --option gamma=4 --option min_joint=0
"""

from __future__ import annotations

import argparse
import math

import torch

from specdecode import SpeculativeDecoder, load_model
from specdecode.accept.joint_ratio import JointRatioAcceptance
from specdecode.bench.dataset import format_prompt, read_prompts
from specdecode.methods import parse_option_value
from specdecode.propose.eagle import HeadDrafter
from specdecode.sampling import process_logits

THRESHOLDS = (0.5, 0.3, 0.1, 0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="results/prompts/tune-14.jsonl")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="eagle-mtad option")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    options = {key: parse_option_value(value) for key, value in (o.split("=", 1) for o in args.option)}

    head_top: dict[str, list[int]] = {}
    rounds: list[dict] = []
    root, rule = HeadDrafter.root, JointRatioAcceptance.__call__

    def watched_root(self, sequence):
        logits = root(self, sequence)
        head_top["ids"] = [] if logits is None else self.to_target(logits.topk(3).indices).tolist()
        return logits

    def watched_rule(self, draft, target_logits):
        if len(draft) and draft.parents is None and head_top.get("ids"):
            p = process_logits(target_logits, self.sampling)
            log_p = torch.log(p[torch.arange(len(draft)), torch.tensor(draft.tokens)])
            rounds.append(dict(ratio=torch.cumsum(log_p - draft.log_q.to(log_p), 0).tolist(),
                               first_in=bool(p[0, draft.tokens[0]] > 0),
                               top1_in=bool(p[0, head_top["ids"][0]] > 0),
                               top3_in=any(bool(p[0, t] > 0) for t in head_top["ids"]),
                               first_is_top1=draft.tokens[0] == head_top["ids"][0]))
        return rule(self, draft, target_logits)

    HeadDrafter.root, JointRatioAcceptance.__call__ = watched_root, watched_rule
    decoder = SpeculativeDecoder(load_model("default", threads=args.threads), "eagle-mtad", **options)
    for i, prompt in enumerate(read_prompts(args.data)):
        decoder.generate(format_prompt(prompt), max_new_tokens=args.max_new_tokens, temperature=1.0, top_k=10,
                         top_p=0.9, seed=i)
    n = len(rounds)
    share = {key: sum(r[key] for r in rounds) / n for key in ("first_in", "top1_in", "top3_in", "first_is_top1")}
    print(f"{n} rounds · first draft token inside the target's nucleus {share['first_in']:.0%} · the head's "
          f"top-1 inside {share['top1_in']:.0%} · any of its top 3 {share['top3_in']:.0%} · first token = "
          f"head's top-1 {share['first_is_top1']:.0%}")
    for threshold in THRESHOLDS:
        accepted = [max((i + 1 for i, r in enumerate(r["ratio"]) if r > math.log(threshold)), default=0)
                    for r in rounds]
        print(f"threshold {threshold}: τ {1 + sum(accepted) / n:.2f} on the same drafts, "
              f"{sum(a == 0 for a in accepted) / n:.0%} of rounds accept nothing")


if __name__ == "__main__":
    main()
