"""float32 fast against bf16 fast in one process, interleaved per prompt: the A/B behind ``--dtype
auto`` and issue 27's headline ratio, robust to a CPU shared with other jobs (each prompt runs
every contender back to back, so load drifts hit them alike).

For each prompt of a Spec-Bench JSONL file (first turn, the benchmark's ``User: …\\nAssistant:``
framing, greedy, EOS ignored) it runs ``ar`` and ``pld`` on both targets after one untimed warm-up
of each, and prints tokens/s per contender, the bf16/float32 ratios, and how many bf16 outputs part
from bf16 ``ar`` and from float32 ``ar`` (bf16 is a different target).

Usage: python scripts/dtype_ab.py --data results/prompts/heldout-12.jsonl [--threads 2]
       [--max-new-tokens 64] [--methods ar pld] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from specdecode import SpeculativeDecoder, load_model
from specdecode.bench.dataset import DEFAULT_TEMPLATE, format_prompt, load_prompts
from specdecode.models.machine import cpu_description

TARGETS = {"float32": "float32", "bf16": "bfloat16"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=["ar", "pld"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = {name: load_model(args.model, dtype=dtype) for name, dtype in TARGETS.items()}
    cpu = cpu_description()
    print(f"CPU: {cpu['cpu']} · features {', '.join(cpu['features'])} · torch threads {cpu['threads']}")
    for name, target in targets.items():
        print(f"{name}: {target.runner.describe()}")
    tokenizer = targets["float32"].tokenizer
    prompts = [list(tokenizer(format_prompt(p, DEFAULT_TEMPLATE))["input_ids"]) for p in load_prompts(args.data)]
    decoders = {(name, method): SpeculativeDecoder(target, method)
                for method in args.methods for name, target in targets.items()}
    settings = dict(max_new_tokens=args.max_new_tokens, stop_at_eos=False)
    for decoder in decoders.values():  # one-time work before any timing
        decoder.generate(prompts[0], max_new_tokens=8, stop_at_eos=False)
    seconds = {key: 0.0 for key in decoders}
    tokens = {key: 0 for key in decoders}
    outputs: dict[tuple[str, str], list[list[int]]] = {key: [] for key in decoders}
    for ids in prompts:
        for key, decoder in decoders.items():
            start = time.perf_counter()
            result = decoder.generate(ids, **settings)
            seconds[key] += time.perf_counter() - start
            tokens[key] += len(result.token_ids)
            outputs[key].append(result.token_ids)
    rate = {key: tokens[key] / seconds[key] for key in decoders}
    report = {"cpu": cpu, "prompts": len(prompts), "runtime": {n: t.runner.describe() for n, t in targets.items()},
              "tokens_per_s": {f"{m} {n}": round(r, 2) for (n, m), r in rate.items()}, "parted": {}}
    print(f"\n{len(prompts)} prompts × {args.max_new_tokens} tokens, greedy\n")
    print("| method | float32 tok/s | bf16 tok/s | bf16 / float32 | bf16 parts from bf16 ar | from float32 ar |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in args.methods:
        fp32, bf16 = rate[("float32", method)], rate[("bf16", method)]
        own = sum(a != b for a, b in zip(outputs[("bf16", method)], outputs[("bf16", "ar")]))
        wide = sum(a != b for a, b in zip(outputs[("bf16", method)], outputs[("float32", "ar")]))
        report["parted"][method] = {"from_bf16_ar": own, "from_float32_ar": wide}
        print(f"| `{method}` | {fp32:.2f} | {bf16:.2f} | {bf16 / fp32:.2f}× | {own}/{len(prompts)} | {wide}/{len(prompts)} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
