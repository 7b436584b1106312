"""Build a KNN-SSD bundle: one skip profile per category plus a mixed one, and k-means anchors.

Offline, per category: search a skip profile on a few calibration prompts (or reuse one already
searched), embed the category's prompts with the target, cluster them with k-means; the
centroids become anchors labelled with the category. The mixed fallback profile is searched on
calibration prompts taken in turn from every category. The fallback radius is a high percentile
of the calibration prompts' distances to their nearest anchor, times a margin.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.neighbors import NearestNeighbors

from specdecode.errors import InvalidSettingError, PromptError
from specdecode.models.cache import KVCache, forward
from specdecode.models.loading import LoadedModel
from specdecode.propose.self_draft import SelfDraftSettings
from specdecode.routing.bundle import MIXED, ProfileBundle, pool
from specdecode.search.build import build_profile, draft_vocabulary
from specdecode.search.calibration import CalibrationSet, calibrate
from specdecode.search.objective import CostModel
from specdecode.search.profile import SkipProfile

EMBEDDING = "mean of the target's final hidden states over the prompt minus its last token, L2-normalised"


def embed_prompts(target: LoadedModel, prompts: list[list[int]]) -> np.ndarray:
    """``[prompts, hidden]`` embeddings, computed exactly as the engine's prefill sees each prompt
    (every token but the last), so offline anchors and online queries live in one space."""
    rows = []
    with torch.inference_mode():
        for ids in prompts:
            if len(ids) < 2:
                raise PromptError(f"a prompt of {len(ids)} token(s) cannot be embedded (needs at least 2)")
            rows.append(pool(forward(target.model, KVCache(), ids[:-1], logits_to_keep=0)))
    return np.stack(rows)


def check_categories(counts: Mapping[str, int], anchors_per_category: int) -> None:
    """Refuse what k-means cannot cluster: an empty category, fewer prompts than anchors."""
    if isinstance(anchors_per_category, bool) or not isinstance(anchors_per_category, int) or anchors_per_category < 1:
        raise InvalidSettingError(f"anchors per category must be an integer >= 1, got {anchors_per_category!r}")
    if not counts:
        raise InvalidSettingError("a bundle needs at least one category")
    for category, count in counts.items():
        if category == MIXED:
            raise InvalidSettingError(f"category name {MIXED!r} is reserved for the fallback profile")
        if not category or not all(c.isalnum() or c in "_.-" for c in category):
            raise InvalidSettingError(f"category {category!r} must be a non-empty name of letters, digits, '_', '.', '-'")
        if count == 0:
            raise InvalidSettingError(f"category {category!r} has no prompts")
        if count < anchors_per_category:
            raise InvalidSettingError(
                f"category {category!r} has {count} prompt(s), fewer than the {anchors_per_category} anchors per category"
            )


def fit_anchors(
    vectors: Mapping[str, np.ndarray], anchors_per_category: int = 10, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """k-means centroids of each category's embeddings (re-normalised to unit length), and their labels."""
    check_categories({c: len(v) for c, v in vectors.items()}, anchors_per_category)
    centres, labels = [], []
    for category, rows in vectors.items():
        with warnings.catch_warnings():  # duplicate prompts: fewer distinct points than clusters
            warnings.simplefilter("ignore", ConvergenceWarning)
            kmeans = KMeans(n_clusters=anchors_per_category, n_init=10, random_state=seed).fit(rows)
        found = kmeans.cluster_centers_
        centres.append(found / np.maximum(np.linalg.norm(found, axis=1, keepdims=True), 1e-12))
        labels += [category] * anchors_per_category
    return np.concatenate(centres), labels


def fallback_radius(anchors: np.ndarray, vectors: np.ndarray, percentile: float = 95.0, margin: float = 2.0) -> float:
    """Distance beyond which a prompt is unlike the calibration data: ``percentile`` of the calibration
    prompts' nearest-anchor distances, times ``margin``. The margin also covers that k-means placed
    the anchors *on* those prompts: new prompts of the same category lie farther (on synthetic
    clusters their largest distance was ~1.8x the calibration 95th percentile)."""
    if not 0 < percentile <= 100:
        raise InvalidSettingError(f"radius percentile must be in (0, 100], got {percentile}")
    if margin <= 0:
        raise InvalidSettingError(f"radius margin must be > 0, got {margin}")
    distances = NearestNeighbors(n_neighbors=1).fit(anchors).kneighbors(vectors)[0][:, 0]
    return max(float(np.percentile(distances, percentile)) * margin, float(np.finfo(np.float32).eps))


def interleave(sets: list[CalibrationSet], size: int) -> CalibrationSet:
    """``size`` calibration prompts taken in turn from each set: the mixed profile's calibration."""
    picks = [(s, i) for i in range(max(len(s.prompts) for s in sets)) for s in sets if i < len(s.prompts)][:size]
    return CalibrationSet([s.prompts[i] for s, i in picks], [s.continuations[i] for s, i in picks],
                          [s.ar_seconds[i] for s, i in picks], sets[0].max_new_tokens)


@dataclass
class BuiltBundle:
    """The bundle and the calibration embeddings it was fitted on (for plots)."""

    bundle: ProfileBundle
    vectors: np.ndarray
    vector_labels: list[str]


def build_bundle(
    target: LoadedModel,
    prompts: Mapping[str, list[str]],
    base: SelfDraftSettings | None = None,
    *,
    anchors_per_category: int = 10,
    search_prompts: int = 8,
    max_new_tokens: int = 32,
    draft_vocab: int = 0,
    reuse: Mapping[str, SkipProfile] | None = None,
    percentile: float = 95.0,
    margin: float = 2.0,
    seed: int = 0,
    checkpoints: str | Path | None = None,
    progress: bool = True,
    search_options: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> BuiltBundle:
    """Search (or reuse, from ``reuse`` keyed by category or ``mixed``) the profiles, embed and cluster.

    ``prompts`` maps each category to its prompt texts, as the requests will look; the first
    ``search_prompts`` of each calibrate its search. ``search_options`` go to
    :func:`~specdecode.search.build.build_profile` (objective, iterations, ...).
    """
    check_categories({c: len(p) for c, p in prompts.items()}, anchors_per_category)
    if target.tokenizer is None:
        raise PromptError(f"model {target.name!r} has no tokenizer: building a bundle needs one")
    if search_prompts < 1:
        raise InvalidSettingError(f"search prompts must be >= 1, got {search_prompts}")
    base = base or SelfDraftSettings()
    reuse = dict(reuse or {})
    for name, profile in reuse.items():
        profile.check_model(target, f"profile for {name!r}")
    encoded = {c: [list(target.tokenizer(text)["input_ids"]) for text in texts] for c, texts in prompts.items()}

    def log(message: str) -> None:
        if progress:
            print(message, file=sys.stderr)

    profiles: dict[str, SkipProfile] = {}
    sets: dict[str, CalibrationSet] = {}
    options = dict(search_options or {})
    if any(c not in reuse for c in [*encoded, MIXED]):
        log(f"calibrating: greedy ar on {search_prompts} prompts of each of {len(encoded)} categories")
        sets = {c: calibrate(target, ids[:search_prompts], max_new_tokens) for c, ids in encoded.items()}
        sets[MIXED] = interleave(list(sets.values()), search_prompts)
        if draft_vocab:
            vocab = draft_vocabulary(target, sets[MIXED], draft_vocab, [t for texts in prompts.values() for t in texts])
            base = replace(base, vocab_ids=vocab)
        if options.get("objective", "simulated") == "simulated" and "costs" not in options:
            mixed = sets[MIXED]  # one cost model for every search: timed once, comparable scores
            options["costs"] = CostModel.measure(target, mixed.prompts[0] + mixed.continuations[0], base)
    for number, category in enumerate([*encoded, MIXED], 1):
        if category in reuse:
            profiles[category] = reuse[category]
            log(f"[{number}/{len(encoded) + 1}] {category}: reusing the given profile")
            continue
        log(f"[{number}/{len(encoded) + 1}] {category}: searching a skip profile")
        checkpoint = Path(checkpoints) / f"{category}.checkpoint.json" if checkpoints is not None else None
        profiles[category] = build_profile(target, sets[category], base, seed=seed, checkpoint=checkpoint,
                                           progress=progress, metadata={"category": category, **(metadata or {})},
                                           **options)

    log(f"embedding {sum(map(len, encoded.values()))} prompts")
    vectors = {c: embed_prompts(target, ids) for c, ids in encoded.items()}
    anchors, labels = fit_anchors(vectors, anchors_per_category, seed)
    stacked = np.concatenate(list(vectors.values()))
    radius = fallback_radius(anchors, stacked, percentile, margin)
    nearest = NearestNeighbors(n_neighbors=1).fit(anchors).kneighbors(stacked)[0][:, 0]
    mixed = profiles.pop(MIXED)
    settings = {
        **(metadata or {}), "anchors_per_category": anchors_per_category,
        "prompts_per_category": {c: len(p) for c, p in prompts.items()}, "search_prompts": search_prompts,
        "max_new_tokens": max_new_tokens, "radius_percentile": percentile, "radius_margin": margin, "seed": seed,
        "calibration_distances": {"p50": float(np.median(nearest)), "p95": float(np.percentile(nearest, 95)),
                                  "max": float(nearest.max())},
        "reused_profiles": sorted(reuse), "embedding": EMBEDDING, "metric": "euclidean",
        "kmeans": "sklearn KMeans, n_init 10, centroids re-normalised",
    }
    bundle = ProfileBundle(anchors.astype(np.float32), labels, profiles, mixed, radius, target.fingerprint,
                           target.name, settings)
    vector_labels = [c for c, rows in vectors.items() for _ in range(len(rows))]
    return BuiltBundle(bundle, stacked, vector_labels)


def plot_tsne(built: BuiltBundle, path: str | Path, seed: int = 0) -> Path:
    """2-D t-SNE of the calibration embeddings (dots) and anchors (crosses), coloured by category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    bundle = built.bundle
    points = np.concatenate([built.vectors, bundle.anchors.astype(built.vectors.dtype)])
    perplexity = float(min(30.0, max(1.0, (len(points) - 1) / 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
    prompts_xy, anchors_xy = xy[: len(built.vectors)], xy[len(built.vectors):]
    fig, ax = plt.subplots(figsize=(7.0, 6.0))
    colours = plt.get_cmap("tab10")
    for i, category in enumerate(bundle.categories):
        colour = colours(i % 10)
        mine = [j for j, label in enumerate(built.vector_labels) if label == category]
        ax.scatter(prompts_xy[mine, 0], prompts_xy[mine, 1], s=14, alpha=0.6, color=colour, label=category)
        anchors = [j for j, label in enumerate(bundle.labels) if label == category]
        ax.scatter(anchors_xy[anchors, 0], anchors_xy[anchors, 1], s=90, marker="X", color=colour,
                   edgecolors="black", linewidths=0.8)
    ax.set_title(f"KNN-SSD prompt embeddings (t-SNE) — {bundle.model_name}\ndots: prompts, crosses: anchors")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
