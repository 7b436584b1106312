"""The Bayesian search engine behind ``specdecode search`` (:mod:`.skip_search`) and ``build-knn``
(:mod:`.config_search`).

Every variable is an integer for `bayesian-optimization` (a Gaussian process, upper-confidence-
bound acquisition). A search is a :class:`Strategy` — which point to evaluate next (a start or the
optimiser's suggestion), what replaces a point already evaluated, what a point means as a draft,
what the optimiser learns from a score — run by :func:`run_search`, which owns what every search
shares: the evaluation loop, the rule that a repeated point is replaced by an unseen one (every
evaluation teaches the model something), a checkpoint after every evaluation and resuming from it,
an optional time budget, the progress bar.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from bayes_opt import BayesianOptimization
from sklearn.exceptions import ConvergenceWarning
from tqdm import tqdm

from specdecode.errors import InvalidSettingError
from specdecode.artifacts.profile import SelfDraftSettings
from specdecode.search.checkpoint import load_search, save_search
from specdecode.search.objective import Evaluation, Objective


def skip_keys(layers: int) -> list[str]:
    """The optimiser's names of the 2·L skip flags: attention sub-layers, then MLP sub-layers."""
    return [f"attn_{i:03d}" for i in range(layers)] + [f"mlp_{i:03d}" for i in range(layers)]


def random_mask(rng: np.random.Generator, layers: int, max_density: float) -> list[int]:
    """2·L skip flags, each set with one skip probability drawn uniform in [0, ``max_density``]:
    on small models skipping half the network makes a useless draft, so sparse points teach more."""
    density = rng.uniform(0.0, max_density)
    return [int(v) for v in rng.random(2 * layers) < density]


def optimizer(bounds: dict[str, tuple[int, int]], seed: int) -> BayesianOptimization:
    """An optimiser over integer variables ``name: (low, high)``."""
    with warnings.catch_warnings():
        # integer parameters are flagged experimental; continuous ones rounded to integers would make
        # the acquisition optimiser ~40x slower here (L-BFGS restarts in 2·L dimensions)
        warnings.filterwarnings("ignore", message="Non-float parameters are experimental")
        return BayesianOptimization(f=None, pbounds={k: (low, high, int) for k, (low, high) in bounds.items()},
                                    random_state=seed, verbose=0)


def register(optimizer: BayesianOptimization, keys: list[str], values: Sequence[int], score: float) -> None:
    with warnings.catch_warnings():  # GP length scales at their bounds: expected with few points
        warnings.simplefilter("ignore", ConvergenceWarning)
        optimizer.register(dict(zip(keys, values)), score)


def suggest(optimizer: BayesianOptimization, keys: list[str]) -> list[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        suggestion = optimizer.suggest()
    return [int(round(float(suggestion[k]))) for k in keys]


@dataclass
class Candidate:
    """The point to evaluate next, where it came from (``start``, ``suggested``, ...) and, for a
    search in stages, which stage proposes it."""

    point: list[int]
    origin: str
    stage: str | None = None


class Strategy(Protocol):
    def next(self, index: int, history: list[dict[str, Any]]) -> Candidate:
        """Evaluation ``index``'s point: a start while ``index`` < the starts, else a suggestion."""

    def unexplored(self, candidate: Candidate, index: int, known: set[tuple[int, ...]]) -> list[int]:
        """A point not in ``known`` to evaluate instead of ``candidate`` (seeded by ``index``)."""

    def settings(self, point: list[int]) -> SelfDraftSettings: ...

    def learn(self, candidate: Candidate, score: float, history: list[dict[str, Any]]) -> None:
        """Tell the optimiser(s) a score (also for each evaluation of a resumed search)."""

    def entry(self, candidate: Candidate, evaluation: Evaluation) -> dict[str, Any]:
        """The history entry (and checkpoint record) of one evaluation."""

    def point_of(self, entry: dict[str, Any]) -> list[int]: ...

    def candidate_of(self, entry: dict[str, Any]) -> Candidate: ...


@dataclass
class SearchRun:
    history: list[dict[str, Any]]  # one entry per evaluation, in order
    seconds: float  # spent, the interrupted runs' included
    stopped_by: str  # "iterations" or "budget"


def run_search(
    objective: Objective,
    strategy: Strategy,
    total: int,
    init_points: int,
    checkpoint: str | os.PathLike[str] | None,
    checkpoint_format: str,
    kind: str,
    signature: dict[str, Any],
    state: BayesianOptimization | None = None,
    budget_s: float | None = None,
    description: str = "search",
    progress: bool = True,
    on_evaluation: Callable[[int, SelfDraftSettings, Evaluation], None] | None = None,
) -> SearchRun:
    """Evaluate ``total`` points (fewer when ``budget_s`` seconds run out, but never fewer than the
    ``init_points`` starts), checkpointing after each. ``state``: the one optimiser whose saved state
    a resume restores; without it a resumed search re-teaches the strategy every evaluation so far.
    ``signature`` identifies the search: a checkpoint of another search is refused."""
    if budget_s is not None and budget_s <= 0:
        raise InvalidSettingError(f"a search budget must be > 0 seconds, got {budget_s}")
    history: list[dict[str, Any]] = []
    spent = 0.0
    if checkpoint is not None and Path(checkpoint).exists():
        resumed = load_search(Path(checkpoint), checkpoint_format, kind, signature, state)
        history, spent = list(resumed["history"]), float(resumed.get("seconds", 0.0))
        if state is None:
            for done, entry in enumerate(history):
                strategy.learn(strategy.candidate_of(entry), entry["evaluation"]["score"], history[:done])
    known = {tuple(strategy.point_of(entry)) for entry in history}
    started = time.perf_counter() - spent
    stopped_by = "iterations"
    bar = tqdm(total=total, initial=min(len(history), total), desc=description, unit="eval", disable=not progress,
               dynamic_ncols=True)
    try:
        while len(history) < total:
            if budget_s is not None and len(history) >= init_points and time.perf_counter() - started >= budget_s:
                stopped_by = "budget"
                break
            candidate = strategy.next(len(history), history)
            if tuple(candidate.point) in known:  # a repeated start, or the GP is sure of this one: explore
                candidate = Candidate(strategy.unexplored(candidate, len(history), known), "random (repeat)",
                                      candidate.stage)
            settings = strategy.settings(candidate.point)
            evaluation = objective(settings)
            strategy.learn(candidate, evaluation.score, history)
            history.append(strategy.entry(candidate, evaluation))
            known.add(tuple(candidate.point))
            if checkpoint is not None:
                save_search(Path(checkpoint), checkpoint_format, signature, history, state,
                            seconds=time.perf_counter() - started)
            if on_evaluation is not None:
                on_evaluation(len(history), settings, evaluation)
            best = max(e["evaluation"]["score"] for e in history)
            bar.set_postfix(best=f"{best:.2f}", last=f"{evaluation.score:.2f}",
                            spent=f"{time.perf_counter() - started:.0f}s" + (f"/{budget_s:.0f}s" if budget_s else ""))
            bar.update(1)
    finally:
        bar.close()
    return SearchRun(history, time.perf_counter() - started, stopped_by)


def check_counts(init_points: int, iterations: int, max_density: float) -> None:
    """Refuse what no search can run: no start, negative iterations, a density outside (0, 1]."""
    if init_points < 1:
        raise InvalidSettingError(f"the search needs at least 1 initial point, got {init_points}")
    if iterations < 0:
        raise InvalidSettingError(f"search iterations must be >= 0, got {iterations}")
    if not 0 < max_density <= 1:
        raise InvalidSettingError(f"max_density must be in (0, 1], got {max_density}")
