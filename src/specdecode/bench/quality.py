"""Quality of sampled outputs with the statistics a claim needs.

Perplexity of single 64-token samples ranges from ~1.2 (a repetition loop) to >100, so a
difference between two methods on a dozen prompts is mostly noise. Here:

* **pooled perplexity** = exp(Σ NLL / Σ tokens) over all prompts (token-weighted, as the table);
* **change vs ar**: per prompt, the mean NLL per token of its samples (several seeds pooled)
  minus ``ar``'s — a paired difference in log-perplexity, so a prompt's own difficulty cancels —
  averaged over prompts and reported as exp(mean) − 1 (with equal output lengths this is the
  ratio of pooled perplexities). Its 95 % interval (``INTERVALS``) is a **Student t** interval on
  the per-prompt differences (the default) or a percentile bootstrap over prompts. A claim
  "method X lowers perplexity" holds when the whole interval lies below 0.
  :func:`aa_exclusion_rate` calibrates either: ``ar`` against ``ar`` under other seeds must
  exclude 0 in about 5 % of splits. Measured (results/quality-100-aa, 200 splits): on 100
  prompts both hold (t 4.0-5.0 %, bootstrap 4.5-5.0 %); on 12 prompts, a benchmark's usual
  count, the bootstrap excludes 0 in 9.5 % and t in 3.5-6.0 %: hence t;
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
INTERVALS = ("t", "bootstrap")  # the default first: the better calibrated (results/quality-100-aa)


@dataclass(frozen=True)
class QualityComparison:
    perplexity: float
    change_vs_ar: float  # pooled perplexity / ar's − 1
    interval: tuple[float, float]  # 95 % interval of change_vs_ar over prompts
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

    prompt: object  # the prompt's id: samples of one prompt (several seeds) form one unit
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


def compare_samples(samples: list[Sample], baseline: list[Sample], seed: int = 0,
                    interval: str = "t") -> QualityComparison | None:
    """The change of ``samples`` against ``baseline`` and its 95 % interval over prompts (module
    docstring); a prompt's samples (one per seed) are pooled first, so several seeds narrow the
    interval without counting one prompt as several independent ones. None unless both cover the
    same prompts."""
    if interval not in INTERVALS:
        raise ValueError(f"unknown interval {interval!r}; choose one of {', '.join(INTERVALS)}")
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
    difference = nll / np.maximum(tokens, 1) - base_nll / np.maximum(base_tokens, 1)
    mean = difference.mean()
    if interval == "t":
        from scipy.stats import t

        half = t.ppf(0.975, len(prompts) - 1) * difference.std(ddof=1) / np.sqrt(len(prompts))
        low, high = mean - half, mean + half
    else:
        draws = np.random.default_rng(seed).integers(0, len(prompts), size=(BOOTSTRAP_DRAWS, len(prompts)))
        low, high = np.percentile(difference[draws].mean(-1), [2.5, 97.5])
    return QualityComparison(
        perplexity=float(np.exp(nll.sum() / tokens.sum())),
        change_vs_ar=float(np.expm1(mean)),
        interval=(float(np.expm1(low)), float(np.expm1(high))),
        repeated_ngram_share=repeated_ngram_share([s.token_ids for s in samples]),
    )


def aa_exclusion_rate(samples: list[Sample], per_side: int, interval: str = "t", splits: int = 200,
                      prompts: int | None = None, seed: int = 0) -> float:
    """How often one method's interval against itself excludes 0: per split, each prompt's samples
    (other seeds of one method) are shuffled and two disjoint sets of ``per_side`` compared, on all
    prompts or a random ``prompts`` of them. An interval that means what it says gives ~0.05.
    Needs ``2 × per_side`` samples of every prompt."""
    groups: dict[object, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.prompt, []).append(sample)
    if min(len(group) for group in groups.values()) < 2 * per_side:
        raise ValueError(f"A/A with {per_side} a side needs {2 * per_side} samples of every prompt")
    rng = np.random.default_rng(seed)
    keys = list(groups)
    excluded = 0
    for split in range(splits):
        chosen = keys if prompts is None else [keys[i] for i in rng.choice(len(keys), prompts, replace=False)]
        left, right = [], []
        for key in chosen:
            group = groups[key]
            order = rng.permutation(len(group))
            left += [group[i] for i in order[:per_side]]
            right += [group[i] for i in order[per_side:2 * per_side]]
        comparison = compare_samples(left, right, seed=seed + split, interval=interval)
        excluded += comparison is not None and comparison.significant
    return excluded / splits
