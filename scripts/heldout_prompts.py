"""Write the held-out prompt set the fast-runtime benchmarks run on.

Every Spec-Bench task with two prompts each: for the five 40-prompt tasks, questions 21-22 of each
category (the shipped ssd profile's vocabulary and the KNN bundle were built from the first 20,
the shipped draft's held-out split is the first 10, so no shipped artifact chose its settings on
these); for MT-bench, the first question of ``writing`` and of ``coding`` (inside the draft's
held-out split; no bundle was built on MT-bench).

Usage: python scripts/heldout_prompts.py ../shared/data/specbench_dev.jsonl results/prompts/heldout-12.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

SKIP, TAKE = 20, 2
MT_BENCH_PICK = ("writing", "coding")


def main(source: str, out: str) -> None:
    rows = [json.loads(line) for line in open(source, encoding="utf-8") if line.strip()]
    seen: dict[str, int] = defaultdict(int)
    picked = []
    for row in rows:
        category = row["category"]
        index = seen[category]
        seen[category] += 1
        if category in MT_BENCH_PICK and index == 0:
            picked.append(row)
        elif category not in MT_BENCH_PICK and index >= SKIP and index < SKIP + TAKE and category in (
                "translation", "summarization", "qa", "math_reasoning", "rag"):
            picked.append(row)
    with open(out, "w", encoding="utf-8") as handle:
        for row in picked:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(picked)} prompts to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
