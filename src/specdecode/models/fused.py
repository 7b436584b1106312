"""Fused projections: linear modules that read the same input, run as one product.

A decoder layer applies q, k and v (and gate and up) to the same normed hidden state. One product
over the concatenated weights reads them in one pass and makes one kernel call instead of three;
with per-output-row kernels (the float32 runtime's, per-channel int8) every output column is the
same dot product as before, so the floats do not change (tested). The runtime builds the fused
modules at load time and hands them to the native decoder (``models/native.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def concatenated(parts: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The parts' weights stacked by output row, and their biases (zeros where a part has none)."""
    weight = torch.cat([part.weight.detach() for part in parts])
    if all(part.bias is None for part in parts):
        return weight, None
    return weight, torch.cat([part.bias.detach() if part.bias is not None else weight.new_zeros(part.out_features)
                              for part in parts])


def projection_groups(layer: nn.Module) -> dict[str, tuple[nn.Module, ...]]:
    """The groups of a decoder layer that read one input: ``"qkv"`` and ``"gate_up"``, where present."""
    groups = {}
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attention is not None and all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj")):
        groups["qkv"] = (attention.q_proj, attention.k_proj, attention.v_proj)
    if mlp is not None and all(hasattr(mlp, name) for name in ("gate_proj", "up_proj")):
        groups["gate_up"] = (mlp.gate_proj, mlp.up_proj)
    return groups
