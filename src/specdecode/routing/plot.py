"""The t-SNE picture of a bundle's routing space (matplotlib and scikit-learn, imported when drawn)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from specdecode.routing.build import BuiltBundle


def plot_tsne(built: BuiltBundle, path: str | Path, seed: int = 0,
              extra: Mapping[str, np.ndarray] | None = None, title: str | None = None) -> Path:
    """2-D t-SNE of the calibration embeddings (dots) and anchors (crosses), coloured by domain;
    ``extra`` groups (e.g. held-out prompts, a domain not in the bundle) are drawn as triangles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    bundle = built.bundle
    extra = dict(extra or {})
    groups = [built.vectors, bundle.anchors.astype(built.vectors.dtype), *[np.asarray(v, built.vectors.dtype)
                                                                          for v in extra.values()]]
    points = np.concatenate(groups)
    perplexity = float(min(30.0, max(1.0, (len(points) - 1) / 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
    prompts_xy = xy[: len(built.vectors)]
    anchors_xy = xy[len(built.vectors): len(built.vectors) + len(bundle.anchors)]
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    colours = plt.get_cmap("tab10")
    names = list(dict.fromkeys([*bundle.categories, *extra]))
    for i, category in enumerate(bundle.categories):
        colour = colours(names.index(category) % 10)
        mine = [j for j, label in enumerate(built.vector_labels) if label == category]
        ax.scatter(prompts_xy[mine, 0], prompts_xy[mine, 1], s=14, alpha=0.6, color=colour, label=category)
        anchors = [j for j, label in enumerate(bundle.labels) if label == category]
        ax.scatter(anchors_xy[anchors, 0], anchors_xy[anchors, 1], s=90, marker="X", color=colour,
                   edgecolors="black", linewidths=0.8)
    offset = len(built.vectors) + len(bundle.anchors)
    for name, rows in extra.items():
        part = xy[offset: offset + len(rows)]
        offset += len(rows)
        base = name.split(" ")[0]
        colour = colours(names.index(base if base in names else name) % 10)
        ax.scatter(part[:, 0], part[:, 1], s=60, marker="^", color=colour, edgecolors="black", linewidths=0.8,
                   label=name)
    ax.set_title(title or f"KNN-SSD prompt embeddings (t-SNE) — {bundle.model_name}\ndots: build prompts, "
                          "crosses: anchors" + (", triangles: other prompts" if extra else ""))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
