"""Bayesian optimisation over the 2·L binary skip variables (Draft & Verify; KNN-SSD).

Each variable says whether the draft skips one attention or one MLP sub-layer. The search
starts from ``init_points`` random skip sets, then lets `bayesian-optimization` (a Gaussian
process over the integer-valued variables, upper-confidence-bound acquisition) suggest
``iterations`` more. When it suggests a skip set it has already seen, a random unseen one is
evaluated instead, so every evaluation teaches the model something. Random skip sets draw
each variable with its own skip probability, uniform in [0, ``max_density``]: on small models
skipping half the network makes a useless draft, so sparser starting points teach the GP more.

The search is seedable (the random starts and the optimiser's own random state) and
resumable: after every evaluation it writes a checkpoint (all evaluations plus the optimiser's
state, including its random generator), and a run given an existing checkpoint of the same
search continues where it stopped instead of starting again.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from bayes_opt import BayesianOptimization
from sklearn.exceptions import ConvergenceWarning
from tqdm import tqdm

from specdecode.errors import InvalidSettingError
from specdecode.models.layer_skip import SkipSet
from specdecode.propose.self_draft import SelfDraftSettings
from specdecode.search.checkpoint import load_search, save_search
from specdecode.search.objective import Evaluation, Objective

CHECKPOINT_FORMAT = "specdecode-ssd-search-checkpoint"


@dataclass
class SearchResult:
    best: SelfDraftSettings
    best_evaluation: Evaluation
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per evaluation, in order
    init_points: int = 0

    @property
    def best_initial_score(self) -> float:
        return max(entry["evaluation"]["score"] for entry in self.history[: self.init_points])


def _keys(layers: int) -> list[str]:
    return [f"attn_{i:03d}" for i in range(layers)] + [f"mlp_{i:03d}" for i in range(layers)]


def random_masks(layers: int, count: int, seed: int, max_density: float) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(count):
        density = rng.uniform(0.0, max_density)
        masks.append([int(v) for v in rng.random(2 * layers) < density])
    return masks


def _at_least(mask: list[int], min_skip: int, seed: int, index: int) -> list[int]:
    """``mask`` with random extra sub-layers skipped until at least ``min_skip`` are (seeded, resumable)."""
    missing = min_skip - sum(mask)
    if missing <= 0:
        return mask
    rng = np.random.default_rng([seed, index, 1])
    kept = [i for i, v in enumerate(mask) if not v]
    repaired = list(mask)
    for i in rng.choice(kept, size=missing, replace=False):
        repaired[int(i)] = 1
    return repaired


def _unexplored(layers: int, known: dict, seed: int, index: int, max_density: float, min_skip: int = 0) -> list[int]:
    """A random skip set not evaluated yet (seeded by the evaluation index, so resumes repeat it)."""
    rng = np.random.default_rng([seed, index])
    for attempt in range(1000):
        density = rng.uniform(0.0, max_density)
        mask = _at_least([int(v) for v in rng.random(2 * layers) < density], min_skip, seed, index * 1000 + attempt)
        if tuple(mask) not in known:
            return mask
    raise InvalidSettingError("the search has evaluated every skip set it can reach; lower --iterations")


def search_skip_set(
    objective: Objective,
    layers: int,
    base: SelfDraftSettings,
    iterations: int,
    init_points: int = 8,
    seed: int = 0,
    max_density: float = 0.5,
    checkpoint: str | os.PathLike[str] | None = None,
    identity: dict[str, Any] | None = None,
    progress: bool = True,
    on_evaluation: Callable[[int, SkipSet, Evaluation], None] | None = None,
    min_skip: int = 0,
) -> SearchResult:
    """Search the skip set of ``base`` (other draft settings stay as given) maximising ``objective``.

    ``identity`` describes the search (model, data, objective...): a checkpoint written by a
    search with another identity, seed or start is refused rather than silently mixed in.
    ``min_skip`` forces every evaluated skip set to skip at least that many sub-layers (a draft
    budget, as in Draft & Verify's setting): a candidate with fewer gets random extra skips.
    """
    if init_points < 1:
        raise InvalidSettingError(f"the search needs at least 1 initial point, got {init_points}")
    if iterations < 0:
        raise InvalidSettingError(f"search iterations must be >= 0, got {iterations}")
    if not 0 <= min_skip <= 2 * layers:
        raise InvalidSettingError(f"min_skip must be in [0, {2 * layers}], got {min_skip}")
    if not 0 < max_density <= 1:
        raise InvalidSettingError(f"max_density must be in (0, 1], got {max_density}")
    keys = _keys(layers)
    with warnings.catch_warnings():
        # integer parameters are flagged experimental; continuous ones rounded to 0/1 would make the
        # acquisition optimiser ~40x slower here (L-BFGS restarts in 2·L dimensions)
        warnings.filterwarnings("ignore", message="Non-float parameters are experimental")
        optimizer = BayesianOptimization(f=None, pbounds={k: (0, 1, int) for k in keys}, random_state=seed,
                                         verbose=0)
    signature = {"identity": identity or {}, "objective": objective.name, "layers": layers, "seed": seed,
                 "init_points": init_points, "max_density": max_density, "min_skip": min_skip}
    history: list[dict[str, Any]] = []
    if checkpoint is not None and Path(checkpoint).exists():
        history = list(load_search(Path(checkpoint), CHECKPOINT_FORMAT, "skip-search", signature, optimizer)["history"])
    known = {tuple(entry["mask"]): entry for entry in history}
    starts = random_masks(layers, init_points, seed, max_density)
    total = init_points + iterations
    bar = tqdm(total=total, initial=min(len(history), total), desc=f"skip search ({objective.name})",
               unit="eval", disable=not progress)
    try:
        while len(history) < total:
            if len(history) < init_points:
                mask, origin = starts[len(history)], "random start"
            else:
                with warnings.catch_warnings():  # GP length scales hitting their bounds: expected here
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    suggestion = optimizer.suggest()
                mask, origin = [int(round(float(suggestion[k]))) for k in keys], "suggested"
            mask = _at_least(mask, min_skip, seed, len(history))
            if tuple(mask) in known:  # a repeated start, or the GP is sure of this one: explore instead
                mask = _unexplored(layers, known, seed, len(history), max_density, min_skip)
                origin = "random (repeat)"
            skip = SkipSet.from_mask(mask, layers)
            evaluation = objective(SelfDraftSettings(skip, base.threshold, base.max_draft, base.vocab_ids, base.int8))
            optimizer.register(dict(zip(keys, mask)), evaluation.score)
            entry = {"mask": mask, "origin": origin, "evaluation": evaluation.to_dict()}
            history.append(entry)
            known[tuple(mask)] = entry
            if checkpoint is not None:
                save_search(Path(checkpoint), CHECKPOINT_FORMAT, signature, history, optimizer)
            if on_evaluation is not None:
                on_evaluation(len(history), skip, evaluation)
            best = max(e["evaluation"]["score"] for e in history)
            bar.set_postfix(best=f"{best:.2f}", last=f"{evaluation.score:.2f}")
            bar.update(1)
    finally:
        bar.close()
    top = max(history, key=lambda e: e["evaluation"]["score"])
    best_skip = SkipSet.from_mask(top["mask"], layers)
    best = SelfDraftSettings(best_skip, base.threshold, base.max_draft, base.vocab_ids, base.int8)
    return SearchResult(best, Evaluation(**top["evaluation"]), history, init_points)
