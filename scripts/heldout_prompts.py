"""Write the held-out prompt sets the benchmarks run on.

``heldout-12`` (speed): every Spec-Bench task with two prompts each: for the five 40-prompt tasks,
questions 21-22 of each category — the shipped ssd profile and KNN bundles were built on the first
20 and the second draft head excluded these twelve, but the shipped draft model (``default-draft``)
was trained on every prompt past its held-out first 10, these included, so ``sps`` / ``mtad``
figures on this set may be optimistic; for MT-bench, the first question of ``writing`` and of
``coding`` (held out from every shipped artifact).

``quality-100`` (the MTAD perplexity judgement, which needs >= 100 prompts): the 90 prompts that
neither the shipped draft nor the draft heads trained on — the first 10 of each 40-prompt task
and all 40 MT-bench questions (their ``--holdout 10`` splits) — plus questions 21-22 of each task
(in the shipped draft's training prompts, see above).

``tune-56`` (choosing defaults, e.g. of prompt lookup, without touching either set above): questions
23-30 of each 40-prompt task and the second and third question of each MT-bench category.

Usage: python scripts/heldout_prompts.py ../shared/data/specbench_dev.jsonl OUT.jsonl [heldout-12|quality-100|tune-56]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

TASKS = ("translation", "summarization", "qa", "math_reasoning", "rag")
MT_BENCH_PICK = ("writing", "coding")


def picked(category: str, index: int, which: str) -> bool:
    """Whether question ``index`` (0-based, within its category) belongs to the set ``which``."""
    if which == "tune-56":
        return 1 <= index < 3 if category not in TASKS else 22 <= index < 30
    if category not in TASKS:
        return which == "quality-100" or (category in MT_BENCH_PICK and index == 0)
    if which == "quality-100" and index < 10:
        return True
    return 20 <= index < 22


def main(source: str, out: str, which: str = "heldout-12") -> None:
    if which not in ("heldout-12", "quality-100", "tune-56"):
        raise SystemExit(f"unknown set {which!r}: heldout-12, quality-100 or tune-56")
    rows = [json.loads(line) for line in open(source, encoding="utf-8") if line.strip()]
    seen: dict[str, int] = defaultdict(int)
    chosen = []
    for row in rows:
        index = seen[row["category"]]
        seen[row["category"]] += 1
        if picked(row["category"], index, which):
            chosen.append(row)
    with open(out, "w", encoding="utf-8") as handle:
        for row in chosen:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(chosen)} prompts to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
