"""Decoding methods by the names users know them from the papers, and how each is assembled.

A method is a drafter plus an acceptance rule. Each builder takes the method's own options as
keyword arguments; unknown options and out-of-range values are refused with a clear error.
"""

from __future__ import annotations

import ast

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from specdecode.accept.joint_ratio import AcceptAll, JointRatioAcceptance
from specdecode.accept.rules import AcceptanceRule, GreedyMatch, GreedyTreeMatch, SpeculativeSampling
from specdecode.artifacts.bundle import ProfileBundle, load_bundle_cached
from specdecode.artifacts.profile import SkipProfile, load_profile, self_draft_settings
from specdecode.errors import InvalidSettingError
from specdecode.models.draft_head import DEFAULT_HEAD, DraftHead, load_head, pair_head
from specdecode.models.loading import LoadedModel, pair_draft, shipped_bundle_dir, shipped_ssd_profile
from specdecode.propose.base import Proposer
from specdecode.propose.beam_sampler import BeamSampleProposer, ModelDrafter
from specdecode.propose.draft_model import DraftModelProposer
from specdecode.propose.eagle import EagleProposer, EagleTreeProposer, HeadDrafter
from specdecode.propose.exact_joint import ExactJointProposer, exact_joint_feasible
from specdecode.propose.knn_self_draft import KnnSelfDraftProposer
from specdecode.propose.lookup_first import LookupFirstProposer
from specdecode.propose.ngram import NgramProposer
from specdecode.propose.self_draft import SelfDraftProposer
from specdecode.sampling import SamplingSettings


@dataclass
class MethodContext:
    """What every builder may use for one request."""

    target: LoadedModel
    draft: LoadedModel | None
    sampling: SamplingSettings
    generator: torch.Generator


Builder = Callable[..., tuple[Proposer, AcceptanceRule]]
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def decorate(builder: Builder) -> Builder:
        _REGISTRY[name] = builder
        return builder

    return decorate


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def method_options(name: str) -> list[str]:
    return [p for p in inspect.signature(_builder(name)).parameters if p != "ctx"]


def _builder(name: str) -> Builder:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidSettingError(f"unknown method {name!r}; choose one of {', '.join(method_names())}") from None


def parse_option_value(raw: str) -> object:
    """A method option's value as written on a command line: ``true`` / ``false`` / ``none`` in any
    case, a Python literal (number, quoted string), or else the text itself (a path, a name)."""
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def validate_options(name: str, options: dict[str, object]) -> None:
    """Refuse unknown options, values of another kind than the option's default (a word where a
    number belongs would otherwise fail deep inside a proposer) and a draft length below 1 — here,
    before the CLI or the server loads a model, as well as in the proposers."""
    unknown = sorted(set(options) - set(method_options(name)))
    if unknown:
        valid = ", ".join(method_options(name)) or "none"
        raise InvalidSettingError(f"unknown option(s) {', '.join(unknown)} for method {name!r} (valid: {valid})")
    parameters = inspect.signature(_builder(name)).parameters
    for key, value in options.items():
        default = parameters[key].default
        if isinstance(default, bool):
            fits, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            fits, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):
            fits, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        else:
            continue  # paths, loaded objects, optional settings: their builders check them
        if not fits:
            raise InvalidSettingError(f"option {key} of method {name!r} takes {kind}, got {value!r}")
    gamma = options.get("gamma")
    if isinstance(gamma, int) and gamma < 1:  # the draft length of every method that takes one; before a model loads
        raise InvalidSettingError(f"gamma (draft length) of method {name!r} must be >= 1, got {gamma}")


def build(name: str, ctx: MethodContext, options: dict[str, object]) -> tuple[Proposer, AcceptanceRule]:
    """Assemble method ``name`` for one request."""
    validate_options(name, options)
    return _builder(name)(ctx, **options)


def default_rule(ctx: MethodContext) -> AcceptanceRule:
    """Greedy match for greedy decoding, speculative sampling otherwise."""
    return GreedyMatch() if ctx.sampling.greedy else SpeculativeSampling(ctx.sampling, ctx.generator)


def require_draft(ctx: MethodContext, method: str) -> LoadedModel:
    if ctx.draft is None:
        raise InvalidSettingError(f"method {method!r} needs a draft model (--draft)")
    pair_draft(ctx.target, ctx.draft)
    return ctx.draft


@register("ar")
def build_autoregressive(ctx: MethodContext) -> tuple[Proposer, AcceptanceRule]:
    """Plain autoregressive decoding: one target forward per token."""
    return Proposer(), default_rule(ctx)


@register("pld")
def build_prompt_lookup(
    ctx: MethodContext, gamma: int = 10, max_ngram: int = 3, min_ngram: int = 1, match: str = "last"
) -> tuple[Proposer, AcceptanceRule]:
    """Prompt lookup: draft the continuation of an earlier occurrence of the last n-gram (``match``:
    the most recent occurrence, or the first)."""
    return NgramProposer(gamma, max_ngram, min_ngram, match), default_rule(ctx)


@register("sps")
def build_speculative_sampling(
    ctx: MethodContext, gamma: int = 4, adaptive_gamma: bool = False
) -> tuple[Proposer, AcceptanceRule]:
    """Speculative decoding / sampling with a separate draft model."""
    draft = require_draft(ctx, "sps")
    proposer = DraftModelProposer(draft.runner, ctx.sampling, ctx.generator, gamma, adaptive_gamma)
    return proposer, default_rule(ctx)


# MTAD's default depth: up to 6 levels, stopping after a level where even the best beam's joint draft
# probability is below 0.05 (results/mtad-depth-threshold: on 100 prompts × 3 seeds τ +4 % over the
# paper's fixed γ 4 at the same perplexity; float32 held-out 1.31× -> 1.40× `ar`)
MTAD_GAMMA, MTAD_MIN_JOINT = 6, 0.05


@register("mtad")
def build_mtad(
    ctx: MethodContext, beams: int = 4, gamma: int = MTAD_GAMMA, threshold: float = 0.5, with_replacement: bool = False,
    tree: bool = False, min_joint: float = MTAD_MIN_JOINT, min_share: float = 0.0, nodes: int = 0,
) -> tuple[Proposer, AcceptanceRule]:
    """Multi-token assisted decoding: beam-sampled joint drafts, joint-ratio verification. ``tree``:
    the multi-candidate variant, every level's beams verified together in one tree forward
    (``nodes``: only that many, the most probable; 0: all). ``min_joint`` (adaptive depth): stop
    after a level whose best beam's joint draft probability is below it; ``min_share`` (adaptive
    width): drop beams below that share of their level. ``gamma=4, min_joint=0`` is the paper's
    fixed B 4 × γ 4 draft."""
    draft = require_draft(ctx, "mtad")
    proposer = BeamSampleProposer(ModelDrafter(draft.runner), ctx.sampling, ctx.generator, beams, gamma,
                                  with_replacement, tree, min_joint=min_joint, min_share=min_share, nodes=nodes)
    return proposer, JointRatioAcceptance(ctx.sampling, ctx.generator, threshold)


@register("mtjd")
def build_mtjd(
    ctx: MethodContext, gamma: int = 4, beams: int = 4, exact: bool | None = None
) -> tuple[Proposer, AcceptanceRule]:
    """Multi-token joint decoding on the target itself: exact by enumeration (tiny vocabularies,
    the default where feasible) or approximated by beam sampling on the target."""
    if exact is None:
        exact = exact_joint_feasible(ctx.target.vocab_size, gamma)
    if exact:
        proposer: Proposer = ExactJointProposer(ctx.target.model, ctx.sampling, ctx.generator, gamma)
    else:
        proposer = BeamSampleProposer(ModelDrafter(ctx.target.runner), ctx.sampling, ctx.generator, beams, gamma)
    return proposer, AcceptAll(ctx.sampling, ctx.generator)


ProfileSpec = str | os.PathLike[str] | SkipProfile | None


@functools.lru_cache(maxsize=1)
def _shipped_ssd_profile_fingerprint() -> str | None:
    path = shipped_ssd_profile()
    return load_profile(path).fingerprint if path.is_file() else None


def resolve_profile(ctx: MethodContext, profile: ProfileSpec) -> ProfileSpec:
    """No ``profile``: the shipped one where the target is the embedded default (a bare full-depth,
    full-vocabulary self-draft is slower than ``ar``); ``"none"``: the bare draft, explicitly."""
    if profile is None and ctx.target.fingerprint == _shipped_ssd_profile_fingerprint():
        return shipped_ssd_profile()
    return None if profile == "none" else profile


@register("ssd")
def build_self_speculative(
    ctx: MethodContext,
    profile: ProfileSpec = None,
    skip_attention: list[int] | None = None,
    skip_mlp: list[int] | None = None,
    threshold: float | None = None,
    max_draft: int | None = None,
    draft_vocab: int | list[int] | None = None,
    int8: bool | None = None,
) -> tuple[Proposer, AcceptanceRule]:
    """Self-speculative decoding: the target itself, with sub-layers skipped, drafts.

    Skip sets and draft settings come from a searched ``profile`` (see ``specdecode search``) or
    the explicit options, which override the profile's. Without ``profile``, the embedded default
    model drafts with its shipped profile; ``profile=none`` (and any other model) starts from the
    bare draft: nothing skipped, threshold 0.8, max_draft 12, full-vocabulary float head.
    """
    settings = self_draft_settings(ctx.target, resolve_profile(ctx, profile), skip_attention, skip_mlp, threshold,
                                   max_draft, draft_vocab, int8)
    return SelfDraftProposer(ctx.target, settings, ctx.sampling, ctx.generator), default_rule(ctx)


@register("knn-ssd")
def build_knn_self_speculative(
    ctx: MethodContext, bundle: str | os.PathLike[str] | ProfileBundle | None = None
) -> tuple[Proposer, AcceptanceRule]:
    """KNN-SSD: ``ssd`` whose skip profile is picked per request by the prompt's nearest anchor in a
    bundle built by ``specdecode build-knn`` (the mixed profile beyond the bundle's radius). Without
    ``bundle``, the bundle shipped for the embedded default model."""
    if bundle is None:
        loaded = load_bundle_cached(shipped_bundle_dir())
        if loaded.fingerprint != ctx.target.fingerprint:
            raise InvalidSettingError(
                "method 'knn-ssd' needs bundle=PATH (a directory written by specdecode build-knn): the shipped "
                f"bundle is for the embedded default model, not {ctx.target.name!r}")
    else:
        loaded = bundle if isinstance(bundle, ProfileBundle) else load_bundle_cached(bundle)
        loaded.check_model(ctx.target, "bundle" if isinstance(bundle, ProfileBundle) else f"bundle {str(bundle)!r}")
    return KnnSelfDraftProposer(ctx.target, loaded, ctx.sampling, ctx.generator), default_rule(ctx)


HeadSpec = str | os.PathLike[str] | DraftHead


@functools.lru_cache(maxsize=4)
def _load_head_cached(spec: str, weights: str) -> DraftHead:
    return load_head(spec, weights)


def require_head(ctx: MethodContext, head: HeadSpec, weights: str | None = None) -> DraftHead:
    """The draft head ``head`` (a directory, ``default-head`` or a loaded head), paired with the
    target. ``weights`` (heads loaded here; default ``auto``): what its products read, see
    :meth:`DraftHead.freeze`; a head passed in runs as its caller froze it."""
    if isinstance(head, DraftHead):
        if weights is not None:
            raise InvalidSettingError("head_weights applies to a head loaded by name or path, not to a DraftHead "
                                      "passed in (freeze it with the weights you want)")
        loaded = head
    else:
        loaded = _load_head_cached(str(head), weights or "auto")
    loaded.to(ctx.target.device)
    pair_head(ctx.target, loaded)
    return loaded


@register("eagle")
def build_eagle(
    ctx: MethodContext, head: HeadSpec = DEFAULT_HEAD, gamma: int = 5, min_confidence: float = 0.5,
    head_weights: str | None = None,
) -> tuple[Proposer, AcceptanceRule]:
    """EAGLE: a feature-level draft head drafts a chain from the target's hidden states (greedy
    match, or speculative sampling with the head as the draft: exact). Drafting stops after a
    token the head gives less than ``min_confidence``: with a head that agrees ~40 % of the time,
    every further head step and verified token would cost more than it returns (docs/eagle.md).
    ``head_weights``: ``float32``, ``fp16`` or ``auto`` (the default: whichever drafts faster here),
    what the head's products read (:meth:`DraftHead.freeze`); every head method takes it."""
    proposer = EagleProposer(require_head(ctx, head, head_weights), ctx.sampling, ctx.generator, gamma, min_confidence)
    return proposer, default_rule(ctx)


@register("eagle-tree")
def build_eagle_tree(
    ctx: MethodContext, head: HeadSpec = DEFAULT_HEAD, gamma: int = 5, top_k: int = 4, nodes: int = 16,
    head_weights: str | None = None,
) -> tuple[Proposer, AcceptanceRule]:
    """EAGLE-2: a dynamic draft tree from the head's confidences, verified in one target forward
    with tree attention (greedy decoding only)."""
    if not ctx.sampling.greedy:
        raise InvalidSettingError("method 'eagle-tree' verifies greedily; use 'eagle' or 'eagle-mtad' for sampling")
    return EagleTreeProposer(require_head(ctx, head, head_weights), gamma, top_k, nodes), GreedyTreeMatch()


@register("eagle-mtad")
def build_eagle_mtad(
    ctx: MethodContext, head: HeadSpec = DEFAULT_HEAD, beams: int = 4, gamma: int = MTAD_GAMMA, threshold: float = 0.5,
    with_replacement: bool = False, tree: bool = False, min_joint: float = MTAD_MIN_JOINT, min_share: float = 0.0,
    nodes: int = 0, head_weights: str | None = None,
) -> tuple[Proposer, AcceptanceRule]:
    """MTAD with the draft head as its auxiliary model: beam sampling over the head, joint-ratio
    verification (``tree``, ``nodes``, ``min_joint``, ``min_share``: as ``mtad``)."""
    drafter = HeadDrafter(require_head(ctx, head, head_weights))
    proposer = BeamSampleProposer(drafter, ctx.sampling, ctx.generator, beams, gamma,
                                  with_replacement, tree, min_joint=min_joint, min_share=min_share, nodes=nodes)
    return proposer, JointRatioAcceptance(ctx.sampling, ctx.generator, threshold)


@register("pld-ssd")
def build_lookup_then_self_draft(
    ctx: MethodContext, gamma: int = 10, min_ngram: int = 2, max_ngram: int = 3,
    profile: ProfileSpec = None,
) -> tuple[Proposer, AcceptanceRule]:
    """Prompt lookup where the last ``min_ngram``..``max_ngram`` tokens occurred before; elsewhere
    ``ssd`` with ``profile`` (as ``ssd`` resolves it) drafts (``propose/lookup_first.py``)."""
    settings = self_draft_settings(ctx.target, resolve_profile(ctx, profile))
    fallback = SelfDraftProposer(ctx.target, settings, ctx.sampling, ctx.generator)
    return LookupFirstProposer(NgramProposer(gamma, max_ngram, min_ngram), fallback), default_rule(ctx)


@register("pld-eagle")
def build_lookup_then_eagle(
    ctx: MethodContext, gamma: int = 10, min_ngram: int = 2, max_ngram: int = 3, head: HeadSpec = DEFAULT_HEAD,
    head_gamma: int = 5, min_confidence: float = 0.5, head_weights: str | None = None,
) -> tuple[Proposer, AcceptanceRule]:
    """Prompt lookup where the last ``min_ngram``..``max_ngram`` tokens occurred before; elsewhere
    the draft head drafts a chain as ``eagle`` does (``propose/lookup_first.py``)."""
    fallback = EagleProposer(require_head(ctx, head, head_weights), ctx.sampling, ctx.generator, head_gamma,
                             min_confidence)
    return LookupFirstProposer(NgramProposer(gamma, max_ngram, min_ngram), fallback), default_rule(ctx)
