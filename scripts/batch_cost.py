"""The verification cost curve of a batched step (issue 28): the time of one
``TargetRunner.forward_batch`` for B requests feeding r rows each, on contexts of C tokens.

Batch-aware speculation needs it: a draft token pays when its chance of acceptance is worth more
than what its row adds to the step, and that addition grows with the rows already in the batch.

    python scripts/batch_cost.py --threads 2 --out results/serve-batch/batch_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from specdecode import load_model
from specdecode.models.runner import Readout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    target = load_model(args.model, threads=args.threads)
    runner = target.runner
    vocab = min(target.vocab_size, 32000)
    gen = torch.Generator().manual_seed(0)
    results = []
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        for batch in (int(x) for x in args.batches.split(",")):
            kvs = []
            for _ in range(batch):
                kv = runner.new_cache()
                runner.forward(kv, torch.randint(10, vocab, (args.context,), generator=gen).tolist(),
                               Readout.hidden_only())
                kvs.append(kv)
            for rows in (int(x) for x in args.rows.split(",")):
                feeds = [torch.randint(10, vocab, (rows,), generator=gen).tolist() for _ in range(batch)]
                times = []
                for repeat in range(args.repeats + 1):
                    start = time.perf_counter()
                    runner.forward_batch(kvs, feeds, [Readout(top_k=1)] * batch)
                    elapsed = time.perf_counter() - start
                    for kv in kvs:
                        kv.crop(args.context)
                    if repeat:  # the first call is a warm-up
                        times.append(elapsed)
                median = statistics.median(times)
                results.append({"requests": batch, "rows_each": rows, "total_rows": batch * rows,
                                "median_ms": round(median * 1e3, 2), "ms_per_row": round(median * 1e3 / (batch * rows), 2)})
                print(json.dumps(results[-1]), flush=True)
    out = {"model": args.model, "runtime": runner.describe(), "threads": args.threads, "context": args.context,
           "cpu": platform.processor() or platform.machine(), "load_average_1m_before_after":
           [round(load_before, 2), round(os.getloadavg()[0], 2)], "results": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
