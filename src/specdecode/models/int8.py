"""Per-channel int8 weights, int8 activations (fbgemm).

The one int8 product of the project, in two flavours:

* **dynamic** (the int8 self-drafts of ``models/layer_skip.py``): each call quantises its input
  with one scale taken over all its rows. Cheap to set up, but a row's result then depends on the
  other rows of the call — fine for a draft, whose numbers only have to be good guesses.
* **static** (the ``--quantize int8`` target of ``models/runtime.py``): the input of every linear
  layer is divided by a per-channel smoothing factor (SmoothQuant, Xiao et al. 2023: the weight
  columns are multiplied by it, so the product is unchanged in exact arithmetic) and quantised
  with a fixed range calibrated once at load time. Every row is then quantised on its own and the
  int32 sums are exact, so a k-token forward gives each row bit for bit what a 1-token forward
  gives it: speculation on the int8 target is as lossless as on float32. The smoothing moves the
  hidden state's outlier channels (±130 against a typical ±5 on the embedded Gemma) into the
  weights, which have precision to spare.

Activations use a 7-bit range, as `torch.ao` does on x86: it keeps fbgemm's AVX2 pairwise int16
sums from saturating.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

ACTIVATION_LEVELS = 127  # 7-bit activations
# what the static ranges are calibrated on: a little of each kind of text the benchmarks hold
CALIBRATION_TEXT = (
    "User: Summarize the following article in three sentences.\nAssistant: The city council voted on "
    "Tuesday to expand the bus network, citing a 12% rise in ridership since 2021.\n"
    "User: Translate to German: The weather is nice today.\nAssistant: Das Wetter ist heute schön. "
    "En français : il fait beau aujourd'hui.\n"
    "User: What is 17 * 23 - 5?\nAssistant: 17 * 23 = 391, and 391 - 5 = 386. The answer is 386.\n"
    "User: Write a Python function that reverses a list.\nAssistant: def reverse(items):\n"
    "    return items[::-1]\n"
    "User: Who wrote 'Pride and Prejudice'? Answer from the context: Jane Austen published the novel "
    "in 1813.\nAssistant: Jane Austen wrote it; it was published in 1813.")
RANGE_MARGIN = 1.25  # calibrated ranges are widened by this; values beyond are clipped


@dataclass(frozen=True)
class StaticActivation:
    """How one linear layer's input is quantised: divided by ``smooth``, then a fixed affine grid."""

    smooth: torch.Tensor  # per input channel (the weight's columns are multiplied by it)
    scale: float
    zero_point: int


def pack_int8(weight: torch.Tensor, bias: torch.Tensor | None, smooth: torch.Tensor | None = None) -> object:
    """fbgemm's packed form of ``weight`` (times ``smooth`` per column) quantised per output row
    (symmetric, scale = max|w| / 127)."""
    weight = weight.detach().float()
    if smooth is not None:
        weight = weight * smooth
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantised tensors are flagged deprecated; fbgemm still runs them
        quantized = torch.quantize_per_channel(weight, scales, torch.zeros_like(scales, dtype=torch.long), 0,
                                               torch.qint8)
    return torch.ops.quantized.linear_prepack(quantized, None if bias is None else bias.detach().float())


def int8_product(x: torch.Tensor, packed: object, static: StaticActivation | None = None) -> torch.Tensor:
    """``x @ Wᵀ + b`` of a :func:`pack_int8` weight, in and out in ``x``'s dtype and shape."""
    rows = x.reshape(-1, x.shape[-1]).float()
    if static is None:
        out = torch.ops.quantized.linear_dynamic(rows, packed, True)
    else:
        out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            rows / static.smooth, static.scale, static.zero_point, packed)
    return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)


class Int8Linear(nn.Module):
    """A stand-alone int8 copy of a linear layer (the float weights stay with their owner)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, static: StaticActivation | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.static = static
        self.packed = pack_int8(weight, bias, None if static is None else static.smooth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_product(x, self.packed, self.static)


def calibration_ids(tokenizer: object | None, vocab_size: int) -> list[int]:
    """:data:`CALIBRATION_TEXT` in the model's tokens, or (no tokenizer: test models) a fixed
    pseudo-random id sequence."""
    if tokenizer is not None:
        return list(tokenizer(CALIBRATION_TEXT)["input_ids"])
    generator = torch.Generator().manual_seed(0)
    return torch.randint(vocab_size, (256,), generator=generator).tolist()


class InputStatistics:
    """Per-channel minimum and maximum of the inputs a set of linear layers saw (forward hooks)."""

    def __init__(self, linears: Sequence[nn.Module]) -> None:
        self.low: dict[nn.Module, torch.Tensor] = {}
        self.high: dict[nn.Module, torch.Tensor] = {}
        self._hooks = [linear.register_forward_pre_hook(self._record) for linear in linears]

    def _record(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        low, high = x.amin(dim=0), x.amax(dim=0)
        if module in self.low:
            low, high = torch.minimum(low, self.low[module]), torch.maximum(high, self.high[module])
        self.low[module], self.high[module] = low, high

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def static_activation(self, group: Sequence[nn.Linear]) -> StaticActivation:
        """The quantisation of the input a ``group`` of linear layers shares (one layer, or q/k/v):
        SmoothQuant factors with α = ½ against the group's weight columns, and the smoothed
        input's calibrated range widened by :data:`RANGE_MARGIN` (always containing 0)."""
        low, high = self.low[group[0]], self.high[group[0]]
        x_max = torch.maximum(low.abs(), high.abs()).clamp(min=1e-5)
        w_max = torch.stack([part.weight.detach().float().abs().amax(dim=0) for part in group]).amax(dim=0)
        smooth = (x_max / w_max.clamp(min=1e-5)).sqrt().clamp(min=1e-2, max=1e2)
        lo = min(float((low / smooth).min()), 0.0) * RANGE_MARGIN
        hi = max(float((high / smooth).max()), 0.0) * RANGE_MARGIN
        scale = max(hi - lo, 1e-8) / ACTIVATION_LEVELS
        zero_point = int(min(max(round(-lo / scale), 0), ACTIVATION_LEVELS))
        return StaticActivation(smooth, scale, zero_point)
