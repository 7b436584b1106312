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
  is cached per CPU, thread count and layer shapes, and recorded in every result).

and two that do (explicit, reported as another target): ``quantize="fp16"`` runs every linear
layer on float16 weights (fbgemm, float32 activations and accumulation); ``quantize="int8"`` on
per-channel int8 weights with smoothed activations on a calibrated static int8 grid (fbgemm: half
fp16's bytes; each row quantised on its own, so speculation stays lossless on that target — see
``models/int8.py``). The LM head stays screened-exact in both.

Everything here is CPU-only; on CUDA the runtime stays off (cuBLAS serves these shapes well).
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specdecode.errors import InvalidSettingError
from specdecode.models.layer_skip import decoder_layers
from specdecode.models.fused import concatenated, projection_groups, register_fused
from specdecode.models.int8 import InputStatistics, Int8Linear, StaticActivation, int8_product, pack_int8
from specdecode.models.int8 import calibration_ids as calibration_token_ids
from specdecode.models.native import supports_native
from specdecode.models.vocab_map import awaits_target_embedding

QUANTIZE_CHOICES = ("fp16", "int8")
KERNELS = ("mkl", "wxt", "onednn")  # x @ Wᵀ (MKL), W @ xᵀ, oneDNN on a prepacked weight
ROW_BUCKETS = (1, 2, 4, 8, 16)
HEAD_BLOCK_ROWS = 4  # the fp16 head screen is memory-bound up to ~4 rows on this CPU  # a product of r rows uses the plan of the smallest bucket >= r
_SCREENED_MODEL_TYPES = ("gemma3_text", "llama", "qwen2", "gpt2", "mistral", "qwen3")


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


class TunedLinear(nn.Linear):
    """``nn.Linear`` whose product kernel follows a :class:`KernelPlan` (same weights, same state
    dict; the oneDNN kernel reads a packed copy made at load time)."""

    plan: KernelPlan
    packed: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        kernel = self.plan.kernel_for(rows.shape[0])
        if kernel == "onednn":
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        elif kernel == "wxt":
            # row-major like the other kernels': ops downstream (RMSNorm's sum) round by layout
            out = torch.mm(self.weight, rows.t()).t().contiguous()
            if self.bias is not None:
                out = out + self.bias
        else:
            out = F.linear(rows, self.weight, self.bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def tune_kernels(linears: Sequence[TunedLinear], repeats: int = 3) -> KernelPlan:
    """Time every kernel on ``linears`` (the whole stack, as a step runs it) for each row bucket;
    keep the fastest. Takes ~2–4 s on a 270M model."""
    kernels = KERNELS if all(m.packed is not None for m in linears) else KERNELS[:2]
    chosen, measured = [], []
    with torch.inference_mode():
        for bucket in ROW_BUCKETS:
            inputs = {m.in_features: torch.randn(bucket, m.in_features) for m in linears}
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
    return f"{cpu['cpu']}|threads={cpu['threads']}|torch={torch.__version__}|{shapes}"


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
        if isinstance(kernels, list) and len(kernels) == len(ROW_BUCKETS) and set(kernels) <= set(KERNELS):
            if "onednn" not in kernels or all(m.packed is not None for m in linears):
                return KernelPlan(tuple(kernels))
    plan = tune_kernels(linears)
    if plan_cache is not None:
        try:
            plan_cache.parent.mkdir(parents=True, exist_ok=True)
            plan_cache.write_text(json.dumps({**stored, key: list(plan.kernels)}, indent=1))
        except OSError:
            pass  # a read-only home only costs a re-tune next time
    return plan


class Fp16WeightLinear(nn.Linear):
    """``nn.Linear`` running on a packed float16 copy of its weight (fbgemm; float32 in and out).

    The float32 parameter stays, so the state dict, the fingerprint and every module sharing
    the weight see the original model; only the product is rounded.
    """

    packed: object

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.dtype != torch.float32:
            rows = rows.float()
        out = torch.ops.quantized.linear_dynamic_fp16(rows, self.packed)
        if self.bias is not None:
            out = out + self.bias
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if out.dtype == x.dtype else out.to(x.dtype)


class Int8WeightLinear(nn.Linear):
    """``nn.Linear`` on a packed per-channel int8 copy of its (smoothed) weight, its input quantised
    on a calibrated static grid (``models/int8.py``), or per call where calibration never reached it."""

    packed: object
    static: StaticActivation | None

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


@dataclass
class Runtime:
    """What the fast runtime changed on one model; ``describe()`` goes into every result."""

    head: ScreenedHead | None
    plan: KernelPlan | None  # float32 products (None with quantized weights)
    quantize: str | None
    native: bool  # layers run by models/native.py instead of `transformers`' forward

    def describe(self) -> str:
        parts = []
        if self.quantize:
            parts.append(f"{self.quantize} weights (fbgemm)")
        elif self.plan is not None:
            parts.append(f"float32 products by rows {self.plan.describe()}")
        if self.head is not None:
            parts.append("fp16-screened exact head")
        if self.native:
            parts.append("native decoder")
        return ", ".join(parts) or "eager"


def runtime_of(model: nn.Module) -> Runtime | None:
    return model.__dict__.get("specdecode_runtime")


@contextmanager
def eager_kernels(*models: nn.Module | None) -> Iterator[None]:
    """Run ``models`` with their own kernels and float32 weights — the runtime switched off —
    then switch it back on: `transformers`' peers, and the float32 reference of a
    reduced-precision run, compute exactly what the plain model computes."""
    saved = []
    for model in models:
        if model is None or runtime_of(model) is None:
            continue
        swapped = [(m, m.__class__) for m in model.modules() if isinstance(m, (TunedLinear, Fp16WeightLinear, Int8WeightLinear))]
        for module, _ in swapped:
            module.__class__ = nn.Linear
        saved.append((model, model.__dict__.pop("specdecode_runtime"), swapped))
    try:
        yield
    finally:
        for model, runtime, swapped in saved:
            for module, cls in swapped:
                module.__class__ = cls
            model.__dict__["specdecode_runtime"] = runtime


def prepare_runtime(
    model: nn.Module,
    quantize: str | None = None,
    kernels: str = "auto",
    plan_cache: Path | None = None,
    calibration_ids: Sequence[int] | None = None,
) -> Runtime | None:
    """Install the fast CPU runtime on ``model`` (in place): the kernels on float32 models, the
    native decoder (``models/native.py``) on supported architectures in any CPU dtype; None where
    nothing applies (CUDA, unsupported float64 architectures).

    ``kernels`` is ``"auto"`` (time the candidates, or reuse the plan stored in ``plan_cache``) or
    one of :data:`KERNELS` for every row count. ``calibration_ids`` (``quantize="int8"``): the
    tokens the static activation ranges are calibrated on (default: a fixed pseudo-random sequence).
    """
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise InvalidSettingError(f"unknown quantize choice {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")
    if kernels != "auto" and kernels not in KERNELS:
        raise InvalidSettingError(f"unknown kernel choice {kernels!r}; choose auto or one of {', '.join(KERNELS)}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if device.type != "cpu" or dtype != torch.float32 or not fbgemm_fp16_available():
        if quantize is not None:
            raise InvalidSettingError(f"quantize={quantize!r} needs a float32 model on a CPU with fbgemm")
        if device.type != "cpu" or not supports_native(model):
            return None
        runtime = Runtime(head=None, plan=None, quantize=None, native=True)  # any CPU dtype: fewer ops
        model.__dict__["specdecode_runtime"] = runtime
        return runtime
    head_module = model.get_output_embeddings()
    layers = [m for m in model.modules() if type(m) is nn.Linear and m is not head_module]
    plan = None
    if quantize == "fp16":
        for linear in layers:
            linear.__class__ = Fp16WeightLinear
            linear.packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach(), None)
    elif quantize == "int8":
        _install_int8(model, layers, calibration_ids)
    elif layers:
        plan = _install_tuned(layers, kernels, plan_cache)
    if supports_native(model):
        _fuse_projections(model)
    head = None
    if (getattr(model.config, "model_type", None) in _SCREENED_MODEL_TYPES and isinstance(head_module, nn.Linear)
            and hasattr(model, "base_model")):
        head = ScreenedHead(head_module.weight, head_module.bias,
                            getattr(model.config, "final_logit_softcapping", None))
    runtime = Runtime(head=head, plan=plan, quantize=quantize, native=supports_native(model))
    model.__dict__["specdecode_runtime"] = runtime
    return runtime


def _fuse_projections(model: nn.Module) -> None:
    """Give the native decoder one product for q/k/v and one for gate/up in every layer, each run by
    the same kind of kernel as its parts (the parts stay as they are: the state dict, the
    fingerprint and `transformers`' own forward see the original model).

    Only the float32 runtime's kernels are fused: their columns come out bit-identical to the
    parts' (tested), while e.g. MKL's float64 product rounds a wider matrix differently."""
    for layer in decoder_layers(model):
        for parts in projection_groups(layer).values():
            kind = type(parts[0])
            if kind not in (TunedLinear, Fp16WeightLinear, Int8WeightLinear) or any(
                    type(part) is not kind for part in parts):
                continue
            weight, bias = concatenated(parts)
            if kind is Int8WeightLinear:  # the parts share their input's quantisation; no float copy
                register_fused(parts, Int8Linear(weight, bias, parts[0].static))
                continue
            fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            fused.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                fused.bias = nn.Parameter(bias, requires_grad=False)
            fused.__class__ = kind
            if kind is Fp16WeightLinear:
                fused.packed = torch.ops.quantized.linear_prepack_fp16(weight, None)
            else:
                fused.plan = parts[0].plan
                fused.packed = None if parts[0].packed is None else torch.ops.mkldnn._reorder_linear_weight(weight, 8)
            register_fused(parts, fused)


def _install_int8(model: nn.Module, layers: list[nn.Linear], calibration_ids: Sequence[int] | None) -> None:
    """Per-channel int8 weights with smoothed, statically quantised inputs (``models/int8.py``),
    calibrated by one float32 forward over ``calibration_ids`` before any layer is swapped. A draft
    that cannot run before it is paired with its target is quantised per call instead (dynamic:
    a draft's numbers only have to be good guesses)."""
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
    for linear in layers:
        static = statistics_.static_activation(groups.get(linear, (linear,))) if linear in statistics_.low else None
        linear.__class__ = Int8WeightLinear
        linear.static = static
        linear.packed = pack_int8(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(),
                                  None if static is None else static.smooth)


def _install_tuned(layers: list[nn.Linear], kernels: str, plan_cache: Path | None) -> KernelPlan:
    pack = _onednn_available() and kernels in ("auto", "onednn")
    for linear in layers:
        linear.__class__ = TunedLinear
        # the hint 8 packs for a few rows: 1 row costs what MKL costs, 2–16 rows much less
        linear.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 8) if pack else None
    if kernels == "onednn" and not pack:
        raise InvalidSettingError("the oneDNN kernel is not available in this torch build")
    plan = KernelPlan(tuple(kernels for _ in ROW_BUCKETS)) if kernels != "auto" else _cached_plan(layers, plan_cache)
    for linear in layers:
        linear.plan = plan
        if "onednn" not in plan.kernels:
            linear.packed = None  # the packed copy is only worth its memory when it is used
    return plan
