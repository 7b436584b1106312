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
* **Skinny products** (float32, exact). For a handful of tokens, ``W @ xᵀ`` runs faster than
  ``x @ Wᵀ`` through MKL on AVX2-only CPUs (measured: 40 vs 65 ms for 5 tokens through the 18
  layers' linears, 2 threads).

and one that does (explicit, reported as another target): ``quantize="fp16"`` runs every linear
layer on float16 weights (fbgemm, float32 activations and accumulation).

Everything here is CPU-only; on CUDA the runtime stays off (cuBLAS serves these shapes well).
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specdecode.errors import InvalidSettingError

QUANTIZE_CHOICES = ("fp16",)
_SKINNY_ROWS = 16  # up to this many tokens a linear runs as W @ xᵀ
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


class SkinnyLinear(nn.Linear):
    """``nn.Linear`` computing few-row products as ``W @ xᵀ`` (same weights, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] > _SKINNY_ROWS:
            return F.linear(x, self.weight, self.bias)
        out = torch.mm(self.weight, rows.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


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

    def top(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        """Logits ``[n, V]``, exact wherever a row's top ``k`` can be, ``-inf`` elsewhere."""
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
    skinny: bool
    quantize: str | None

    def describe(self) -> str:
        parts = []
        if self.quantize:
            parts.append(f"{self.quantize} weights (fbgemm)")
        elif self.skinny:
            parts.append("float32 W@xT linears")
        if self.head is not None:
            parts.append("fp16-screened exact head")
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
        swapped = [(m, m.__class__) for m in model.modules() if isinstance(m, (SkinnyLinear, Fp16WeightLinear))]
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


def prepare_runtime(model: nn.Module, quantize: str | None = None) -> Runtime | None:
    """Install the fast CPU kernels on a float32 model (in place); None where they do not apply."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise InvalidSettingError(f"unknown quantize choice {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if device.type != "cpu" or dtype != torch.float32 or not fbgemm_fp16_available():
        if quantize is not None:
            raise InvalidSettingError(f"quantize={quantize!r} needs a float32 model on a CPU with fbgemm")
        return None
    head_module = model.get_output_embeddings()
    layers = [m for m in model.modules() if type(m) is nn.Linear and m is not head_module]
    for linear in layers:
        if quantize == "fp16":
            linear.__class__ = Fp16WeightLinear
            linear.packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach(), None)
        else:
            linear.__class__ = SkinnyLinear
    head = None
    if (getattr(model.config, "model_type", None) in _SCREENED_MODEL_TYPES and isinstance(head_module, nn.Linear)
            and hasattr(model, "base_model")):
        head = ScreenedHead(head_module.weight, head_module.bias,
                            getattr(model.config, "final_logit_softcapping", None))
    runtime = Runtime(head=head, skinny=quantize is None, quantize=quantize)
    model.__dict__["specdecode_runtime"] = runtime
    return runtime
