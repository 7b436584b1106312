"""The fast CPU runtime: kernels chosen for what dominates a decoding step on a CPU.

A step of a small model with a big vocabulary is dominated by reading weights (measured on the
embedded Gemma 3 270M, see docs/perf.md), and by one product above all: the 262k-row LM head,
671 MB in float32. Two kernel choices change the cost of a step without changing its result:

* **Screened head** (float32, exact). The head is first evaluated with a float16 copy of its
  weights through fbgemm's AVX2 fp16 kernel (half the bytes, and k rows cost about what one row
  does), then the rows that can still be among the top ``k`` — given a rigorous bound on the
  float16 error — are recomputed exactly (float64 dot products rounded to float32). Greedy
  decoding needs ``k = 1``, top-k sampling ``k = top_k``: every value such a consumer can read is
  exact, the rest of the row is ``-inf``. Consumers that read the whole distribution (sampling
  without top-k, perplexity) get the full float32 head.
* **Tuned products** (float32, exact). Which kernel multiplies a few rows by a layer's weight
  fastest depends on the CPU, the thread count and the row count: on an AVX2-only EPYC, MKL's
  ``x @ Wᵀ`` costs 2× for 2 rows what it costs for 1, while oneDNN on a prepacked weight costs
  1.1× (2 threads). At load time every candidate (MKL, ``W @ xᵀ``, oneDNN packed) is timed on the
  model's own linear layers for 1, 2, 4, 8 and 16 rows; each row count uses the fastest (the plan
  is cached per CPU model and features, thread count and layer shapes, and recorded in every result).

On a bf16 model (``--dtype bfloat16``, or ``auto`` where it measures faster) the same seam runs
the bf16 target: every linear layer and the LM head on the kernel that is fastest for the row
count (timed at load, cached as float32's plans are: ``F.linear`` or oneDNN on a weight
prepacked for bf16 — on AVX-512 BF16 / AMX these run the native bf16 dot products — or fbgemm's
float16 kernel on an exact float16 copy of the bf16 weights), fused q/k/v and gate/up products,
the native decoder, and attention on float32 upcasts where a load-time timing finds torch's bf16
attention slower. The head is the bf16 target's own product (the
consumer's top-k is read from it: bf16 is a different target from float32 anyway, and on this
hardware a bf16 head costs what the float16 screen does, see docs/perf.md). The bf16 kernels
accumulate in float32 and round each output once, but their blocking over the inner dimension
depends on the row count for some shapes (e.g. 640×2048 at ≥ 5 rows on AVX-512 BF16): a k-token
bf16 verification can round differently from k 1-token steps, as `transformers`' own bf16 does.

and two that do (explicit, reported as another target): ``quantize="fp16"`` runs every linear
layer on float16 weights (fbgemm, float32 activations and accumulation); ``quantize="int8"`` on
per-channel int8 weights with smoothed activations on a calibrated static int8 grid (fbgemm: half
fp16's bytes; each row quantised on its own, so speculation stays lossless on that target — see
``models/int8.py``). The LM head stays screened-exact in both.

Nothing here changes the loaded model: :func:`build_runtime` returns a :class:`RuntimePlan` whose
faster modules are new objects built at load time over the same weight tensors (a shallow copy
of the module tree where a product kernel changes), and the model's runner
(``models/runner.py``) runs that plan — or, in its eager mode, the untouched model.

Everything here is CPU-only; on CUDA the runtime stays off (cuBLAS serves these shapes well).
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specdecode.errors import InvalidSettingError
from specdecode.models.families import decoder_layers, family_or_none, runs_natively
from specdecode.models.fused import concatenated, projection_groups
from specdecode.models.int8 import InputStatistics, Int8Linear, StaticActivation, int8_product, pack_int8
from specdecode.models.int8 import calibration_ids as calibration_token_ids
from specdecode.models.layer_skip import shallow_replace
from specdecode.models.native import FusedGroup, NativeDecoder
from specdecode.models.vocab_map import awaits_target_embedding

QUANTIZE_CHOICES = ("fp16", "int8")
KERNELS = ("mkl", "wxt", "onednn")  # x @ Wᵀ (MKL), W @ xᵀ, oneDNN on a prepacked weight
# bf16 candidates: F.linear (oneDNN's bf16 matmul behind it), oneDNN on a prepacked bf16 weight, and
# fbgemm's float16-weight kernel on an exact float16 copy of the bf16 weight (offered only where
# every weight converts exactly; float32 sum, rounded once to bf16 like the others). W @ xᵀ is
# 1.5–2.5× slower than either oneDNN kernel in bf16 on AVX-512 BF16 (docs/perf.md)
BF16_KERNELS = ("mkl", "onednn", "fp16")
ROW_BUCKETS = (1, 2, 4, 8, 16)
ATTENTION_CHOICES = ("auto", "float32", "model")  # the bf16 runtime's attention dtype
HEAD_BLOCK_ROWS = 4  # the fp16 head screen is memory-bound up to ~4 rows on this CPU


def cpu_description() -> dict[str, object]:
    """The CPU model and the instruction-set features the kernel choice depends on."""
    name, flags = "", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"cpu": name or platform.processor() or platform.machine(),
            "features": [f for f in wanted if f in flags],
            "native_bf16": bool({"avx512_bf16", "amx_bf16"} & flags), "threads": torch.get_num_threads()}


def auto_dtype(device: torch.device) -> torch.dtype:
    """The fastest format the device runs natively: bf16 on CUDA and on CPUs with AVX-512 BF16 /
    AMX, float32 elsewhere (an AVX2-only CPU emulates bf16 products: slower, not faster)."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_description()["native_bf16"] else torch.float32


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


class TunedLinear(_LinearOver):
    """A float32 or bf16 product whose kernel follows a :class:`KernelPlan` (the oneDNN kernel
    reads a packed copy of the weight made at load time, the ``fp16`` kernel an fbgemm-packed exact
    float16 copy of a bf16 weight)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan: KernelPlan,
                 packed: torch.Tensor | None = None, half: object | None = None) -> None:
        super().__init__(weight, bias)
        self.plan, self.packed, self.half = plan, packed, half

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        kernel = self.plan.kernel_for(rows.shape[0])
        if kernel == "fp16":  # bf16 weights as their exact float16 copy (fbgemm), one rounding back
            out = torch.ops.quantized.linear_dynamic_fp16(rows.float(), self.half)
            if self.bias is not None:
                out = out + self.bias.float()
            out = out.to(rows.dtype)
        elif kernel == "onednn":
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        elif kernel == "wxt":
            # row-major like the other kernels': ops downstream (RMSNorm's sum) round by layout
            out = torch.mm(self.weight, rows.t()).t().contiguous()
            if self.bias is not None:
                out = out + self.bias
        else:
            out = F.linear(rows, self.weight, self.bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def _offered(kernel: str, linears: Sequence[TunedLinear]) -> bool:
    """Whether every layer has what ``kernel`` reads (its packed copy)."""
    if kernel == "onednn":
        return all(m.packed is not None for m in linears)
    if kernel == "fp16":
        return all(m.half is not None for m in linears)
    return True


def _exact_half_pack(weight: torch.Tensor) -> object | None:
    """fbgemm's packed float16 copy of a bf16 ``weight`` where every value converts exactly (bf16
    values within float16's normal range do), else None."""
    if not fbgemm_fp16_available():
        return None
    weight = weight.detach()
    half = weight.half()
    if not torch.equal(half.to(weight.dtype), weight):
        return None
    return torch.ops.quantized.linear_prepack_fp16(half.float(), None)


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def candidate_kernels(dtype: torch.dtype) -> tuple[str, ...]:
    """The product kernels the tuner may choose for weights of ``dtype``."""
    return BF16_KERNELS if dtype == torch.bfloat16 else KERNELS


def tune_kernels(linears: Sequence[TunedLinear], repeats: int = 3) -> KernelPlan:
    """Time every kernel on ``linears`` (the whole stack, as a step runs it) for each row bucket;
    keep the fastest. Takes ~2–4 s on a 270M model."""
    dtype = linears[0].weight.dtype
    kernels = tuple(k for k in candidate_kernels(dtype) if _offered(k, linears))
    chosen, measured = [], []
    with torch.inference_mode():
        for bucket in ROW_BUCKETS:
            inputs = {m.in_features: torch.randn(bucket, m.in_features).to(dtype) for m in linears}
            times = []
            for kernel in kernels:
                plan = KernelPlan(tuple(kernel for _ in ROW_BUCKETS))
                runs = []
                for _ in range(repeats + 1):
                    start = time.perf_counter()
                    for m in linears:
                        m.plan = plan
                        m(inputs[m.in_features])
                    runs.append(time.perf_counter() - start)
                times.append(statistics.median(runs[1:]) * 1000)
            chosen.append(kernels[times.index(min(times))])
            measured.append(tuple(round(t, 2) for t in times))
    return KernelPlan(tuple(chosen), tuple(measured))


def _plan_key(linears: Sequence[nn.Linear]) -> str:
    shapes = hashlib.sha256(repr([tuple(m.weight.shape) for m in linears]).encode()).hexdigest()[:12]
    cpu = cpu_description()
    dtype = linears[0].weight.dtype
    offered = "/".join(k for k in candidate_kernels(dtype) if _offered(k, linears))  # a new candidate re-tunes
    suffix = "" if dtype == torch.float32 else f"|{str(dtype).removeprefix('torch.')}|{offered}"
    # the features too: one model name ("AMD EPYC") covers an AVX2 Zen 3 and an AVX-512 BF16 Zen 4
    return f"{cpu['cpu']}|{'+'.join(cpu['features'])}|threads={cpu['threads']}|torch={torch.__version__}|{shapes}{suffix}"


def _cached_plan(linears: Sequence[TunedLinear], plan_cache: Path | None) -> KernelPlan:
    """The tuned plan of this CPU / thread count / model shape, measured once and kept in ``plan_cache``."""
    key = _plan_key(linears)
    stored: dict[str, list[str]] = {}
    if plan_cache is not None and plan_cache.is_file():
        try:
            stored = json.loads(plan_cache.read_text())
        except (OSError, ValueError):
            stored = {}
        kernels = stored.get(key)
        allowed = set(candidate_kernels(linears[0].weight.dtype))
        if isinstance(kernels, list) and len(kernels) == len(ROW_BUCKETS) and set(kernels) <= allowed:
            if all(_offered(k, linears) for k in kernels):
                return KernelPlan(tuple(kernels))
    if plan_cache is not None:  # a load's one-time work, said where it happens (not inside a timed run)
        print(f"tuning {str(linears[0].weight.dtype).removeprefix('torch.')} product kernels for this CPU "
              f"({len(linears)} weights; once, cached in {plan_cache})", file=sys.stderr, flush=True)
    plan = tune_kernels(linears)
    if plan_cache is not None:
        try:
            plan_cache.parent.mkdir(parents=True, exist_ok=True)
            plan_cache.write_text(json.dumps({**stored, key: list(plan.kernels)}, indent=1))
        except OSError:
            pass  # a read-only home only costs a re-tune next time
    return plan


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


class ScreenedHead:
    """Exact top-``k`` logits of a float32 head, reading it in float16 (see the module docstring).

    Bound: with ``δ_r = w_r − fp16(w_r)`` and fbgemm accumulating ``d`` products in float32,
    ``|screen_r − x·w_r| ≤ ‖x‖₂ (‖δ_r‖₂ + γ_d ‖fp16(w_r)‖₂)`` with ``γ_d = d·2⁻²⁴/(1 − d·2⁻²⁴)``.
    Taking ``B`` as that bound's maximum over rows (times a margin): if ``s`` is the k-th largest
    screened value, every row of the true top ``k`` has ``screen_r ≥ s − 2B``. Those candidates
    are rescored exactly.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None) -> None:
        self.weight = weight.detach()
        self.bias = bias.detach() if bias is not None else None
        self.softcap = softcap
        self.packed = torch.ops.quantized.linear_prepack_fp16(self.weight, None)
        half = self.weight.half().float()
        dim = self.weight.shape[1]
        gamma = dim * 2.0**-24 / (1 - dim * 2.0**-24)
        per_row = (self.weight - half).norm(dim=1) + gamma * half.norm(dim=1)
        self.row_bound = float(per_row.max()) * 1.01 + 1e-7  # margin for the norms' own rounding

    def full(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every logit, float32."""
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
        hidden = hidden.float()
        screen = torch.ops.quantized.linear_dynamic_fp16(hidden, self.packed)
        if self.bias is not None:
            screen = screen + self.bias
        if k == 1:
            kth = screen.amax(dim=1, keepdim=True)
        else:
            kth = torch.topk(screen, k, dim=1).values[:, -1:]
        # 2B, plus float32 rounding of values near the k-th (relative 1e-6 of their size)
        margin = 2 * hidden.norm(dim=1, keepdim=True) * self.row_bound
        margin = margin + 1e-6 * (kth.abs() + margin) + 1e-6
        candidates = torch.nonzero((screen >= kth - margin).any(dim=0)).squeeze(1)
        rows = self.weight.index_select(0, candidates).double()
        exact = (hidden.double() @ rows.t())
        if self.bias is not None:
            exact = exact + self.bias.index_select(0, candidates).double()
        if out is None:
            out = torch.full_like(screen, float("-inf"))
        out.index_copy_(1, candidates, self._cap(exact.float()))
        return out

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

    def full(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.linear(hidden.to(self.weight.dtype))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()  # bf16 → float32, as the eager runner widens it

    def top(self, hidden: torch.Tensor, k: int, until_mismatch: Sequence[int] | None = None) -> torch.Tensor:
        return self.full(hidden)


@dataclass(frozen=True)
class RuntimePlan:
    """How the fast runtime runs one model; ``describe()`` goes into every result.

    ``model`` is the module tree the plan runs: the loaded model itself, or a shallow copy of it
    that shares every weight and swaps linear modules for faster products. ``decoder`` is the
    native decoder over that tree (None: `transformers`' forward of ``model``)."""

    model: nn.Module
    head: ScreenedHead | TunedHead | None
    kernels: KernelPlan | None  # float32 / bf16 products (None with quantized weights)
    quantize: str | None
    decoder: NativeDecoder | None
    chosen_by: str = ""  # how the dtype was chosen, where ``--dtype auto`` measured it

    def describe(self) -> str:
        parts = [self.chosen_by] if self.chosen_by else []
        if self.quantize:
            parts.append(f"{self.quantize} weights (fbgemm)")
        elif self.kernels is not None:
            dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
            parts.append(f"{dtype} products by rows {self.kernels.describe()}")
        if isinstance(self.head, TunedHead):
            parts.append(f"bf16 head by rows {self.head.plan.describe()}")
        elif self.head is not None:
            parts.append("fp16-screened exact head")
        if self.decoder is not None and self.decoder.attention_dtype is not None:
            parts.append("float32 attention")
        if self.decoder is not None:
            parts.append("native decoder")
        return ", ".join(parts) or "eager"


def build_runtime(
    model: nn.Module,
    quantize: str | None = None,
    kernels: str = "auto",
    plan_cache: Path | None = None,
    calibration_ids: Sequence[int] | None = None,
    attention: str = "auto",
) -> RuntimePlan | None:
    """The fast CPU runtime of ``model`` (which it leaves as it is): the kernels on float32 and bf16
    models, the native decoder (``models/native.py``) on supported families in any CPU dtype; None
    where nothing applies (CUDA, unsupported float64 architectures).

    ``kernels`` is ``"auto"`` (time the candidates, or reuse the plan stored in ``plan_cache``) or
    one of :data:`KERNELS` for every row count. ``calibration_ids`` (``quantize="int8"``): the
    tokens the static activation ranges are calibrated on (default: a fixed pseudo-random sequence).
    ``attention`` (bf16 models): ``"auto"`` upcasts attention to float32 where a timing at load
    finds it faster, ``"float32"`` always, ``"model"`` never (the model's own dtype, as
    `transformers` runs it).
    """
    if attention not in ATTENTION_CHOICES:
        raise InvalidSettingError(f"unknown attention choice {attention!r}; choose one of {', '.join(ATTENTION_CHOICES)}")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise InvalidSettingError(f"unknown quantize choice {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")
    known = dict.fromkeys(KERNELS + BF16_KERNELS)
    if kernels != "auto" and kernels not in known:
        raise InvalidSettingError(f"unknown kernel choice {kernels!r}; choose auto or one of {', '.join(known)}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    native = runs_natively(model)
    if device.type == "cpu" and dtype == torch.bfloat16 and quantize is None:
        return _bf16_runtime(model, kernels, plan_cache, native, attention)
    if device.type != "cpu" or dtype != torch.float32 or not fbgemm_fp16_available():
        if quantize is not None:
            raise InvalidSettingError(f"quantize={quantize!r} needs a float32 model on a CPU with fbgemm")
        if device.type != "cpu" or not native:
            return None
        return RuntimePlan(model, head=None, kernels=None, quantize=None, decoder=NativeDecoder(model))  # fewer ops
    head_module = model.get_output_embeddings()
    linears = [m for m in model.modules() if type(m) is nn.Linear and m is not head_module]
    plan = None
    replacements: dict[nn.Module, nn.Module]
    if quantize == "fp16":
        replacements = {linear: Fp16WeightLinear(linear.weight, linear.bias) for linear in linears}
    elif quantize == "int8":
        replacements = _int8_linears(model, linears, calibration_ids)
    else:
        plan, replacements = _tuned_linears(linears, kernels, plan_cache)
    fast = shallow_replace(model, replacements)
    head = None
    if family_or_none(model) is not None and isinstance(head_module, nn.Linear) and hasattr(model, "base_model"):
        head = ScreenedHead(head_module.weight, head_module.bias,
                            getattr(model.config, "final_logit_softcapping", None))
    decoder = NativeDecoder(fast, _fused_projections(fast)) if native else None
    return RuntimePlan(fast, head=head, kernels=plan, quantize=quantize, decoder=decoder)


def _bf16_runtime(model: nn.Module, kernels: str, plan_cache: Path | None, native: bool,
                  attention: str) -> RuntimePlan:
    """The bf16 target's runtime: tuned bf16 products (fused where the native decoder runs), the
    head as a tuned bf16 product of its own, the native decoder, attention upcast to float32 where
    that is faster (``attention="auto"``, timed) or asked for (``"float32"``)."""
    if kernels == "wxt":
        raise InvalidSettingError(f"kernel 'wxt' is not a bf16 kernel; choose auto or one of {', '.join(BF16_KERNELS)}")
    head_module = model.get_output_embeddings()
    linears = [m for m in model.modules() if type(m) is nn.Linear and m is not head_module]
    plan, replacements = _tuned_linears(linears, kernels, plan_cache)
    fast = shallow_replace(model, replacements)
    head = None
    if family_or_none(model) is not None and type(head_module) is nn.Linear and hasattr(model, "base_model"):
        _, tuned = _tuned_linears([head_module], kernels, plan_cache)
        head = TunedHead(tuned[head_module], getattr(model.config, "final_logit_softcapping", None))
    wide_attention = attention == "float32" or (attention == "auto" and native and upcast_attention_pays(model))
    decoder = NativeDecoder(fast, _fused_projections(fast), torch.float32 if wide_attention else None) if native else None
    return RuntimePlan(fast, head=head, kernels=plan, quantize=None, decoder=decoder)


def upcast_attention_pays(model: nn.Module, context: int = 256, repeats: int = 20) -> bool:
    """Whether one query's attention over ``context`` keys (this model's head shapes, one layer)
    runs faster upcast to float32 than in the model's dtype, timed here (~10 ms): torch's bf16
    flash-attention kernel is 7–9× slower than float32 for one query on AVX-512 BF16 (docs/perf.md)."""
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    heads, kv_heads = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    dtype = next(model.parameters()).dtype
    q = torch.randn(1, heads, 1, head_dim).to(dtype)
    k, v = (torch.randn(1, kv_heads, context, head_dim).to(dtype) for _ in range(2))

    def own() -> None:
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def wide() -> None:
        F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True).to(dtype)

    times = {}
    with torch.inference_mode():
        for name, step in (("own", own), ("wide", wide), ("own", own), ("wide", wide)):  # interleaved
            step()
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            times[name] = min(times.get(name, float("inf")), time.perf_counter() - start)
    return times["wide"] < times["own"]


def tuned_linear(linear: nn.Linear, kernels: KernelPlan | None) -> nn.Module:
    """``linear`` on the product kernels of ``kernels`` (a plan tuned for the model it sits beside);
    itself where there is no plan (reduced precision, no oneDNN)."""
    if kernels is None:
        return linear
    packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 8) if "onednn" in kernels.kernels else None
    return TunedLinear(linear.weight, linear.bias, kernels, packed)


def _fused_projections(model: nn.Module) -> dict[tuple[int, str], FusedGroup]:
    """One product for q/k/v and one for gate/up in every layer, each run by the same kind of
    kernel as its parts, for the native decoder (the parts stay: `transformers`' forward and the
    state dict see the original model).

    Only the float32 and bf16 runtimes' kernels are fused: their columns come out bit-identical to
    the parts' (tested), while e.g. MKL's float64 product rounds a wider matrix differently."""
    fused: dict[tuple[int, str], FusedGroup] = {}
    for index, layer in enumerate(decoder_layers(model)):
        for name, parts in projection_groups(layer).items():
            kind = type(parts[0])
            if kind not in (TunedLinear, Fp16WeightLinear, Int8WeightLinear) or any(
                    type(part) is not kind for part in parts):
                continue
            weight, bias = concatenated(parts)
            if kind is Int8WeightLinear:  # the parts share their input's quantisation; no float copy
                fused[index, name] = Int8Linear(weight, bias, parts[0].static)
            elif kind is Fp16WeightLinear:
                fused[index, name] = Fp16WeightLinear(weight, bias)
            else:
                packed = None if parts[0].packed is None else torch.ops.mkldnn._reorder_linear_weight(weight, 8)
                half = None if parts[0].half is None else _exact_half_pack(weight)
                fused[index, name] = TunedLinear(weight, bias, parts[0].plan, packed, half)
    return fused


def int8_fused_projections(model: nn.Module) -> dict[tuple[int, str], FusedGroup]:
    """Per-channel int8 products (dynamically quantised input) of every q/k/v and gate/up group of
    ``model``'s float layers: the fused half of an int8 self-draft (the same floats as its parts)."""
    return {(index, name): Int8Linear(*concatenated(parts))
            for index, layer in enumerate(decoder_layers(model))
            for name, parts in projection_groups(layer).items()}


def _int8_linears(model: nn.Module, layers: list[nn.Linear],
                  calibration_ids: Sequence[int] | None) -> dict[nn.Module, nn.Module]:
    """Per-channel int8 weights with smoothed, statically quantised inputs (``models/int8.py``),
    calibrated by one float32 forward over ``calibration_ids``. A draft that cannot run before it
    is paired with its target is quantised per call instead (dynamic: a draft's numbers only have
    to be good guesses)."""
    if calibration_ids is None:
        calibration_ids = calibration_token_ids(None, model.config.get_text_config().vocab_size)
    statistics_ = InputStatistics(layers)
    try:
        if not awaits_target_embedding(model):
            with torch.inference_mode():
                model.base_model(input_ids=torch.tensor([list(calibration_ids)]), use_cache=False)
    finally:
        statistics_.remove()
    groups = {part: parts for layer in decoder_layers(model) for parts in projection_groups(layer).values()
              for part in parts}
    return {linear: Int8WeightLinear(linear.weight, linear.bias,
                                     statistics_.static_activation(groups.get(linear, (linear,)))
                                     if linear in statistics_.low else None)
            for linear in layers}


def _tuned_linears(layers: list[nn.Linear], kernels: str,
                   plan_cache: Path | None) -> tuple[KernelPlan | None, dict[nn.Module, nn.Module]]:
    if not layers:
        return None, {}
    pack = _onednn_available() and kernels in ("auto", "onednn")
    if kernels == "onednn" and not pack:
        raise InvalidSettingError("the oneDNN kernel is not available in this torch build")
    # the hint 8 packs for a few rows: 1 row costs what MKL costs, 2–16 rows much less
    half = layers[0].weight.dtype == torch.bfloat16 and kernels in ("auto", "fp16")
    tuned = [TunedLinear(linear.weight, linear.bias, KernelPlan(("mkl",) * len(ROW_BUCKETS)),
                         torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 8) if pack else None,
                         _exact_half_pack(linear.weight) if half else None)
             for linear in layers]
    if kernels == "fp16" and not _offered("fp16", tuned):
        raise InvalidSettingError("the fp16 kernel needs bf16 weights that convert to float16 exactly, and fbgemm")
    plan = KernelPlan(tuple(kernels for _ in ROW_BUCKETS)) if kernels != "auto" else _cached_plan(tuned, plan_cache)
    for linear in tuned:
        linear.plan = plan
        if "onednn" not in plan.kernels:
            linear.packed = None  # the packed copy is only worth its memory when it is used
        if "fp16" not in plan.kernels:
            linear.half = None
    return plan, dict(zip(layers, tuned))
