"""How multi-candidate MTAD should read the target's rows: all at once, on demand level by level, or
on demand with the next level read along (``LogitRows``'s look-ahead), against ``eagle``.

One process, the configurations interleaved prompt by prompt (order reversed every other prompt),
so a drifting host hits all alike. Prints a markdown table: τ, verification + acceptance ms a
round, decoding tokens/s, speed vs ``eagle``. The three ways are switched by patching the rule's
readout and the look-ahead width — a measurement of internals, not an API.

    python scripts/mtad_tree_rows.py results/prompts/tune-14.jsonl [float32|bfloat16]
"""

from __future__ import annotations

import json
import sys

import torch

import specdecode.accept.joint_ratio as joint_ratio
import specdecode.models.runner as runner
from specdecode import SpeculativeDecoder, load_model
from specdecode.accept.rules import sampling_readout

SAMPLING = dict(temperature=1.0, top_k=10, top_p=0.9)


def main() -> None:
    prompts = [json.loads(line)["turns"][0] for line in open(sys.argv[1], encoding="utf-8") if line.strip()]
    target = load_model("default", threads=2, dtype=sys.argv[2] if len(sys.argv) > 2 else "float32")
    on_demand, look_ahead = joint_ratio.JointRatioAcceptance.readout, runner.HEAD_BLOCK_ROWS

    def every_row(rule, draft):  # noqa: ANN001, ANN202
        return sampling_readout(rule.sampling)

    configs = [("`eagle`", "eagle", {}, None)] + [
        (f"tree B {beams}, {way}", "eagle-mtad", {"tree": True, "beams": beams}, way)
        for beams in (4, 8) for way in ("every row read", "walk", "walk + next level along")]
    decoders = {label: SpeculativeDecoder(target, method, **options) for label, method, options, _ in configs}
    totals = {label: [0.0, 0, 0, 0.0] for label, *_ in configs}
    with torch.inference_mode():
        for index, prompt in enumerate(prompts):
            for label, _, _, way in (configs if index % 2 == 0 else configs[::-1]):
                joint_ratio.JointRatioAcceptance.readout = every_row if way == "every row read" else on_demand
                runner.HEAD_BLOCK_ROWS = look_ahead if way == "walk + next level along" else 1
                stats = decoders[label].generate(prompt, max_new_tokens=48, seed=index, **SAMPLING).stats
                total = totals[label]
                total[0] += stats.total_s - stats.prefill_s
                total[1] += stats.new_tokens
                total[2] += stats.target_forwards
                total[3] += stats.verify_s + stats.accept_s
    base = totals["`eagle`"][1] / totals["`eagle`"][0]
    print("| configuration | τ | verify + accept ms | tok/s | vs `eagle` |\n|---|---:|---:|---:|---:|")
    for label, (seconds, tokens, rounds, verify) in totals.items():
        print(f"| {label} | {tokens / rounds:.2f} | {1e3 * verify / rounds:.1f} | {tokens / seconds:.1f} | "
              f"{tokens / seconds / base:.2f} |")


if __name__ == "__main__":
    main()
