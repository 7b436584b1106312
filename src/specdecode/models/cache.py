"""KV cache with exact rollback for every supported architecture.

Speculative decoders write draft tokens into the cache and must drop the rejected ones. We keep
a `transformers.DynamicCache` built *without* the model config, so every layer — including
Gemma 3's sliding-window layers — keeps its full history. Rolling back is then a plain crop on
every layer, exact at any context length; the model's own attention masks still apply the
sliding window, so the logits are those of a fresh forward. (A config-built cache trims
sliding layers to the window and can no longer be cropped once past it.) The extra memory is the
sliding layers' history beyond the window, small at the context lengths of a single request.

Each layer appends into a preallocated buffer (:class:`GrowingLayer`) rather than concatenating:
``torch.cat`` copied the whole history at every step — 36 layers × the context, ~40 ms a step at
1,000 tokens of context on this CPU, more than the layers' products.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` writing new positions into a buffer that doubles when full.

    ``keys`` / ``values`` stay what `transformers` expects — tensors of the cached length — as
    views of the buffers, so crops (slicing) keep writing in place. Anything that replaces them
    with new tensors (tree compaction, batch selection) is noticed by pointer and copied into a
    fresh buffer on the next append. The views returned by ``update`` are read at once by the
    attention that asked for them: positions past a crop are overwritten by later appends.
    """

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.requires_grad or value_states.requires_grad:
            # training through the cache (a draft head's unrolled steps): writing in place would
            # change keys that autograd saved for the backward pass, so concatenate instead
            self._key_buffer = self._value_buffer = None
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if not self._owns(key_states) or end > self._key_buffer.shape[-2]:
            self._reallocate(key_states, value_states, length, end)
        self._key_buffer[..., length:end, :].copy_(key_states)
        self._value_buffer[..., length:end, :].copy_(value_states)
        self.keys = self._key_buffer[..., :end, :]
        self.values = self._value_buffer[..., :end, :]
        return self.keys, self.values

    def _owns(self, key_states: torch.Tensor) -> bool:
        buffer = self._key_buffer
        return (buffer is not None and self.keys.data_ptr() == buffer.data_ptr()
                and self.values.data_ptr() == self._value_buffer.data_ptr()
                and buffer.shape[:-2] == key_states.shape[:-2] and buffer.dtype == key_states.dtype)

    def _reallocate(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, end: int) -> None:
        capacity = max(256, 2 * end)
        keys = key_states.new_empty(*key_states.shape[:-2], capacity, key_states.shape[-1])
        values = value_states.new_empty(*value_states.shape[:-2], capacity, value_states.shape[-1])
        if length:
            keys[..., :length, :].copy_(self.keys)
            values[..., :length, :].copy_(self.values)
        self._key_buffer, self._value_buffer = keys, values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


class KVCache:
    """A model's KV cache plus the token ids it holds, so callers can sync it to a sequence."""

    def __init__(self) -> None:
        self.cache = DynamicCache()
        self.cache.layer_class_to_replicate = GrowingLayer
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
