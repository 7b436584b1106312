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

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from specdecode.errors import InvalidSettingError
from specdecode.models.cache import KVCache, forward
from specdecode.models.frequent_vocab import expand_logits, validate_token_ids
from specdecode.models.int8 import Int8Linear
from specdecode.models.layer_skip import SkipSet, layer_skip_view, num_layers
from specdecode.models.loading import LoadedModel
from specdecode.propose.base import Draft, Proposer
from specdecode.sampling import SamplingSettings, process_logits, sample


@dataclass(frozen=True)
class SelfDraftSettings:
    """Everything that defines a self-draft; what a skip profile stores."""

    skip: SkipSet = SkipSet()
    threshold: float = 0.8
    max_draft: int = 12
    vocab_ids: tuple[int, ...] | None = None  # reduced-vocabulary head; None = full head
    int8: bool = False  # int8 weights for the draft's kept sub-layers and its head

    def validate(self, layers: int, vocab_size: int | None = None) -> None:
        """Refuse out-of-range values; ``vocab_size`` None skips the upper bound on vocabulary ids."""
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not (
            0 < self.threshold <= 1
        ):
            raise InvalidSettingError(f"ssd threshold must be in (0, 1], got {self.threshold!r}")
        if isinstance(self.max_draft, bool) or not isinstance(self.max_draft, int) or self.max_draft < 1:
            raise InvalidSettingError(f"ssd max_draft must be an integer >= 1, got {self.max_draft!r}")
        if not isinstance(self.int8, bool):
            raise InvalidSettingError(f"ssd int8 must be True or False, got {self.int8!r}")
        self.skip.check(layers)
        if self.vocab_ids is not None:
            if any(isinstance(t, bool) or not isinstance(t, int) for t in self.vocab_ids):
                raise InvalidSettingError("draft vocabulary must be a list of integer token ids")
            ids = torch.tensor(self.vocab_ids, dtype=torch.long)
            upper = vocab_size if vocab_size is not None else int(ids.max()) + 1 if len(ids) else 1
            validate_token_ids(ids, upper, "draft vocabulary")


class _SubVocabHead(nn.Module):
    """Logits over ``token_ids`` only, from the target's output-embedding rows (float or int8 copy)."""

    def __init__(self, model: nn.Module, token_ids: torch.Tensor, int8: bool) -> None:
        super().__init__()
        head = model.get_output_embeddings()
        weight = head.weight.detach()[token_ids]
        bias = head.bias.detach()[token_ids] if getattr(head, "bias", None) is not None else None
        self.proj: nn.Module = Int8Linear(weight, bias) if int8 else _FrozenLinear(weight, bias)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.proj(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class _FrozenLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


# sub-vocabulary heads per model and (ids, int8): built once, shared by every request and profile.
# The most recently used few are kept: a bundle has one per domain, a configuration search tries
# many sizes and would otherwise keep every head it ever built.
_HEADS: weakref.WeakKeyDictionary[nn.Module, OrderedDict[tuple[tuple[int, ...], bool], _SubVocabHead]] = (
    weakref.WeakKeyDictionary()
)
MAX_CACHED_HEADS = 24


def sub_vocab_head(model: nn.Module, token_ids: tuple[int, ...], int8: bool) -> _SubVocabHead:
    per_model = _HEADS.setdefault(model, OrderedDict())
    key = (token_ids, int8)
    if key in per_model:
        per_model.move_to_end(key)
    else:
        per_model[key] = _SubVocabHead(model, torch.tensor(token_ids, dtype=torch.long, device=_device(model)), int8)
        while len(per_model) > MAX_CACHED_HEADS:
            per_model.popitem(last=False)
    return per_model[key]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


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
        self.view = layer_skip_view(target.model, settings.skip, int8=settings.int8,
                                    int8_head=settings.int8 and settings.vocab_ids is None)
        self.head: _SubVocabHead | None = None
        self.token_ids: torch.Tensor | None = None
        if settings.vocab_ids is not None:
            self.head = sub_vocab_head(target.model, settings.vocab_ids, settings.int8)
            self.token_ids = torch.tensor(settings.vocab_ids, dtype=torch.long, device=target.device)
        self.kv: KVCache | None = None

    def bind_target_cache(self, target_cache: KVCache) -> None:
        self.kv = target_cache

    def _logits(self, new_ids: list[int]) -> torch.Tensor:
        """Draft logits for the next token: over the sub-vocabulary, or the full one."""
        if self.head is None:
            return forward(self.view, self.kv, new_ids, logits_to_keep=1)[-1]
        hidden = forward(self.view, self.kv, new_ids, logits_to_keep=0)[-1]
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
