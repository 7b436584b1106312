"""What ``min_joint`` (MTAD's adaptive depth) would buy, read exactly off one multi-candidate run.

With ``tree=true`` every level's beams are verified together, and stopping after level L leaves
the first L levels of the tree exactly as drawn (the draws up to the stop are the same:
tests/test_beam_sampler.py::test_min_joint_stops_at_the_first_level_below_it) and the rule's
verdict restricted to them: the deepest passing node of depth <= L (a node's pass depends only on
its own path and the best draft joint at its depth, which truncation keeps). So one full-depth run
gives, per round and for every threshold, the levels drafted and the tokens accepted — paired, on
the same contexts, free of timing noise; likewise every smaller fixed depth (a depth-d run draws
the same first d levels). Costs are left as counts: head steps (levels) and verified tree tokens.

    .venv/bin/python scripts/mtad_depth_analysis.py --prompts 6 --tokens 48 --method eagle-mtad
"""

from __future__ import annotations

import argparse
import json
import math

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--method", default="eagle-mtad")
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--data", default="/work/shared/data/specbench_dev.jsonl")
    parser.add_argument("--skip", type=int, default=0, help="start at this prompt of the spread (held-out split)")
    parser.add_argument("--thresholds", default="0,0.001,0.003,0.01,0.02,0.05,0.1,0.2,0.3")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from specdecode import SpeculativeDecoder, load_model
    from specdecode.accept.joint_ratio import JointRatioAcceptance

    rounds: list[tuple[list[float], list[int]]] = []  # per round: best joint log q per level, passing depths
    inner = JointRatioAcceptance._tree

    def record(self, draft, p):
        step_log_p = torch.log(p[torch.tensor(draft.parents), torch.tensor(draft.tokens)]).tolist()
        depth, log_p, log_q = [0], [0.0], [0.0]
        for parent, lp, lq in zip(draft.parents, step_log_p, draft.log_q.tolist()):
            depth.append(depth[parent] + 1)
            log_p.append(log_p[parent] + lp)
            log_q.append(log_q[parent] + lq)
        levels = max(depth)
        best = [max(log_q[n] for n in range(1, len(depth)) if depth[n] == d) for d in range(1, levels + 1)]
        passing = [depth[n] for n in range(1, len(depth)) if log_p[n] - best[depth[n] - 1] > self.log_threshold]
        rounds.append((best, passing))
        return inner(self, draft, p)

    JointRatioAcceptance._tree = record
    target = load_model("default", threads=args.threads)
    draft = load_model("default-draft", threads=args.threads) if args.method == "mtad" else None
    with open(args.data) as handle:
        rows = [json.loads(line) for line in handle]
    step = max(1, len(rows) // (args.prompts + args.skip))
    prompts = [row["turns"][0] for row in rows[::step][args.skip: args.skip + args.prompts]]
    decoder = SpeculativeDecoder(target, args.method, draft=draft, beams=args.beams, gamma=args.gamma, tree=True)
    tokens = 0
    for i, prompt in enumerate(prompts):
        for seed in range(args.seeds):
            result = decoder.generate(prompt, max_new_tokens=args.tokens, seed=1000 * seed + i,
                                      temperature=1.0, top_k=10, top_p=0.9)
            tokens += result.stats.new_tokens
    full = [r for r in rounds if len(r[0]) == args.gamma]  # rounds cut short by max_new_tokens left out
    print(f"{args.method} tree B {args.beams} gamma {args.gamma}: {len(prompts)} prompts x {args.seeds} seeds, "
          f"{len(full)} full-depth rounds of {len(rounds)}; T 1 top-k 10 top-p 0.9")
    print("gamma  min_joint  levels  tree tokens  tau (1 + accepted)")
    for cap in range(1, args.gamma + 1):  # a depth-cap run draws the same first levels: exact too
        for threshold in (float(t) for t in args.thresholds.split(",")):
            levels_sum = accepted_sum = 0
            for best, passing in full:
                levels = cap
                if threshold:
                    below = [d for d, value in enumerate(best[:cap], start=1) if value < math.log(threshold)]
                    levels = below[0] if below else cap
                levels_sum += levels
                accepted_sum += max((d for d in passing if d <= levels), default=0)
            n = len(full)
            levels = levels_sum / n
            tau = 1 + accepted_sum / n
            print(f"{cap:5d}  {threshold:9g}  {levels:6.2f}  {1 + args.beams * levels:11.2f}  {tau:18.3f}")

if __name__ == "__main__":
    main()
