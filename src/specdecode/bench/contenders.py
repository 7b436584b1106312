"""What the benchmark runs: our registered methods and `transformers` peers behind one interface.

A contender is given as ``NAME`` or ``NAME:key=value,key=value`` (``pld:gamma=10,max_ngram=3``,
``hf-pld:num_tokens=10``). Our methods come from the registry in :mod:`specdecode.methods`, so a
method registered later (mtad, ssd, knn-ssd, ...) is benchmarked with no change here.
"""

from __future__ import annotations

import ast
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from specdecode import methods
from specdecode.accept.rules import GreedyMatch, SpeculativeSampling
from specdecode.api import SpeculativeDecoder
from specdecode.engine.stats import GenerationStats
from specdecode.errors import InvalidSettingError
from specdecode.models.loading import LoadedModel
from specdecode.sampling import GenerationSettings, SamplingSettings, make_generator

# Rules whose output is distributed exactly as the target's (greedy: identical to ar). A new
# rule declares itself with a class attribute ``lossless = True`` / ``False``.
_LOSSLESS_RULES = (GreedyMatch, SpeculativeSampling)


@dataclass(frozen=True)
class ContenderSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How the contender is named in tables: the spec as the user would write it."""
        if not self.options:
            return self.name
        return f"{self.name}:" + ",".join(f"{key}={value}" for key, value in self.options.items())


def parse_spec(text: str) -> ContenderSpec:
    """``"pld:gamma=10,max_ngram=3"`` → ``ContenderSpec("pld", {"gamma": 10, "max_ngram": 3})``."""
    name, _, rest = text.strip().partition(":")
    if not name:
        raise InvalidSettingError(f"method spec {text!r} has no name (expected NAME or NAME:key=value,...)")
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InvalidSettingError(f"option {item!r} in {text!r} is not key=value")
        options[key.strip().replace("-", "_")] = _parse_value(raw.strip())
    return ContenderSpec(name, options)


def _parse_value(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


@dataclass
class Outcome:
    """One timed generation: its tokens, its wall-clock time and what it cost."""

    token_ids: list[int]
    seconds: float
    stats: GenerationStats
    draft_timed: bool = True  # False: drafting happened where it could not be timed (stats.draft_s is 0)


class Contender(Protocol):
    label: str
    lossless: bool  # exact w.r.t. the target distribution: greedy output must equal ar's
    peer: bool  # a `transformers` peer rather than one of our methods

    def run(self, prompt_ids: list[int], settings: GenerationSettings) -> Outcome: ...


def wall_clock(device: torch.device) -> float:
    """Seconds, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class OurMethod:
    """A method from our registry, run through the public :class:`SpeculativeDecoder`."""

    peer = False

    def __init__(
        self, spec: ContenderSpec, target: LoadedModel, draft: LoadedModel | None, sampling: SamplingSettings
    ) -> None:
        self.label = spec.label
        self.decoder = SpeculativeDecoder(target, spec.name, draft, **spec.options)
        ctx = methods.MethodContext(target, draft, sampling, make_generator(0, target.device))
        _, rule = methods.build(spec.name, ctx, spec.options)
        self.lossless = bool(getattr(rule, "lossless", isinstance(rule, _LOSSLESS_RULES)))

    def run(self, prompt_ids: list[int], settings: GenerationSettings) -> Outcome:
        device = self.decoder.target.device
        start = wall_clock(device)
        result = self.decoder.generate(
            prompt_ids,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.sampling.temperature,
            top_k=settings.sampling.top_k,
            top_p=settings.sampling.top_p,
            seed=settings.seed,
            stop_at_eos=settings.stop_at_eos,
        )
        return Outcome(result.token_ids, wall_clock(device) - start, result.stats)
