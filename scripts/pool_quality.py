"""Pool the sampling quality of several benchmark runs (the same prompts, other seeds) into one table.

Each run's ``records.jsonl`` holds one sample per prompt and method; a prompt's samples over the
runs are summed before the paired bootstrap (``bench/quality.py: compare_samples``), so more
seeds narrow the interval only as far as they really do.

    python scripts/pool_quality.py results/quality-100-head/seed0 results/quality-100-head/seed1000

``--calibrate``: first the A/A check of each interval on the baseline's own samples (``ar``
against ``ar`` under other seeds, ``bench/quality.py: aa_exclusion_rate``): how often its 95 %
interval excludes 0, per number of samples a side and per number of prompts — near 5 %.

A method's sample of a prompt under a seed counts once: runs that repeat a seed (every bench run
includes ``ar``) add nothing new.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from specdecode.bench.quality import INTERVALS, Sample, aa_exclusion_rate, compare_samples
from specdecode.bench.runner import BASELINE


def read_samples(runs: list[Path]) -> dict[str, list[Sample]]:
    """Every method's samples over ``runs`` (benchmark folders), one per (method, prompt, seed)."""
    samples: dict[str, list[Sample]] = defaultdict(list)
    seen: set[tuple[str, object, object]] = set()
    for run in runs:
        seed = json.loads((run / "summary.json").read_text(encoding="utf-8"))["config"]["seed"]
        for line in (run / "records.jsonl").read_text(encoding="utf-8").split("\n"):  # U+2028 may sit in a text
            if not line.strip():
                continue
            record = json.loads(line)
            key = (record["method"], record["question_id"], seed)
            if record["nll"] is not None and key not in seen:
                seen.add(key)
                samples[record["method"]].append(Sample(record["question_id"], record["nll"],
                                                        record["stats"]["new_tokens"], tuple(record["token_ids"])))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="benchmark output folders (records.jsonl)")
    parser.add_argument("--interval", choices=INTERVALS, default=INTERVALS[0])
    parser.add_argument("--calibrate", action="store_true", help="A/A exclusion rates of every interval first")
    parser.add_argument("--splits", type=int, default=200, help="A/A splits per interval and size")
    parser.add_argument("--subsets", default="12,30", help="A/A also on random subsets of this many prompts")
    args = parser.parse_args()
    samples = read_samples(args.runs)
    if BASELINE not in samples:
        parser.error(f"no sampled {BASELINE!r} records with NLLs in {', '.join(map(str, args.runs))}")
    baseline = samples[BASELINE]
    prompts = len({s.prompt for s in baseline})
    print(f"{len(args.runs)} runs · {prompts} prompts · {len(baseline)} `{BASELINE}` samples\n")
    if args.calibrate:
        most = len(baseline) // prompts // 2
        sizes = [None, *(int(n) for n in args.subsets.split(",") if n and int(n) < prompts)]
        print(f"A/A: `{BASELINE}` against itself, {args.splits} random splits of its seeds (per prompt); share of "
              "95 % intervals that exclude 0 (should be ~5 %)\n")
        print("| interval | prompts | " + " | ".join(f"{n} a side" for n in range(1, most + 1)) + " |")
        print("|---|---:|" + "---:|" * most)
        for interval in INTERVALS:
            for size in sizes:
                rates = [aa_exclusion_rate(baseline, n, interval, args.splits, size) for n in range(1, most + 1)]
                print(f"| {interval} | {size or prompts} | " + " | ".join(f"{rate:.1%}" for rate in rates) + " |")
        print()
    print(f"Interval: {args.interval}\n")
    print("| method | perplexity | vs ar [95 % CI] | repeated 4-grams |\n|---|---:|---:|---:|")
    for method, of in samples.items():
        quality = compare_samples(of, baseline, interval=args.interval)
        if quality is None:
            print(f"| `{method}` | not on the same prompts as `{BASELINE}` | | |")
            continue
        print(quality.table_row(f"`{method}`", method == BASELINE))


if __name__ == "__main__":
    main()
