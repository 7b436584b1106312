"""Product kernels for a few rows at a time, chosen per CPU by timing (the fast runtime's products).

Which kernel multiplies a few rows by a weight fastest depends on the CPU, the thread count and
the row count: on an AVX2-only EPYC, MKL's ``x @ Wᵀ`` costs 2× for 2 rows what it costs for 1,
while oneDNN on a prepacked weight costs 1.1× (2 threads); on a Zen 4 MKL costs ~4× for 2-16 rows
of an 8k × 640 product what ``W @ xᵀ`` does. At load time every candidate (float32: MKL,
``W @ xᵀ``, oneDNN packed; bf16: ``F.linear``, oneDNN packed, fbgemm on an exact float16 copy) is
timed on the model's own linear layers for each bucket of :data:`ROW_BUCKETS`; each row count
uses the fastest. The plan is cached per CPU model and features, thread count and layer shapes,
and recorded in every result. Float32 kernels give the same products up to summation order
(lossless speculation holds: every forward of a step uses one plan).

Also here: the weight-only float16 and int8 products of ``quantize="fp16"`` / ``"int8"``.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specdecode.errors import InvalidSettingError
from specdecode.models import row_kernels
from specdecode.models.machine import cpu_description
from specdecode.models.int8 import StaticActivation, int8_product, pack_int8

KERNELS = ("mkl", "wxt", "onednn")  # x @ Wᵀ (MKL), W @ xᵀ, oneDNN on a prepacked weight
# bf16 candidates: F.linear (oneDNN's bf16 matmul behind it), oneDNN on a prepacked bf16 weight,
# fbgemm's float16-weight kernel on an exact float16 copy of the bf16 weight (offered only where
# every weight converts exactly), and our AVX-512 BF16 kernel for a few rows (``row_kernels.py``,
# offered where it builds); each a float32 sum rounded once to bf16. W @ xᵀ is 1.5–2.5× slower than
# either oneDNN kernel in bf16 on AVX-512 BF16 (docs/perf.md)
BF16_KERNELS = ("mkl", "onednn", "fp16", "dpbf16")
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # 17-64: draft trees and batched steps (MKL was 2x slower there)
def fbgemm_fp16_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_prepack_fp16")


@dataclass(frozen=True)
class KernelPlan:
    """Which product kernel each row-count bucket uses (``ROW_BUCKETS[i]`` → ``kernels[i]``)."""

    kernels: tuple[str, ...]
    measured_ms: tuple[tuple[float, ...], ...] = ()  # [bucket][kernel], from the tuning run

    def kernel_for(self, rows: int) -> str:
        for bucket, kernel in zip(ROW_BUCKETS, self.kernels):
            if rows <= bucket:
                return kernel
        return "mkl"  # prefill-sized products: MKL is compute-bound and good at them

    def describe(self) -> str:
        return " ".join(f"{bucket}:{kernel}" for bucket, kernel in zip(ROW_BUCKETS, self.kernels))


class _LinearOver(nn.Module):
    """A linear product over an existing weight and bias (shared, not copied): the base of the
    runtime's replacement modules, built beside the model's own ``nn.Linear``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight, self.bias = weight, bias


COPIED = ("onednn", "fp16", "dpbf16")  # kernels that read a copy of the weight made at load, not the weight
KERNEL_NEEDS = {"onednn": "it needs a torch build with oneDNN",
                "fp16": "it needs bf16 weights that convert to float16 exactly, and fbgemm",
                "dpbf16": "it needs bf16 weights, a CPU with AVX-512 BF16 and a C compiler"}


def weight_copy(kernel: str, weight: torch.Tensor) -> object | None:
    """What ``kernel`` reads in place of ``weight``, made once at load, or None where it cannot
    take this weight here: oneDNN's packed layout, fbgemm's exact float16 copy of a bf16 weight,
    or the AVX-512 BF16 kernel's packed blocks."""
    weight = weight.detach()
    if kernel == "onednn":
        # the hint 8 packs for a few rows: 1 row costs what MKL costs, 2–16 rows much less
        return torch.ops.mkldnn._reorder_linear_weight(weight, 8) if onednn_available() else None
    if kernel == "fp16":
        return exact_half_pack(weight) if weight.dtype == torch.bfloat16 else None
    if kernel == "dpbf16":
        return row_kernels.pack_bf16(weight)
    raise ValueError(f"kernel {kernel!r} reads the weight itself")


class TunedLinear(_LinearOver):
    """A float32 or bf16 product whose kernel follows a :class:`KernelPlan`; ``copies`` holds what
    the planned kernels of :data:`COPIED` read (:func:`weight_copy`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan: KernelPlan,
                 copies: dict[str, object] | None = None) -> None:
        super().__init__(weight, bias)
        self.plan, self.copies = plan, dict(copies or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        kernel = self.plan.kernel_for(rows.shape[0])
        if kernel == "dpbf16":
            out = row_kernels.bf16_product(rows, self.copies[kernel], self.out_features, self.bias, rows.dtype)
        elif kernel == "fp16":  # bf16 weights as their exact float16 copy (fbgemm), one rounding back
            out = torch.ops.quantized.linear_dynamic_fp16(rows.float(), self.copies[kernel])
            if self.bias is not None:
                out = out + self.bias.float()
            out = out.to(rows.dtype)
        elif kernel == "onednn":
            out = torch.ops.mkldnn._linear_pointwise(rows, self.copies[kernel], self.bias, "none", [], "")
        elif kernel == "wxt":
            # row-major like the other kernels': ops downstream (RMSNorm's sum) round by layout
            out = torch.mm(self.weight, rows.t()).t().contiguous()
            if self.bias is not None:
                out = out + self.bias
        else:
            out = F.linear(rows, self.weight, self.bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def _offered(kernel: str, linears: Sequence[TunedLinear]) -> bool:
    """Whether every layer has what ``kernel`` reads (its copy of the weight)."""
    return kernel not in COPIED or all(m.copies.get(kernel) is not None for m in linears)


def exact_half_pack(weight: torch.Tensor) -> object | None:
    """fbgemm's packed float16 copy of a bf16 ``weight`` where every value converts exactly (bf16
    values within float16's normal range do), else None."""
    if not fbgemm_fp16_available():
        return None
    weight = weight.detach()
    half = weight.half()
    if not torch.equal(half.to(weight.dtype), weight):
        return None
    return torch.ops.quantized.linear_prepack_fp16(half.float(), None)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def candidate_kernels(dtype: torch.dtype) -> tuple[str, ...]:
    """The product kernels the tuner may choose for weights of ``dtype``."""
    return BF16_KERNELS if dtype == torch.bfloat16 else KERNELS


def tune_kernels(linears: Sequence[TunedLinear], repeats: int = 5) -> KernelPlan:
    """Time every kernel on ``linears`` (the whole stack, as a step runs it) for each row bucket;
    keep the fastest. Takes ~2–4 s on a 270M model."""
    dtype = linears[0].weight.dtype
    kernels = tuple(k for k in candidate_kernels(dtype) if _offered(k, linears))

    def runner(bucket: int) -> Callable[[str], None]:
        inputs = {m.in_features: torch.randn(bucket, m.in_features).to(dtype) for m in linears}

        def run(kernel: str) -> None:
            plan = KernelPlan(tuple(kernel for _ in ROW_BUCKETS))
            for m in linears:
                m.plan = plan
                m(inputs[m.in_features])
        return run

    return fastest_per_bucket(kernels, runner, repeats)


def fastest_per_bucket(candidates: Sequence[str], runner: Callable[[int], Callable[[str], None]],
                       repeats: int = 5) -> KernelPlan:
    """The plan keeping, for each row bucket, the candidate whose ``runner(bucket)(candidate)`` has the
    lowest median time over ``repeats`` runs, after one untimed run of each. The candidates take
    turns, each round in a rotated order: timed one after the other, the first candidate of a bucket
    met its cold caches and any drift of the host, and a 10 % slower screen was kept (stop 32)."""
    chosen, measured = [], []
    with torch.inference_mode():
        for bucket in ROW_BUCKETS:
            run = runner(bucket)
            for candidate in candidates:
                run(candidate)
            runs: dict[str, list[float]] = {candidate: [] for candidate in candidates}
            for round_ in range(repeats):
                shift = round_ % len(candidates)
                for candidate in candidates[shift:] + candidates[:shift]:
                    start = time.perf_counter()
                    run(candidate)
                    runs[candidate].append(time.perf_counter() - start)
            times = [statistics.median(runs[candidate]) * 1000 for candidate in candidates]
            chosen.append(candidates[times.index(min(times))])
            measured.append(tuple(round(t, 2) for t in times))
    return KernelPlan(tuple(chosen), tuple(measured))


def plan_key(shapes: Sequence[tuple[int, ...]], suffix: str = "") -> str:
    """A tuned plan's cache key: CPU model and features, thread count, torch, our row kernels' version
    (a plan timed an older kernel), the weights' shapes."""
    digest = hashlib.sha256(repr([tuple(shape) for shape in shapes]).encode()).hexdigest()[:12]
    cpu = cpu_description()
    # the features too: one model name ("AMD EPYC") covers an AVX2 Zen 3 and an AVX-512 BF16 Zen 4
    return (f"{cpu['cpu']}|{'+'.join(cpu['features'])}|threads={cpu['threads']}|torch={torch.__version__}"
            f"|rows={row_kernels.source_digest()}|{digest}{suffix}")


def cached_plan(key: str, offered: Sequence[str], tune: Callable[[], KernelPlan], plan_cache: Path | None,
                what: str) -> KernelPlan:
    """The plan stored under ``key`` in ``plan_cache`` if it names only ``offered`` kernels, else
    ``tune()`` once (saying so on stderr: a load's one-time work, not inside a timed run) and store it."""
    stored: dict[str, list[str]] = {}
    if plan_cache is not None and plan_cache.is_file():
        try:
            stored = json.loads(plan_cache.read_text())
        except (OSError, ValueError):
            stored = {}
        kernels = stored.get(key)
        if isinstance(kernels, list) and len(kernels) == len(ROW_BUCKETS) and set(kernels) <= set(offered):
            return KernelPlan(tuple(kernels))
    if plan_cache is not None:
        print(f"tuning {what} for this CPU (once, cached in {plan_cache})", file=sys.stderr, flush=True)
    plan = tune()
    if plan_cache is not None:
        try:
            plan_cache.parent.mkdir(parents=True, exist_ok=True)
            plan_cache.write_text(json.dumps({**stored, key: list(plan.kernels)}, indent=1))
        except OSError:
            pass  # a read-only home only costs a re-tune next time
    return plan


def _cached_plan(linears: Sequence[TunedLinear], plan_cache: Path | None) -> KernelPlan:
    """The tuned plan of this CPU / thread count / model shape, measured once and kept in ``plan_cache``."""
    dtype = linears[0].weight.dtype
    offered = [k for k in candidate_kernels(dtype) if _offered(k, linears)]
    suffix = "" if dtype == torch.float32 else f"|{str(dtype).removeprefix('torch.')}|{'/'.join(offered)}"  # a new candidate re-tunes
    return cached_plan(plan_key([m.weight.shape for m in linears], suffix), offered, lambda: tune_kernels(linears),
                       plan_cache, f"{str(dtype).removeprefix('torch.')} product kernels ({len(linears)} weights)")


class Fp16WeightLinear(_LinearOver):
    """A product on a packed float16 copy of the weight (fbgemm; float32 in and out). The float32
    weight stays with the model, so its state dict and fingerprint see the original; only the
    product is rounded."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight, bias)
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.detach(), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.dtype != torch.float32:
            rows = rows.float()
        out = torch.ops.quantized.linear_dynamic_fp16(rows, self.packed)
        if self.bias is not None:
            out = out + self.bias
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if out.dtype == x.dtype else out.to(x.dtype)


class Int8WeightLinear(_LinearOver):
    """A product on a packed per-channel int8 copy of the (smoothed) weight, its input quantised on
    a calibrated static grid (``models/int8.py``), or per call where calibration never reached it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, static: StaticActivation | None) -> None:
        super().__init__(weight, bias)
        self.static = static
        self.packed = pack_int8(weight.detach(), None if bias is None else bias.detach(),
                                None if static is None else static.smooth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_product(x, self.packed, self.static)


def tuned_linear(linear: nn.Linear, kernels: KernelPlan | None) -> nn.Module:
    """``linear`` on the product kernels of ``kernels`` (a plan tuned for the model it sits beside);
    itself where there is no plan (reduced precision, no oneDNN)."""
    if kernels is None:
        return linear
    return TunedLinear(linear.weight, linear.bias, kernels,
                       {k: weight_copy(k, linear.weight) for k in set(kernels.kernels) & set(COPIED)})


def tuned_product(weight: torch.Tensor) -> nn.Module:
    """``x @ weightᵀ`` on the kernel timed fastest for it per row count (a plan of its own, tuned
    here in ~0.2 s: one product's best kernel need not be its model's)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    _, tuned = tuned_linears([linear], "auto", None)
    return tuned[linear]


def tuned_linears(layers: list[nn.Linear], kernels: str,
                   plan_cache: Path | None) -> tuple[KernelPlan | None, dict[nn.Module, nn.Module]]:
    if not layers:
        return None, {}
    dtype = layers[0].weight.dtype
    wanted = [k for k in candidate_kernels(dtype) if k in COPIED and kernels in ("auto", k)]
    tuned = [TunedLinear(linear.weight, linear.bias, KernelPlan(("mkl",) * len(ROW_BUCKETS)),
                         {k: weight_copy(k, linear.weight) for k in wanted})
             for linear in layers]
    if kernels in COPIED and not _offered(kernels, tuned):
        raise InvalidSettingError(f"the {kernels} kernel cannot run here: {KERNEL_NEEDS[kernels]}")
    plan = KernelPlan(tuple(kernels for _ in ROW_BUCKETS)) if kernels != "auto" else _cached_plan(tuned, plan_cache)
    for linear in tuned:
        linear.plan = plan
        # a copy is only worth its memory when the plan uses it
        linear.copies = {k: v for k, v in linear.copies.items() if k in plan.kernels}
    return plan, dict(zip(layers, tuned))
