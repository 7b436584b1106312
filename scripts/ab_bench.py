"""A/B speed of two checkouts of specdecode on the same prompts, interleaved in one run.

A refactor that promises "no behaviour change" has to show it: each checkout gets a worker process
(its ``src/`` first on the path, the same venv otherwise) that loads the model once; the driver
then asks the two workers in turn to generate each (method, prompt), alternating which goes first,
so drift of a noisy machine hits both alike (and the methods take turns, prompt by prompt or wave by
wave, so that ratios between methods on one side are interleaved too). Reports per method the summed
seconds of each side (end to end, and without the prefill),
the ratio B/A, whether the tokens were identical, and ``ar`` measured twice per side (the noise).

Usage:
    git worktree add /tmp/specdecode-before <commit>
    python scripts/ab_bench.py /tmp/specdecode-before . --data results/prompts/heldout-12.jsonl \
        --method ar --method pld --method eagle ... [--max-new-tokens 64] [--threads 2] [--dtype bfloat16]
        [--sampling 1.0,10,0.9] [--json OUT]

``--sampling T,TOP_K,TOP_P`` samples instead of decoding greedily, each prompt under its own seed (its
index), the same on both sides: an exact change keeps the tokens identical there too.

``--concurrency C`` decodes the prompts in waves of C, together (``engine/batch.py``'s
``BatchStepper``, with ``--adaptive-drafts`` its batch-aware draft budgets), and times each wave:
for changes to batched decoding.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from specdecode import SpeculativeDecoder, load_model
torch.set_num_threads(int(sys.argv[2]))
target = load_model("default", dtype=sys.argv[3])
decoders = {}
memories = {}
print(json.dumps({"ready": True, "file": __import__("specdecode").__file__}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    key = (job["method"], json.dumps(job["options"], sort_keys=True))
    if key not in decoders:
        options = dict(job["options"])
        if "draft" in options:
            options["draft"] = load_model(options["draft"], dtype=sys.argv[3])
        decoders[key] = SpeculativeDecoder(target, job["method"], **options)
        decoders[key].generate("Warm up.", max_new_tokens=8)
    start = time.perf_counter()
    if len(job["prompts"]) == 1:
        result = decoders[key].generate(job["prompts"][0], max_new_tokens=job["max_new_tokens"], **job["sampling"])
        tokens, prefill = [result.token_ids], result.stats.prefill_s
    else:
        from specdecode.engine import batch as batch_module
        from specdecode.engine.batch import BatchStepper
        sampling = dict(job["sampling"])
        seed = sampling.pop("seed")
        wave = [decoders[key].start(prompt, max_new_tokens=job["max_new_tokens"], seed=seed + i, **sampling)
                for i, prompt in enumerate(job["prompts"])]
        # what the steps learn, kept across a decoder's waves as a server keeps it (a checkout before
        # BatchMemory relearns it each wave)
        learnt = {"memory": memories.setdefault(key, batch_module.BatchMemory())} if hasattr(batch_module, "BatchMemory") else {}
        stepper = BatchStepper(wave, adaptive_drafts=job["adaptive"], **learnt)
        stepper.prefill_pending()
        prefill = time.perf_counter() - start
        stepper.run()
        tokens = [g.result().token_ids for g in wave]
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "decode_seconds": seconds - prefill, "tokens": tokens}), flush=True)
"""


def parse_method(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value,key=value`` (values: ints, floats, true/false, else strings)."""
    name, _, rest = spec.partition(":")
    options: dict = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                options[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            options[key] = {"true": True, "false": False}.get(value, value)
    return name, options


class Worker:
    def __init__(self, checkout: Path, threads: int, dtype: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", WORKER, str(checkout / "src"), str(threads), dtype],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.process.stdout.readline())

    def run(self, job: dict) -> dict:
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="checkout A (e.g. a worktree of the commit before)")
    parser.add_argument("b", type=Path, help="checkout B")
    parser.add_argument("--data", required=True)
    parser.add_argument("--method", action="append", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the target's dtype on both sides")
    parser.add_argument("--template", default="User: {turn}\nAssistant:")
    parser.add_argument("--sampling", default=None, metavar="T,TOP_K,TOP_P",
                        help="sample (seed = the prompt's index) instead of greedy decoding")
    parser.add_argument("--concurrency", type=int, default=1, help="decode the prompts in waves of this many, together")
    parser.add_argument("--adaptive-drafts", action="store_true", help="with --concurrency: batch-aware draft budgets")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.concurrency < 1:
        parser.error("--concurrency must be >= 1")
    try:
        temperature, top_k, top_p = (args.sampling or "0,0,1").split(",")
        sampling = {"temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p)}
    except ValueError:
        parser.error(f"--sampling takes T,TOP_K,TOP_P (e.g. 1.0,10,0.9), got {args.sampling!r}")
    prompts = [args.template.format(turn=json.loads(line)["turns"][0])
               for line in Path(args.data).read_text(encoding="utf-8").split("\n") if line.strip()]
    methods = [parse_method(m) for m in args.method]
    if ("ar", {}) in methods:
        methods.append(("ar", {}))  # ar twice: the noise floor
    workers = {"A": Worker(args.a, args.threads, args.dtype), "B": Worker(args.b, args.threads, args.dtype)}
    for side, worker in workers.items():
        print(f"{side}: {worker.info['file']}", file=sys.stderr)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows: dict[str, dict] = {}
    labels = []
    for name, options in methods:
        label = name + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")
        labels.append(label + (" (again)" if label in labels else ""))
        rows[labels[-1]] = {"A": 0.0, "B": 0.0, "A decode": 0.0, "B decode": 0.0, "identical": 0, "prompts": 0,
                            "tokens": 0}
    for wave, p in enumerate(range(0, len(prompts), args.concurrency)):  # methods interleaved wave by wave
        for index, ((name, options), label) in enumerate(zip(methods, labels)):
            row = rows[label]
            job = {"method": name, "options": options, "prompts": prompts[p:p + args.concurrency],
                   "max_new_tokens": args.max_new_tokens, "sampling": {**sampling, "seed": p},
                   "adaptive": args.adaptive_drafts}
            order = ("A", "B") if (index + wave) % 2 == 0 else ("B", "A")
            out = {side: workers[side].run(job) for side in order}
            for side in ("A", "B"):
                row[side] += out[side]["seconds"]
                row[f"{side} decode"] += out[side]["decode_seconds"]
            row["identical"] += sum(a == b for a, b in zip(out["A"]["tokens"], out["B"]["tokens"]))
            row["prompts"] += len(job["prompts"])
            row["tokens"] += sum(len(t) for t in out["B"]["tokens"])
        print(f"wave {wave + 1}: " + "  ".join(f"{label} B/A {rows[label]['B'] / rows[label]['A']:.3f}"
                                             for label in labels), file=sys.stderr, flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    report = {"started": started, "concurrency": args.concurrency, "adaptive_drafts": args.adaptive_drafts, "cpu": cpu, "features": [f for f in flags if f.startswith(("avx", "amx", "fma"))],
              "threads": args.threads, "dtype": args.dtype, "sampling": sampling, "a": str(args.a), "b": str(args.b),
              "data": args.data,
              "max_new_tokens": args.max_new_tokens, "rows": rows}
    print("| method | A s | B s | B/A | decoding only: A s | B s | B/A | B decoding tokens/s | identical tokens |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, row in rows.items():
        print(f"| {label} | {row['A']:.2f} | {row['B']:.2f} | {row['B'] / row['A']:.3f} | {row['A decode']:.2f} | "
              f"{row['B decode']:.2f} | {row['B decode'] / row['A decode']:.3f} | {row['tokens'] / row['B decode']:.1f} | "
              f"{row['identical']}/{row['prompts']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    for worker in workers.values():
        worker.process.stdin.close()
        worker.process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
