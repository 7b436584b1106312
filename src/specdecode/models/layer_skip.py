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
They are built once per linear module by an :class:`Int8Copies` that the model's runner owns,
and shared by every view of that model. (Views are the `transformers`-path draft; on the native
decoder a draft is the same decoder run with a :class:`SkipSet`, ``models/native.py``.)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from specdecode.errors import InvalidSettingError
from specdecode.models.families import decoder_layers, family_of
from specdecode.models.int8 import Int8Linear


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


def _kv_shape(attention: nn.Module) -> tuple[int, int]:
    config = attention.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return int(heads), int(attention.head_dim)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


class Int8Copies:
    """int8 copies of one model's linear modules, each built once on first use (its owner, the
    model's runner, shares them between every draft view of that model)."""

    def __init__(self) -> None:
        self._copies: dict[int, tuple[nn.Module, Int8Linear]] = {}  # id(module) -> (module, copy)

    def __call__(self, module: nn.Module) -> Int8Linear:
        """The int8 version of an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
        entry = self._copies.get(id(module))
        if entry is None or entry[0] is not module:
            weight = module.weight if isinstance(module, nn.Linear) else module.weight.t()  # Conv1D: transposed
            entry = (module, Int8Linear(weight, module.bias))
            self._copies[id(module)] = entry
        return entry[1]

    def tree(self, module: nn.Module) -> nn.Module:
        """``module`` with every linear projection below it replaced by its int8 copy."""
        return shallow_replace(module, {m: self(m) for m in module.modules() if _is_linear(m)})


def _shallow(module: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A copy of ``module`` sharing every parameter and child except those in ``replacements``."""
    clone = copy.copy(module)
    clone._modules = {**module._modules, **replacements}
    return clone


def shallow_replace(root: nn.Module, replacements: dict[nn.Module, nn.Module]) -> nn.Module:
    """``root`` with the modules in ``replacements`` swapped, as new shallow copies of their
    ancestors: every other module and parameter is shared, and ``root`` itself is left alone."""
    if root in replacements:
        return replacements[root]
    children = {name: shallow_replace(child, replacements)
                for name, child in root._modules.items() if child is not None}
    changed = {name: child for name, child in children.items() if child is not root._modules[name]}
    return _shallow(root, changed) if changed else root


def layer_skip_view(model: nn.Module, skip: SkipSet, int8_copies: Int8Copies | None = None,
                    int8_head: bool = False) -> nn.Module:
    """``model`` as a draft that skips the sub-layers in ``skip``; shares every float weight.

    With ``int8_copies`` the kept sub-layers' projections run on int8 weights (and, with
    ``int8_head``, the LM head).
    """
    family = family_of(model, "layer skipping")
    layers = decoder_layers(model)
    skip.check(len(layers))
    replacements: dict[nn.Module, nn.Module] = {}
    for index, layer in enumerate(layers):
        attention, mlp = getattr(layer, family.attention), getattr(layer, family.mlp)
        if index in skip.attention:
            replacements[attention] = _SkippedAttention(index, *_kv_shape(attention))
        elif int8_copies is not None:
            replacements[attention] = int8_copies.tree(attention)
        if index in skip.mlp:
            replacements[mlp] = _SkippedMLP()
        elif int8_copies is not None:
            replacements[mlp] = int8_copies.tree(mlp)
    if int8_head and int8_copies is not None:
        replacements[model.get_output_embeddings()] = int8_copies(model.get_output_embeddings())
    return shallow_replace(model, replacements)
