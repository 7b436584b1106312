"""Mixed-stream evaluation of KNN-SSD: a stream of requests that switches domain, with ``ar``,
``ssd`` with the mixed configuration, ``ssd`` with each domain's configuration, and ``knn-ssd``.

The stream may hold domains the bundle was not built on ("unseen"): their requests show what the
router does with something new (fall back to the mixed configuration, or borrow a neighbour's).

The methods run through the benchmark runner (same prompts, interleaved per request, warm-up,
identity check against ``ar``), one request at a time with a checkpoint after each, so an
interrupted evaluation resumes; this module builds the stream, names the contenders and adds what
only KNN-SSD has: how often the router picked the request's own domain, and the cross-domain matrix
(written by :mod:`specdecode.bench.knn_report`).
:func:`routing_check` routes many more held-out prompts by their embedding alone (no generation).
"""

from __future__ import annotations

import json
import pickle
import random
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from specdecode.artifacts.bundle import MIXED, ProfileBundle
from specdecode.bench.contenders import ContenderSpec
from specdecode.bench.dataset import BenchPrompt, format_prompt
from specdecode.bench.metrics import Aggregate, aggregate
from specdecode.bench.runner import BASELINE, BenchConfig, BenchResult, run_bench
from specdecode.errors import InvalidSettingError
from specdecode.models.loading import LoadedModel
from specdecode.routing.anchors import embed_prompts
from specdecode.routing.build import BuiltBundle
from specdecode.routing.plot import plot_tsne
from specdecode.search.calibration import load_labelled_prompts

KNN = "knn-ssd"


def category_prompts(
    path: str | Path, categories: list[str], per_category: int, offset: int, field: str = "category",
    exclude: set[str] | None = None, at_most: bool = False, every: bool = False,
) -> dict[str, list[BenchPrompt]]:
    """Prompts ``offset .. offset + per_category`` of each category (a bundle is built on the first ones,
    evaluated on the ones after them), skipping any whose text is in ``exclude`` (``at_most``: take
    fewer where a category has fewer; ``every``: all of them from ``offset`` on). A prompt's id is ``<category>-<position in the file's category>``."""
    if per_category < 1 or offset < 0:
        raise InvalidSettingError(f"need per-category >= 1 and prompt offset >= 0, got {per_category} and {offset}")
    records = load_labelled_prompts(path, field)
    exclude = exclude or set()
    chosen = {}
    for category in categories:
        texts = [(i, text) for i, text in enumerate(t for label, t in records if label == category)]
        usable = [(i, text) for i, text in texts[offset:] if text not in exclude]
        if len(usable) < per_category and not (at_most and usable):
            raise InvalidSettingError(f"category {category!r} has {len(texts)} prompts in {Path(path).name}; "
                                      f"{per_category} from offset {offset} need {offset + per_category}"
                                      + (f" ({len(texts[offset:]) - len(usable)} excluded)" if exclude else ""))
        chosen[category] = [BenchPrompt(f"{category}-{i}", category, text)
                            for i, text in (usable if every else usable[:per_category])]
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


OTHER = "knn-ssd[other]"


def contenders(bundle: ProfileBundle, bundle_path: str | Path, compare: str | Path | None = None
               ) -> dict[str, ContenderSpec]:
    """Short name → contender: ar, ssd with the mixed configuration, ssd with each domain's, knn-ssd
    (and knn-ssd with another bundle, ``compare``)."""
    if not bundle.sources:
        raise InvalidSettingError("evaluate a bundle loaded from disk (its profiles are passed to ssd as files)")
    specs = {BASELINE: ContenderSpec(BASELINE), f"ssd[{MIXED}]": ContenderSpec("ssd", {"profile": str(bundle.sources[MIXED])})}
    for category in bundle.categories:
        specs[f"ssd[{category}]"] = ContenderSpec("ssd", {"profile": str(bundle.sources[category])})
    specs[KNN] = ContenderSpec(KNN, {"bundle": str(bundle_path)})
    if compare is not None:
        specs[OTHER] = ContenderSpec(KNN, {"bundle": str(compare)})
    return specs


@dataclass
class KnnEvaluation:
    bench: BenchResult
    names: dict[str, str]  # short name → contender label in ``bench``
    mix_ratio: float
    radius: float | dict[str, float]
    bundle_domains: list[str] = field(default_factory=list)
    complete: bool = True  # False: a budget stopped the stream early
    seconds: float = 0.0

    def methods(self, categories: list[str] | None = None) -> dict[str, Aggregate]:
        """Each method over the stream (or over the requests of ``categories``)."""
        def keep(records):
            return [r for r in records if categories is None or r.prompt.category in categories]

        baseline = keep(self.bench.of(BASELINE))
        return {name: aggregate(keep(self.bench.of(label)), baseline) for name, label in self.names.items()}

    def unseen(self) -> list[str]:
        return [c for c in dict.fromkeys(r.prompt.category for r in self.bench.of(BASELINE))
                if self.bundle_domains and c not in self.bundle_domains]

    def routing(self) -> dict[str, dict[str, Any]]:
        """Per domain (bundle domains, then unseen ones), over the bundle's domains, and overall:
        requests, nearest anchor of the right domain, fallbacks, where requests went."""
        rows: dict[str, dict[str, Any]] = {}
        records = self.bench.of(self.names[KNN])
        categories = list(dict.fromkeys(r.prompt.category for r in records))
        seen = [c for c in categories if not self.bundle_domains or c in self.bundle_domains]
        keys = [*seen, *[c for c in categories if c not in seen], "bundle domains", "overall"]
        for key in keys:
            if key == "bundle domains":
                mine = [r for r in records if r.prompt.category in seen]
            else:
                mine = [r for r in records if key in ("overall", r.prompt.category)]
            if not mine:
                continue
            routes = [r.stats.extra["route"] for r in mine]
            correct = sum(route["category"] == r.prompt.category for route, r in zip(routes, mine))
            distances = [route["distance"] for route in routes if route["distance"] is not None]
            went: dict[str, int] = {}
            for route in routes:
                went[route["profile"]] = went.get(route["profile"], 0) + 1
            rows[key] = {"requests": len(mine), "correct": correct, "accuracy": correct / len(mine),
                         "fallbacks": sum(route["fallback"] for route in routes),
                         "mean_distance": sum(distances) / len(distances) if distances else None,
                         "configurations": went, "unseen": key in categories and key not in seen}
        return rows

    def domain_matrix(self) -> dict[str, dict[str, Aggregate]]:
        """Contender → prompt domain → aggregate: row ``ssd[c]`` is configuration c on every domain."""
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

    def headline(self) -> dict[str, Any]:
        """knn-ssd against the single mixed configuration and ar (whole stream), and on unseen domains."""
        methods = self.methods()
        knn, mixed = methods[KNN], methods[f"ssd[{MIXED}]"]
        routing = self.routing()
        out: dict[str, Any] = {
            "tau_vs_mixed": knn.tau / mixed.tau if mixed.tau else None,
            "wall_vs_mixed": knn.tokens_per_second / mixed.tokens_per_second if mixed.tokens_per_second else None,
            "wall_vs_ar": knn.speedup, "mixed_wall_vs_ar": mixed.speedup,
            "routing_accuracy_bundle_domains": routing.get("bundle domains", {}).get("accuracy"),
        }
        unseen = self.unseen()
        if unseen:
            part = self.methods(unseen)
            out["unseen"] = {"domains": unseen, "knn_tau": part[KNN].tau, "mixed_tau": part[f"ssd[{MIXED}]"].tau,
                             "knn_speedup": part[KNN].speedup, "mixed_speedup": part[f"ssd[{MIXED}]"].speedup,
                             "tau_vs_mixed": part[KNN].tau / part[f"ssd[{MIXED}]"].tau
                             if part[f"ssd[{MIXED}]"].tau else None}
        if OTHER in methods:
            other = methods[OTHER]
            out["vs_other_bundle"] = {"tau": knn.tau / other.tau if other.tau else None,
                                      "wall": knn.tokens_per_second / other.tokens_per_second
                                      if other.tokens_per_second else None}
        return out


def evaluate(
    target: LoadedModel,
    bundle: ProfileBundle,
    bundle_path: str | Path,
    stream: list[BenchPrompt],
    config: BenchConfig,
    mix_ratio: float,
    progress: bool = True,
    checkpoints: str | Path | None = None,
    budget_s: float | None = None,
    compare: str | Path | None = None,
) -> KnnEvaluation:
    """Run every contender on the stream (greedy or sampling, as ``config`` says), one request at a
    time (contender order rotating per request); after each request its records go to
    ``checkpoints`` and a rerun with the same stream and contenders picks up after the last one.
    ``budget_s``: start no new request after this many seconds of this run."""
    bundle.check_model(target)
    specs = contenders(bundle, bundle_path, compare)
    order = list(specs.values())
    identity = {"model": target.fingerprint, "stream": [p.question_id for p in stream],
                "contenders": [s.label for s in order], "config": asdict(config)}
    store = Path(checkpoints) if checkpoints is not None else None
    if store is not None:
        store.mkdir(parents=True, exist_ok=True)
        index = store / "stream.json"
        if index.exists() and json.loads(index.read_text()) != json.loads(json.dumps(identity)):
            raise InvalidSettingError(f"checkpoints in {str(store)!r} belong to another evaluation (stream, contenders "
                                      "or settings differ); delete them or choose another --out")
        index.write_text(json.dumps(identity))
    started = time.perf_counter()
    results: list[BenchResult] = []
    warmed = False
    complete = True
    bar = tqdm(total=len(stream), desc="knn-eval", unit="request", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        for i, prompt in enumerate(stream):
            path = store / f"request-{i:03d}.pkl" if store is not None else None
            if path is not None and path.exists():
                results.append(pickle.loads(path.read_bytes()))
                bar.update()
                continue
            if budget_s is not None and time.perf_counter() - started >= budget_s:
                complete = False
                break
            shift = i % len(order)
            rotated = order[shift:] + order[:shift]
            chunk = replace(config, warmup=0 if warmed else config.warmup, seed=config.seed + i)
            bar.set_postfix_str(f"{prompt.category} #{prompt.question_id}, {time.perf_counter() - started:.0f}s"
                                + (f"/{budget_s:.0f}s" if budget_s else ""))
            result = run_bench(target, [prompt], rotated, config=chunk, progress=False)
            warmed = True
            results.append(result)
            if path is not None:
                staging = path.with_name(f".{path.name}.tmp")
                staging.write_bytes(pickle.dumps(result))
                staging.replace(path)
            bar.update()
    finally:
        bar.close()
    if not results:
        raise InvalidSettingError("no request of the stream was run (budget too small?)")
    labels = [s.label for s in order]
    infos = {c.label: c for c in results[0].contenders}
    records = [r for result in results for label in labels for r in result.records if r.label == label]
    merged = BenchResult(config, [infos[label] for label in labels], records, results[-1].meta)
    return KnnEvaluation(merged, {name: spec.label for name, spec in specs.items()}, mix_ratio, bundle.radius,
                         bundle.categories, complete, time.perf_counter() - started)


def routing_check(target: LoadedModel, bundle: ProfileBundle, prompts: dict[str, list[BenchPrompt]], unseen: list[str],
                  template: str, path: Path) -> dict:
    """Route every held-out prompt (and every prompt of the unseen domains) by its embedding alone —
    no generation, so many more requests than the timed stream — and draw the t-SNE picture."""
    vectors = {c: embed_prompts(target, [target.tokenizer(format_prompt(p, template))["input_ids"] for p in rows])
               for c, rows in prompts.items()}
    rows: dict[str, dict] = {}
    for category, block in vectors.items():
        routes = [bundle.route(v) for v in block]
        went: dict[str, int] = {}
        for route in routes:
            went[route.profile] = went.get(route.profile, 0) + 1
        rows[category] = {"prompts": len(routes), "unseen": category in unseen,
                          "nearest_own": sum(r.category == category for r in routes),
                          "fallbacks": sum(r.fallback for r in routes), "configurations": went,
                          "ids": [p.question_id for p in prompts[category]]}
    seen = [c for c in rows if c not in unseen]
    total = sum(rows[c]["prompts"] for c in seen)
    summary = {"per_domain": rows, "bundle_domains": {
        "prompts": total, "nearest_own": sum(rows[c]["nearest_own"] for c in seen),
        "accuracy": sum(rows[c]["nearest_own"] for c in seen) / total if total else None,
        "own_configuration": sum(rows[c]["configurations"].get(c, 0) for c in seen) / total if total else None}}
    built = BuiltBundle(bundle, np.concatenate([vectors[c] for c in seen]), [c for c in seen for _ in vectors[c]])
    extra = {f"{c} (not in the bundle)": vectors[c] for c in unseen}
    plot_tsne(built, path, extra=extra, title=f"KNN-SSD routing space (t-SNE) — {bundle.model_name}\n"
                                             "dots: held-out prompts, crosses: anchors, triangles: unseen domain")
    return summary
