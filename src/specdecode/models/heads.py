"""The LM head on the fast runtime: screened and rescored exactly (float32, and bf16 where our row
kernel runs), or a tuned bf16 product.

A step of a small model with a big vocabulary is dominated by one product: the 262k-row LM head,
671 MB in float32 (docs/perf.md). The **screened head** first evaluates every row on a cheaper
copy of the weights — fbgemm's float16 kernel, a bf16 kernel (oneDNN's, or ours on AVX-512 BF16),
or our int8 kernels (AVX-512 VNNI, 1.125 bytes a weight; rows as int16, or as int8 for half the
instructions) — then recomputes exactly the rows that a
rigorous bound on the screen's error cannot exclude from the top ``k``: float64 dot products
rounded to float32 for a float32 head; for a bf16 head, the row kernel's own bf16 logits (its
float32 sums come out alike whatever else it computes, so a candidate's value is the full
product's). Greedy decoding needs ``k = 1``, top-k sampling ``k = top_k``: every value such a
consumer can read is exact, the rest of the row is ``-inf``. Which screen runs is timed at load
per row count (on a Zen 4 the int16-row int8 screen for 1-4 rows, the int8-row one beyond; an
AVX2-only CPU keeps float16); the result is the same either way. Consumers that read the whole distribution (sampling
without top-k, perplexity) get the full head.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from specdecode.errors import InvalidSettingError
from specdecode.models import row_kernels
from specdecode.models.kernels import (ROW_BUCKETS, KernelPlan, TunedLinear, cached_plan, fastest_per_bucket,
                                       fbgemm_fp16_available, onednn_available, plan_key)

HEAD_BLOCK_ROWS = 4  # a head screen is memory-bound up to ~4 rows on these CPUs
SCRATCH_ROWS = 128  # the most rows whose screened values a head keeps a buffer for (128 MB at 262k)
SCREENS = ("fp16", "bf16", "dpbf16", "int8", "q8")


class _Screen:
    """A cheap copy of the head's weight, its product, and what bounds the product's error.

    With ``w̃`` the copy, ``x̃`` the input as the kernel reads it and ``d`` products summed in
    float32 (``γ_d = d·2⁻²⁴/(1 − d·2⁻²⁴)``), every row obeys
    ``|x̃·w̃ (summed) − x·w| ≤ ‖x‖ (‖w − w̃‖ + γ_d ‖w̃‖) + ‖x − x̃‖ ‖w̃‖ (1 + γ_d)``; the bf16 kernel
    also rounds each result once to bf16 (relative ``2⁻⁸``). ``fp16``: fbgemm's float16-weight
    kernel, float32 inputs and outputs. ``bf16``: oneDNN on a prepacked bf16 copy, bf16 inputs,
    native bf16 dot products where the CPU has them (AVX-512 BF16, AMX). ``dpbf16``: our AVX-512
    BF16 kernel (``models/row_kernels.py``) on the same copy, float32 outputs; its γ takes a unit
    roundoff of ``2⁻²³`` rather than ``2⁻²⁴`` (an instruction whose intermediate rounding the
    vendors describe loosely; the kernel test shows ``d·2⁻²³`` holds with room). ``int8``: our
    AVX-512 VNNI kernel on an int8 copy with a scale per 32 inputs, the input as int16 with a scale
    (``x̃`` within ``max|x| / 65534`` of each value), integer sums exact within a group and float32
    across groups (``K/32 + 3`` roundings a term, within ``γ_d``): 1.125 bytes a weight. ``q8``: the
    same int8 copy, the input as int8 with a scale per 32 inputs too (``x̃`` measured exactly), on
    AVX-512 VNNI's four-byte products (half ``int8``'s instructions; ``K/32 + 2`` roundings a term):
    a coarser input, so more candidates, for the many-row screens where ``int8`` is compute-bound.
    """

    def __init__(self, name: str, weight: torch.Tensor) -> None:
        dim = weight.shape[1]
        unit = 2.0**-23 if name == "dpbf16" else 2.0**-24
        gamma = dim * unit / (1 - dim * unit)
        self.name, self.vocab, self.output_rounding = name, weight.shape[0], 0.0
        if name == "fp16":
            self.packed = torch.ops.quantized.linear_prepack_fp16(weight.float(), None)
            copy_rows = lambda rows: weight[rows].half()  # noqa: E731
        elif name in ("int8", "q8"):
            self.packed = row_kernels.Int8Groups(weight, "pairs" if name == "int8" else "quads")
            copy_rows = self.packed.dequantized
        else:
            low = weight.to(torch.bfloat16)
            self.packed = row_kernels.pack_bf16(low) if name == "dpbf16" else torch.ops.mkldnn._reorder_linear_weight(low, 8)
            copy_rows = lambda rows: low[rows]  # noqa: E731
            if name == "bf16":
                self.output_rounding = 2.0**-8 / (1 - 2.0**-8)  # |rounded − s| ≤ this × |rounded|
        worst_error, worst_norm = _worst_row_terms(weight, copy_rows, gamma)
        # 1.01 and 1e-7: margin for the norms' own rounding
        self.row_bound = worst_error * 1.01 + 1e-7
        self.input_bound = 0.0 if name == "fp16" else worst_norm * (1 + gamma) * 1.01  # fp16 reads x as it is

    def __call__(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Screened values ``[n, V]`` (float32; in ``out`` where given and our kernel computes them) and
        each row's bound ``[n, 1]`` before output rounding."""
        bound = hidden.norm(dim=1, keepdim=True) * self.row_bound
        if self.name == "fp16":
            return torch.ops.quantized.linear_dynamic_fp16(hidden, self.packed), bound
        if self.name == "int8":
            xq, scale = row_kernels.quantize_rows(hidden)
            rounded_error = (hidden.double() - xq.double() * scale.double()[:, None]).norm(dim=1, keepdim=True)
            return row_kernels.int8_product(xq, scale, self.packed, out), bound + rounded_error.float() * self.input_bound
        if self.name == "q8":
            xu, xs, rounded = row_kernels.quantize_groups(hidden)
            rounded_error = (hidden.double() - rounded).norm(dim=1, keepdim=True)
            return row_kernels.q8_product(xu, xs, self.packed, out), bound + rounded_error.float() * self.input_bound
        rounded = hidden.to(torch.bfloat16)
        bound = bound + (hidden - rounded.float()).norm(dim=1, keepdim=True) * self.input_bound
        if self.name == "dpbf16":
            return row_kernels.bf16_product(rounded, self.packed, self.vocab, out_dtype=torch.float32, out=out), bound
        return torch.ops.mkldnn._linear_pointwise(rounded, self.packed, None, "none", [], "").float(), bound


def _worst_row_terms(weight: torch.Tensor, copy_rows: Callable[[slice], torch.Tensor], gamma: float,
                     chunk: int = 16_384) -> tuple[float, float]:
    """The largest ``‖w − w̃‖ + γ‖w̃‖`` and ``‖w̃‖`` over the rows, in float64 (exact differences),
    a chunk of rows at a time: a float64 copy of a 262k-row head would be 1.3 GB."""
    worst_error = worst_norm = 0.0
    for start in range(0, weight.shape[0], chunk):
        rows = slice(start, start + chunk)
        copy = copy_rows(rows).double()
        norms = copy.norm(dim=1)
        worst_error = max(worst_error, float(((weight[rows].double() - copy).norm(dim=1) + gamma * norms).max()))
        worst_norm = max(worst_norm, float(norms.max()))
    return worst_error, worst_norm


def offered_screens(in_features: int = 2) -> tuple[str, ...]:
    """The screens this torch build and CPU can run on a head of ``in_features`` inputs (our
    kernels pair the inputs: an odd count is not offered them); whether they pay is timed."""
    return tuple(name for name, ok in (("fp16", fbgemm_fp16_available()), ("bf16", onednn_available()),
                                       ("dpbf16", row_kernels.bf16_available() and in_features % 2 == 0),
                                       ("int8", row_kernels.int8_available() and in_features % 2 == 0),
                                       ("q8", row_kernels.int8_available() and in_features % 2 == 0)) if ok)


def bf16_head_screens(weight: torch.Tensor, softcap: float | None) -> bool:
    """Whether a bf16 head can be screened: its candidates are rescored on the row kernel."""
    return not softcap and row_kernels.bf16_available() and weight.shape[1] % 2 == 0


KTH_BLOCK = 256  # columns per block of _kth_floor


def _kth_floor(values: torch.Tensor, k: int) -> torch.Tensor:
    """A value at most each row's k-th highest of ``values [n, V]``: the k-th highest of its blocks'
    maxima (k blocks hold a value at least that high). With the top k of 262k in k different
    blocks of 256, as they nearly always are, it is the k-th highest itself — for one max over
    the row and a top-k over 1,024 maxima instead of a top-k over 262k values (~0.5 ms a row)."""
    n, vocab = values.shape
    whole = vocab - vocab % KTH_BLOCK
    maxima = values[:, :whole].view(n, -1, KTH_BLOCK).amax(dim=-1)
    if whole < vocab:
        maxima = torch.cat([maxima, values[:, whole:].amax(dim=-1, keepdim=True)], dim=1)
    if maxima.shape[1] < k:
        return torch.topk(values, k, dim=1).values[:, -1:]
    return torch.topk(maxima, k, dim=1).values[:, -1:]


class ScreenedHead:
    """Exact top-``k`` logits of a float32 or bf16 head, reading a cheap copy of it first (module
    docstring).

    The float32 head's exact values are float64 dot products rounded to float32. A bf16 head's are
    what the bf16 target computes: our AVX-512 BF16 row kernel's float32 sums rounded once to bf16
    (``row_kernels.bf16_product``), the same bits for a column whatever the row count or which
    columns are computed beside it — so the rescored candidates are exactly the full product's.
    Only where that kernel runs, and without softcapping (bf16's rounding of a softcap could tie a
    value below the candidates with one above).

    ``screens``: ``"auto"`` times every offered screen per row count at construction (or reuses the
    plan stored in ``plan_cache``) and keeps only the ones the plan uses; or one name of
    :data:`SCREENS` for every row count. Exactness does not depend on the choice.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
                 screens: str = "auto", plan_cache: Path | None = None) -> None:
        self.weight = weight.detach()
        self.bias = bias.detach() if bias is not None else None
        self.softcap = softcap
        self.bf16 = self.weight.dtype == torch.bfloat16
        if self.bf16 and not bf16_head_screens(self.weight, softcap):
            raise InvalidSettingError("a screened bf16 head needs the AVX-512 BF16 row kernel, an even "
                                      "inner dimension and no softcapping")
        available = offered_screens(self.weight.shape[1])
        offered = available if screens == "auto" else (screens,)
        if screens != "auto" and screens not in available:
            raise InvalidSettingError(f"head screen {screens!r} is not available here; choose one of "
                                      f"{', '.join(available) or 'none'}")
        self.screens = {name: _Screen(name, self.weight) for name in offered}
        self._scratch = threading.local()  # each decoding thread's screen output, kept between calls
        self.bias_max = 0.0 if self.bias is None else float(self.bias.abs().max())
        # the bf16 target: |fl(x·w) − x·w| ≤ γ‖x‖‖w‖ (float32 sums, 2⁻²³ as for the dpbf16 screen,
        # one more for the bias), then one rounding to bf16 (relative 2⁻⁸ of the result)
        dim = self.weight.shape[1] + 1
        self.target_error = 0.0
        self.target_rounding = 0.0
        if self.bf16:
            gamma = dim * 2.0**-23 / (1 - dim * 2.0**-23)
            self.target_error = gamma * float(self.weight.float().norm(dim=1).max()) * 1.01
            self.target_rounding = 2.0**-8 / (1 - 2.0**-8)
        if len(offered) == 1:
            self.plan = KernelPlan(offered * len(ROW_BUCKETS))
        else:
            target = "|bf16-target" if self.bf16 else ""
            key = plan_key([tuple(self.weight.shape)], "|head-screen|" + "/".join(offered) + target)
            self.plan = cached_plan(key, offered, self._tune, plan_cache, "the LM head's screen")
            self._scratch = threading.local()  # the tuner's 64-row buffer is not a decoder's
            self.screens = {name: screen for name, screen in self.screens.items() if name in self.plan.kernels}
        if self.bf16:  # what full() reads: the dpbf16 screen's copy where it is kept (the same layout)
            kept = self.screens.get("dpbf16")
            self.packed = kept.packed if kept is not None else row_kernels.pack_bf16(self.weight)

    def _tune(self) -> KernelPlan:
        """The fastest screen per row bucket, timed on random inputs (the rescoring after it costs
        well under a millisecond for either screen on real hidden states)."""
        def runner(bucket: int):  # noqa: ANN202
            hidden = torch.randn(bucket, self.weight.shape[1])
            return lambda name: self.screens[name](hidden, self._screened_rows(bucket))  # as top_columns runs them

        return fastest_per_bucket(tuple(self.screens), runner)

    def describe(self) -> str:
        return f"screened exact {'bf16' if self.bf16 else 'float32'} head, screen by rows " + self.plan.describe()

    def full(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every logit, float32."""
        if self.bf16:
            return row_kernels.bf16_product(hidden, self.packed, self.weight.shape[0], self.bias).float()
        return self._cap(F.linear(hidden, self.weight, self.bias))

    def top(self, hidden: torch.Tensor, k: int, until_mismatch: Sequence[int] | None = None) -> torch.Tensor:
        """Logits ``[n, V]``, exact wherever a row's top ``k`` can be, ``-inf`` elsewhere.

        With ``until_mismatch`` (``k == 1``: greedy verification of a chain draft) the rows are
        screened in blocks of :data:`HEAD_BLOCK_ROWS`, and after the block holding the first row
        whose argmax differs from its draft token the rest stay ``-inf``: a rejected draft does
        not pay for the head on the rows after it (up to 4 rows cost about what 1 does here).
        """
        if until_mismatch is None or k != 1 or hidden.shape[0] <= HEAD_BLOCK_ROWS:
            return self._top(hidden, k)
        out = hidden.new_full((hidden.shape[0], self.weight.shape[0]), float("-inf"), dtype=torch.float32)
        for start in range(0, hidden.shape[0], HEAD_BLOCK_ROWS):
            block = self._top(hidden[start:start + HEAD_BLOCK_ROWS], 1, out=out[start:start + HEAD_BLOCK_ROWS])
            choices = block.argmax(dim=1).tolist()
            if any(choice != token for choice, token in zip(choices, until_mismatch[start:])):
                break
        return out

    def _top(self, hidden: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`top` of all rows at once, written into ``out`` (all ``-inf``) where given."""
        columns, logits = self.top_columns(hidden, k)
        if out is None:
            out = hidden.new_full((hidden.shape[0], self.weight.shape[0]), float("-inf"), dtype=torch.float32)
        return out.index_copy_(1, columns, logits)

    def top_columns(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The columns where any row's top ``k`` can be (ascending) and every row's exact logits there
        ``[n, C]``: what :meth:`top` writes into rows of ``-inf``, for consumers that write it
        themselves (``models/batch.py``) or read only the argmax.

        With ``|s − v| ≤ A + ρ|s|`` between every screened value ``s`` and the exact one ``v``
        (:class:`_Screen`'s bound; for a bf16 target widened by its float32 sum and its rounding to
        bf16, ``|v − u| ≤ ρₜ|v|``: ``A/(1 − ρₜ)`` and ``ρ + ρₜ(1 + ρ)/(1 − ρₜ)``), the ``k`` rows
        screened highest are each worth at least ``h(s_k) − A`` in truth (``h(s) = s − ρ|s|``,
        ``s_k`` the k-th highest screened value, or any value below it: :func:`_kth_floor`), so a
        row of the true top ``k`` has ``s + A + ρ|s| ≥ h(s_k) − A``; those candidates are rescored
        exactly."""
        hidden = hidden.to(torch.bfloat16).float() if self.bf16 else hidden.float()  # what the target multiplies
        if hidden.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long), hidden.new_zeros(0, 0)
        screen = self.screens[self.plan.kernels[-1] if hidden.shape[0] > ROW_BUCKETS[-1]
                              else self.plan.kernel_for(hidden.shape[0])]
        values, bound = screen(hidden, self._screened_rows(hidden.shape[0]))
        rho = screen.output_rounding
        if self.bias is not None:
            values = values + self.bias.float()
            bound = bound + rho * self.bias_max  # ρ applies to the value before the bias
        if self.bf16:
            bound = (bound + hidden.norm(dim=1, keepdim=True) * self.target_error) / (1 - self.target_rounding)
            rho = rho + self.target_rounding * (1 + rho) / (1 - self.target_rounding)
        kth = values.amax(dim=1, keepdim=True) if k == 1 else _kth_floor(values, k)
        slack = 1e-6 * (kth.abs() + 2 * bound) + 1e-6  # float32 rounding of values near the k-th
        floor = kth - rho * kth.abs() - 2 * bound - slack
        floor = torch.where(floor >= 0, floor / (1 + rho), floor / (1 - rho))  # s + ρ|s| ≥ floor
        # s ≥ floor ⟺ s − floor ≥ 0 (IEEE: a difference is 0 only between equals, and keeps the sign):
        # in place and one reduction over the rows, rather than a [n, V] mask and a second pass
        candidates = torch.nonzero(values.sub_(floor).amax(dim=0) >= 0).squeeze(1)
        return candidates, self._exact(hidden, candidates)

    def _screened_rows(self, rows: int) -> torch.Tensor | None:
        """Where the screen writes ``rows`` rows: this thread's buffer, grown as needed and kept between
        calls (the values never leave :meth:`top_columns`). Fresh, a tensor over 32 MB (> 32 rows of a
        262k vocabulary) is mapped anew by glibc at each call and its first touch page-faults: ~10 ms
        at 32 rows, more than the screen's own arithmetic grows. None past SCRATCH_ROWS rows."""
        if rows > SCRATCH_ROWS:
            return None
        buffer = getattr(self._scratch, "buffer", None)
        if buffer is None or buffer.shape[0] < rows:
            buffer = self._scratch.buffer = torch.empty(max(rows, HEAD_BLOCK_ROWS), self.weight.shape[0])
        return buffer[:rows]

    def _exact(self, hidden: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """The target's own logits of the ``candidates`` columns, float32."""
        rows = self.weight.index_select(0, candidates)
        bias = None if self.bias is None else self.bias.index_select(0, candidates)
        if self.bf16:  # the same kernel as full(): each column's sum alike whatever else is computed
            return row_kernels.bf16_product(hidden, row_kernels.pack_bf16(rows), len(candidates), bias).float()
        exact = hidden.double() @ rows.double().t()
        if bias is not None:
            exact = exact + bias.double()
        return self._cap(exact.float())

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        # softcapping is monotonic: screening on uncapped values selects the same top k
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits


class TunedHead:
    """The LM head of a bf16 model: the bf16 target's own product, on the kernel its own tuned plan
    finds fastest per row count (a :class:`TunedLinear` over the head weight). Its logits are what
    the eager runner returns (the bf16 product, softcapped in bf16, then float32); a consumer's top
    k is read from all of them, so :meth:`top` is :meth:`full`."""

    def __init__(self, linear: TunedLinear, softcap: float | None) -> None:
        self.linear, self.softcap = linear, softcap
        self.weight, self.bias = linear.weight, linear.bias

    @property
    def plan(self) -> KernelPlan:
        return self.linear.plan

    def describe(self) -> str:
        return f"bf16 head by rows {self.plan.describe()}"

    def full(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.linear(hidden.to(self.weight.dtype))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()  # bf16 → float32, as the eager runner widens it

    def top(self, hidden: torch.Tensor, k: int, until_mismatch: Sequence[int] | None = None) -> torch.Tensor:
        return self.full(hidden)


