"""Search a skip profile for one set of calibration prompts: the library call behind ``specdecode search``.

KNN-SSD's bundle builder calls :func:`build_profile` once per category with that category's
calibration set (and usually one shared :class:`CostModel` and draft vocabulary).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from importlib.metadata import version
from typing import Any

from specdecode.artifacts.profile import SkipProfile
from specdecode.errors import InvalidSettingError
from specdecode.models.frequent_vocab import frequent_token_ids
from specdecode.models.families import num_layers
from specdecode.models.loading import LoadedModel
from specdecode.artifacts.profile import SelfDraftSettings
from specdecode.search.calibration import CalibrationSet
from specdecode.search.objective import CostModel, MeasuredObjective, Objective, SimulatedObjective
from specdecode.search.skip_search import search_skip_set

OBJECTIVES = ("simulated", "measured")


def draft_vocabulary(
    target: LoadedModel, calibration: CalibrationSet, size: int, extra_texts: Iterable[str] = ()
) -> tuple[int, ...]:
    """The ``size`` most frequent ids of the calibration prompts, the target's answers and ``extra_texts``.

    The target's end-of-sequence ids are always included (a draft that cannot propose EOS
    cannot draft the end of an answer).
    """
    lists: list[Sequence[int]] = [*calibration.prompts, *calibration.continuations]
    if target.tokenizer is not None:
        lists.extend(target.tokenizer(text)["input_ids"] for text in extra_texts)
    ids = frequent_token_ids(lists, size, always_include=sorted(target.eos_token_ids))
    return tuple(int(t) for t in ids)


def make_objective(
    name: str, target: LoadedModel, calibration: CalibrationSet, base: SelfDraftSettings,
    costs: CostModel | None = None,
) -> Objective:
    if name == "measured":
        return MeasuredObjective(target, calibration)
    if name == "simulated":
        if costs is None:
            context = calibration.prompts[0] + calibration.continuations[0]
            costs = CostModel.measure(target, context, base)
        return SimulatedObjective(target, calibration, costs)
    raise InvalidSettingError(f"unknown search objective {name!r}; choose one of {', '.join(OBJECTIVES)}")


def build_profile(
    target: LoadedModel,
    calibration: CalibrationSet,
    base: SelfDraftSettings,
    *,
    objective: str = "simulated",
    iterations: int = 40,
    init_points: int = 8,
    seed: int = 0,
    max_density: float = 0.5,
    min_skip: int = 0,
    costs: CostModel | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    measure: bool = True,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> SkipProfile:
    """Search the skip sets for ``base``'s draft head, then (``measure``) time the winner for real."""
    base.validate(num_layers(target.model), target.vocab_size)
    started = time.perf_counter()
    scorer = make_objective(objective, target, calibration, base, costs)
    identity = {"model": target.fingerprint, "prompts": calibration.prompts,
                "max_new_tokens": calibration.max_new_tokens, "threshold": base.threshold,
                "max_draft": base.max_draft, "vocab_ids": list(base.vocab_ids or ()), "int8": base.int8}
    layers = num_layers(target.model)
    result = search_skip_set(scorer, layers, base, iterations, init_points, seed, max_density,
                             checkpoint, identity, progress, min_skip=min_skip)
    search: dict[str, Any] = {
        **(metadata or {}),
        "library": f"bayesian-optimization {version('bayesian-optimization')}",
        "objective": objective,
        "iterations": iterations,
        "init_points": init_points,
        "seed": seed,
        "max_density": max_density,
        "min_skip": min_skip,
        "prompts": len(calibration.prompts),
        "max_new_tokens": calibration.max_new_tokens,
        "best_score": result.best_evaluation.score,
        "best_initial_score": result.best_initial_score,
        "best": result.best_evaluation.to_dict(),
        "history": [{"mask": e["mask"], "origin": e["origin"], "score": e["evaluation"]["score"]}
                    for e in result.history],
        "seconds": round(time.perf_counter() - started, 1),
    }
    if isinstance(scorer, SimulatedObjective):
        search["cost_model"] = scorer.costs.to_dict()
    measured: dict[str, Any] = {}
    if measure:
        evaluation = MeasuredObjective(target, calibration)(result.best)
        measured = {"tokens_per_second": evaluation.score, "ar_tokens_per_second": calibration.ar_tokens_per_second,
                    "speedup": evaluation.speedup, "tau": evaluation.tau,
                    "acceptance_rate": evaluation.acceptance_rate,
                    "note": "greedy, calibration prompts, wall clock including prefill; ar timed once at calibration"}
    return SkipProfile(result.best, target.fingerprint, target.name, layers, search, measured)
