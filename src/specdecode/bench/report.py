"""Benchmark outputs: per-prompt JSONL, a Spec-Bench-style Markdown table, PNG plots, a summary.

Everything is rendered in memory and staged in a temporary folder first; files are moved into the
output folder only once all of them exist, so a failure never leaves a half-written report.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from specdecode.bench.dataset import order_tasks
from specdecode.bench.metrics import Aggregate, aggregate
from specdecode.bench.quality import compare_quality
from specdecode.bench.runner import BASELINE, BenchResult

OVERALL = "overall"


def columns(result: BenchResult) -> list[str]:
    return order_tasks({r.prompt.task for r in result.records}) + [OVERALL]


def summarize(result: BenchResult) -> dict[str, dict[str, Aggregate]]:
    """Aggregates per contender label × column (tasks, then ``overall``)."""
    table: dict[str, dict[str, Aggregate]] = {}
    for contender in result.contenders:
        table[contender.label] = {}
        for column in columns(result):
            def keep(record) -> bool:
                return column == OVERALL or record.prompt.task == column

            table[contender.label][column] = aggregate(
                [r for r in result.of(contender.label) if keep(r)], [r for r in result.of(BASELINE) if keep(r)]
            )
    return table


def fastest_lossless(result: BenchResult, peers: bool = False) -> tuple[str, Aggregate] | None:
    """The fastest of our (or the peers') lossless contenders that passed the identity check."""
    overall = {label: cells[OVERALL] for label, cells in summarize(result).items()}
    failed = result.mismatches()
    candidates = [c.label for c in result.contenders if c.lossless and c.peer == peers and c.label not in failed]
    if not candidates:
        return None
    best = max(candidates, key=lambda label: overall[label].tokens_per_second)
    return best, overall[best]


def _name(result: BenchResult, label: str) -> str:
    peer = next(c.peer for c in result.contenders if c.label == label)
    if not peer:
        return f"`{label}`"
    return f"`{label}`" if label.startswith("llama.cpp") else f"`{label}` (transformers)"


def quality_lines(result: BenchResult) -> list[str]:
    """Sampling runs: pooled perplexity, its change vs ar with a 95 % interval over prompts,
    and the repeated 4-gram share (see bench/quality.py)."""
    if result.greedy:
        return []
    baseline = result.of(BASELINE)
    rows = []
    for contender in result.contenders:
        quality = compare_quality(result.of(contender.label), baseline)
        if quality is None:
            continue
        rows.append(quality.table_row(_name(result, contender.label), contender.label == BASELINE))
    if not rows:
        return []
    return ["## Quality (sampling)", "",
            f"Pooled perplexity under the float32 target over {len(baseline)} prompts; change vs `ar`: the mean "
            "over prompts of the per-prompt change in log-perplexity, with a Student t 95 % interval over prompts "
            "(* = the interval excludes 0; bench/quality.py, calibrated by A/A runs in results/quality-100-aa); "
            "repeated 4-gram share (a loop lowers perplexity too).", "",
            "| method | perplexity | vs ar [95 % CI] | repeated 4-grams |", "|---|---:|---:|---:|", *rows, ""]


def divergence_lines(result: BenchResult) -> list[str]:
    """Reduced precision: how often each contender's greedy output equals float32 ``ar`` (the
    ``ar@eager`` contender) and where it first parts — next to the same figure for ``ar`` itself."""
    reference = result.float32_reference
    if reference is None or not result.greedy:
        return []
    out = ["## Divergence from float32 `ar` (reduced precision)", "",
           f"Reference: `{reference}` (the same weights in float32 with the model's own kernels). A k-token "
           "forward rounds differently from a 1-token one, so greedy outputs may part at near-ties — "
           "numerics, not a bug; speculation should add no divergence beyond what `ar` itself shows.", "",
           "| method | identical to float32 ar | identical to this run's ar | median first divergence |",
           "|---|---:|---:|---:|"]
    for contender in result.contenders:
        if contender.label == reference:
            continue
        records = result.of(contender.label)
        firsts = sorted(r.float32_mismatch_at for r in records if r.float32_mismatch_at is not None)
        same_f32 = sum(r.float32_mismatch_at is None for r in records)
        same_ar = sum(bool(r.identical) for r in records)
        median_first = firsts[len(firsts) // 2] if firsts else None
        out.append(f"| {_name(result, contender.label)} | {same_f32}/{len(records)} | {same_ar}/{len(records)} | "
                   f"{_fmt(median_first, 'token {}')} |")
    return out + [""]


def _fmt(value: float | None, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def summary_lines(result: BenchResult) -> list[str]:
    """The verdict: fastest lossless method and peer, and — loudly — any identity failures."""
    lines = []
    for peers, what in ((False, "Fastest lossless method"), (True, "Fastest lossless transformers peer")):
        best = fastest_lossless(result, peers)
        if best:
            label, cell = best
            lines.append(f"**{what}: `{label}`** — {cell.speedup:.2f}× ar, {cell.tokens_per_second:.2f} tokens/s.")
    if result.greedy and not result.exact:
        lines.append("Reduced precision: lossless methods are not held to ar's exact tokens (see the divergence "
                     "table); the identity check applies to float32/float64 runs.")
    elif result.greedy:
        failed = result.mismatches()
        prompts = len(result.of(BASELINE))
        for label, records in failed.items():
            first = records[0]
            lines.append(
                f"**IDENTITY CHECK FAILED: `{label}` differs from ar's greedy output on {len(records)}/{prompts} "
                f"prompts** (first: question {first.prompt.question_id}, token {first.mismatch_at}). A lossless "
                "method must reproduce ar exactly: this is a bug, or a numerical near-tie of the target's logits."
            )
        if not failed:
            lossless = [c.label for c in result.contenders if c.lossless and c.label != BASELINE]
            lines.append(f"Identity check passed: {', '.join(lossless) or 'no other lossless method'} produced "
                         f"ar's exact greedy tokens on all {prompts} prompts.")
    return lines


def round_cost_lines(table: dict[str, dict[str, Aggregate]]) -> list[str]:
    """Where a round's time goes, per drafting method (ms per verification round), and the ceiling:
    the speedup each would reach were drafting free (its τ against its verification cost)."""
    rows = {label: cells[OVERALL] for label, cells in table.items() if cells[OVERALL].round_ms}
    if not rows:
        return []
    out = ["", "## Per-round cost (ms per verification round) and the zero-draft-cost ceiling", "",
           "| method | draft | of which forwards | bookkeeping | tree | verify | accept | speedup | "
           "ceiling (free drafts) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, cell in rows.items():
        ms = cell.round_ms
        parts = " | ".join(_fmt(ms.get(part), "{:.1f}") for part in ("draft", "forward", "bookkeeping", "tree",
                                                                    "verify", "accept"))
        out.append(f"| {label} | {parts} | {_fmt(cell.speedup, '{:.2f}×')} | "
                   f"{_fmt(cell.zero_draft_speedup, '{:.2f}×')} |")
    return out


def render_table(result: BenchResult) -> str:
    config, meta = result.config, result.meta
    table = summarize(result)
    cols = columns(result)
    counts = {c: sum(1 for r in result.of(BASELINE) if r.prompt.task == c) for c in cols[:-1]}
    mode = "greedy" if result.greedy else (
        f"sampling (temperature {config.temperature}, top-k {config.top_k}, top-p {config.top_p}, seed {config.seed})")
    out = [
        f"# specdecode bench — {meta.get('model', '?')}",
        "",
        f"{mode} · {config.max_new_tokens} new tokens per prompt (EOS ignored) · "
        f"{len(result.of(BASELINE))} prompts ({', '.join(f'{c} {n}' for c, n in counts.items())}) · "
        f"repeats {config.repeats} (median) · warm-up {config.warmup}",
        "",
        f"{meta.get('cpu')} ({', '.join(meta.get('features') or [])}) · runtime: {meta.get('runtime')} · "
        f"quantize: {meta.get('quantize') or 'none'}",
        "",
        f"{meta.get('device')} · {meta.get('dtype')} · torch threads {meta.get('threads')} · torch {meta.get('torch')} · "
        f"transformers {meta.get('transformers')} · draft: {meta.get('draft') or 'none'} · "
        f"energy: {meta.get('energy')}",
        "",
        "## Speedup over our `ar` (wall clock, same prompts, same run)",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for label, cells in table.items():
        out.append(f"| {_name(result, label)} | " + " | ".join(_fmt(cells[c].speedup, "{:.2f}×") for c in cols) + " |")
    out += ["", "## Mean tokens per target forward (τ)", "",
            "| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for label, cells in table.items():
        out.append(f"| {_name(result, label)} | " + " | ".join(f"{cells[c].tau:.2f}" for c in cols) + " |")
    out += ["", "## Overall", "",
            "| method | tokens/s | speedup | τ | acceptance | draft cost | identical to ar | perplexity | "
            "energy J/token |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    failed = result.mismatches()
    for label, cells in table.items():
        cell = cells[OVERALL]
        identical = "—" if cell.identical is None else f"{cell.identical}/{cell.prompts}"
        if label in failed:
            identical = f"**{identical} ✗**"
        out.append(
            f"| {_name(result, label)} | {cell.tokens_per_second:.2f} | {_fmt(cell.speedup, '{:.2f}×')} | "
            f"{cell.tau:.2f} | {_fmt(cell.acceptance_rate, '{:.1%}')} | {_fmt(cell.draft_cost, '{:.3f}')} | "
            f"{identical} | {_fmt(cell.perplexity, '{:.2f}')} | {_fmt(cell.energy_per_token_j, '{:.3f}')} |"
        )
    out += round_cost_lines(table)
    out += ["", *quality_lines(result), *divergence_lines(result), *summary_lines(result), "",
            "Speedup and tokens/s include the prompt's prefill. τ counts every target forward that emits "
            "tokens; draft cost = drafting time / verification time (— where nothing was drafted, or where "
            "the drafting happens inside `transformers` without a model forward to time). "
            "Definitions: docs/benchmarking.md.", ""]
    return "\n".join(out)


def _plot_speedup(result: BenchResult, path: Path) -> None:
    import matplotlib.pyplot as plt

    table, cols = summarize(result), columns(result)
    labels = [label for label in table if label != BASELINE]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cols) * max(1, len(labels)) / 2), 4.0))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        values = [table[label][c].speedup or 0.0 for c in cols]
        ax.bar([x + (i - (len(labels) - 1) / 2) * width for x in range(len(cols))], values, width, label=label)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="ar")
    ax.set_xticks(range(len(cols)), cols, rotation=20, ha="right")
    ax.set_ylabel("speedup over our ar (×)")
    ax.set_title(f"Speedup per category — {result.meta.get('model', '')}")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_tau(result: BenchResult, path: Path) -> None:
    import matplotlib.pyplot as plt

    labels = [c.label for c in result.contenders]
    data = [[r.stats.tokens_per_target_forward for r in result.of(label)] for label in labels]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels)), 4.0))
    ax.boxplot(data)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20, ha="right")
    ax.set_ylabel("τ per prompt (tokens per target forward)")
    ax.set_title("Distribution of τ over prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result: BenchResult, out_dir: str | Path, command: str | None = None) -> list[Path]:
    """Write records.jsonl, table.md, summary.json, two PNG plots (and COMMAND.txt) into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        with (staging / "records.jsonl").open("w", encoding="utf-8") as handle:
            for record in result.records:
                handle.write(json.dumps(record.to_dict(), ensure_ascii=False, default=str) + "\n")
        (staging / "table.md").write_text(render_table(result), encoding="utf-8")
        summary = {
            "config": asdict(result.config),
            "meta": result.meta,
            "contenders": [asdict(c) for c in result.contenders],
            "aggregates": {label: {col: asdict(cell) for col, cell in cells.items()}
                           for label, cells in summarize(result).items()},
            "summary": summary_lines(result),
        }
        (staging / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        _plot_speedup(result, staging / "speedup_per_category.png")
        _plot_tau(result, staging / "tau_distribution.png")
        if command is not None:
            (staging / "COMMAND.txt").write_text(command + "\n", encoding="utf-8")
        out_dir.mkdir(exist_ok=True)
        written = []
        for item in sorted(staging.iterdir()):
            os.replace(item, out_dir / item.name)
            written.append(out_dir / item.name)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
