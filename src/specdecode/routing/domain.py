"""One domain of a bundle, built stage by stage (resumable): data collection (:mod:`.collect`), the
configuration search (:mod:`.domain_search`), the final vocabulary (:mod:`.vocabulary`) and the
anchors (:mod:`.anchors`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from specdecode.artifacts.profile import SkipProfile
from specdecode.errors import InvalidSettingError
from specdecode.models.families import num_layers
from specdecode.models.loading import LoadedModel
from specdecode.routing.anchors import embed_prompts, fallback_radius, fit_anchors
from specdecode.routing.collect import calibrate_domain, cut_calibration
from specdecode.routing.domain_search import describe, search_domain
from specdecode.routing.options import BuildOptions
from specdecode.routing.progress import BuildLog, Checkpoints, digest
from specdecode.routing.vocabulary import rankings
from specdecode.search.calibration import CalibrationSet
from specdecode.search.config_search import DraftSpace
from specdecode.search.objective import CostTable, MeasuredObjective


@dataclass
class DomainBuild:
    """One domain's finished build: what goes into the bundle, and what it cost."""

    profile: SkipProfile
    anchors: np.ndarray
    radius: float
    vectors: np.ndarray
    seconds: float
    info: dict[str, Any]


def build_domain(
    target: LoadedModel,
    name: str,
    prompts: list[list[int]],
    options: BuildOptions,
    costs: CostTable,
    background: Sequence[int],
    *,
    budget_s: float | None = None,
    store: Checkpoints | None = None,
    log: BuildLog | None = None,
    metadata: dict[str, Any] | None = None,
    calibration: CalibrationSet | None = None,
) -> DomainBuild:
    """Calibrate (unless ``calibration`` is given), search, rank the final vocabulary, embed and
    cluster one domain (resumable)."""
    store = store or Checkpoints(None)
    log = log or BuildLog(False, None)
    started = time.perf_counter()
    settings = {k: v for k, v in asdict(options).items() if k != "budget_s"}  # a resume may change the budget
    identity = digest({"model": target.fingerprint, "prompts": prompts, "options": settings,
                        "background": list(background)})
    done = store.load(f"{name}.domain.json", identity)
    if done is not None:
        log(f"{name}: finished in an earlier run (checkpoint)")
        return DomainBuild(SkipProfile.from_dict(done["profile"], f"checkpoint of {name!r}"),
                           np.array(done["anchors"], dtype=np.float32), float(done["radius"]),
                           np.array(done["vectors"]), float(done["seconds"]), done["info"])
    if len(prompts) <= options.search_prompts:
        raise InvalidSettingError(f"domain {name!r} has {len(prompts)} build prompts; the search takes the first "
                                  f"{options.search_prompts} and the vocabulary needs at least one more")
    eos = sorted(target.eos_token_ids)
    if calibration is None:
        calibration = calibrate_domain(target, name, prompts, options.answer_tokens, store, log)
    n = options.search_prompts
    search_set = cut_calibration(calibration, range(n), options.search_tokens)
    held = [calibration.continuations[i] for i in range(n, len(prompts))]
    space = DraftSpace(rankings(held, prompts[n:], options.space.vocab_sources, eos, background),
                       options.space.vocab_sizes, options.space.int8, options.space.threshold,
                       options.space.max_draft)
    best, point, search = search_domain(target, name, search_set, space, costs, options, budget_s, store, log,
                                  {"category": name, **(metadata or {})})
    source = search["vocab_source"]
    if best.vocab_ids is not None:  # rank again on every build prompt's text, cut to the size the search chose
        final = rankings(calibration.continuations, prompts, [source], eos, background)[source]
        best = replace(best, vocab_ids=tuple(final[: len(best.vocab_ids)]))
    measured: dict[str, Any] = {}
    if options.measure:
        log(f"{name}: timing the configuration with real ssd runs on its search prompts")
        evaluation = MeasuredObjective(target, search_set)(best)
        measured = {"tokens_per_second": evaluation.score, "ar_tokens_per_second": search_set.ar_tokens_per_second,
                    "speedup": evaluation.speedup, "tau": evaluation.tau, "acceptance_rate": evaluation.acceptance_rate,
                    "note": "greedy, search prompts, wall clock including prefill"}
    layers = num_layers(target.model)
    domain = {"name": name, "vocab_source": source, "vocab_text": f"greedy target answers ({options.answer_tokens} "
              f"tokens) of {len(prompts)} build prompts" + (" and those prompts" if source == "answers+prompts" else "")
              + ", then the background ranking", "build_prompts": len(prompts)}
    profile = SkipProfile(best, target.fingerprint, target.name, layers, search, measured, domain)
    log(f"{name}: embedding {len(prompts)} prompts, {options.anchors_per_category} anchors")
    vectors = embed_prompts(target, prompts)
    anchors, _ = fit_anchors({name: vectors}, options.anchors_per_category, options.seed)
    radius = fallback_radius(anchors, vectors, options.percentile, options.margin)
    seconds = time.perf_counter() - started
    info = {"build_prompts": len(prompts), "search_prompts": n, "seconds": round(seconds, 1)}
    built = DomainBuild(profile, anchors.astype(np.float32), radius, vectors, seconds, info)
    store.save(f"{name}.domain.json", identity, {"profile": profile.to_dict(), "anchors": built.anchors.tolist(),
                                                 "radius": radius, "vectors": vectors.tolist(), "seconds": seconds,
                                                 "info": info})
    log(f"{name}: done in {seconds:.0f}s — {describe(best)}")
    return built
