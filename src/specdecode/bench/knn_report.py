"""The report of a KNN-SSD mixed-stream evaluation (:mod:`specdecode.bench.knn_eval`): knn.md, knn.json,
the cross-domain matrix and its picture, and the routing check's section."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from specdecode.bench.knn_eval import KnnEvaluation
from specdecode.bench.report import write_report
from specdecode.bench.runner import BASELINE


def _fmt(value: float | None, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def _radius_text(radius: float | dict[str, float]) -> str:
    if isinstance(radius, dict):
        return "per domain " + ", ".join(f"{c} {r:.3f}" for c, r in radius.items())
    return f"{radius:.4f}"


def render(evaluation: KnnEvaluation) -> str:
    result, config = evaluation.bench, evaluation.bench.config
    prompts = result.of(BASELINE)
    counts: dict[str, int] = {}
    for record in prompts:
        counts[record.prompt.category] = counts.get(record.prompt.category, 0) + 1
    unseen = evaluation.unseen()
    out = [
        f"# KNN-SSD on a mixed request stream — {result.meta.get('model', '?')}",
        "",
        f"mix ratio {evaluation.mix_ratio} · {len(prompts)} requests "
        f"({', '.join(f'{c} {n}' + (' (not in the bundle)' if c in unseen else '') for c, n in counts.items())}) · "
        f"{evaluation.switches()} domain switches · "
        f"{'greedy' if result.greedy else f'temperature {config.temperature}'} · {config.max_new_tokens} new tokens "
        f"(EOS ignored) · repeats {config.repeats} (median) · {result.meta.get('device')} "
        f"{result.meta.get('dtype')}, {result.meta.get('threads')} threads · runtime: {result.meta.get('runtime')}"
        + ("" if evaluation.complete else " · **stopped early by the time budget**"),
        "",
        "| method | τ | tokens/s | speedup vs ar | acceptance | draft cost / verify | identical to ar |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, cell in evaluation.methods().items():
        identical = "—" if cell.identical is None else f"{cell.identical}/{cell.prompts}"
        out.append(f"| `{name}` | {cell.tau:.2f} | {cell.tokens_per_second:.2f} | {_fmt(cell.speedup, '{:.2f}×')} | "
                   f"{_fmt(cell.acceptance_rate, '{:.1%}')} | {_fmt(cell.draft_cost, '{:.2f}')} | {identical} |")
    head = evaluation.headline()
    out += ["", f"`knn-ssd` against the single mixed configuration: τ {_fmt(head['tau_vs_mixed'], '{:.2f}×')}, "
                f"wall clock {_fmt(head['wall_vs_mixed'], '{:.2f}×')}; against `ar`: {_fmt(head['wall_vs_ar'], '{:.2f}×')} "
                f"(mixed: {_fmt(head['mixed_wall_vs_ar'], '{:.2f}×')}); routing accuracy on bundle domains "
                f"{_fmt(head['routing_accuracy_bundle_domains'], '{:.0%}')}."]
    if "unseen" in head:
        u = head["unseen"]
        out.append(f"Domains not in the bundle ({', '.join(u['domains'])}): `knn-ssd` τ {u['knn_tau']:.2f} vs mixed "
                   f"{u['mixed_tau']:.2f} ({_fmt(u['tau_vs_mixed'], '{:.2f}×')}); speedup vs ar "
                   f"{_fmt(u['knn_speedup'], '{:.2f}×')} vs {_fmt(u['mixed_speedup'], '{:.2f}×')}.")
    if "vs_other_bundle" in head:
        o = head["vs_other_bundle"]
        out.append(f"Against `knn-ssd` with the other bundle: τ {_fmt(o['tau'], '{:.2f}×')}, wall clock "
                   f"{_fmt(o['wall'], '{:.2f}×')}.")
    out += ["", f"## Routing of `knn-ssd` (fallback radius {_radius_text(evaluation.radius)})", "",
            "| domain | requests | nearest anchor of its domain | fallbacks to mixed | mean distance | configurations used |",
            "|---|---:|---:|---:|---:|---|"]
    for category, row in evaluation.routing().items():
        label = f"{category} (not in the bundle)" if row["unseen"] else category
        correct = "—" if row["unseen"] else f"{row['correct']} ({row['accuracy']:.0%})"
        used = ", ".join(f"{c} {n}" for c, n in row["configurations"].items())
        out.append(f"| {label} | {row['requests']} | {correct} | {row['fallbacks']} | "
                   f"{_fmt(row['mean_distance'], '{:.4f}')} | {used} |")
    out += ["", "`ssd[c]` drafts with domain c's configuration on every request; `knn-ssd` picks the configuration of "
            "the prompt's nearest anchor (mixed beyond that domain's radius). Speedup and tokens/s include the "
            "prefill. Per-request records: records.jsonl.", ""]
    return "\n".join(out)


def write(evaluation: KnnEvaluation, out_dir: str | Path, command: str | None = None) -> list[Path]:
    """The benchmark report (records, per-category tables, plots) plus knn.md and knn.json."""
    out_dir = Path(out_dir)
    written = write_report(evaluation.bench, out_dir, command)
    summary = {
        "mix_ratio": evaluation.mix_ratio, "radius": evaluation.radius, "switches": evaluation.switches(),
        "complete": evaluation.complete, "seconds": round(evaluation.seconds, 1), "headline": evaluation.headline(),
        "unseen_domains": evaluation.unseen(),
        "stream": [r.prompt.question_id for r in evaluation.bench.of(BASELINE)],
        "contenders": evaluation.names, "config": asdict(evaluation.bench.config), "meta": evaluation.bench.meta,
        "methods": {name: asdict(cell) for name, cell in evaluation.methods().items()},
        "routing": evaluation.routing(),
        "domain_matrix": {row: {c: {"tau": cell.tau, "speedup": cell.speedup} for c, cell in cells.items()}
                          for row, cells in evaluation.domain_matrix().items()},
        "by_domain": {c: {name: asdict(cell) for name, cell in evaluation.methods([c]).items()}
                      for c in dict.fromkeys(r.prompt.category for r in evaluation.bench.of(BASELINE))},
    }
    (out_dir / "knn.md").write_text(render(evaluation) + render_matrix(evaluation), encoding="utf-8")
    plot_matrix(evaluation, out_dir / "domain_matrix.png")
    (out_dir / "knn.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [*written, out_dir / "knn.md", out_dir / "knn.json", out_dir / "domain_matrix.png"]


def render_matrix(evaluation: KnnEvaluation) -> str:
    """Cross-domain table: each profile (row) on each category's prompts (column), τ and speedup vs ar."""
    matrix = evaluation.domain_matrix()
    categories = list(next(iter(matrix.values())))
    out = ["## Cross-domain matrix: configuration (row) on prompts of domain (column)", "",
           "τ / speedup against `ar` on the same prompts; the diagonal is each configuration on its own domain.", "",
           "| profile | " + " | ".join(categories) + " |", "|---|" + "---:|" * len(categories)]
    for row, cells in matrix.items():
        out.append(f"| `{row}` | " + " | ".join(f"{cell.tau:.2f} / {_fmt(cell.speedup, '{:.2f}×')}"
                                                  for cell in cells.values()) + " |")
    return "\n".join(out) + "\n"


def plot_matrix(evaluation: KnnEvaluation, path: Path) -> None:
    """Heat-map of τ per (profile, category), annotated with τ and speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = evaluation.domain_matrix()
    rows, categories = list(matrix), list(next(iter(matrix.values())))
    tau = [[matrix[r][c].tau for c in categories] for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 * len(categories) + 2, 0.6 * len(rows) + 1.5))
    image = ax.imshow(tau, cmap="viridis", aspect="auto")
    for i, r in enumerate(rows):
        for j, c in enumerate(categories):
            cell = matrix[r][c]
            ax.text(j, i, f"{cell.tau:.2f}\n{_fmt(cell.speedup, '{:.2f}x')}", ha="center", va="center",
                    fontsize=8, color="white" if cell.tau < (max(map(max, tau)) + min(map(min, tau))) / 2 else "black")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(len(categories)), [c + ("\n(unseen)" if c in evaluation.unseen() else "") for c in categories],
                  rotation=30, ha="right")
    ax.set_xlabel("prompt domain")
    ax.set_ylabel("draft configuration")
    ax.set_title("τ (tokens per target forward) and speedup vs ar,\nper draft configuration (row) and domain (column)")
    fig.colorbar(image, ax=ax, label="τ")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_routing_check(check: dict) -> str:
    """The routing check (:func:`routing_check`) as the Markdown section ``knn-eval`` appends to knn.md."""
    b = check["bundle_domains"]
    out = ["", "## Routing of every held-out prompt (embedding only, no generation)", "",
           f"Bundle domains: {b['nearest_own']}/{b['prompts']} nearest an anchor of their own domain "
           f"({b['accuracy']:.0%}); {b['own_configuration']:.0%} drafted with their own configuration "
           "(the rest fell back to mixed). t-SNE: tsne.png.", "",
           "| domain | prompts | nearest anchor of its domain | fallbacks to mixed | configurations used |",
           "|---|---:|---:|---:|---|"]
    for category, row in check["per_domain"].items():
        label = f"{category} (not in the bundle)" if row["unseen"] else category
        own = "—" if row["unseen"] else str(row["nearest_own"])
        used = ", ".join(f"{c} {n}" for c, n in row["configurations"].items())
        out.append(f"| {label} | {row['prompts']} | {own} | {row['fallbacks']} | {used} |")
    return "\n".join(out) + "\n"
