"""Drafting with a separate, smaller model that shares the target's vocabulary (classic SpS)."""

from __future__ import annotations

import torch

from specdecode.errors import InvalidSettingError
from specdecode.models.frequent_vocab import expand_logits
from specdecode.models.runner import Readout, TargetRunner
from specdecode.propose.base import Draft, Proposer
from specdecode.sampling import SamplingSettings, process_logits, sample


class DraftLengthSchedule:
    """Draft length γ: fixed, or adapted like `transformers`' "heuristic" schedule
    (+2 after a fully accepted draft, −1 otherwise, never below 1)."""

    def __init__(self, gamma: int, adaptive: bool = False, max_gamma: int = 16) -> None:
        if gamma < 1:
            raise InvalidSettingError(f"gamma (draft length) must be >= 1, got {gamma}")
        self.gamma, self.adaptive, self.max_gamma = gamma, adaptive, max(max_gamma, gamma)

    def observe(self, proposed: int, accepted: int) -> None:
        if not self.adaptive or proposed == 0:
            return
        if accepted == proposed:
            self.gamma = min(self.gamma + 2, self.max_gamma)
        else:
            self.gamma = max(1, self.gamma - 1)


class DraftModelProposer(Proposer):
    """Autoregressively drafts γ tokens with the ``draft`` model, keeping its own KV cache in sync."""

    def __init__(
        self,
        draft: TargetRunner,
        sampling: SamplingSettings,
        generator: torch.Generator | None,
        gamma: int = 4,
        adaptive: bool = False,
    ) -> None:
        super().__init__()
        self.runner = draft
        self.sampling = sampling
        self.generator = generator
        self.schedule = DraftLengthSchedule(gamma, adaptive)
        self.kv = draft.new_cache()

    def propose(self, sequence: list[int], max_tokens: int) -> Draft:
        limit = min(self.schedule.gamma, max_tokens)
        if limit < 1:
            return Draft()
        pending = self.kv.sync(sequence)
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        ids = self.runner.vocabulary_ids  # a reduced-vocabulary draft samples among its own ids
        for _ in range(limit):
            logits = self.runner.forward(self.kv, pending, Readout(rows=1, own_vocabulary=True)).logits[-1]
            self.stats.forwards += 1
            if self.sampling.greedy:
                local = int(logits.argmax())
            else:
                dist = process_logits(logits, self.sampling)
                local = sample(dist, self.generator)
                probs.append(dist)
            token = local if ids is None else int(ids[local])
            tokens.append(token)
            pending = [token]
        self.stats.proposed += len(tokens)
        if not probs:
            return Draft(tokens=tokens)
        q = torch.stack(probs)  # over the target's vocabulary for the verifier: 0 outside a reduced draft's ids
        vocab = self.runner.model.config.get_text_config().vocab_size
        return Draft(tokens=tokens, probs=q if ids is None else expand_logits(q, ids, vocab, fill=0.0))

    def observe(self, proposed: int, accepted: int) -> None:
        self.schedule.observe(proposed, accepted)
