"""Build a KNN-SSD bundle: one searched draft configuration per domain plus a mixed one, and
k-means anchors; add a domain to a bundle, or remove one.

Per domain (each on its own, so a domain can be added later without touching the others):

1. calibration: the target's greedy answers to the domain's build prompts (``ar``);
2. the draft-vocabulary rankings: the domain's own target text — its answers, or its answers and
   prompts — counted by frequency, end-of-sequence ids first, then a background ranking (all
   domains' build text at a full build; the mixed configuration's vocabulary for ``--add``) so
   that large sizes stay meaningful;
3. the Bayesian search over the whole configuration (skip set, vocabulary source and size, int8,
   threshold, maximum draft; :mod:`specdecode.search.config_search`) on the first
   ``search_prompts`` prompts, scored by the simulated objective with a cost table timed on the
   model as loaded. During the search the rankings count only the *other* build prompts' text,
   so a vocabulary is scored on answers it was not built from; the saved vocabulary is then
   ranked on all build prompts' text and cut to the chosen size;
4. anchors: k-means centroids of the domain's prompt embeddings; its fallback radius: a high
   percentile of its prompts' distances to its own anchors, times a margin.

The mixed configuration drafts for requests beyond every radius: its vocabulary is the union of
the domains' vocabularies (taken in turn, so each domain's most frequent ids come first), and its
skip set, int8, threshold and maximum draft are searched on prompts of every domain in turn.

The stages live in their own modules: data collection (:mod:`.collect`), the per-domain search
(:mod:`.domain_search`, over vocabularies from :mod:`.vocabulary`), anchors (:mod:`.anchors`);
this module runs them per domain and writes the bundle (:mod:`.options`: what a build may choose;
:mod:`.progress`: its log and checkpoints; :mod:`.plot`: the t-SNE picture).

Progress is printed per stage; every finished domain is checkpointed (``checkpoints/`` in the
output directory) and a rerun of the same command resumes after the last finished domain and
inside an interrupted search. An optional time budget is shared out between the searches still
to run.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from specdecode.artifacts.bundle import MIXED, ProfileBundle
from specdecode.artifacts.profile import SkipProfile
from specdecode.errors import InvalidSettingError, PromptError
from specdecode.models.families import num_layers
from specdecode.models.loading import LoadedModel
from specdecode.routing.anchors import EMBEDDING, check_categories, embed_prompts, fallback_radius, fit_anchors
from specdecode.routing.domain import DomainBuild, build_domain
from specdecode.routing.collect import calibrate_domain, cut_calibration, interleave
from specdecode.routing.domain_search import search_domain
from specdecode.routing.options import BuildOptions
from specdecode.routing.progress import BuildLog, Checkpoints
from specdecode.routing.vocabulary import rank_vocabulary, union_vocabulary
from specdecode.search.calibration import CalibrationSet
from specdecode.search.config_search import DraftSpace
from specdecode.search.objective import CostTable


@dataclass
class BuiltBundle:
    """The bundle and the calibration embeddings it was fitted on (for plots)."""

    bundle: ProfileBundle
    vectors: np.ndarray
    vector_labels: list[str]


def _search_budget(total_s: float | None, log: BuildLog, searches_left: int, reserve_s: float) -> float | None:
    """This search's share of what is left of the build's budget (at least a minute)."""
    if total_s is None:
        return None
    return max(60.0, (total_s - log.elapsed - reserve_s) / max(1, searches_left))


def build_bundle(
    target: LoadedModel,
    prompts: Mapping[str, list[str]],
    options: BuildOptions | None = None,
    *,
    anchors_per_category: int | None = None,
    reuse: Mapping[str, SkipProfile] | None = None,
    checkpoints: str | Path | None = None,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> BuiltBundle:
    """A bundle over ``prompts`` (domain → prompt texts, as requests will look); ``reuse`` maps
    a domain (or ``mixed``) to an already searched configuration, which is kept as it is."""
    options = options or BuildOptions()
    if anchors_per_category is not None:
        options = replace(options, anchors_per_category=anchors_per_category)
    options.validate()
    check_categories({c: len(p) for c, p in prompts.items()}, options.anchors_per_category)
    if target.tokenizer is None:
        raise PromptError(f"model {target.name!r} has no tokenizer: building a bundle needs one")
    reuse = dict(reuse or {})
    for name, profile in reuse.items():
        profile.check_model(target, f"profile for {name!r}")
    encoded = {c: [list(target.tokenizer(text)["input_ids"]) for text in texts] for c, texts in prompts.items()}
    searching = [c for c in encoded if c not in reuse]
    store = Checkpoints(checkpoints if searching or MIXED not in reuse else None)
    spent = 0.0
    log = BuildLog(progress, options.budget_s, spent)
    log(f"building a bundle over {len(encoded)} domains ({', '.join(encoded)}); "
        f"{len(searching) + (MIXED not in reuse)} configuration searches"
        + (f", time budget {options.budget_s:.0f}s" if options.budget_s else ", no time budget"))
    eos = sorted(target.eos_token_ids)
    costs: CostTable | None = None
    calibrations: dict[str, CalibrationSet] = {}
    background: list[int] = []
    if searching or MIXED not in reuse:
        for name in encoded:  # the answers: vocabulary text and search ground truth
            if name not in reuse or MIXED not in reuse:
                calibrations[name] = calibrate_domain(target, name, encoded[name], options.answer_tokens, store, log)
        texts = [t for name, c in calibrations.items() for t in (*c.continuations, *c.prompts)]
        background = rank_vocabulary(texts, eos) if texts else []
        first = next(iter(calibrations.values()))
        log("timing the cost table (verification forwards; draft heads as the search meets them)")
        costs = CostTable(target, first.prompts[0] + first.continuations[0][: options.search_tokens],
                          options.space.max_draft[1])
    built: dict[str, DomainBuild] = {}
    vectors: dict[str, np.ndarray] = {}
    profiles: dict[str, SkipProfile] = {}
    for number, name in enumerate(encoded, 1):
        if name in reuse:
            log(f"[{number}/{len(encoded) + 1}] {name}: reusing the given configuration")
            profiles[name] = reuse[name]
            vectors[name] = embed_prompts(target, encoded[name])
            continue
        log(f"[{number}/{len(encoded) + 1}] {name}")
        left = len([c for c in searching if c not in built]) + (MIXED not in reuse)
        budget = _search_budget(options.budget_s, log, left, reserve_s=0.0)
        built[name] = build_domain(target, name, encoded[name], options, costs, background, budget_s=budget,
                                   store=store, log=log, metadata=metadata, calibration=calibrations[name])
        profiles[name] = built[name].profile
        vectors[name] = built[name].vectors
    union = union_vocabulary([list(p.settings.vocab_ids or ()) for p in profiles.values()])
    if MIXED in reuse:
        log(f"[{len(encoded) + 1}/{len(encoded) + 1}] {MIXED}: reusing the given configuration")
        mixed = reuse[MIXED]
    else:
        log(f"[{len(encoded) + 1}/{len(encoded) + 1}] {MIXED}: vocabulary = union of the domains' ({len(union)} ids)")
        sets = [cut_calibration(c, range(options.search_prompts), options.search_tokens) for c in calibrations.values()]
        mixed_set = interleave(sets, options.search_prompts)
        has_vocab = all(p.settings.vocab_ids is not None for p in profiles.values())
        space = DraftSpace({"union": union if has_vocab else [0]}, (len(union),) if has_vocab else (0,),
                           options.space.int8, options.space.threshold, options.space.max_draft)
        budget = _search_budget(options.budget_s, log, 1, reserve_s=0.0)
        best, _, search = search_domain(target, MIXED, mixed_set, space, costs, options, budget, store, log,
                                  {"category": MIXED, **(metadata or {})})
        mixed = SkipProfile(best, target.fingerprint, target.name, num_layers(target.model), search, {},
                            {"name": MIXED, "vocab_source": "union of the domains' vocabularies"})
    anchors, labels, radii = [], [], {}
    for name in encoded:
        if name in built:
            block, radii[name] = built[name].anchors, built[name].radius
        else:
            block, _ = fit_anchors({name: vectors[name]}, options.anchors_per_category, options.seed)
            radii[name] = fallback_radius(block, vectors[name], options.percentile, options.margin)
        anchors.append(block.astype(np.float32))
        labels += [name] * len(block)
    stacked = np.concatenate(list(vectors.values()))
    settings = {
        **(metadata or {}), "anchors_per_category": options.anchors_per_category,
        "prompts_per_category": {c: len(p) for c, p in prompts.items()}, "search_prompts": options.search_prompts,
        "answer_tokens": options.answer_tokens, "search_tokens": options.search_tokens,
        "space": asdict(options.space), "iterations": options.iterations, "init_points": options.init_points,
        "budget_s": options.budget_s, "build_seconds": round(log.elapsed, 1),
        "radius_percentile": options.percentile, "radius_margin": options.margin, "seed": options.seed,
        "reused_profiles": sorted(reuse), "embedding": EMBEDDING, "metric": "euclidean",
        "kmeans": "sklearn KMeans per domain, n_init 10, centroids re-normalised",
        "radius": "per domain: percentile of its build prompts' distances to its own anchors, times the margin",
    }
    infos = {name: b.info for name, b in built.items()}
    bundle = ProfileBundle(np.concatenate(anchors), labels, profiles, mixed, radii, target.fingerprint, target.name,
                           settings, revision=1, history=[{"revision": 1, "action": "build", "domains": list(encoded),
                                                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}],
                           domains=infos)
    log(f"bundle built in {log.elapsed:.0f}s")
    return BuiltBundle(bundle, stacked, [c for c, rows in vectors.items() for _ in range(len(rows))])


def add_domain(
    target: LoadedModel,
    bundle: ProfileBundle,
    name: str,
    texts: list[str],
    options: BuildOptions | None = None,
    *,
    checkpoints: str | Path | None = None,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    replace_existing: bool = False,
) -> tuple[ProfileBundle, DomainBuild]:
    """``bundle`` with domain ``name`` added: only that domain is calibrated and searched; the other
    domains' anchors and configurations are kept as they are. The mixed configuration keeps its
    settings and gains the new domain's vocabulary (its union grows)."""
    options = options or BuildOptions()
    options.validate()
    bundle.check_model(target)
    check_categories({name: len(texts)}, options.anchors_per_category)
    if name in bundle.profiles and not replace_existing:
        raise InvalidSettingError(f"bundle already has domain {name!r} (remove it first)")
    if target.tokenizer is None:
        raise PromptError(f"model {target.name!r} has no tokenizer: building a bundle needs one")
    encoded = [list(target.tokenizer(text)["input_ids"]) for text in texts]
    log = BuildLog(progress, options.budget_s)
    log(f"adding domain {name!r} to a bundle of {len(bundle.categories)} domains (revision {bundle.revision})"
        + (f", time budget {options.budget_s:.0f}s" if options.budget_s else ", no time budget"))
    store = Checkpoints(checkpoints)
    calibration = calibrate_domain(target, name, encoded, options.answer_tokens, store, log)
    log("timing the cost table")
    costs = CostTable(target, calibration.prompts[0] + calibration.continuations[0][: options.search_tokens],
                      options.space.max_draft[1])
    background = list(bundle.mixed.settings.vocab_ids or ())
    built = build_domain(target, name, encoded, options, costs, background,
                         budget_s=_search_budget(options.budget_s, log, 1, 0.0), store=store, log=log,
                         metadata=metadata, calibration=calibration)
    mixed = bundle.mixed
    if mixed.settings.vocab_ids is not None and built.profile.settings.vocab_ids is not None:
        grown = union_vocabulary([list(mixed.settings.vocab_ids), list(built.profile.settings.vocab_ids)])
        mixed = replace(mixed, settings=replace(mixed.settings, vocab_ids=tuple(grown)),
                        domain={**mixed.domain, "covers": sorted({*mixed.domain.get("covers", bundle.categories), name})})
    info = {**built.info, "added_with": "build-knn --add"}
    return bundle.with_domain(name, built.anchors, built.radius, built.profile, mixed, info), built
