"""Fused projections: linear modules that read the same input, run as one product.

A decoder layer applies q, k and v (and gate and up) to the same normed hidden state. One product
over the concatenated weights reads them in one pass and makes one kernel call instead of three;
with per-output-row kernels (the float32 runtime's, per-channel int8) every output column is the
same dot product as before, so the floats do not change (tested). Whoever builds the parts
registers their fused module here; the native decoder looks it up by the parts' identity, so a
view that swaps a part (an int8 copy, a skipped sub-layer) runs its own parts unless those are
registered too.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

# first part of a group → (the fused module, weak references to the parts it stands for; strong
# ones would keep the key alive)
_FUSED: weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, tuple[weakref.ref, ...]]] = weakref.WeakKeyDictionary()


def register_fused(parts: Sequence[nn.Module], fused: nn.Module) -> None:
    """Run ``fused`` (whose output is the parts' outputs side by side) wherever :func:`project`
    is asked for exactly these ``parts``."""
    _FUSED[parts[0]] = (fused, tuple(weakref.ref(part) for part in parts))


def is_fused(parts: Sequence[nn.Module]) -> bool:
    entry = _FUSED.get(parts[0])
    return entry is not None and len(entry[1]) == len(parts) and all(a() is b for a, b in zip(entry[1], parts))


def project(x: torch.Tensor, *parts: nn.Module) -> Sequence[torch.Tensor]:
    """Every part applied to ``x``: through their fused module where one is registered."""
    if not is_fused(parts):
        return [part(x) for part in parts]
    return _FUSED[parts[0]][0](x).split([part.out_features for part in parts], dim=-1)


def joined(x: torch.Tensor, *parts: nn.Module) -> torch.Tensor:
    """The parts' outputs side by side in one tensor: the fused module's output where one is
    registered (no copy), else the parts' outputs concatenated."""
    if is_fused(parts):
        return _FUSED[parts[0]][0](x)
    return torch.cat([part(x) for part in parts], dim=-1)


def concatenated(parts: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The parts' weights stacked by output row, and their biases (zeros where a part has none)."""
    weight = torch.cat([part.weight.detach() for part in parts])
    if all(part.bias is None for part in parts):
        return weight, None
    return weight, torch.cat([part.bias.detach() if part.bias is not None else weight.new_zeros(part.out_features)
                              for part in parts])


def projection_groups(layer: nn.Module) -> dict[str, tuple[nn.Module, ...]]:
    """The groups of a decoder layer that read one input, where present (a skipped sub-layer has
    none): ``"qkv"`` and ``"gate_up"``."""
    groups = {}
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attention is not None and all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj")):
        groups["qkv"] = (attention.q_proj, attention.k_proj, attention.v_proj)
    if mlp is not None and all(hasattr(mlp, name) for name in ("gate_proj", "up_proj")):
        groups["gate_up"] = (mlp.gate_proj, mlp.up_proj)
    return groups
