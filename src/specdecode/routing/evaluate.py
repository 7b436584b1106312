"""Mixed-stream evaluation of KNN-SSD: a stream of requests that switches category, with ``ar``,
``ssd`` with the mixed profile, ``ssd`` with each single-category profile, and ``knn-ssd``.

The methods run through the benchmark runner (same prompts, interleaved per request, warm-up,
identity check against ``ar``); this module builds the stream, names the contenders and adds
what only KNN-SSD has: how often the router picked the request's own category.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from specdecode.bench.contenders import ContenderSpec
from specdecode.bench.dataset import BenchPrompt
from specdecode.bench.metrics import Aggregate, aggregate
from specdecode.bench.report import write_report
from specdecode.bench.runner import BASELINE, BenchConfig, BenchResult, run_bench
from specdecode.errors import InvalidSettingError
from specdecode.models.loading import LoadedModel
from specdecode.routing.bundle import MIXED, ProfileBundle
from specdecode.search.calibration import load_labelled_prompts

KNN = "knn-ssd"


def category_prompts(
    path: str | Path, categories: list[str], per_category: int, offset: int, field: str = "category"
) -> dict[str, list[BenchPrompt]]:
    """Prompts ``offset .. offset + per_category`` of each category (a bundle is built on the first ones,
    evaluated on the ones after them)."""
    if per_category < 1 or offset < 0:
        raise InvalidSettingError(f"need per-category >= 1 and prompt offset >= 0, got {per_category} and {offset}")
    records = load_labelled_prompts(path, field)
    chosen = {}
    for category in categories:
        texts = [text for label, text in records if label == category]
        if len(texts) < offset + per_category:
            raise InvalidSettingError(f"category {category!r} has {len(texts)} prompts in {Path(path).name}; "
                                      f"{per_category} from offset {offset} need {offset + per_category}")
        chosen[category] = [BenchPrompt(f"{category}-{offset + i}", category, text)
                            for i, text in enumerate(texts[offset: offset + per_category])]
    return chosen


def mixed_stream(prompts: Mapping[str, list[BenchPrompt]], mix_ratio: float, seed: int = 0) -> list[BenchPrompt]:
    """Every prompt once; each next request comes from another category with probability ``mix_ratio``
    (0: one category after another; 1: the category changes at every request while it can)."""
    if not 0 <= mix_ratio <= 1:
        raise InvalidSettingError(f"mix ratio must be in [0, 1], got {mix_ratio}")
    rng = random.Random(seed)
    left = {c: list(p) for c, p in prompts.items() if p}
    if not left:
        raise InvalidSettingError("no prompts to stream")
    current = rng.choice(sorted(left))
    stream: list[BenchPrompt] = []
    while left:
        others = sorted(c for c in left if c != current)
        if current not in left or (others and rng.random() < mix_ratio):
            current = rng.choice(others)
        stream.append(left[current].pop(0))
        if not left[current]:
            del left[current]
    return stream


def contenders(bundle: ProfileBundle, bundle_path: str | Path) -> dict[str, ContenderSpec]:
    """Short name → contender: ar, ssd with the mixed profile, ssd with each category's, knn-ssd."""
    if not bundle.sources:
        raise InvalidSettingError("evaluate a bundle loaded from disk (its profiles are passed to ssd as files)")
    specs = {BASELINE: ContenderSpec(BASELINE), f"ssd[{MIXED}]": ContenderSpec("ssd", {"profile": str(bundle.sources[MIXED])})}
    for category in bundle.categories:
        specs[f"ssd[{category}]"] = ContenderSpec("ssd", {"profile": str(bundle.sources[category])})
    specs[KNN] = ContenderSpec(KNN, {"bundle": str(bundle_path)})
    return specs


@dataclass
class KnnEvaluation:
    bench: BenchResult
    names: dict[str, str]  # short name → contender label in ``bench``
    mix_ratio: float
    radius: float

    def methods(self) -> dict[str, Aggregate]:
        baseline = self.bench.of(BASELINE)
        return {name: aggregate(self.bench.of(label), baseline) for name, label in self.names.items()}

    def routing(self) -> dict[str, dict[str, Any]]:
        """Per category (and overall): requests, nearest anchor of the right category, fallbacks."""
        rows: dict[str, dict[str, Any]] = {}
        records = self.bench.of(self.names[KNN])
        for key in [*dict.fromkeys(r.prompt.category for r in records), "overall"]:
            mine = [r for r in records if key in ("overall", r.prompt.category)]
            routes = [r.stats.extra["route"] for r in mine]
            correct = sum(route["category"] == r.prompt.category for route, r in zip(routes, mine))
            distances = [route["distance"] for route in routes if route["distance"] is not None]
            rows[key] = {"requests": len(mine), "correct": correct, "accuracy": correct / len(mine),
                         "fallbacks": sum(route["fallback"] for route in routes),
                         "mean_distance": sum(distances) / len(distances) if distances else None}
        return rows

    def domain_matrix(self) -> dict[str, dict[str, Aggregate]]:
        """Contender → prompt category → aggregate: row ``ssd[c]`` is profile c evaluated on every category."""
        categories = list(dict.fromkeys(r.prompt.category for r in self.bench.of(BASELINE)))
        matrix: dict[str, dict[str, Aggregate]] = {}
        for name, label in self.names.items():
            if name == BASELINE:
                continue
            matrix[name] = {c: aggregate([r for r in self.bench.of(label) if r.prompt.category == c],
                                         [r for r in self.bench.of(BASELINE) if r.prompt.category == c])
                            for c in categories}
        return matrix

    def switches(self) -> int:
        order = [r.prompt.category for r in self.bench.of(BASELINE)]
        return sum(a != b for a, b in zip(order, order[1:]))


def evaluate(
    target: LoadedModel,
    bundle: ProfileBundle,
    bundle_path: str | Path,
    stream: list[BenchPrompt],
    config: BenchConfig,
    mix_ratio: float,
    progress: bool = True,
) -> KnnEvaluation:
    """Run every contender on the stream (greedy or sampling, as ``config`` says)."""
    bundle.check_model(target)
    specs = contenders(bundle, bundle_path)
    result = run_bench(target, stream, list(specs.values()), config=config, progress=progress)
    return KnnEvaluation(result, {name: spec.label for name, spec in specs.items()}, mix_ratio, bundle.radius)


def _fmt(value: float | None, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def render(evaluation: KnnEvaluation) -> str:
    result, config = evaluation.bench, evaluation.bench.config
    prompts = result.of(BASELINE)
    counts: dict[str, int] = {}
    for record in prompts:
        counts[record.prompt.category] = counts.get(record.prompt.category, 0) + 1
    out = [
        f"# KNN-SSD on a mixed request stream — {result.meta.get('model', '?')}",
        "",
        f"mix ratio {evaluation.mix_ratio} · {len(prompts)} requests "
        f"({', '.join(f'{c} {n}' for c, n in counts.items())}) · {evaluation.switches()} category switches · "
        f"{'greedy' if result.greedy else f'temperature {config.temperature}'} · {config.max_new_tokens} new tokens "
        f"(EOS ignored) · repeats {config.repeats} (median) · {result.meta.get('device')} "
        f"{result.meta.get('dtype')}, {result.meta.get('threads')} threads",
        "",
        "| method | τ | tokens/s | speedup vs ar | acceptance | identical to ar |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, cell in evaluation.methods().items():
        identical = "—" if cell.identical is None else f"{cell.identical}/{cell.prompts}"
        out.append(f"| `{name}` | {cell.tau:.2f} | {cell.tokens_per_second:.2f} | {_fmt(cell.speedup, '{:.2f}×')} | "
                   f"{_fmt(cell.acceptance_rate, '{:.1%}')} | {identical} |")
    out += ["", f"## Routing of `knn-ssd` (fallback radius {evaluation.radius:.4f})", "",
            "| category | requests | nearest anchor of its category | fallbacks to mixed | mean distance |",
            "|---|---:|---:|---:|---:|"]
    for category, row in evaluation.routing().items():
        out.append(f"| {category} | {row['requests']} | {row['correct']} ({row['accuracy']:.0%}) | "
                   f"{row['fallbacks']} | {_fmt(row['mean_distance'], '{:.4f}')} |")
    out += ["", "`ssd[c]` drafts with category c's profile on every request; `knn-ssd` picks the profile of the "
            "prompt's nearest anchor. Speedup and tokens/s include the prefill. Per-request records: records.jsonl.", ""]
    return "\n".join(out)


def write(evaluation: KnnEvaluation, out_dir: str | Path, command: str | None = None) -> list[Path]:
    """The benchmark report (records, per-category tables, plots) plus knn.md and knn.json."""
    out_dir = Path(out_dir)
    written = write_report(evaluation.bench, out_dir, command)
    summary = {
        "mix_ratio": evaluation.mix_ratio, "radius": evaluation.radius, "switches": evaluation.switches(),
        "stream": [r.prompt.question_id for r in evaluation.bench.of(BASELINE)],
        "contenders": evaluation.names, "config": asdict(evaluation.bench.config), "meta": evaluation.bench.meta,
        "methods": {name: asdict(cell) for name, cell in evaluation.methods().items()},
        "routing": evaluation.routing(),
        "domain_matrix": {row: {c: {"tau": cell.tau, "speedup": cell.speedup} for c, cell in cells.items()}
                          for row, cells in evaluation.domain_matrix().items()},
    }
    (out_dir / "knn.md").write_text(render(evaluation) + render_matrix(evaluation), encoding="utf-8")
    plot_matrix(evaluation, out_dir / "domain_matrix.png")
    (out_dir / "knn.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [*written, out_dir / "knn.md", out_dir / "knn.json", out_dir / "domain_matrix.png"]


def render_matrix(evaluation: KnnEvaluation) -> str:
    """Cross-domain table: each profile (row) on each category's prompts (column), τ and speedup vs ar."""
    matrix = evaluation.domain_matrix()
    categories = list(next(iter(matrix.values())))
    out = ["## Cross-domain matrix: profile (row) on prompts of category (column)", "",
           "τ / speedup against `ar` on the same prompts; the diagonal is each profile on its own domain.", "",
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
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("prompt category")
    ax.set_ylabel("skip profile")
    ax.set_title("ssd tokens per target forward (τ) and speedup vs ar, per profile and domain")
    fig.colorbar(image, ax=ax, label="τ")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
