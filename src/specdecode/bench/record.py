"""One benchmark measurement: one contender on one prompt, as the runner records it and the
metrics, the quality statistics and the reports read it."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import mean, median
from typing import Any

from specdecode.bench.dataset import BenchPrompt
from specdecode.engine.stats import GenerationStats


@dataclass
class Record:
    """One contender on one prompt."""

    prompt: BenchPrompt
    label: str
    prompt_tokens: int
    token_ids: list[int]
    seconds: list[float]  # one per repeat
    stats: GenerationStats  # of the first repeat
    draft_timed: bool = True
    energies_j: list[float] | None = None
    identical: bool | None = None  # greedy runs: output equals ar's
    mismatch_at: int | None = None
    float32_mismatch_at: int | None = None  # reduced-precision runs: first token differing from float32 ar
    nll: float | None = None  # sampling runs: summed NLL of the output under the raw target
    text: str | None = None

    @property
    def time(self) -> float:
        return median(self.seconds)

    @property
    def energy_j(self) -> float | None:
        return mean(self.energies_j) if self.energies_j else None

    def to_dict(self) -> dict[str, Any]:
        stats = self.stats.to_dict()
        stats.pop("total_s")  # the wall-clock times of every repeat are in "seconds"
        if not self.draft_timed:
            stats["draft_s"] = None
        return {
            "question_id": self.prompt.question_id, "category": self.prompt.category, "task": self.prompt.task,
            "method": self.label, "prompt_tokens": self.prompt_tokens, "seconds": self.seconds,
            "median_s": self.time, "energy_j": self.energy_j, "identical_to_ar": self.identical,
            "first_mismatch": self.mismatch_at, "float32_first_mismatch": self.float32_mismatch_at, "nll": self.nll, "stats": stats, "text": self.text,
            "token_ids": self.token_ids,
        }
