"""Stage 2 of a bundle build, the per-domain search: the Bayesian configuration search
(:mod:`specdecode.search.config_search`) on a domain's search prompts, scored by the simulated
objective, and the search metadata its profile keeps."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from specdecode.models.families import num_layers
from specdecode.models.loading import LoadedModel
from specdecode.artifacts.profile import SelfDraftSettings
from specdecode.routing.options import BuildOptions
from specdecode.routing.progress import BuildLog, Checkpoints, digest
from specdecode.search.calibration import CalibrationSet
from specdecode.search.config_search import DraftSpace, search_config
from specdecode.search.objective import CostTable, SimulatedObjective


def search_domain(target: LoadedModel, name: str, calibration: CalibrationSet, space: DraftSpace, costs: CostTable,
            options: BuildOptions, budget_s: float | None, store: Checkpoints, log: BuildLog,
            fixed_metadata: dict[str, Any]) -> tuple[SelfDraftSettings, list[int], dict[str, Any]]:
    identity = {"model": target.fingerprint, "prompts": calibration.prompts, "tokens": calibration.max_new_tokens,
                "rankings": digest({k: list(v) for k, v in space.rankings.items()})}
    log(f"{name}: searching the draft configuration on {len(calibration.prompts)} prompts "
        f"({options.init_points} starts + up to {options.iterations} suggestions"
        + (f", budget {budget_s:.0f}s)" if budget_s is not None else ")"))
    objective = SimulatedObjective(target, calibration, costs)
    layers = num_layers(target.model)
    result = search_config(objective, layers, space, options.iterations, options.init_points, options.seed,
                           options.max_density, budget_s, store.path(f"{name}.search.json"), identity,
                           log.progress, description=f"{name} search")
    best = result.best
    log(f"{name}: best {describe(best)} — simulated {result.best_evaluation.score:.2f} tok/s, "
        f"τ {result.best_evaluation.tau:.2f} ({len(result.history)} evaluations, {result.seconds:.0f}s, "
        f"stopped by {result.stopped_by})")
    by_source: dict[str, float] = {}
    for entry in result.history:
        source = space.describe(entry["point"], layers)["vocab_source"]
        by_source[source] = max(by_source.get(source, 0.0), entry["evaluation"]["score"])
    search = {
        **fixed_metadata,
        "library": f"bayesian-optimization {version('bayesian-optimization')}",
        "objective": "simulated", "space": space.to_dict(), "iterations": options.iterations,
        "init_points": options.init_points, "seed": options.seed, "max_density": options.max_density,
        "budget_s": budget_s, "stopped_by": result.stopped_by, "evaluations": len(result.history),
        "prompts": len(calibration.prompts), "max_new_tokens": calibration.max_new_tokens,
        "best_score": result.best_evaluation.score, "best_initial_score": result.best_initial_score,
        "best": result.best_evaluation.to_dict(), "best_by_vocab_source": by_source,
        **space.describe(result.best_point, layers),
        "history": [{"point": e["point"], "origin": e["origin"], "score": e["evaluation"]["score"],
                     "tau": e["evaluation"]["tau"]} for e in result.history],
        "seconds": round(result.seconds, 1), "cost_model": costs.to_dict(),
    }
    return best, result.best_point, search


def describe(settings: SelfDraftSettings) -> str:
    skip = settings.skip
    vocab = len(settings.vocab_ids) if settings.vocab_ids is not None else "full"
    return (f"skip attn {list(skip.attention)} mlp {list(skip.mlp)}, vocab {vocab}, "
            f"{'int8' if settings.int8 else 'float'}, threshold {settings.threshold}, max_draft {settings.max_draft}")
