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

import torch

from specdecode.models.cache import KVCache
from specdecode.artifacts.profile import SelfDraftSettings
from specdecode.models.frequent_vocab import SubVocabHead, expand_logits
from specdecode.models.families import num_layers
from specdecode.models.loading import LoadedModel
from specdecode.models.runner import Readout
from specdecode.propose.base import Draft, Proposer
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

    def _logits(self, new_ids: list[int]) -> torch.Tensor:
        """Draft logits for the next token: over the sub-vocabulary, or the full one."""
        if self.head is None:
            return self.runner.forward(self.kv, new_ids, Readout(rows=1)).logits[-1]
        hidden = self.runner.forward(self.kv, new_ids, Readout.hidden_only()).hidden[-1]
        logits = self.head(hidden)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def propose(self, sequence: list[int], max_tokens: int) -> Draft:
        if self.kv is None:
            raise RuntimeError("SelfDraftProposer.propose called before bind_target_cache")
        limit = min(self.settings.max_draft, max_tokens)
        if limit < 1:
            return Draft()
        pending = self.kv.sync(sequence)  # the context minus its last token is already there
        keep = len(self.kv)
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        temperature = 1.0 if self.sampling.greedy else self.sampling.temperature
        try:
            for _ in range(limit):
                logits = self._logits(pending)
                self.stats.forwards += 1
                confidence = float(torch.softmax(logits / temperature, dim=-1).max())
                if self.sampling.greedy:
                    index = int(logits.argmax())
                    token = int(self.token_ids[index]) if self.token_ids is not None else index
                else:
                    full = (expand_logits(logits, self.token_ids, self.vocab_size)
                            if self.token_ids is not None else logits)
                    dist = process_logits(full, self.sampling)
                    token = sample(dist, self.generator)
                    probs.append(dist)
                tokens.append(token)
                pending = [token]
                if confidence < self.settings.threshold:
                    break
        finally:
            self.kv.crop(keep)  # the target's cache must come back exactly as it was lent
        self.stats.proposed += len(tokens)
        return Draft(tokens=tokens, probs=torch.stack(probs) if probs else None)
