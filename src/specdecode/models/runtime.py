"""The fast CPU runtime: how one model runs a decoding step on a CPU, built at load time.

:func:`build_runtime` puts together, for a float32 model: every linear layer on the product
kernel timed fastest per row count (``models/kernels.py``), q/k/v and gate/up fused, the native
decoder (``models/native.py``), and the screened exact LM head (``models/heads.py``). All of it
is exact: float32 speculation stays lossless.

On a bf16 model (``--dtype bfloat16``, or ``auto`` where it measures faster) the same seam runs
the bf16 target: every linear layer and the LM head on the kernel that is fastest for the row
count (timed at load, cached as float32's plans are: ``F.linear`` or oneDNN on a weight
prepacked for bf16 — on AVX-512 BF16 / AMX these run the native bf16 dot products —, fbgemm's
float16 kernel on an exact float16 copy of the bf16 weights, or our AVX-512 BF16 row kernel,
``models/row_kernels.py``), fused q/k/v and gate/up products, the native decoder, and attention
on float32 upcasts where a load-time timing finds torch's bf16 attention slower. Where the row
kernel runs, the head is screened like float32's and its candidates rescored on that kernel (the
bf16 target's logits exactly); elsewhere it is a tuned bf16 product read whole. The bf16 kernels
accumulate in float32 and round each output once; oneDNN's and fbgemm's blocking over the inner
dimension depends on the row count for some shapes (e.g. 640×2048 at ≥ 5 rows on AVX-512 BF16),
so a k-token bf16 verification can round differently from k 1-token steps, as `transformers`'
own bf16 does; the row kernel sums each row alike at any row count, so where it is chosen for
every row count only attention still rounds a k-token step unlike k 1-token ones.

Two runtimes do change the target (explicit, reported as another target): ``quantize="fp16"``
runs every linear layer on float16 weights (fbgemm, float32 activations and accumulation);
``quantize="int8"`` on per-channel int8 weights with smoothed activations on a calibrated static
int8 grid (fbgemm: half fp16's bytes; each row quantised on its own, so speculation stays
lossless on that target — see ``models/int8.py``). The LM head stays screened-exact in both.

Nothing here changes the loaded model: :func:`build_runtime` returns a :class:`RuntimePlan` whose
faster modules are new objects built at load time over the same weight tensors (a shallow copy
of the module tree where a product kernel changes), and the model's runner
(``models/runner.py``) runs that plan — or, in its eager mode, the untouched model.

Everything here is CPU-only; on CUDA the runtime stays off (cuBLAS serves these shapes well).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specdecode.errors import InvalidSettingError
from specdecode.models.families import decoder_layers, family_or_none, runs_natively
from specdecode.models.fused import concatenated, projection_groups
from specdecode.models.heads import ScreenedHead, TunedHead, bf16_head_screens
from specdecode.models.int8 import InputStatistics, Int8Linear
from specdecode.models.int8 import calibration_ids as calibration_token_ids
from specdecode.models.kernels import (BF16_KERNELS, KERNELS, KernelPlan, Fp16WeightLinear, Int8WeightLinear, TunedLinear,
                                       fbgemm_fp16_available, tuned_linears, weight_copy)
from specdecode.models import row_kernels
from specdecode.models.machine import cpu_description
from specdecode.models.layer_skip import shallow_replace
from specdecode.models.native import FusedGroup, NativeDecoder
from specdecode.models.vocab_map import awaits_target_embedding

QUANTIZE_CHOICES = ("fp16", "int8")
ATTENTION_CHOICES = ("auto", "float32", "model")  # the bf16 runtime's attention dtype
ATTENTION_KERNELS = ("auto", "chain", "torch")  # chain rows' float32 attention: ours (timed), ours, torch's
def auto_dtype(device: torch.device) -> torch.dtype:
    """The fastest format the device runs natively: bf16 on CUDA and on CPUs with AVX-512 BF16 /
    AMX, float32 elsewhere (an AVX2-only CPU emulates bf16 products: slower, not faster)."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_description()["native_bf16"] else torch.float32


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
    chosen_by: str = ""  # how the dtype (a draft: its weights) was chosen, where a timing chose it

    def describe(self) -> str:
        parts = [self.chosen_by] if self.chosen_by else []
        if self.quantize:
            parts.append(f"{self.quantize} weights (fbgemm)")
        elif self.kernels is not None:
            dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
            parts.append(f"{dtype} products by rows {self.kernels.describe()}")
        if self.head is not None:
            parts.append(self.head.describe())
        if self.decoder is not None and self.decoder.attention_dtype is not None:
            parts.append("float32 attention")
        if self.decoder is not None and self.decoder.chain_kernel:
            parts.append("chain attention kernel")
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
    attention_kernel: str = "auto",
) -> RuntimePlan | None:
    """The fast CPU runtime of ``model`` (which it leaves as it is): the kernels on float32 and bf16
    models, the native decoder (``models/native.py``) on supported families in any CPU dtype; None
    where nothing applies (CUDA, unsupported float64 architectures).

    ``kernels`` is ``"auto"`` (time the candidates, or reuse the plan stored in ``plan_cache``) or
    one of :data:`KERNELS` for every row count. ``calibration_ids`` (``quantize="int8"``): the
    tokens the static activation ranges are calibrated on (default: a fixed pseudo-random sequence).
    ``attention`` (bf16 models): ``"auto"`` upcasts attention to float32 where a timing at load
    finds it faster, ``"float32"`` always, ``"model"`` never (the model's own dtype, as
    `transformers` runs it). ``attention_kernel``: how chain rows attend where attention runs in
    float32 — ``"chain"`` our kernel (``row_kernels.chain_attention``), ``"torch"`` torch's SDPA a
    request at a time, ``"auto"`` ours where a timing at load finds it faster (:func:`chain_kernel_pays`).
    """
    if attention_kernel not in ATTENTION_KERNELS:
        raise InvalidSettingError(f"unknown attention kernel {attention_kernel!r}; choose one of "
                                  f"{', '.join(ATTENTION_KERNELS)}")
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
        return _bf16_runtime(model, kernels, plan_cache, native, attention, attention_kernel)
    if device.type != "cpu" or dtype != torch.float32 or not fbgemm_fp16_available():
        if quantize is not None:
            raise InvalidSettingError(f"quantize={quantize!r} needs a float32 model on a CPU with fbgemm")
        if device.type != "cpu" or not native:
            return None
        return RuntimePlan(model, head=None, kernels=None, quantize=None,  # fewer ops
                           decoder=NativeDecoder(model, chain_kernel=_chain_kernel(model, attention_kernel, dtype)))
    head_module = model.get_output_embeddings()
    linears = [m for m in model.modules() if type(m) is nn.Linear and m is not head_module]
    plan = None
    replacements: dict[nn.Module, nn.Module]
    if quantize == "fp16":
        replacements = {linear: Fp16WeightLinear(linear.weight, linear.bias) for linear in linears}
    elif quantize == "int8":
        replacements = _int8_linears(model, linears, calibration_ids)
    else:
        plan, replacements = tuned_linears(linears, kernels, plan_cache)
    fast = shallow_replace(model, replacements)
    head = None
    if family_or_none(model) is not None and isinstance(head_module, nn.Linear) and hasattr(model, "base_model"):
        head = ScreenedHead(head_module.weight, head_module.bias,
                            getattr(model.config, "final_logit_softcapping", None), plan_cache=plan_cache)
    decoder = NativeDecoder(fast, _fused_projections(fast), chain_kernel=_chain_kernel(model, attention_kernel)) \
        if native else None
    return RuntimePlan(fast, head=head, kernels=plan, quantize=quantize, decoder=decoder)


def _bf16_runtime(model: nn.Module, kernels: str, plan_cache: Path | None, native: bool,
                  attention: str, attention_kernel: str) -> RuntimePlan:
    """The bf16 target's runtime: tuned bf16 products (fused where the native decoder runs), the
    head screened and its candidates rescored on the row kernel where that runs (the bf16 logits
    of that kernel, exactly; ``heads.ScreenedHead``) or else a tuned bf16 product of its own, the
    native decoder, attention upcast to float32 where that is faster (``attention="auto"``,
    timed) or asked for (``"float32"``)."""
    if kernels == "wxt":
        raise InvalidSettingError(f"kernel 'wxt' is not a bf16 kernel; choose auto or one of {', '.join(BF16_KERNELS)}")
    head_module = model.get_output_embeddings()
    linears = [m for m in model.modules() if type(m) is nn.Linear and m is not head_module]
    plan, replacements = tuned_linears(linears, kernels, plan_cache)
    fast = shallow_replace(model, replacements)
    head = None
    if family_or_none(model) is not None and type(head_module) is nn.Linear and hasattr(model, "base_model"):
        softcap = getattr(model.config, "final_logit_softcapping", None)
        if kernels == "auto" and bf16_head_screens(head_module.weight, softcap):
            head = ScreenedHead(head_module.weight, head_module.bias, None, plan_cache=plan_cache)
        else:
            _, tuned = tuned_linears([head_module], kernels, plan_cache)
            head = TunedHead(tuned[head_module], softcap)
    wide_attention = attention == "float32" or (attention == "auto" and native and upcast_attention_pays(model))
    decoder = None
    if native:
        decoder = NativeDecoder(fast, _fused_projections(fast), torch.float32 if wide_attention else None,
                                _chain_kernel(model, attention_kernel, torch.float32 if wide_attention else torch.bfloat16))
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

    times = _timed_in_turns({"own": own, "wide": wide}, repeats)
    return times["wide"] < times["own"]


def _chain_kernel(model: nn.Module, choice: str, attention_dtype: torch.dtype = torch.float32) -> bool:
    """Whether the native decoder's chain rows attend through our kernel (float32 attention only)."""
    if attention_dtype != torch.float32 or choice == "torch" or not row_kernels.chain_attention_available():
        return False
    return choice == "chain" or chain_kernel_pays(model)


def chain_kernel_pays(model: nn.Module, context: int = 256, repeats: int = 10) -> bool:
    """Whether our chain-attention kernel beats torch's SDPA on this model's head shapes, timed here
    (a few ms): one query row of one request and of four, over ``context`` keys each, as a decode
    step attends in one layer. Torch's CPU attention costs ~40-100 µs a call however small the
    work, called once a request; the kernel runs every request in one call (docs/perf.md, stop 32)."""
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    heads, kv_heads = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    scale = head_dim ** -0.5
    totals = {"torch": 0.0, "ours": 0.0}
    for requests in (1, 4):
        q = torch.randn(1, heads, requests, head_dim)
        keys = [torch.randn(1, kv_heads, context, head_dim) for _ in range(requests)]
        values = [torch.randn(1, kv_heads, context, head_dim) for _ in range(requests)]

        def torch_sdpa() -> None:
            for r in range(requests):
                F.scaled_dot_product_attention(q[:, :, r:r + 1], keys[r], values[r], scale=scale, enable_gqa=True)

        def ours() -> None:
            row_kernels.chain_attention(q, keys, values, [1] * requests, None, scale)

        for name, seconds in _timed_in_turns({"torch": torch_sdpa, "ours": ours}, repeats).items():
            totals[name] += seconds
    return totals["ours"] < totals["torch"]


def _timed_in_turns(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Each step's best time for ``repeats`` calls, the steps taking turns twice (one untimed call
    before each timing), in inference mode: a load-time choice between two ways of one computation."""
    times: dict[str, float] = {}
    with torch.inference_mode():
        for _ in range(2):
            for name, step in steps.items():
                step()
                start = time.perf_counter()
                for _ in range(repeats):
                    step()
                times[name] = min(times.get(name, float("inf")), time.perf_counter() - start)
    return times


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
                fused[index, name] = TunedLinear(weight, bias, parts[0].plan,
                                                 {k: weight_copy(k, weight) for k in parts[0].copies})
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


