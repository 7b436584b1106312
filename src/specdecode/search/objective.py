"""What the skip-set search maximises: measured or simulated ``ssd`` tokens per second.

``measured`` runs real ``ssd`` generations on the calibration prompts and times them, like the
reference implementations. On a shared CPU that number is noisy (a skip set can win because a
neighbour's job paused), and Bayesian optimisation chases the noise.

``simulated`` is deterministic. Greedy ``ssd`` emits exactly the target's greedy text, so the
accepted length of every step can be replayed without running the target: the draft proposes
from the target's cache of the context (one full forward per prompt, computed once), and its
tokens are matched against the target's own continuation. Time comes from a cost model timed
once per search: the target's verification forward for 1..k+1 tokens, and a draft forward
whose cost falls linearly with the parameters of the sub-layers it skips. The estimate is
``tokens / Σ_steps (verify(k_i + 1) + drafts_i · draft_cost)``; it ignores the prefill, which
``ssd`` and ``ar`` share, and the replay is also several times faster than a measured
evaluation because it never runs a verification forward.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from specdecode.api import SpeculativeDecoder
from specdecode.models.cache import KVCache
from specdecode.models.runner import Readout, TargetRunner
from specdecode.models.families import sublayers
from specdecode.models.layer_skip import SkipSet
from specdecode.models.loading import LoadedModel
from specdecode.artifacts.profile import SelfDraftSettings
from specdecode.propose.self_draft import SelfDraftProposer
from specdecode.sampling import SamplingSettings
from specdecode.search.calibration import CalibrationSet
from specdecode.timing import time_call


@dataclass
class Evaluation:
    """One skip set's score (what the search maximises) and the statistics behind it."""

    score: float  # tokens per second, measured or estimated
    speedup: float  # against autoregressive decoding on the same prompts
    tau: float  # tokens per target forward
    acceptance_rate: float
    new_tokens: int
    draft_forwards: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Objective(Protocol):
    name: str

    def __call__(self, settings: SelfDraftSettings) -> Evaluation: ...


def ssd_options(settings: SelfDraftSettings) -> dict[str, Any]:
    """``ssd`` method options that reproduce ``settings``."""
    return dict(skip_attention=list(settings.skip.attention), skip_mlp=list(settings.skip.mlp),
                threshold=settings.threshold, max_draft=settings.max_draft, int8=settings.int8,
                draft_vocab=list(settings.vocab_ids) if settings.vocab_ids is not None else 0)


class MeasuredObjective:
    """Wall-clock tokens/s of greedy ``ssd`` over the calibration prompts (prefill included)."""

    name = "measured"

    def __init__(self, target: LoadedModel, calibration: CalibrationSet) -> None:
        self.target, self.calibration = target, calibration

    def __call__(self, settings: SelfDraftSettings) -> Evaluation:
        decoder = SpeculativeDecoder(self.target, "ssd", **ssd_options(settings))
        tokens = forwards = drafts = proposed = accepted = 0
        seconds = 0.0
        for prompt in self.calibration.prompts:
            stats = decoder.generate(prompt, max_new_tokens=self.calibration.max_new_tokens).stats
            tokens += stats.new_tokens
            seconds += stats.total_s
            forwards += stats.target_forwards
            drafts += stats.draft_forwards
            proposed += stats.proposed_tokens
            accepted += stats.accepted_tokens
        score = tokens / seconds
        return Evaluation(score, score / self.calibration.ar_tokens_per_second, tokens / forwards,
                          accepted / proposed if proposed else 0.0, tokens, drafts)


def greedy_verification(runner: TargetRunner, kv: KVCache, tokens: list[int]) -> torch.Tensor:
    """The forward greedy ``ssd`` verifies ``tokens`` with, every row read (a fully accepted draft):
    what the cost models time. Greedy reads each row's top 1, so a model with the fast runtime
    screens its head instead of scoring the full vocabulary in float32 — timing the full head
    made k-token verification look 1.5–2× dearer than it is and the searches chose short drafts."""
    return runner.forward(kv, tokens, Readout(top_k=1)).logits


def time_on_cache(step: Callable[[], Any], kv: KVCache, repeats: int,
                  statistic: Callable[[list[float]], float] = statistics.median) -> float:
    """Seconds ``step`` takes on what ``kv`` holds now: one warm-up run (dropped, it warms caches),
    then ``repeats`` runs, the cache cut back after each so every run sees the same context."""
    keep = len(kv)
    return time_call(step, repeats, warmup=1, statistic=statistic, after=lambda: kv.crop(keep))


def time_verification(runner: TargetRunner, kv: KVCache, token: int, counts: list[int], repeats: int,
                      statistic: Callable[[list[float]], float] = statistics.median) -> list[float]:
    """Seconds of a greedy verification of k tokens after what ``kv`` holds, for each k in ``counts``."""
    return [time_on_cache(lambda k=k: greedy_verification(runner, kv, [token] * k), kv, repeats, statistic)
            for k in counts]


@dataclass
class CostModel:
    """Seconds per forward, timed once: verification by number of tokens, draft by what it keeps."""

    verify_s: list[float]  # verify_s[k - 1]: the target fed k tokens, greedy logits for all of them
    draft_fixed_s: float  # a draft forward that skips every sub-layer (embedding, norms, head)
    draft_layers_s: float  # what keeping every sub-layer adds to that
    attention_share: list[float]  # share of draft_layers_s per attention sub-layer (by parameters)
    mlp_share: list[float]

    def verify(self, tokens: int) -> float:
        return self.verify_s[min(tokens, len(self.verify_s)) - 1]

    def draft(self, skip: SkipSet) -> float:
        skipped = sum(self.attention_share[i] for i in skip.attention) + sum(self.mlp_share[i] for i in skip.mlp)
        return self.draft_fixed_s + self.draft_layers_s * max(0.0, 1.0 - skipped)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def measure(cls, target: LoadedModel, context: list[int], draft: SelfDraftSettings, repeats: int = 5) -> CostModel:
        """Time the forwards on ``context`` (medians of ``repeats``) with the draft head of ``draft``."""
        model = target.model
        pairs = sublayers(model)
        count = len(pairs)
        kv = KVCache()

        def draft_time(skip: SkipSet) -> float:
            proposer = SelfDraftProposer(target, SelfDraftSettings(skip, threshold=1.0, max_draft=1,
                                                                   vocab_ids=draft.vocab_ids, int8=draft.int8),
                                         SamplingSettings(), None)
            proposer.bind_target_cache(kv)
            return time_on_cache(lambda: proposer.propose(context, max_tokens=1), kv, repeats)

        with torch.inference_mode():
            target.runner.forward(kv, context[:-1], Readout.hidden_only())
            verify_s = time_verification(target.runner, kv, context[-1], list(range(1, draft.max_draft + 2)), repeats)
            everything = SkipSet(tuple(range(count)), tuple(range(count)))
            fixed = draft_time(everything)
            full = draft_time(SkipSet())
        attention = [_parameters(attn) for attn, _ in pairs]
        mlp = [_parameters(mlp) for _, mlp in pairs]
        total = sum(attention) + sum(mlp)
        return cls(verify_s, fixed, max(0.0, full - fixed), [a / total for a in attention], [m / total for m in mlp])


class CostTable:
    """Cost models for a search over whole draft configurations, timed on the model as loaded
    (fast runtime included) and shared by every domain's search of a bundle, so scores compare.

    On a shared CPU single timings are noisy (another job's burst can double one), so every
    timing is the *minimum* of ``repeats`` runs (interference only ever adds time) and the table
    is a small model fitted to a few of them rather than one timing per configuration:

    * verification of k tokens: timed at a few k, made non-decreasing, interpolated linearly;
    * a draft forward, per weight format (float or int8): ``fixed + rows · per_row + kept · layers``
      where ``rows`` is the draft head's vocabulary size (the full head is timed on its own),
      ``kept`` the parameter share of the sub-layers kept. ``fixed`` and ``per_row`` come from two
      drafts that skip every sub-layer (a small and a large head), ``layers`` from one that skips
      nothing.
    """

    SMALL, LARGE = 1024, 16384

    def __init__(self, target: LoadedModel, context: list[int], max_draft: int, repeats: int = 5) -> None:
        self.target, self.context, self.repeats = target, list(context), repeats
        self.kv = KVCache()
        pairs = sublayers(target.model)
        attention = [_parameters(attn) for attn, _ in pairs]
        mlp = [_parameters(m) for _, m in pairs]
        total = sum(attention) + sum(mlp)
        self.attention_share, self.mlp_share = [a / total for a in attention], [m / total for m in mlp]
        self.formats: dict[str, dict[str, float]] = {}  # "float" / "int8" -> fixed, per_row, layers, full_head
        self.started = time.perf_counter()
        with torch.inference_mode():
            target.runner.forward(self.kv, self.context[:-1], Readout.hidden_only())
            points = sorted({1, 2, 3, 5, 8, 12, max_draft + 1} & set(range(1, max_draft + 2)))
            timed = time_verification(target.runner, self.kv, self.context[-1], points, repeats, min)
        timed = list(np.maximum.accumulate(timed))
        self.verify_points = dict(zip(points, timed))
        self.verify_s = [float(np.interp(k, points, timed)) for k in range(1, max_draft + 2)]

    @staticmethod
    def head_key(settings: SelfDraftSettings) -> str:
        return f"{len(settings.vocab_ids) if settings.vocab_ids is not None else 'full'}:{'int8' if settings.int8 else 'float'}"

    def _draft_time(self, skip: SkipSet, vocab_ids: tuple[int, ...] | None, int8: bool) -> float:
        probe = SelfDraftSettings(skip, threshold=1.0, max_draft=1, vocab_ids=vocab_ids, int8=int8)
        proposer = SelfDraftProposer(self.target, probe, SamplingSettings(), None)
        proposer.bind_target_cache(self.kv)
        with torch.inference_mode():
            return time_on_cache(lambda: proposer.propose(self.context, max_tokens=1), self.kv, self.repeats, min)

    def _format(self, int8: bool, full_head: bool) -> dict[str, float]:
        name = "int8" if int8 else "float"
        entry = self.formats.setdefault(name, {})
        count = len(self.attention_share)
        everything = SkipSet(tuple(range(count)), tuple(range(count)))
        vocab = min(self.LARGE, self.target.vocab_size)
        small = tuple(range(min(self.SMALL, vocab)))
        if "fixed" not in entry:
            large = tuple(range(vocab))
            t_small = self._draft_time(everything, small, int8)
            t_large = self._draft_time(everything, large, int8)
            per_row = max(0.0, (t_large - t_small) / max(1, len(large) - len(small)))
            entry["per_row"] = per_row
            entry["fixed"] = max(0.0, t_small - per_row * len(small))
            entry["layers"] = max(0.0, self._draft_time(SkipSet(), small, int8) - t_small)
        if full_head and "full_head" not in entry:
            entry["full_head"] = max(0.0, self._draft_time(everything, None, int8) - entry["fixed"])
        return entry

    def model_for(self, settings: SelfDraftSettings) -> CostModel:
        """The cost model of ``settings``' draft (timed now if its weight format is new)."""
        entry = self._format(settings.int8, settings.vocab_ids is None)
        head = entry["full_head"] if settings.vocab_ids is None else entry["per_row"] * len(settings.vocab_ids)
        verify = self.verify_s
        if settings.max_draft + 1 > len(verify):  # longer drafts than timed: extrapolate linearly
            slope = (verify[-1] - verify[0]) / max(1, len(verify) - 1)
            verify = verify + [verify[-1] + slope * i for i in range(1, settings.max_draft + 2 - len(verify))]
        return CostModel(verify, entry["fixed"] + head, entry["layers"], self.attention_share, self.mlp_share)

    @property
    def heads(self) -> dict[str, dict[str, float]]:
        return self.formats

    def to_dict(self) -> dict[str, Any]:
        # copies: the table keeps growing (formats timed by later searches) after a profile took this
        return {"verify_s": list(self.verify_s), "verify_timed": {str(k): v for k, v in self.verify_points.items()},
                "draft": {name: dict(entry) for name, entry in self.formats.items()},
                "attention_share": list(self.attention_share), "mlp_share": list(self.mlp_share),
                "timing": f"minimum of {self.repeats} runs after one warm-up"}


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class SimulatedObjective:
    """Deterministic estimate: replayed greedy acceptance × the cost model (see module docstring)."""

    name = "simulated"

    def __init__(self, target: LoadedModel, calibration: CalibrationSet, costs: CostModel | CostTable) -> None:
        self.target, self.calibration, self.costs = target, calibration, costs
        self.sequences = [p + c for p, c in zip(calibration.prompts, calibration.continuations)]
        self.caches = []
        with torch.inference_mode():
            for sequence in self.sequences:
                kv = KVCache()
                target.runner.forward(kv, sequence[:-1], Readout.hidden_only())
                self.caches.append(kv)

    def __call__(self, settings: SelfDraftSettings) -> Evaluation:
        costs = self.costs.model_for(settings) if isinstance(self.costs, CostTable) else self.costs
        tokens = steps = drafts = proposed = accepted = 0
        seconds = 0.0
        for prompt, full, cache in zip(self.calibration.prompts, self.sequences, self.caches):
            continuation = full[len(prompt):]
            proposer = SelfDraftProposer(self.target, settings, SamplingSettings(), None)
            position = 0
            with torch.inference_mode():
                while position < len(continuation):
                    sequence = full[: len(prompt) + position]
                    proposer.bind_target_cache(_prefix_view(cache, len(sequence) - 1))
                    before = proposer.stats.forwards
                    draft = proposer.propose(sequence, self.calibration.max_new_tokens - position - 1)
                    expected = continuation[position:]
                    kept = 0
                    while kept < min(len(draft), len(expected) - 1) and draft.tokens[kept] == expected[kept]:
                        kept += 1
                    seconds += costs.verify(len(draft) + 1)
                    seconds += (proposer.stats.forwards - before) * costs.draft(settings.skip)
                    steps += 1
                    proposed += len(draft)
                    accepted += kept
                    position += kept + 1
            tokens += len(continuation)
            drafts += proposer.stats.forwards
        score = tokens / seconds
        return Evaluation(score, score * costs.verify(1), tokens / steps,
                          accepted / proposed if proposed else 0.0, tokens, drafts)


def _prefix_view(kv: KVCache, length: int) -> KVCache:
    """A cache holding the first ``length`` tokens of ``kv`` without copying them.

    Appending to the view makes new tensors (``DynamicLayer.update`` concatenates), so ``kv``
    itself is never modified.
    """
    view = KVCache()
    view.cache = DynamicCache()
    for layer in kv.cache.layers:
        part = DynamicLayer()
        part.lazy_initialization(layer.keys, layer.values)
        part.keys, part.values = layer.keys[..., :length, :], layer.values[..., :length, :]
        view.cache.layers.append(part)
    view.token_ids = kv.token_ids[:length]
    return view
