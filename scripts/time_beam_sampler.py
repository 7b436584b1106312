"""Time MTAD's beam sampler per drafting round: draft-model forwards vs the sampler's own bookkeeping.

Wraps ``BeamSampleProposer.propose`` and the drafters' ``root`` / ``extend`` at class level, so it
measures any version of the sampler the same way (bookkeeping = propose time − drafter calls,
which include the drafter's own tree-mask construction). Also prints a digest of the generated
tokens: with the same seed, a rewrite that keeps random-number consumption gives the same digest.

    .venv/bin/python scripts/time_beam_sampler.py --prompts 4 --tokens 48 --threads 2

Keep it small: on the 2-core dev box 4 prompts x 48 tokens x 2 methods takes ~1-2 minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from collections import defaultdict

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="/work/shared/data/specbench_dev.jsonl")
    parser.add_argument("--methods", default="mtad,eagle-mtad")
    parser.add_argument("--options", default="", help="method options for every method, e.g. tree=true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from specdecode import SpeculativeDecoder, load_model
    from specdecode.methods import parse_option_value
    from specdecode.propose import beam_sampler
    from specdecode.propose.eagle import HeadDrafter

    clock = time.perf_counter
    acc: dict[str, float] = defaultdict(float)

    def timed(cls, name, key):
        inner = getattr(cls, name)

        def wrapper(self, *a, **k):
            t0 = clock()
            try:
                return inner(self, *a, **k)
            finally:
                acc[key] += clock() - t0
        setattr(cls, name, wrapper)

    timed(beam_sampler.BeamSampleProposer, "propose", "propose_s")
    for cls in (beam_sampler.ModelDrafter, HeadDrafter):
        timed(cls, "root", "forward_s")
        timed(cls, "extend", "forward_s")

    target = load_model("default", threads=args.threads)
    draft = load_model("default-draft", threads=args.threads)
    prompts = []
    with open(args.data) as handle:
        rows = [json.loads(line) for line in handle]
    # spread over categories: every len/n-th row
    step = max(1, len(rows) // args.prompts)
    for row in rows[::step][: args.prompts]:
        prompts.append(row["turns"][0])
    options = dict(kv.split("=", 1) for kv in args.options.split(",") if kv)
    options = {k: parse_option_value(v) for k, v in options.items()}
    print(f"cpu: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}")
    for method in args.methods.split(","):
        decoder = SpeculativeDecoder(target, method, draft=draft if method == "mtad" else None, **options)
        decoder.generate(prompts[0], max_new_tokens=8, seed=args.seed, temperature=1.0, top_k=10, top_p=0.9)  # warm
        acc.clear()
        rounds, new_tokens, total, extra = 0, 0, 0.0, defaultdict(float)
        digest = hashlib.sha256()
        for i, prompt in enumerate(prompts):
            result = decoder.generate(prompt, max_new_tokens=args.tokens, seed=args.seed + i,
                                      temperature=1.0, top_k=10, top_p=0.9)
            stats = result.stats
            rounds += stats.target_forwards
            new_tokens += stats.new_tokens
            total += stats.total_s
            for key, value in stats.extra.items():
                if key.startswith("draft_") and isinstance(value, (int, float)):
                    extra[key] += value
            digest.update(str(result.token_ids).encode())
        bookkeeping = acc["propose_s"] - acc["forward_s"]
        print(f"{method} {args.options or ''}: {rounds} rounds, {new_tokens} tokens, tau {new_tokens / rounds:.2f}, "
              f"total {total:.2f}s; per round: propose {1e3 * acc['propose_s'] / rounds:.2f} ms, "
              f"drafter calls {1e3 * acc['forward_s'] / rounds:.2f} ms, "
              f"sampler bookkeeping {1e3 * bookkeeping / rounds:.2f} ms; tokens sha {digest.hexdigest()[:12]}")
        if extra:
            print("  stats.extra per round: " + ", ".join(f"{k} {1e3 * v / rounds:.2f} ms" for k, v in sorted(extra.items())))


if __name__ == "__main__":
    main()
