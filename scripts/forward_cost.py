"""Forward cost of the target per dtype and tokens-per-forward, split into layers and LM head.

Usage: python scripts/forward_cost.py [--model default] [--context 200] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specdecode import load_model
from specdecode.models.cache import KVCache, forward


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print("| dtype | tokens | full forward ms | layers only ms |")
    print("|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        target = load_model(args.model, dtype=dtype)
        kv = KVCache()
        with torch.inference_mode():
            forward(target.model, kv, [1] * args.context, logits_to_keep=0)
            for n in (1, 4, 8):
                ids = [1] * n

                def full(ids=ids):
                    forward(target.model, kv, ids, logits_to_keep=len(ids))
                    kv.crop(args.context)

                def layers(ids=ids):
                    forward(target.model, kv, ids, logits_to_keep=0)
                    kv.crop(args.context)

                print(f"| {dtype} | {n} | {median_ms(full, args.repeats):.1f} | {median_ms(layers, args.repeats):.1f} |")


if __name__ == "__main__":
    main()
