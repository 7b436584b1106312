"""KNN-SSD (Song et al. 2025): a self-draft whose skip set is chosen per request by nearest anchor.

The engine's prefill already runs the full target over the prompt; its final hidden states,
mean-pooled, locate the request among the bundle's anchors, and the nearest anchor's category
profile drafts for the rest of the request (the mixed profile beyond the bundle's radius). The
choice is recorded in the generation's ``stats.extra["route"]``.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence

import torch

from specdecode.artifacts.bundle import ProfileBundle, pool
from specdecode.models.cache import KVCache
from specdecode.models.loading import LoadedModel
from specdecode.propose.base import Draft, Proposer
from specdecode.propose.self_draft import SelfDraftProposer
from specdecode.sampling import SamplingSettings


class KnnSelfDraftProposer(Proposer):
    """Routes on the prefill, then drafts exactly like ``ssd`` with the routed profile."""

    def __init__(
        self,
        target: LoadedModel,
        bundle: ProfileBundle,
        sampling: SamplingSettings,
        generator: torch.Generator | None,
    ) -> None:
        super().__init__()
        self.target, self.bundle, self.sampling, self.generator = target, bundle, sampling, generator
        self.kv: KVCache | None = None
        self.draft: SelfDraftProposer | None = None

    def bind_target_cache(self, target_cache: KVCache) -> None:
        self.kv = target_cache

    def on_prefill(self, prompt_hidden: torch.Tensor) -> None:
        self._route(prompt_hidden)

    def _route(self, prompt_hidden: torch.Tensor | None) -> None:
        start = time.perf_counter()
        route = self.bundle.route(pool(prompt_hidden) if prompt_hidden is not None else None)
        self.draft = SelfDraftProposer(self.target, self.bundle.profile(route).settings, self.sampling,
                                       self.generator)
        self.draft.stats = self.stats  # one set of counters: the engine reads ours
        if self.kv is not None:
            self.draft.bind_target_cache(self.kv)
        self.stats.extra["route"] = {**route.to_dict(), "seconds": time.perf_counter() - start}

    def propose(self, sequence: list[int], max_tokens: int) -> Draft:
        return self.propose_batch([self], [sequence], [max_tokens])[0]

    def _routed(self) -> SelfDraftProposer:
        if self.draft is None:  # a one-token prompt: no prefill, nothing to route on
            self._route(None)
        return self.draft

    def batch_key(self) -> Hashable | None:
        """Requests routed to the same profile draft together (``ssd``'s key)."""
        return self._routed().batch_key()

    @classmethod
    def propose_batch(cls, proposers: Sequence[KnnSelfDraftProposer], sequences: Sequence[list[int]],
                      max_tokens: Sequence[int]) -> list[Draft]:
        return SelfDraftProposer.propose_batch([p._routed() for p in proposers], sequences, max_tokens)
