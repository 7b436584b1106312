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

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from specdecode.bench.runner import Record

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


def repeated_ngram_share(records: list[Record], n: int = NGRAM) -> float:
    """Pooled fraction of n-grams that repeat an earlier n-gram of the same output."""
    repeated = total = 0
    for record in records:
        seen: set[tuple[int, ...]] = set()
        ids = record.token_ids
        for i in range(len(ids) - n + 1):
            gram = tuple(ids[i:i + n])
            repeated += gram in seen
            seen.add(gram)
            total += 1
    return repeated / total if total else 0.0


def compare_quality(records: list[Record], baseline: list[Record], seed: int = 0) -> QualityComparison | None:
    """``records`` of one method against ar's on the same prompts (same order); None without NLLs."""
    if not records or any(r.nll is None for r in records + baseline) or len(records) != len(baseline):
        return None
    nll = np.array([r.nll for r in records], dtype=np.float64)
    tokens = np.array([r.stats.new_tokens for r in records], dtype=np.float64)
    base_nll = np.array([r.nll for r in baseline], dtype=np.float64)
    base_tokens = np.array([r.stats.new_tokens for r in baseline], dtype=np.float64)

    def log_ratio(index: np.ndarray) -> np.ndarray:
        ours = nll[index].sum(-1) / tokens[index].sum(-1)
        theirs = base_nll[index].sum(-1) / base_tokens[index].sum(-1)
        return ours - theirs

    everything = np.arange(len(records))
    draws = np.random.default_rng(seed).integers(0, len(records), size=(BOOTSTRAP_DRAWS, len(records)))
    low, high = np.percentile(log_ratio(draws), [2.5, 97.5])
    return QualityComparison(
        perplexity=float(np.exp(nll.sum() / tokens.sum())),
        change_vs_ar=float(np.expm1(log_ratio(everything))),
        interval=(float(np.expm1(low)), float(np.expm1(high))),
        repeated_ngram_share=repeated_ngram_share(records),
    )
