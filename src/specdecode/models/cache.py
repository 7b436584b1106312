"""KV cache with exact rollback for every supported architecture.

Speculative decoders write draft tokens into the cache and must drop the rejected ones. We keep
a `transformers.DynamicCache` built *without* the model config, so every layer — including
Gemma 3's sliding-window layers — keeps its full history. Rolling back is then a plain crop on
every layer, exact at any context length; the model's own attention masks still apply the
sliding window, so the logits are those of a fresh forward. (A config-built cache trims
sliding layers to the window and can no longer be cropped once past it.) The extra memory is the
sliding layers' history beyond the window, small at the context lengths of a single request.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from specdecode.models.native import native_forward
from specdecode.models.runtime import runtime_of


class KVCache:
    """A model's KV cache plus the token ids it holds, so callers can sync it to a sequence."""

    def __init__(self) -> None:
        self.cache = DynamicCache()
        self.token_ids: list[int] = []

    def __len__(self) -> int:
        return len(self.token_ids)

    def crop(self, length: int) -> None:
        """Keep only the first ``length`` tokens."""
        if length < len(self.token_ids):
            self.cache.crop(length - len(self.token_ids))
            del self.token_ids[length:]

    def common_prefix(self, sequence: list[int]) -> int:
        """Length of the longest prefix shared by the cached tokens and ``sequence``."""
        limit = min(len(self.token_ids), len(sequence))
        cached = self.token_ids
        index = 0
        while index < limit and cached[index] == sequence[index]:
            index += 1
        return index

    def sync(self, sequence: list[int]) -> list[int]:
        """Crop to the part of the cache that is a prefix of ``sequence``; return what is missing."""
        self.crop(self.common_prefix(sequence))
        return sequence[len(self.token_ids):]


def forward(
    model: torch.nn.Module,
    kv: KVCache,
    new_ids: list[int],
    logits_to_keep: int,
    exact_top: int | None = None,
) -> torch.Tensor:
    """Run ``new_ids`` through ``model`` on top of ``kv``; return the last ``logits_to_keep`` logits.

    ``logits_to_keep == 0`` skips the LM head entirely (prefill of the target: on a 262k vocabulary
    the head costs as much as all layers together) and returns the final hidden states instead.
    ``exact_top = k`` says the caller reads only each row's top ``k`` (greedy: 1; top-k sampling:
    k): a model with the fast runtime then screens its head (see ``models/runtime.py``).
    """
    return forward_with_hidden(model, kv, new_ids, logits_to_keep, exact_top)[0]


def forward_with_hidden(
    model: torch.nn.Module,
    kv: KVCache,
    new_ids: list[int],
    logits_to_keep: int,
    exact_top: int | None = None,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`forward`, also returning the final (post-norm) hidden states of the kept positions:
    the one forward a feature-level draft head needs (no second pass).

    ``position_ids`` and ``attention_mask`` are for tree attention (``models/tree.py``).
    """
    device = next(model.parameters()).device
    input_ids = torch.tensor([new_ids], dtype=torch.long, device=device)
    runtime = runtime_of(model)
    if runtime is not None and runtime.native:
        hidden = native_forward(model, kv.cache, input_ids, position_ids, attention_mask)[0]
    else:
        hidden = model.base_model(input_ids=input_ids, past_key_values=kv.cache, use_cache=True,
                                  position_ids=position_ids, attention_mask=attention_mask).last_hidden_state[0]
    kv.token_ids.extend(new_ids)
    if logits_to_keep == 0:
        return hidden, hidden
    hidden = hidden[-logits_to_keep:]
    if runtime is not None and runtime.head is not None:
        head = runtime.head
        return (head.top(hidden, exact_top) if exact_top else head.full(hidden)), hidden
    logits = model.get_output_embeddings()(hidden)
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.to(torch.promote_types(logits.dtype, torch.float32)), hidden
