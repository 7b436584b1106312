"""Generation settings and the logits → probabilities processing every method shares.

Target and draft distributions go through the same temperature / top-k / top-p processing, as
in `transformers` and the reference implementations; speculative sampling is exact with respect
to the *processed* target distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specdecode.errors import InvalidSettingError


@dataclass(frozen=True)
class SamplingSettings:
    """``temperature == 0`` means greedy; ``top_k == 0`` and ``top_p == 1`` disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise InvalidSettingError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidSettingError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidSettingError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def exact_top(self) -> int | None:
        """How many of a row's highest logits :func:`process_logits` reads (None: all of them)."""
        if self.greedy:
            return 1
        return self.top_k or None


@dataclass(frozen=True)
class GenerationSettings:
    """What to generate: length, sampling, stop conditions and seed."""

    max_new_tokens: int = 128
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidSettingError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop_strings):
            raise InvalidSettingError("stop strings must be non-empty")


TIE_ROOM = 16  # values read past the k-th, for ties with it (see process_logits)


def process_logits(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Turn logits ``[..., V]`` into the sampling distribution ``[..., V]`` (temperature, top-k, top-p).

    Greedy settings give the one-hot distribution of the argmax.
    """
    if settings.greedy:
        probs = torch.zeros_like(logits)
        probs.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
        return probs
    vocab = logits.shape[-1]
    if 0 < settings.top_k < vocab:
        if (columns := _few_finite_columns(logits)) is not None:  # a screened head's rows: work on those
            return torch.zeros_like(logits).index_copy_(
                -1, columns, process_logits(logits.index_select(-1, columns), settings))
        # Only the top k can survive: process those and scatter them into zeros, instead of masking
        # and normalising whole 262k-entry rows (16 ms for a 5-row verification on this CPU, 3 ms
        # this way). Masking keeps every token tied with the k-th, so TIE_ROOM more values are
        # read: ties are common in bf16 logits (8 bits of precision), and only where they run
        # past those (rare) does the general path below decide.
        width = min(vocab, settings.top_k + TIE_ROOM)
        values, indices = torch.topk(logits, width, dim=-1)
        values = values / settings.temperature
        kth = values[..., settings.top_k - 1:settings.top_k]
        if width == vocab or not bool((values[..., -1:] == kth).any()):
            values = values.masked_fill(values < kth, float("-inf"))
            if settings.top_p < 1.0:
                values = values.masked_fill(_beyond_top_p(values, settings.top_p), float("-inf"))
            return torch.zeros_like(logits).scatter_(-1, indices, torch.softmax(values, dim=-1))
    logits = logits / settings.temperature
    if 0 < settings.top_k < vocab:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        k = settings.top_k if 0 < settings.top_k < vocab else vocab
        top_vals, top_idx = torch.topk(logits, k, dim=-1)  # sorted, descending
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top_idx, _beyond_top_p(top_vals, settings.top_p))
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _few_finite_columns(logits: torch.Tensor) -> torch.Tensor | None:
    """The columns where some row is finite, where those are under an eighth of the vocabulary.

    A screened head (``models/heads.py``) leaves all but a row's top-k candidates ``-inf``; every
    value top-k can keep is among the finite ones, and a ``-inf`` logit gets probability 0 either
    way, so processing only those columns gives the same distribution — without a top-k over
    262k entries a row (~0.7 ms each, 17 ms of a 25-row tree verification on a Zen 4)."""
    finite = logits.reshape(-1, logits.shape[-1]).amax(dim=0) > float("-inf")
    if int(finite.sum()) * 8 > logits.shape[-1]:
        return None
    return finite.nonzero().squeeze(1)


def _beyond_top_p(sorted_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Of logits sorted descending: those whose preceding mass already reaches ``top_p`` (the
    first is always kept)."""
    probs = torch.softmax(sorted_logits, dim=-1)
    return (probs.cumsum(dim=-1) - probs) >= top_p


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from a 1-D distribution, among its nonzero entries: ``multinomial``
    spends a random number on every entry (8 ms for 262k ids on this CPU), and a top-k
    distribution has k."""
    support = probs.nonzero().squeeze(-1)
    return int(support[torch.multinomial(probs[support], 1, generator=generator)])


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
