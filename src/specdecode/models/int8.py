"""Per-channel int8 weights with activations quantised per call (fbgemm dynamic int8).

The one int8 product of the project: the runtime's ``--quantize int8`` target
(``models/runtime.py``) and the int8 self-drafts of layer skipping (``models/layer_skip.py``)
both pack weights and multiply here. Activations use the 7-bit range `torch.ao` uses on x86,
which keeps fbgemm's AVX2 pairwise int16 sums from saturating.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def pack_int8(weight: torch.Tensor, bias: torch.Tensor | None) -> object:
    """fbgemm's packed form of ``weight`` quantised per output row (symmetric, scale = max|w| / 127)."""
    weight = weight.detach().float()
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantised tensors are flagged deprecated; fbgemm still runs them
        quantized = torch.quantize_per_channel(weight, scales, torch.zeros_like(scales, dtype=torch.long), 0,
                                               torch.qint8)
    return torch.ops.quantized.linear_prepack(quantized, None if bias is None else bias.detach().float())


def int8_product(x: torch.Tensor, packed: object) -> torch.Tensor:
    """``x @ Wᵀ + b`` of a :func:`pack_int8` weight, in and out in ``x``'s dtype and shape."""
    rows = x.reshape(-1, x.shape[-1]).float()
    out = torch.ops.quantized.linear_dynamic(rows, packed, True)
    return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)


class Int8Linear(nn.Module):
    """A stand-alone int8 copy of a linear layer (the float weights stay with their owner)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.packed = pack_int8(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_product(x, self.packed)
