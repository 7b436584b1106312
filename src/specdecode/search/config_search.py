"""Bayesian search over a whole self-draft configuration, for one domain.

The skip search (:mod:`specdecode.search.skip_search`) tunes the 2·L skip variables of a fixed draft
head. A domain's best draft also depends on choices that change what a draft forward costs and
what it can propose, so here they are searched together:

* the 2·L skip flags,
* the draft vocabulary: which ranking it is cut from (``vocab_sources``: e.g. the domain's target
  answers only, or answers and prompts) and its size (one of ``vocab_sizes``; 0 = full head),
* int8 or float weights for the kept sub-layers and the head,
* the confidence threshold (0.05 steps) and the maximum draft length.

Every variable is an integer for the optimiser (`bayesian-optimization`, the skip search's
library and settings). The search runs in two stages, because 2·L skip flags swamp five choices:
one search over all of them at once spent its suggestions on drafts that skip 4–12 sub-layers
(bad drafts on the embedded 18-layer model) and judged the choices on two points.

1. **Choices** with nothing skipped: the first start is ``default_point``, the other starts are
   random choices, then half the iterations are suggestions over the five choices.
2. **Skips** with the best choices fixed: the other half of the iterations search the skip flags,
   from that best point (registered, mask all zeros) and a random sparse mask (density uniform
   in [0, ``max_density``]).

A suggestion already evaluated is replaced by a random unseen point.

A search stops after ``init_points + iterations`` evaluations or once ``budget_s`` seconds are
spent (the seconds of an interrupted run count: the checkpoint keeps them), whichever comes
first, but never before the starts are done. It checkpoints after every evaluation and resumes
from a checkpoint of the same search (each stage's optimiser re-registers the evaluations so far).
The loop, the checkpoints and the repeat rule are the engine's (:mod:`specdecode.search.bayes`);
this module is the space and the two-stage strategy.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from specdecode.errors import InvalidSettingError
from specdecode.models.layer_skip import SkipSet
from specdecode.artifacts.profile import SelfDraftSettings
from specdecode.search.bayes import (Candidate, check_counts, optimizer, random_mask, register, run_search, skip_keys,
                                     suggest)
from specdecode.search.objective import Evaluation, Objective

CHECKPOINT_FORMAT = "specdecode-draft-config-checkpoint"
THRESHOLD_STEP = 0.05


@dataclass(frozen=True)
class DraftSpace:
    """What the configuration search may choose. ``rankings`` maps a vocabulary source name to
    token ids, most useful first; a configuration's vocabulary is a prefix of one of them."""

    rankings: Mapping[str, Sequence[int]]
    vocab_sizes: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    int8: tuple[bool, ...] = (False, True)
    threshold: tuple[float, float] = (0.3, 0.95)
    max_draft: tuple[int, int] = (2, 16)

    def __post_init__(self) -> None:
        if not self.rankings:
            raise InvalidSettingError("a draft space needs at least one vocabulary ranking")
        if not self.vocab_sizes or any(s < 0 for s in self.vocab_sizes):
            raise InvalidSettingError(f"vocabulary sizes must be >= 0 (0: full head), got {self.vocab_sizes}")
        if not self.int8:
            raise InvalidSettingError("int8 choices must not be empty")
        low, high = self.threshold
        if not 0 < low <= high <= 1:
            raise InvalidSettingError(f"threshold range must lie in (0, 1], got {self.threshold}")
        if not 1 <= self.max_draft[0] <= self.max_draft[1]:
            raise InvalidSettingError(f"max_draft range must be 1 <= low <= high, got {self.max_draft}")

    @property
    def sources(self) -> list[str]:
        return list(self.rankings)

    def bounds(self) -> dict[str, tuple[int, int]]:
        low, high = (round(t / THRESHOLD_STEP) for t in self.threshold)
        return {"vocab_size": (0, len(self.vocab_sizes) - 1), "vocab_source": (0, len(self.rankings) - 1),
                "int8": (0, len(self.int8) - 1), "threshold": (low, high), "max_draft": self.max_draft}

    def settings(self, point: Sequence[int], layers: int) -> SelfDraftSettings:
        """The configuration a point (2·L skip flags, then the five choice indices) stands for."""
        mask, (size_i, source_i, int8_i, threshold_k, max_draft) = list(point[: 2 * layers]), point[2 * layers:]
        size = self.vocab_sizes[size_i]
        ranking = list(self.rankings[self.sources[source_i]])
        vocab = tuple(int(t) for t in ranking[:size]) if size else None
        return SelfDraftSettings(SkipSet.from_mask(mask, layers), threshold=round(threshold_k * THRESHOLD_STEP, 2),
                                 max_draft=int(max_draft), vocab_ids=vocab, int8=bool(self.int8[int8_i]))

    def describe(self, point: Sequence[int], layers: int) -> dict[str, Any]:
        size_i, source_i = point[2 * layers], point[2 * layers + 1]
        return {"vocab_source": self.sources[source_i], "vocab_size_requested": self.vocab_sizes[size_i]}

    def default_point(self, layers: int) -> list[int]:
        """Nothing skipped, the middle vocabulary size of the first source, int8 if allowed,
        threshold 0.8 (clamped), max draft 12 (clamped)."""
        bounds = self.bounds()
        threshold = min(max(round(0.8 / THRESHOLD_STEP), bounds["threshold"][0]), bounds["threshold"][1])
        return [0] * (2 * layers) + [len(self.vocab_sizes) // 2, 0, len(self.int8) - 1, threshold,
                                     min(max(12, self.max_draft[0]), self.max_draft[1])]

    def to_dict(self) -> dict[str, Any]:
        return {"vocab_sources": {name: len(ids) for name, ids in self.rankings.items()},
                "vocab_sizes": list(self.vocab_sizes), "int8": list(self.int8), "threshold": list(self.threshold),
                "threshold_step": THRESHOLD_STEP, "max_draft": list(self.max_draft)}


@dataclass
class ConfigSearchResult:
    best: SelfDraftSettings
    best_point: list[int]
    best_evaluation: Evaluation
    history: list[dict[str, Any]] = field(default_factory=list)
    init_points: int = 0
    seconds: float = 0.0
    stopped_by: str = "iterations"  # or "budget"

    @property
    def best_initial_score(self) -> float:
        return max(entry["evaluation"]["score"] for entry in self.history[: self.init_points])


SKIP_STAGE, CHOICE_STAGE = "skips", "choices"
CHOICE_KEYS = ["vocab_size", "vocab_source", "int8", "threshold", "max_draft"]


def _random_choices(rng: np.random.Generator, space: DraftSpace) -> list[int]:
    return [int(rng.integers(low, high + 1)) for low, high in space.bounds().values()]


class ConfigStrategy:
    """Stage 1 searches the five choices with nothing skipped, stage 2 the skip flags with the best
    choices fixed (see the module docstring)."""

    def __init__(self, layers: int, space: DraftSpace, iterations: int, init_points: int, seed: int,
                 max_density: float) -> None:
        self.layers, self.space, self.init_points, self.seed, self.max_density = layers, space, init_points, seed, max_density
        self.skip_keys = skip_keys(layers)
        self.choices = optimizer(space.bounds(), seed)
        self.skips = optimizer({k: (0, 1) for k in self.skip_keys}, seed)
        self.rng = np.random.default_rng(seed)
        self.zeros = [0] * (2 * layers)
        self.starts = [space.default_point(layers)] + [self.zeros + _random_choices(self.rng, space)
                                                        for _ in range(init_points - 1)]
        self.choice_quota = init_points + (iterations + 1) // 2
        self.fixed: list[int] | None = None  # the skip stage's choices, once it has begun

    def _best_choice(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The best point of the choice stage (it skips nothing): where the skip stage starts."""
        return max((e for e in history if e["stage"] == CHOICE_STAGE), key=lambda e: e["evaluation"]["score"])

    def next(self, index: int, history: list[dict[str, Any]]) -> Candidate:
        layers = self.layers
        if index < self.init_points:
            return Candidate(self.starts[index], "start" if index else "default", CHOICE_STAGE)
        if index < self.choice_quota and self.fixed is None:
            return Candidate(self.zeros + suggest(self.choices, CHOICE_KEYS), "suggested", CHOICE_STAGE)
        if self.fixed is None:  # the skip stage begins: a random sparse mask on the best choices yet
            point = random_mask(self.rng, layers, self.max_density) + self._best_choice(history)["point"][2 * layers:]
            return Candidate(point, "start", SKIP_STAGE)
        return Candidate(suggest(self.skips, self.skip_keys) + self.fixed, "suggested", SKIP_STAGE)

    def unexplored(self, candidate: Candidate, index: int, known: set[tuple[int, ...]]) -> list[int]:
        retry = np.random.default_rng([self.seed, index])
        point = candidate.point
        for _ in range(1000):
            if candidate.stage == CHOICE_STAGE:
                point = self.zeros + _random_choices(retry, self.space)
            else:
                point = random_mask(retry, self.layers, self.max_density) + point[2 * self.layers:]
            if tuple(point) not in known:
                break
        return point

    def settings(self, point: list[int]) -> SelfDraftSettings:
        return self.space.settings(point, self.layers)

    def learn(self, candidate: Candidate, score: float, history: list[dict[str, Any]]) -> None:
        """Tell the stage's optimiser; the skip stage first learns its start, the best choice point,
        which skips nothing."""
        point, layers = candidate.point, self.layers
        if candidate.stage == CHOICE_STAGE:
            register(self.choices, CHOICE_KEYS, point[2 * layers:], score)
            return
        if self.fixed is None:
            best = self._best_choice(history)
            self.fixed = best["point"][2 * layers:]
            register(self.skips, self.skip_keys, self.zeros, best["evaluation"]["score"])
        register(self.skips, self.skip_keys, point[: 2 * layers], score)

    def entry(self, candidate: Candidate, evaluation: Evaluation) -> dict[str, Any]:
        return {"point": candidate.point, "stage": candidate.stage, "origin": candidate.origin,
                "evaluation": evaluation.to_dict()}

    def point_of(self, entry: dict[str, Any]) -> list[int]:
        return entry["point"]

    def candidate_of(self, entry: dict[str, Any]) -> Candidate:
        return Candidate(entry["point"], entry["origin"], entry["stage"])


def search_config(
    objective: Objective,
    layers: int,
    space: DraftSpace,
    iterations: int,
    init_points: int = 8,
    seed: int = 0,
    max_density: float = 0.25,
    budget_s: float | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    identity: dict[str, Any] | None = None,
    progress: bool = True,
    description: str = "draft config search",
    on_evaluation: Callable[[int, SelfDraftSettings, Evaluation], None] | None = None,
) -> ConfigSearchResult:
    """Maximise ``objective`` over ``space`` (see the module docstring)."""
    check_counts(init_points, iterations, max_density)
    if budget_s is not None and budget_s <= 0:
        raise InvalidSettingError(f"a search budget must be > 0 seconds, got {budget_s}")
    strategy = ConfigStrategy(layers, space, iterations, init_points, seed, max_density)
    signature = {"identity": identity or {}, "objective": objective.name, "layers": layers, "seed": seed,
                 "init_points": init_points, "max_density": max_density, "space": space.to_dict(),
                 "stages": [CHOICE_STAGE, SKIP_STAGE]}
    run = run_search(objective, strategy, init_points + iterations, init_points, checkpoint, CHECKPOINT_FORMAT,
                     "draft-config", signature, budget_s=budget_s, description=description, progress=progress,
                     on_evaluation=on_evaluation)
    top = max(run.history, key=lambda e: e["evaluation"]["score"])
    return ConfigSearchResult(space.settings(top["point"], layers), list(top["point"]), Evaluation(**top["evaluation"]),
                              run.history, init_points, run.seconds, run.stopped_by)
