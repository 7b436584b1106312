"""Drafting with a separate, smaller model that shares the target's vocabulary (classic SpS)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from specdecode.errors import InvalidSettingError
from specdecode.models.frequent_vocab import expand_logits
from specdecode.models.runner import Readout, TargetRunner
from specdecode.propose.base import Draft, Proposer, draft_chains
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

    def batch_key(self) -> Hashable | None:
        """Requests drafting with the same draft runner (on the native decoder: its batched forward)
        draft together; each keeps its own γ, cache, sampling settings and seed."""
        return id(self.runner) if self.runner.native else None

    def propose(self, sequence: list[int], max_tokens: int) -> Draft:
        return self.propose_batch([self], [sequence], [max_tokens])[0]

    @classmethod
    def propose_batch(cls, proposers: Sequence[DraftModelProposer], sequences: Sequence[list[int]],
                      max_tokens: Sequence[int]) -> list[Draft]:
        """Token by token, one draft forward a step for every request still drafting (each on its
        own cache, synced to its sequence first): the draft's weights are read once for all."""
        runner = proposers[0].runner
        limits = [min(p.schedule.gamma, m) for p, m in zip(proposers, max_tokens)]
        live = [i for i, limit in enumerate(limits) if limit >= 1]
        ids = runner.vocabulary_ids  # a reduced-vocabulary draft samples among its own ids

        def next_logits(going: list[int], new_ids: list[list[int]]) -> list[torch.Tensor]:
            outs = runner.forward_batch([proposers[i].kv for i in going], new_ids,
                                        [Readout(rows=1, own_vocabulary=True)] * len(going))
            return [out.logits[-1] for out in outs]

        def choose(i: int, logits: torch.Tensor) -> tuple[int, torch.Tensor | None, bool]:
            proposer = proposers[i]
            proposer.stats.forwards += 1
            dist = None if proposer.sampling.greedy else process_logits(logits, proposer.sampling)
            local = int(logits.argmax()) if dist is None else sample(dist, proposer.generator)
            return (local if ids is None else int(ids[local])), dist, True

        pending = [proposers[i].kv.sync(sequences[i]) for i in live]
        tokens, probs = draft_chains(limits, dict(zip(live, next_logits(live, pending))) if live else {},
                                     lambda going, last: next_logits(going, [[t] for t in last]), choose)
        vocab = runner.model.config.get_text_config().vocab_size
        drafts = []
        for proposer, drafted, drawn in zip(proposers, tokens, probs):
            proposer.stats.proposed += len(drafted)
            if not drawn:
                drafts.append(Draft(tokens=drafted))
                continue
            q = torch.stack(drawn)  # over the target's vocabulary for the verifier: 0 outside a reduced draft's ids
            drafts.append(Draft(tokens=drafted, probs=q if ids is None else expand_logits(q, ids, vocab, fill=0.0)))
        return drafts

    def observe(self, proposed: int, accepted: int) -> None:
        self.schedule.observe(proposed, accepted)
