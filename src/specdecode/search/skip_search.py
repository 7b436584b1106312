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
search continues where it stopped instead of starting again. The loop, the checkpoints and the
repeat rule are the engine's (:mod:`specdecode.search.bayes`); this module is the strategy.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from bayes_opt import BayesianOptimization

from specdecode.errors import InvalidSettingError
from specdecode.models.layer_skip import SkipSet
from specdecode.artifacts.profile import SelfDraftSettings
from specdecode.search.bayes import (Candidate, check_counts, optimizer, random_mask, register, run_search, skip_keys,
                                     suggest)
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


def random_masks(layers: int, count: int, seed: int, max_density: float) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [random_mask(rng, layers, max_density) for _ in range(count)]


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


class SkipStrategy:
    """Random sparse starts, then the optimiser's suggestions over the 2·L skip flags of ``base``."""

    def __init__(self, layers: int, base: SelfDraftSettings, init_points: int, seed: int, max_density: float,
                 min_skip: int) -> None:
        self.layers, self.base, self.init_points, self.seed = layers, base, init_points, seed
        self.max_density, self.min_skip = max_density, min_skip
        self.keys = skip_keys(layers)
        self.optimizer: BayesianOptimization = optimizer({k: (0, 1) for k in self.keys}, seed)
        self.starts = random_masks(layers, init_points, seed, max_density)

    def next(self, index: int, history: list[dict[str, Any]]) -> Candidate:
        if index < self.init_points:
            mask, origin = self.starts[index], "random start"
        else:
            mask, origin = suggest(self.optimizer, self.keys), "suggested"
        return Candidate(_at_least(mask, self.min_skip, self.seed, index), origin)

    def unexplored(self, candidate: Candidate, index: int, known: set[tuple[int, ...]]) -> list[int]:
        """A random skip set not evaluated yet (seeded by the evaluation index, so resumes repeat it)."""
        rng = np.random.default_rng([self.seed, index])
        for attempt in range(1000):
            mask = _at_least(random_mask(rng, self.layers, self.max_density), self.min_skip, self.seed,
                             index * 1000 + attempt)
            if tuple(mask) not in known:
                return mask
        raise InvalidSettingError("the search has evaluated every skip set it can reach; lower --iterations")

    def settings(self, point: list[int]) -> SelfDraftSettings:
        base = self.base
        return SelfDraftSettings(SkipSet.from_mask(point, self.layers), base.threshold, base.max_draft,
                                 base.vocab_ids, base.int8)

    def learn(self, candidate: Candidate, score: float, history: list[dict[str, Any]]) -> None:
        register(self.optimizer, self.keys, candidate.point, score)

    def entry(self, candidate: Candidate, evaluation: Evaluation) -> dict[str, Any]:
        return {"mask": candidate.point, "origin": candidate.origin, "evaluation": evaluation.to_dict()}

    def point_of(self, entry: dict[str, Any]) -> list[int]:
        return entry["mask"]

    def candidate_of(self, entry: dict[str, Any]) -> Candidate:
        return Candidate(entry["mask"], entry["origin"])


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
    check_counts(init_points, iterations, max_density)
    if not 0 <= min_skip <= 2 * layers:
        raise InvalidSettingError(f"min_skip must be in [0, {2 * layers}], got {min_skip}")
    strategy = SkipStrategy(layers, base, init_points, seed, max_density, min_skip)
    signature = {"identity": identity or {}, "objective": objective.name, "layers": layers, "seed": seed,
                 "init_points": init_points, "max_density": max_density, "min_skip": min_skip}
    report = None if on_evaluation is None else (
        lambda count, settings, evaluation: on_evaluation(count, settings.skip, evaluation))
    run = run_search(objective, strategy, init_points + iterations, init_points, checkpoint, CHECKPOINT_FORMAT,
                     "skip-search", signature, state=strategy.optimizer, description=f"skip search ({objective.name})",
                     progress=progress, on_evaluation=report)
    top = max(run.history, key=lambda e: e["evaluation"]["score"])
    return SearchResult(strategy.settings(top["mask"]), Evaluation(**top["evaluation"]), run.history, init_points)
