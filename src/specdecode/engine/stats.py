"""Per-generation statistics and the result object."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


DRAFT_COST_KEYS = (
    "draft_forward_s",      # the draft model's / head's forwards (with the tree masks it builds)
    "draft_bookkeeping_s",  # the sampler's own work: candidates, draws, scores, reading out the draft
    "draft_tree_s",         # tree bookkeeping: which earlier slots each new one sees, the node tables
)


@dataclass
class GenerationStats:
    """What a generation cost and how well its drafts did.

    ``target_forwards`` counts verification forwards after the prefill; ``accepted_lengths`` has
    one entry per verification (draft tokens kept, excluding the target's own token).
    """

    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    proposed_tokens: int = 0
    accepted_lengths: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0  # the target's verification forwards
    accept_s: float = 0.0  # the acceptance rule and, for trees, compacting the cache to the kept path
    total_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted_tokens(self) -> int:
        return sum(self.accepted_lengths)

    @property
    def tokens_per_target_forward(self) -> float:
        """τ: mean tokens emitted per verification forward (1.0 for autoregressive decoding)."""
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """Fraction of drafted tokens the target kept; ``None`` when nothing was drafted."""
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else None

    @property
    def other_s(self) -> float:
        return max(0.0, self.total_s - self.prefill_s - self.draft_s - self.verify_s - self.accept_s)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def draft_cost_breakdown(self) -> dict[str, float]:
        """Drafting time per drafting round by part, in seconds, from what the drafter recorded in
        ``extra`` (:data:`DRAFT_COST_KEYS`; MTAD's beam sampler records all three and
        ``draft_rounds``): empty for drafters that record none. The parts add up to the proposer's
        own time; ``draft_s`` also holds the loop's overhead around it."""
        rounds = self.extra.get("draft_rounds") or 0
        if not rounds:
            return {}
        return {key: self.extra[key] / rounds for key in DRAFT_COST_KEYS if key in self.extra}

    @property
    def accepted_length_histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.accepted_lengths).items()))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["accepted_lengths"]
        data.update(
            accepted_length_histogram=self.accepted_length_histogram,
            tokens_per_target_forward=self.tokens_per_target_forward,
            acceptance_rate=self.acceptance_rate,
            other_s=self.other_s,
            tokens_per_second=self.tokens_per_second,
        )
        return data


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats
    method: str
    stop_reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "text": self.text, "token_ids": self.token_ids,
                "stop_reason": self.stop_reason, "stats": self.stats.to_dict()}
