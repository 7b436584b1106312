"""Self-drafting (Draft & Verify, Zhang et al. ACL 2024): the target with sub-layers skipped drafts.

The draft continues while it is confident: after each drafted token, drafting stops when the
draft's top-1 probability falls below ``threshold`` (the low-confidence token is still proposed:
its forward is already paid for), or at ``max_draft`` tokens.

Two optional ways to make the draft forward cheaper, for models where the layers are not what
costs (see :mod:`specdecode.models.layer_skip` for int8 weights):

* a reduced-vocabulary head (FR-Spec): the draft scores only the N most frequent tokens of
  calibration text, with the target's own (tied) output-embedding rows for those ids; logits
  are scattered back to the full vocabulary so a token outside the subset has draft
  probability 0 and acceptance stays exact.
* int8 weights for the kept sub-layers and the head.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from specdecode.models.cache import KVCache
from specdecode.artifacts.profile import SelfDraftSettings
from specdecode.models.frequent_vocab import SubVocabHead, expand_logits
from specdecode.models.families import num_layers
from specdecode.models.loading import LoadedModel
from specdecode.models.runner import Readout
from specdecode.propose.base import Draft, Proposer, draft_chains
from specdecode.sampling import SamplingSettings, process_logits, sample


class SelfDraftProposer(Proposer):
    """Drafts with a layer-skip view of the target until its confidence drops below the threshold.

    The draft reads the context from the target's own KV cache (bound by the engine), as Draft &
    Verify does: no draft prefill, no second cache, and the kept layers attend to the full
    model's keys and values of the context. (On the embedded Gemma with an int8 draft this
    accepted 96 % of draft tokens against 85 % for a draft with its own cache.) Draft tokens
    are appended to that cache and cropped off again before the target verifies them.
    """

    def __init__(
        self,
        target: LoadedModel,
        settings: SelfDraftSettings,
        sampling: SamplingSettings,
        generator: torch.Generator | None,
    ) -> None:
        super().__init__()
        settings.validate(num_layers(target.model), target.vocab_size)
        self.settings = settings
        self.sampling = sampling
        self.generator = generator
        self.vocab_size = target.vocab_size
        self.runner = target.runner.skipping(settings.skip, int8=settings.int8,
                                             int8_head=settings.int8 and settings.vocab_ids is None)
        self.head: SubVocabHead | None = None
        self.token_ids: torch.Tensor | None = None
        if settings.vocab_ids is not None:
            self.head = target.runner.sub_vocab_head(settings.vocab_ids, settings.int8)
            self.token_ids = torch.tensor(settings.vocab_ids, dtype=torch.long, device=target.device)
        self.kv: KVCache | None = None

    def bind_target_cache(self, target_cache: KVCache) -> None:
        self.kv = target_cache

    def batch_key(self) -> Hashable | None:
        """Self-drafts of one model that skip the same sub-layers (and score the same vocabulary on
        the same weights) draft together; thresholds, lengths and sampling stay per request."""
        if not self.runner.native:
            return None
        settings = self.settings
        return id(self.runner.model), settings.skip, settings.int8, settings.vocab_ids

    def propose(self, sequence: list[int], max_tokens: int) -> Draft:
        return self.propose_batch([self], [sequence], [max_tokens])[0]

    @classmethod
    def propose_batch(cls, proposers: Sequence[SelfDraftProposer], sequences: Sequence[list[int]],
                      max_tokens: Sequence[int]) -> list[Draft]:
        """Every request's draft token by token, the requests still drafting in one skipping forward
        a token (each on the target cache it borrows); each stops at its own ``max_draft`` or after
        a token below its own confidence threshold."""
        if any(p.kv is None for p in proposers):
            raise RuntimeError("SelfDraftProposer.propose called before bind_target_cache")
        limits = [min(p.settings.max_draft, m) for p, m in zip(proposers, max_tokens)]
        live = [i for i, limit in enumerate(limits) if limit >= 1]
        keep: dict[int, int] = {}  # each borrowed cache's length after the sync (the context minus its last token)

        def next_logits(going: list[int], new_ids: list[list[int]]) -> list[torch.Tensor]:
            return cls._next_logits([proposers[i] for i in going], new_ids)

        def choose(i: int, logits: torch.Tensor) -> tuple[int, torch.Tensor | None, bool]:
            proposer = proposers[i]
            proposer.stats.forwards += 1
            token, dist, confidence = proposer._choose(logits)
            return token, dist, confidence >= proposer.settings.threshold

        try:
            pending = [proposers[i].kv.sync(sequences[i]) for i in live]
            keep = {i: len(proposers[i].kv) for i in live}
            tokens, probs = draft_chains(limits, dict(zip(live, next_logits(live, pending))) if live else {},
                                         lambda going, last: next_logits(going, [[t] for t in last]), choose)
        finally:
            for i, length in keep.items():
                proposers[i].kv.crop(length)  # the target's cache must come back exactly as it was lent
        drafts = []
        for proposer, chain, dists in zip(proposers, tokens, probs):
            proposer.stats.proposed += len(chain)
            drafts.append(Draft(tokens=chain, probs=torch.stack(dists) if dists else None))
        return drafts

    @staticmethod
    def _next_logits(proposers: Sequence[SelfDraftProposer], new_ids: Sequence[list[int]]) -> list[torch.Tensor]:
        """Each proposer's draft logits for its next token after ``new_ids`` (over the sub-vocabulary,
        or the full one), in one batched forward of the shared skipping runner."""
        first = proposers[0]
        kvs = [p.kv for p in proposers]
        if first.head is None:
            outs = first.runner.forward_batch(kvs, new_ids, [Readout(rows=1)] * len(proposers))
            return [out.logits[-1] for out in outs]
        outs = first.runner.forward_batch(kvs, new_ids, [Readout.hidden_only()] * len(proposers))
        logits = first.head(torch.stack([out.hidden[-1] for out in outs]))
        return list(logits.to(torch.promote_types(logits.dtype, torch.float32)))

    def _choose(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None, float]:
        """The next draft token (greedy or sampled; the distribution it was drawn from) and the
        draft's top-1 probability, which decides whether drafting goes on."""
        temperature = 1.0 if self.sampling.greedy else self.sampling.temperature
        confidence = float(torch.softmax(logits / temperature, dim=-1).max())
        if self.sampling.greedy:
            index = int(logits.argmax())
            return (int(self.token_ids[index]) if self.token_ids is not None else index), None, confidence
        full = expand_logits(logits, self.token_ids, self.vocab_size) if self.token_ids is not None else logits
        dist = process_logits(full, self.sampling)
        return sample(dist, self.generator), dist, confidence
