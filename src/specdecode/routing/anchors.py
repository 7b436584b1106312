"""Stage 3 of a bundle build, anchors: prompts embedded as the engine's prefill sees them, k-means
centroids per domain and the fallback radius beyond which a prompt gets the mixed configuration.
The online lookup (:func:`specdecode.artifacts.bundle.nearest`) measures with the same distance."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

from specdecode.artifacts.bundle import MIXED, nearest, pool
from specdecode.errors import InvalidSettingError, PromptError
from specdecode.models.loading import LoadedModel
from specdecode.models.runner import Readout

EMBEDDING = "mean of the target's final hidden states over the prompt minus its last token, L2-normalised"


def embed_prompts(target: LoadedModel, prompts: list[list[int]]) -> np.ndarray:
    """``[prompts, hidden]`` embeddings, computed exactly as the engine's prefill sees each prompt
    (every token but the last), so offline anchors and online queries live in one space."""
    rows = []
    with torch.inference_mode():
        for ids in prompts:
            if len(ids) < 2:
                raise PromptError(f"a prompt of {len(ids)} token(s) cannot be embedded (needs at least 2)")
            rows.append(pool(target.runner.forward(target.runner.new_cache(), ids[:-1], Readout.hidden_only()).hidden))
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
    distances = nearest(anchors, vectors)[0]
    return max(float(np.percentile(distances, percentile)) * margin, float(np.finfo(np.float32).eps))
