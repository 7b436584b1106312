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
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
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


def _skip_keys(layers: int) -> list[str]:
    return [f"attn_{i:03d}" for i in range(layers)] + [f"mlp_{i:03d}" for i in range(layers)]


CHOICE_KEYS = ["vocab_size", "vocab_source", "int8", "threshold", "max_draft"]


def _random_mask(rng: np.random.Generator, layers: int, max_density: float) -> list[int]:
    density = rng.uniform(0.0, max_density)
    return [int(v) for v in rng.random(2 * layers) < density]


def _random_choices(rng: np.random.Generator, space: DraftSpace) -> list[int]:
    return [int(rng.integers(low, high + 1)) for low, high in space.bounds().values()]


def _optimizer(bounds: dict[str, tuple[int, int, type]], seed: int) -> BayesianOptimization:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Non-float parameters are experimental")
        return BayesianOptimization(f=None, pbounds=bounds, random_state=seed, verbose=0)


def _register(optimizer: BayesianOptimization, keys: list[str], values: Sequence[int], score: float) -> None:
    with warnings.catch_warnings():  # GP length scales at their bounds: expected with few points
        warnings.simplefilter("ignore", ConvergenceWarning)
        optimizer.register(dict(zip(keys, values)), score)


def _suggest(optimizer: BayesianOptimization, keys: list[str]) -> list[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        suggestion = optimizer.suggest()
    return [int(round(float(suggestion[k]))) for k in keys]


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
    if init_points < 1:
        raise InvalidSettingError(f"the search needs at least 1 initial point, got {init_points}")
    if iterations < 0:
        raise InvalidSettingError(f"search iterations must be >= 0, got {iterations}")
    if not 0 < max_density <= 1:
        raise InvalidSettingError(f"max_density must be in (0, 1], got {max_density}")
    if budget_s is not None and budget_s <= 0:
        raise InvalidSettingError(f"a search budget must be > 0 seconds, got {budget_s}")
    skip_keys = _skip_keys(layers)
    choices = _optimizer({k: (low, high, int) for k, (low, high) in space.bounds().items()}, seed)
    skips = _optimizer({k: (0, 1, int) for k in skip_keys}, seed)
    signature = {"identity": identity or {}, "objective": objective.name, "layers": layers, "seed": seed,
                 "init_points": init_points, "max_density": max_density, "space": space.to_dict(),
                 "stages": [CHOICE_STAGE, SKIP_STAGE]}
    history: list[dict[str, Any]] = []
    spent = 0.0
    if checkpoint is not None and Path(checkpoint).exists():
        resumed = load_search(Path(checkpoint), CHECKPOINT_FORMAT, "draft-config", signature, None)
        history, spent = list(resumed["history"]), float(resumed.get("seconds", 0.0))
    known = {tuple(entry["point"]) for entry in history}
    rng = np.random.default_rng(seed)
    zeros = [0] * (2 * layers)
    starts = [space.default_point(layers)] + [zeros + _random_choices(rng, space) for _ in range(init_points - 1)]
    total = init_points + iterations
    choice_quota = init_points + (iterations + 1) // 2

    fixed: list[int] | None = None  # the skip stage's choices, once it has begun

    def best_choice() -> dict[str, Any]:
        """The best point of the choice stage (it skips nothing): where the skip stage starts."""
        return max((e for e in history if e["stage"] == CHOICE_STAGE), key=lambda e: e["evaluation"]["score"])

    def record(stage: str, point: list[int], score: float) -> None:
        """Tell the stage's optimiser; the skip stage first learns its start, the best choice
        point, which skips nothing."""
        nonlocal fixed
        if stage == CHOICE_STAGE:
            _register(choices, CHOICE_KEYS, point[2 * layers:], score)
            return
        if fixed is None:
            best = best_choice()
            fixed = best["point"][2 * layers:]
            _register(skips, skip_keys, zeros, best["evaluation"]["score"])
        _register(skips, skip_keys, point[: 2 * layers], score)

    for entry in history:  # a resumed search: each stage's optimiser learns what was evaluated
        record(entry["stage"], entry["point"], entry["evaluation"]["score"])
    started = time.perf_counter() - spent
    stopped_by = "iterations"
    bar = tqdm(total=total, initial=min(len(history), total), desc=description, unit="eval", disable=not progress,
               dynamic_ncols=True)
    try:
        while len(history) < total:
            if budget_s is not None and len(history) >= init_points and time.perf_counter() - started >= budget_s:
                stopped_by = "budget"
                break
            if len(history) < init_points:
                stage, point, origin = CHOICE_STAGE, starts[len(history)], "start" if len(history) else "default"
            elif len(history) < choice_quota and fixed is None:
                stage, point, origin = CHOICE_STAGE, zeros + _suggest(choices, CHOICE_KEYS), "suggested"
            elif fixed is None:  # the skip stage begins: a random sparse mask on the best choices yet
                stage, origin = SKIP_STAGE, "start"
                point = _random_mask(rng, layers, max_density) + best_choice()["point"][2 * layers:]
            else:
                stage, point, origin = SKIP_STAGE, _suggest(skips, skip_keys) + fixed, "suggested"
            if tuple(point) in known:
                retry = np.random.default_rng([seed, len(history)])
                for _ in range(1000):
                    if stage == CHOICE_STAGE:
                        point = zeros + _random_choices(retry, space)
                    else:
                        point = _random_mask(retry, layers, max_density) + point[2 * layers:]
                    if tuple(point) not in known:
                        break
                origin = "random (repeat)"
            settings = space.settings(point, layers)
            evaluation = objective(settings)
            record(stage, point, evaluation.score)
            history.append({"point": point, "stage": stage, "origin": origin, "evaluation": evaluation.to_dict()})
            known.add(tuple(point))
            if checkpoint is not None:
                save_search(Path(checkpoint), CHECKPOINT_FORMAT, signature, history, None,
                            seconds=time.perf_counter() - started)
            if on_evaluation is not None:
                on_evaluation(len(history), settings, evaluation)
            best = max(e["evaluation"]["score"] for e in history)
            bar.set_postfix(best=f"{best:.2f}", last=f"{evaluation.score:.2f}",
                            spent=f"{time.perf_counter() - started:.0f}s" + (f"/{budget_s:.0f}s" if budget_s else ""))
            bar.update(1)
    finally:
        bar.close()
    top = max(history, key=lambda e: e["evaluation"]["score"])
    return ConfigSearchResult(space.settings(top["point"], layers), list(top["point"]), Evaluation(**top["evaluation"]),
                              history, init_points, time.perf_counter() - started, stopped_by)
