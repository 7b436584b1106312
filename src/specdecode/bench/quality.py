"""Quality of sampled outputs with the statistics a claim needs.

Perplexity of single 64-token samples ranges from ~1.2 (a repetition loop) to >100, so a
difference between two methods on a dozen prompts is mostly noise. Here:

* **pooled perplexity** = exp(Σ NLL / Σ tokens) over all prompts (token-weighted, as the table);
* **change vs ar** with a **paired bootstrap 95 % interval**: prompts are resampled with
  replacement, the same draw for both methods, and the ratio of pooled perplexities recomputed;
  a claim "method X lowers perplexity" holds when the whole interval lies below 0;
* **repeated 4-gram share**: the fraction of 4-grams in an output that already occurred earlier
  in it, pooled — a loop lowers perplexity too, so lower perplexity only counts as better text
  when repetition does not rise with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from specdecode.bench.record import Record

BOOTSTRAP_DRAWS = 2000
NGRAM = 4


@dataclass(frozen=True)
class QualityComparison:
    perplexity: float
    change_vs_ar: float  # pooled perplexity / ar's − 1
    interval: tuple[float, float]  # paired bootstrap 95 % interval of change_vs_ar
    repeated_ngram_share: float

    @property
    def significant(self) -> bool:
        low, high = self.interval
        return low > 0 or high < 0

    def table_row(self, name: str, baseline: bool) -> str:
        """``| name | perplexity | change [interval] (* = excludes 0) | repeated 4-grams |``"""
        low, high = self.interval
        change = "—" if baseline else (
            f"{self.change_vs_ar:+.1%} [{low:+.1%}, {high:+.1%}]{' *' if self.significant else ''}")
        return f"| {name} | {self.perplexity:.2f} | {change} | {self.repeated_ngram_share:.1%} |"


@dataclass(frozen=True)
class Sample:
    """One sampled output as quality sees it: its prompt, summed NLL, length and tokens."""

    prompt: object  # the prompt's id: samples of one prompt (several seeds) form one bootstrap unit
    nll: float
    tokens: int
    token_ids: tuple[int, ...]


def repeated_ngram_share(outputs: list[Sequence[int]], n: int = NGRAM) -> float:
    """Pooled fraction of n-grams that repeat an earlier n-gram of the same output."""
    repeated = total = 0
    for ids in outputs:
        seen: set[tuple[int, ...]] = set()
        for i in range(len(ids) - n + 1):
            gram = tuple(ids[i:i + n])
            repeated += gram in seen
            seen.add(gram)
            total += 1
    return repeated / total if total else 0.0


def compare_quality(records: list[Record], baseline: list[Record], seed: int = 0) -> QualityComparison | None:
    """``records`` of one method against ar's on the same prompts; None without NLLs."""
    if not records or any(r.nll is None for r in records + baseline):
        return None

    def samples(of: list[Record]) -> list[Sample]:
        return [Sample(r.prompt.question_id, r.nll, r.stats.new_tokens, tuple(r.token_ids)) for r in of]

    return compare_samples(samples(records), samples(baseline), seed)


def compare_samples(samples: list[Sample], baseline: list[Sample], seed: int = 0) -> QualityComparison | None:
    """Pooled perplexity and its paired bootstrap against ``baseline`` over prompts; a prompt's
    samples (one per seed) are summed first, so several seeds narrow the interval without
    counting one prompt as several independent ones. None unless both cover the same prompts."""
    prompts = list(dict.fromkeys(s.prompt for s in baseline))
    if not samples or {s.prompt for s in samples} != set(prompts):
        return None
    index = {prompt: i for i, prompt in enumerate(prompts)}

    def per_prompt(of: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
        nll, tokens = np.zeros(len(prompts)), np.zeros(len(prompts))
        for sample in of:
            nll[index[sample.prompt]] += sample.nll
            tokens[index[sample.prompt]] += sample.tokens
        return nll, tokens

    (nll, tokens), (base_nll, base_tokens) = per_prompt(samples), per_prompt(baseline)

    def log_ratio(draw: np.ndarray) -> np.ndarray:
        return nll[draw].sum(-1) / tokens[draw].sum(-1) - base_nll[draw].sum(-1) / base_tokens[draw].sum(-1)

    draws = np.random.default_rng(seed).integers(0, len(prompts), size=(BOOTSTRAP_DRAWS, len(prompts)))
    low, high = np.percentile(log_ratio(draws), [2.5, 97.5])
    return QualityComparison(
        perplexity=float(np.exp(nll.sum() / tokens.sum())),
        change_vs_ar=float(np.expm1(log_ratio(np.arange(len(prompts))))),
        interval=(float(np.expm1(low)), float(np.expm1(high))),
        repeated_ngram_share=repeated_ngram_share([s.token_ids for s in samples]),
    )
