"""What the benchmark runs: our registered methods and `transformers` peers behind one interface.

A contender is given as ``NAME`` or ``NAME:key=value,key=value`` (``pld:gamma=10,max_ngram=3``,
``hf-pld:num_tokens=10``). Our methods come from the registry in :mod:`specdecode.methods`, so a
method registered later (mtad, ssd, knn-ssd, ...) is benchmarked with no change here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from specdecode import methods
from specdecode.accept.rules import GreedyMatch, SpeculativeSampling
from specdecode.api import SpeculativeDecoder
from specdecode.engine.loop import Generation
from specdecode.engine.stats import GenerationResult, GenerationStats
from specdecode.errors import InvalidSettingError
from specdecode.models.loading import LoadedModel
from specdecode.sampling import GenerationSettings, SamplingSettings, make_generator
from specdecode.timing import clock

# Rules whose output is distributed exactly as the target's (greedy: identical to ar). A new
# rule declares itself with a class attribute ``lossless = True`` / ``False``.
_LOSSLESS_RULES = (GreedyMatch, SpeculativeSampling)


EAGER_SUFFIX = "@eager"  # run a method on the model's own kernels, the fast runtime switched off


@dataclass(frozen=True)
class ContenderSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    eager: bool = False

    @property
    def label(self) -> str:
        """How the contender is named in tables: the spec as the user would write it."""
        label = self.name
        if self.options:
            label += ":" + ",".join(f"{key}={value}" for key, value in self.options.items())
        return label + (EAGER_SUFFIX if self.eager else "")


def parse_spec(text: str) -> ContenderSpec:
    """``"pld:gamma=10,max_ngram=3"`` → ``ContenderSpec("pld", {"gamma": 10, "max_ngram": 3})``;
    a trailing ``@eager`` runs it without the fast runtime (``ar@eager``: the plain float32 loop)."""
    text = text.strip()
    eager = text.endswith(EAGER_SUFFIX)
    text = text.removesuffix(EAGER_SUFFIX)
    name, _, rest = text.partition(":")
    if not name:
        raise InvalidSettingError(f"method spec {text!r} has no name (expected NAME or NAME:key=value,...)")
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InvalidSettingError(f"option {item!r} in {text!r} is not key=value")
        options[key.strip().replace("-", "_")] = methods.parse_option_value(raw.strip())
    return ContenderSpec(name, options, eager)


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


class OurMethod:
    """A method from our registry, run through the public :class:`SpeculativeDecoder`."""

    peer = False

    def __init__(
        self, spec: ContenderSpec, target: LoadedModel, draft: LoadedModel | None, sampling: SamplingSettings
    ) -> None:
        self.label = spec.label
        if spec.eager:  # `transformers`' kernels, the reference the fast runtime is measured against
            target, draft = target.eager(), draft.eager() if draft is not None else None
        self.decoder = SpeculativeDecoder(target, spec.name, draft, **spec.options)
        ctx = methods.MethodContext(target, draft, sampling, make_generator(0, target.device))
        _, rule = methods.build(spec.name, ctx, spec.options)
        self.lossless = bool(getattr(rule, "lossless", isinstance(rule, _LOSSLESS_RULES)))

    def run(self, prompt_ids: list[int], settings: GenerationSettings) -> Outcome:
        device = self.decoder.target.device
        start = clock(device)
        result = self._generate(prompt_ids, settings)
        seconds = clock(device) - start
        return Outcome(result.token_ids, seconds, result.stats)

    def _generate(self, prompt_ids: list[int], settings: GenerationSettings) -> GenerationResult:
        return self.start(prompt_ids, settings).result()

    def start(self, prompt_ids: list[int], settings: GenerationSettings) -> Generation:
        """A generation of ``prompt_ids`` under ``settings``, not yet stepped (a batch steps several)."""
        return self.decoder.start(
            prompt_ids,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.sampling.temperature,
            top_k=settings.sampling.top_k,
            top_p=settings.sampling.top_p,
            seed=settings.seed,
            stop_at_eos=settings.stop_at_eos,
        )
