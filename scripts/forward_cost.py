"""How far a decoding step is from the memory-bandwidth floor, per runtime mode and token count.

Prints this machine's CPU and features, its measured read bandwidth, the bytes one step must read
in each mode (weights of the layers and of the head as that mode stores them), the resulting
floor, and the median cost of a forward of 1, 2, 4, 8 and 16 tokens — layers and head apart — on
top of a context of ``--context`` tokens.

The floor is the mode's own: float32 modes read float32 layers, bf16 modes bf16 layers; a screened
head reads the copy its 1-row screen reads (int8 with a scale per 32 inputs: 1.125 bytes a weight;
float16 or bf16: 2), an unscreened one its own dtype; ``× floor`` is how far each forward is from it.

Usage: python scripts/forward_cost.py [--model default] [--context 200] [--repeats 7] [--threads N]
       [--modes "float32 fast (exact)" "bf16 fast"]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from specdecode import load_model
from specdecode.models.heads import ScreenedHead
from specdecode.models.loading import LoadedModel
from specdecode.models.runner import Readout
from specdecode.models.machine import cpu_description
from specdecode.timing import clock, time_call

TOKENS = (1, 2, 4, 5, 8, 9, 16)  # 5 and 9: a 4- and an 8-token draft plus the last token
MODES = {  # label: load_model arguments
    "float32 eager": dict(fast=False),
    "float32 fast (exact)": dict(fast=True),
    "fp16 weights": dict(quantize="fp16"),
    "int8 weights": dict(quantize="int8"),
    "bf16 eager": dict(dtype="bfloat16", fast=False),
    "bf16 fast": dict(dtype="bfloat16", fast=True),
}
LAYER_BYTES_PER_PARAM = {"fp16 weights": 2, "int8 weights": 1, "bf16 eager": 2, "bf16 fast": 2}  # float32 otherwise
SCREEN_BYTES = {"int8": 1 + 4 / 32}  # a head weight as the int8 screen reads it; the other screens read 2


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second a reduction over a buffer much larger than the caches reads (best of
    ``repeats``: the floor is what the machine can do, not what a busy moment gave)."""
    buffer = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    return buffer.numel() * 4 / time_call(buffer.sum, repeats, warmup=1, statistic=min) / 1e9


def step_bytes(target: LoadedModel, mode: str) -> tuple[int, int]:
    """Bytes of weights one 1-token step reads: (layers, head) as this mode stores them."""
    model = target.model
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    layer_params = sum(p.numel() for p in model.parameters() if p is not head and p is not embed)
    layer_bytes = layer_params * LAYER_BYTES_PER_PARAM.get(mode, 4)
    runtime_head = target.runtime.head if target.runtime is not None else None
    if isinstance(runtime_head, ScreenedHead):
        per_weight = SCREEN_BYTES.get(runtime_head.plan.kernel_for(1), 2)
    else:
        per_weight = head.element_size()
    return layer_bytes, int(head.numel() * per_weight)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                        help="the modes to measure (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = cpu_description()
    bandwidth = read_bandwidth_gbs()
    print(f"CPU: {cpu['cpu']} · features {', '.join(cpu['features'])} · torch threads {cpu['threads']}")
    print(f"measured read bandwidth: {bandwidth:.1f} GB/s\n")
    report: dict = {"cpu": cpu, "bandwidth_gbs": bandwidth, "context": args.context, "modes": {}}
    # every mode loaded first, then measured interleaved (repeat × tokens × mode), so machine drift
    # hits the modes alike
    loaded = {mode: load_model(args.model, **MODES[mode]) for mode in args.modes}
    for mode, target in loaded.items():
        report["modes"][mode] = {"runtime": target.runner.describe()}
        print(f"{mode}: {report['modes'][mode]['runtime']}")
    print()
    caches = {}
    with torch.inference_mode():
        for mode, target in loaded.items():
            caches[mode] = target.runner.new_cache()
            target.runner.forward(caches[mode], [2] * args.context, Readout.hidden_only())
        times: dict[tuple[str, int, str], list[float]] = {}
        for _ in range(args.repeats + 1):  # the first round warms up and is dropped below
            for n in TOKENS:
                for mode, target in loaded.items():
                    kv, ids = caches[mode], [2] * n
                    for part, readout in (("step", Readout(top_k=1)), ("layers", Readout.hidden_only())):
                        start = clock()  # greedy reads the top 1, as the loop asks
                        target.runner.forward(kv, ids, readout)
                        times.setdefault((mode, n, part), []).append(clock() - start)
                        kv.crop(args.context)
    print("| mode | tokens | layers ms | head ms | step ms | × 1-token step | floor ms | × floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, target in loaded.items():
        layer_bytes, head_bytes = step_bytes(target, mode)
        floor_ms = (layer_bytes + head_bytes) / bandwidth / 1e6
        rows = []
        for n in TOKENS:
            step = 1000 * statistics.median(times[(mode, n, "step")][1:])
            body = 1000 * statistics.median(times[(mode, n, "layers")][1:])
            one_token = rows[0]["step_ms"] if rows else step
            rows.append(dict(tokens=n, step_ms=step, layers_ms=body, head_ms=step - body,
                             vs_one_token=step / one_token, floor_ms=floor_ms, vs_floor=step / floor_ms))
            print(f"| {mode} | {n} | {body:.1f} | {step - body:.1f} | {step:.1f} | {step / one_token:.2f} | "
                  f"{floor_ms:.1f} | {step / floor_ms:.2f} |")
        report["modes"][mode].update(layer_bytes=layer_bytes, head_bytes=head_bytes, floor_ms=floor_ms, rows=rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
