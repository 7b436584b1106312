"""A layer-skip view of a loaded model: the self-draft of self-speculative decoding.

The view is a second ``nn.Module`` built from *shallow* copies of the target's causal-LM wrapper,
its decoder stack and its decoder layers: every parameter, norm and rotary table is the target's
own object. Only the skipped sub-layers are swapped out, for modules that add nothing to the
residual stream — the draft computes ``h + 0`` where the target computes ``h + attn(norm(h))``,
which is exactly "skipping" the sub-layer in every pre-norm architecture supported here. The
view is called like the target (same ``forward(model, kv, ids, ...)`` helper, same cache class).

KV cache. A skipped attention sub-layer still appends zero placeholders for its new positions,
so every layer of the cache keeps the same length. `transformers` derives the positions and the
attention-mask sizes from the length of one layer (the first one, or the first full / sliding
one, see ``masking_utils``); with unequal lengths those would be wrong. Placeholders are never
attended to: the skipped layer does not attend, and a cache shared with the target is cropped
back before the target sees it again.

Low-bit drafts. With ``int8=True`` the view runs the linear projections of the sub-layers it
keeps (and, if asked, a head) on per-channel int8 weights with dynamically quantised activations
(``torch.ao`` dynamic quantisation, fbgemm/oneDNN kernels). The target keeps its float weights,
so those int8 weights are a second copy: a quarter of the float32 size of the layers used.
They are built once per linear module and shared by every view of the same model.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from specdecode.errors import InvalidSettingError
from specdecode.models.fused import concatenated, is_fused, projection_groups, register_fused
from specdecode.models.int8 import Int8Linear


@dataclass(frozen=True)
class _Layout:
    """Where a model type keeps its decoder layers and their sub-layers."""

    stack: str  # attribute of the causal-LM wrapper holding the decoder stack
    layers: str  # attribute of the stack holding the ModuleList of layers
    attention: str
    mlp: str


_LAYOUTS = {
    "llama": _Layout("model", "layers", "self_attn", "mlp"),
    "qwen2": _Layout("model", "layers", "self_attn", "mlp"),
    "gemma3_text": _Layout("model", "layers", "self_attn", "mlp"),
    "gpt2": _Layout("transformer", "h", "attn", "mlp"),
}


def _layout(model: nn.Module) -> _Layout:
    model_type = getattr(model.config, "model_type", None)
    try:
        return _LAYOUTS[model_type]
    except KeyError:
        supported = ", ".join(sorted(_LAYOUTS))
        raise InvalidSettingError(
            f"layer skipping does not support model type {model_type!r} (supported: {supported})"
        ) from None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layout = _layout(model)
    return getattr(getattr(model, layout.stack), layout.layers)


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def sublayers(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """The (attention, MLP) sub-layer pair of every decoder layer."""
    layout = _layout(model)
    return [(getattr(layer, layout.attention), getattr(layer, layout.mlp)) for layer in decoder_layers(model)]


@dataclass(frozen=True)
class SkipSet:
    """Indices of the attention sub-layers and the MLP sub-layers the draft skips (sorted, unique)."""

    attention: tuple[int, ...] = ()
    mlp: tuple[int, ...] = ()

    @classmethod
    def of(cls, attention: Iterable[int] = (), mlp: Iterable[int] = (), layers: int | None = None) -> SkipSet:
        """Normalise two index lists; with ``layers`` given, refuse indices outside ``[0, layers)``."""
        skip = cls(_indices(attention, "attention"), _indices(mlp, "mlp"))
        if layers is not None:
            skip.check(layers)
        return skip

    def check(self, layers: int) -> None:
        for kind, indices in (("attention", self.attention), ("mlp", self.mlp)):
            bad = [i for i in indices if not 0 <= i < layers]
            if bad:
                raise InvalidSettingError(
                    f"skipped {kind} layer index {bad[0]} out of range: the model has {layers} layers (0..{layers - 1})"
                )

    @property
    def size(self) -> int:
        return len(self.attention) + len(self.mlp)

    def as_mask(self, layers: int) -> list[int]:
        """The 2·L binary skip variables: attention flags of layers 0..L-1, then MLP flags."""
        return [int(i in self.attention) for i in range(layers)] + [int(i in self.mlp) for i in range(layers)]

    @classmethod
    def from_mask(cls, mask: Iterable[int | bool], layers: int) -> SkipSet:
        flags = [bool(f) for f in mask]
        if len(flags) != 2 * layers:
            raise InvalidSettingError(f"a skip mask for {layers} layers has {2 * layers} entries, got {len(flags)}")
        return cls(tuple(i for i in range(layers) if flags[i]), tuple(i for i in range(layers) if flags[layers + i]))


def _indices(values: Iterable[int], kind: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)):
        raise InvalidSettingError(f"skipped {kind} layers must be a list of integers, got {values!r}")
    try:
        items = list(values)
    except TypeError:
        raise InvalidSettingError(f"skipped {kind} layers must be a list of integers, got {values!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, int) for v in items):
        raise InvalidSettingError(f"skipped {kind} layers must be integers, got {items!r}")
    return tuple(sorted(set(items)))


class _SkippedAttention(nn.Module):
    """Contributes nothing to the residual stream; appends zero K/V so cache lengths stay equal."""

    def __init__(self, layer_idx: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.layer_idx, self.kv_heads, self.head_dim = layer_idx, kv_heads, head_dim

    def forward(self, hidden_states: torch.Tensor, *args: object, past_key_values: object = None,
                **kwargs: object) -> tuple[torch.Tensor, None]:
        if past_key_values is not None:
            batch, length = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros(batch, self.kv_heads, length, self.head_dim)
            past_key_values.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class _SkippedMLP(nn.Module):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def is_skipped_attention(module: nn.Module) -> bool:
    return isinstance(module, _SkippedAttention)


def is_skipped_mlp(module: nn.Module) -> bool:
    return isinstance(module, _SkippedMLP)


def _kv_shape(attention: nn.Module) -> tuple[int, int]:
    config = attention.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return int(heads), int(attention.head_dim)


# int8 copies, one per float linear module of any model, shared by all views of that model
_INT8_COPIES: weakref.WeakKeyDictionary[nn.Module, Int8Linear] = weakref.WeakKeyDictionary()


def int8_copy(module: nn.Module) -> Int8Linear:
    """The (cached) int8 version of an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    cached = _INT8_COPIES.get(module)
    if cached is None:
        if isinstance(module, nn.Linear):
            cached = Int8Linear(module.weight, module.bias)
        else:  # transformers' Conv1D stores the weight transposed
            cached = Int8Linear(module.weight.t(), module.bias)
        _INT8_COPIES[module] = cached
    return cached


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _shallow(module: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A copy of ``module`` sharing every parameter and child except those in ``replacements``."""
    clone = copy.copy(module)
    clone._modules = {**module._modules, **replacements}
    return clone


def _with_int8_linears(module: nn.Module) -> nn.Module:
    """``module`` with every linear projection below it replaced by its int8 copy."""
    if _is_linear(module):
        return int8_copy(module)
    if not module._modules:
        return module
    return _shallow(module, {name: _with_int8_linears(child) for name, child in module._modules.items()
                             if child is not None})


def _fuse_int8(layer: nn.Module, int8_layer: nn.Module) -> None:
    """One int8 product per projection group of ``int8_layer`` (per-channel: the same floats as its
    parts), built from the float layer's weights once and shared by every view."""
    float_groups = projection_groups(layer)
    for name, parts in projection_groups(int8_layer).items():
        if all(type(part) is Int8Linear for part in parts) and not is_fused(parts):
            register_fused(parts, Int8Linear(*concatenated(float_groups[name])))


def layer_skip_view(model: nn.Module, skip: SkipSet, int8: bool = False, int8_head: bool = False) -> nn.Module:
    """``model`` as a draft that skips the sub-layers in ``skip``; shares every float weight.

    ``int8`` runs the kept sub-layers' projections on int8 weights, ``int8_head`` the LM head.
    """
    layout = _layout(model)
    stack = getattr(model, layout.stack)
    layers = getattr(stack, layout.layers)
    skip.check(len(layers))
    new_layers = []
    for index, layer in enumerate(layers):
        attention, mlp = getattr(layer, layout.attention), getattr(layer, layout.mlp)
        if index in skip.attention:
            attention = _SkippedAttention(index, *_kv_shape(attention))
        elif int8:
            attention = _with_int8_linears(attention)
        if index in skip.mlp:
            mlp = _SkippedMLP()
        elif int8:
            mlp = _with_int8_linears(mlp)
        new_layers.append(_shallow(layer, {layout.attention: attention, layout.mlp: mlp}))
        if int8:
            _fuse_int8(layer, new_layers[-1])
    replacements = {layout.stack: _shallow(stack, {layout.layers: nn.ModuleList(new_layers)})}
    if int8_head:
        replacements["lm_head"] = int8_copy(model.get_output_embeddings())
    return _shallow(model, replacements)
