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

Progress is printed per stage; every finished domain is checkpointed (``checkpoints/`` in the
output directory) and a rerun of the same command resumes after the last finished domain and
inside an interrupted search. An optional time budget is shared out between the searches still
to run.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

from specdecode.artifacts.bundle import MIXED, ProfileBundle, nearest, pool
from specdecode.artifacts.profile import SkipProfile
from specdecode.errors import InvalidSettingError, PromptError
from specdecode.models.cache import KVCache, forward
from specdecode.models.layer_skip import num_layers
from specdecode.models.loading import LoadedModel
from specdecode.propose.self_draft import SelfDraftSettings
from specdecode.search.calibration import CalibrationSet, calibrate
from specdecode.search.config_search import DraftSpace, search_config
from specdecode.search.objective import CostTable, MeasuredObjective, SimulatedObjective

VOCAB_SOURCES = ("answers", "answers+prompts")
EMBEDDING = "mean of the target's final hidden states over the prompt minus its last token, L2-normalised"


def embed_prompts(target: LoadedModel, prompts: list[list[int]]) -> np.ndarray:
    """``[prompts, hidden]`` embeddings, computed exactly as the engine's prefill sees each prompt
    (every token but the last), so offline anchors and online queries live in one space."""
    rows = []
    with torch.inference_mode():
        for ids in prompts:
            if len(ids) < 2:
                raise PromptError(f"a prompt of {len(ids)} token(s) cannot be embedded (needs at least 2)")
            rows.append(pool(forward(target.model, KVCache(), ids[:-1], logits_to_keep=0)))
    return np.stack(rows)


def check_categories(counts: Mapping[str, int], anchors_per_category: int) -> None:
    """Refuse what k-means cannot cluster: an empty category, fewer prompts than anchors."""
    if isinstance(anchors_per_category, bool) or not isinstance(anchors_per_category, int) or anchors_per_category < 1:
        raise InvalidSettingError(f"anchors per category must be an integer >= 1, got {anchors_per_category!r}")
    if not counts:
        raise InvalidSettingError("a bundle needs at least one category")
    for category, count in counts.items():
        if category == MIXED:
            raise InvalidSettingError(f"category name {MIXED!r} is reserved for the fallback profile")
        if not category or not all(c.isalnum() or c in "_.-" for c in category):
            raise InvalidSettingError(f"category {category!r} must be a non-empty name of letters, digits, '_', '.', '-'")
        if count == 0:
            raise InvalidSettingError(f"category {category!r} has no prompts")
        if count < anchors_per_category:
            raise InvalidSettingError(
                f"category {category!r} has {count} prompt(s), fewer than the {anchors_per_category} anchors per category"
            )


def fit_anchors(
    vectors: Mapping[str, np.ndarray], anchors_per_category: int = 10, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """k-means centroids of each category's embeddings (re-normalised to unit length), and their labels."""
    check_categories({c: len(v) for c, v in vectors.items()}, anchors_per_category)
    centres, labels = [], []
    for category, rows in vectors.items():
        with warnings.catch_warnings():  # duplicate prompts: fewer distinct points than clusters
            warnings.simplefilter("ignore", ConvergenceWarning)
            kmeans = KMeans(n_clusters=anchors_per_category, n_init=10, random_state=seed).fit(rows)
        found = kmeans.cluster_centers_
        centres.append(found / np.maximum(np.linalg.norm(found, axis=1, keepdims=True), 1e-12))
        labels += [category] * anchors_per_category
    return np.concatenate(centres), labels


def fallback_radius(anchors: np.ndarray, vectors: np.ndarray, percentile: float = 95.0, margin: float = 2.0) -> float:
    """Distance beyond which a prompt is unlike the calibration data: ``percentile`` of the calibration
    prompts' nearest-anchor distances, times ``margin``. The margin also covers that k-means placed
    the anchors *on* those prompts: new prompts of the same category lie farther (on synthetic
    clusters their largest distance was ~1.8x the calibration 95th percentile)."""
    if not 0 < percentile <= 100:
        raise InvalidSettingError(f"radius percentile must be in (0, 100], got {percentile}")
    if margin <= 0:
        raise InvalidSettingError(f"radius margin must be > 0, got {margin}")
    distances = nearest(anchors, vectors)[0]
    return max(float(np.percentile(distances, percentile)) * margin, float(np.finfo(np.float32).eps))


def interleave(sets: list[CalibrationSet], size: int) -> CalibrationSet:
    """``size`` calibration prompts taken in turn from each set: the mixed profile's calibration."""
    picks = [(s, i) for i in range(max(len(s.prompts) for s in sets)) for s in sets if i < len(s.prompts)][:size]
    return CalibrationSet([s.prompts[i] for s, i in picks], [s.continuations[i] for s, i in picks],
                          [s.ar_seconds[i] for s, i in picks], sets[0].max_new_tokens)


@dataclass
class BuiltBundle:
    """The bundle and the calibration embeddings it was fitted on (for plots)."""

    bundle: ProfileBundle
    vectors: np.ndarray
    vector_labels: list[str]


@dataclass(frozen=True)
class SearchSpace:
    """What a domain's configuration search may choose (see :class:`~specdecode.search.config_search.DraftSpace`)."""

    vocab_sizes: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384)
    vocab_sources: tuple[str, ...] = VOCAB_SOURCES
    int8: tuple[bool, ...] = (False, True)
    threshold: tuple[float, float] = (0.3, 0.95)
    max_draft: tuple[int, int] = (2, 16)

    def __post_init__(self) -> None:
        unknown = [s for s in self.vocab_sources if s not in VOCAB_SOURCES]
        if unknown or not self.vocab_sources:
            raise InvalidSettingError(f"vocabulary sources must be among {', '.join(VOCAB_SOURCES)}, got "
                                      f"{', '.join(self.vocab_sources) or 'none'}")


@dataclass(frozen=True)
class BuildOptions:
    """How a bundle (or one domain of it) is built."""

    anchors_per_category: int = 10
    search_prompts: int = 6
    answer_tokens: int = 48  # greedy target tokens per build prompt: vocabulary text and search replay
    search_tokens: int = 32  # of those, how many the search replays
    space: SearchSpace = SearchSpace()
    iterations: int = 24
    init_points: int = 8
    max_density: float = 0.25
    seed: int = 0
    percentile: float = 95.0
    margin: float = 2.0
    budget_s: float | None = None  # for the whole build (calibration, searches, embedding)
    objective: str = "simulated"
    measure: bool = False  # time each winning configuration with real ssd runs on its search prompts

    def validate(self) -> None:
        if self.search_prompts < 1:
            raise InvalidSettingError(f"search prompts must be >= 1, got {self.search_prompts}")
        if not 1 <= self.search_tokens <= self.answer_tokens:
            raise InvalidSettingError(f"need 1 <= search tokens ({self.search_tokens}) <= answer tokens "
                                      f"({self.answer_tokens})")
        if self.objective != "simulated":
            raise InvalidSettingError("a bundle's configuration search uses the simulated objective (deterministic, "
                                      "timed on the model as loaded)")



def rank_vocabulary(texts: Sequence[Sequence[int]], eos: Sequence[int], background: Sequence[int] = ()) -> list[int]:
    """End-of-sequence ids, then the ids of ``texts`` by frequency (ties: first seen), then ``background``."""
    counts: Counter[int] = Counter()
    for ids in texts:
        counts.update(int(t) for t in ids)
    ranked = list(dict.fromkeys([int(t) for t in eos] + [t for t, _ in counts.most_common()]
                                + [int(t) for t in background]))
    if not ranked:
        raise InvalidSettingError("no tokens to rank a draft vocabulary on")
    return ranked


def union_vocabulary(vocabularies: Sequence[Sequence[int]]) -> list[int]:
    """Every id of every vocabulary, taken in turn (each one's most frequent ids come first)."""
    merged: dict[int, None] = {}
    for rank in range(max((len(v) for v in vocabularies), default=0)):
        for vocabulary in vocabularies:
            if rank < len(vocabulary):
                merged.setdefault(int(vocabulary[rank]), None)
    return list(merged)


def _rankings(answers: Sequence[Sequence[int]], prompts: Sequence[Sequence[int]], sources: Sequence[str],
              eos: Sequence[int], background: Sequence[int]) -> dict[str, list[int]]:
    texts = {"answers": list(answers), "answers+prompts": [*answers, *prompts]}
    return {name: rank_vocabulary(texts[name], eos, background) for name in sources}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _cut(calibration: CalibrationSet, indices: Sequence[int], tokens: int) -> CalibrationSet:
    """The calibration of ``indices``, continuations cut to ``tokens`` (ar time scaled to match)."""
    continuations = [calibration.continuations[i][:tokens] for i in indices]
    seconds = [calibration.ar_seconds[i] * len(c) / max(1, len(calibration.continuations[i]))
               for i, c in zip(indices, continuations)]
    return CalibrationSet([calibration.prompts[i] for i in indices], continuations, seconds, tokens)


class _Log:
    def __init__(self, progress: bool, budget_s: float | None, spent_s: float = 0.0) -> None:
        self.progress, self.budget_s = progress, budget_s
        self.started = time.perf_counter() - spent_s

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def __call__(self, message: str) -> None:
        if self.progress:
            budget = f"/{self.budget_s:.0f}s budget" if self.budget_s else ""
            print(f"[{self.elapsed:6.0f}s{budget}] {message}", file=sys.stderr, flush=True)


@dataclass
class DomainBuild:
    """One domain's finished build: what goes into the bundle, and what it cost."""

    profile: SkipProfile
    anchors: np.ndarray
    radius: float
    vectors: np.ndarray
    seconds: float
    info: dict[str, Any]


class _Checkpoints:
    """Per-domain files under ``directory``: calibration (ar answers) and the finished domain."""

    def __init__(self, directory: str | Path | None) -> None:
        self.directory = Path(directory) if directory is not None else None

    def path(self, name: str) -> Path | None:
        return self.directory / name if self.directory is not None else None

    def load(self, name: str, identity: str) -> dict[str, Any] | None:
        path = self.path(name)
        if path is None or not path.exists():
            return None
        data = json.loads(path.read_text())
        return data if data.get("identity") == identity else None

    def save(self, name: str, identity: str, data: dict[str, Any]) -> None:
        path = self.path(name)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text(json.dumps({"identity": identity, **data}))
        staging.replace(path)


def _calibrate(target: LoadedModel, name: str, prompts: list[list[int]], tokens: int, store: _Checkpoints,
               log: _Log) -> CalibrationSet:
    identity = _digest({"model": target.fingerprint, "prompts": prompts, "tokens": tokens})
    saved = store.load(f"{name}.calibration.json", identity)
    if saved is not None:
        log(f"{name}: ar answers of {len(prompts)} build prompts reused from the checkpoint")
        return CalibrationSet(saved["prompts"], saved["continuations"], saved["ar_seconds"], tokens)
    log(f"{name}: greedy ar answers ({tokens} tokens) to {len(prompts)} build prompts")
    calibration = calibrate(target, prompts, tokens)
    store.save(f"{name}.calibration.json", identity, {"prompts": calibration.prompts,
                                                      "continuations": calibration.continuations,
                                                      "ar_seconds": calibration.ar_seconds})
    return calibration


def _search(target: LoadedModel, name: str, calibration: CalibrationSet, space: DraftSpace, costs: CostTable,
            options: BuildOptions, budget_s: float | None, store: _Checkpoints, log: _Log,
            fixed_metadata: dict[str, Any]) -> tuple[SelfDraftSettings, list[int], dict[str, Any]]:
    identity = {"model": target.fingerprint, "prompts": calibration.prompts, "tokens": calibration.max_new_tokens,
                "rankings": _digest({k: list(v) for k, v in space.rankings.items()})}
    log(f"{name}: searching the draft configuration on {len(calibration.prompts)} prompts "
        f"({options.init_points} starts + up to {options.iterations} suggestions"
        + (f", budget {budget_s:.0f}s)" if budget_s is not None else ")"))
    objective = SimulatedObjective(target, calibration, costs)
    layers = num_layers(target.model)
    result = search_config(objective, layers, space, options.iterations, options.init_points, options.seed,
                           options.max_density, budget_s, store.path(f"{name}.search.json"), identity,
                           log.progress, description=f"{name} search")
    best = result.best
    log(f"{name}: best {_describe(best)} — simulated {result.best_evaluation.score:.2f} tok/s, "
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


def _describe(settings: SelfDraftSettings) -> str:
    skip = settings.skip
    vocab = len(settings.vocab_ids) if settings.vocab_ids is not None else "full"
    return (f"skip attn {list(skip.attention)} mlp {list(skip.mlp)}, vocab {vocab}, "
            f"{'int8' if settings.int8 else 'float'}, threshold {settings.threshold}, max_draft {settings.max_draft}")


def build_domain(
    target: LoadedModel,
    name: str,
    prompts: list[list[int]],
    options: BuildOptions,
    costs: CostTable,
    background: Sequence[int],
    *,
    budget_s: float | None = None,
    store: _Checkpoints | None = None,
    log: _Log | None = None,
    metadata: dict[str, Any] | None = None,
    calibration: CalibrationSet | None = None,
) -> DomainBuild:
    """Calibrate (unless ``calibration`` is given), search, rank the final vocabulary, embed and
    cluster one domain (resumable)."""
    store = store or _Checkpoints(None)
    log = log or _Log(False, None)
    started = time.perf_counter()
    settings = {k: v for k, v in asdict(options).items() if k != "budget_s"}  # a resume may change the budget
    identity = _digest({"model": target.fingerprint, "prompts": prompts, "options": settings,
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
        calibration = _calibrate(target, name, prompts, options.answer_tokens, store, log)
    n = options.search_prompts
    search_set = _cut(calibration, range(n), options.search_tokens)
    held = [calibration.continuations[i] for i in range(n, len(prompts))]
    space = DraftSpace(_rankings(held, prompts[n:], options.space.vocab_sources, eos, background),
                       options.space.vocab_sizes, options.space.int8, options.space.threshold,
                       options.space.max_draft)
    best, point, search = _search(target, name, search_set, space, costs, options, budget_s, store, log,
                                  {"category": name, **(metadata or {})})
    source = search["vocab_source"]
    if best.vocab_ids is not None:  # rank again on every build prompt's text, cut to the size the search chose
        final = _rankings(calibration.continuations, prompts, [source], eos, background)[source]
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
    log(f"{name}: done in {seconds:.0f}s — {_describe(best)}")
    return built


def _search_budget(total_s: float | None, log: _Log, searches_left: int, reserve_s: float) -> float | None:
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
    store = _Checkpoints(checkpoints if searching or MIXED not in reuse else None)
    spent = 0.0
    log = _Log(progress, options.budget_s, spent)
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
                calibrations[name] = _calibrate(target, name, encoded[name], options.answer_tokens, store, log)
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
        sets = [_cut(c, range(options.search_prompts), options.search_tokens) for c in calibrations.values()]
        mixed_set = interleave(sets, options.search_prompts)
        has_vocab = all(p.settings.vocab_ids is not None for p in profiles.values())
        space = DraftSpace({"union": union if has_vocab else [0]}, (len(union),) if has_vocab else (0,),
                           options.space.int8, options.space.threshold, options.space.max_draft)
        budget = _search_budget(options.budget_s, log, 1, reserve_s=0.0)
        best, _, search = _search(target, MIXED, mixed_set, space, costs, options, budget, store, log,
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
    log = _Log(progress, options.budget_s)
    log(f"adding domain {name!r} to a bundle of {len(bundle.categories)} domains (revision {bundle.revision})"
        + (f", time budget {options.budget_s:.0f}s" if options.budget_s else ", no time budget"))
    store = _Checkpoints(checkpoints)
    calibration = _calibrate(target, name, encoded, options.answer_tokens, store, log)
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
