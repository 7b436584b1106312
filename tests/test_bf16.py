"""The bf16 fast runtime: tuned bf16 products and head, fused projections, the native decoder; and
``--dtype auto``, which times float32 against bf16 on the machine it runs on.

Exactness, stated per mode (as the README does): bf16 is a different target from float32, and
within bf16 a k-token forward is not bit-equal to k 1-token forwards: the bf16 kernels block the
inner dimension by row count for some shapes, and torch's bf16 ``scaled_dot_product_attention``
rounds a k-query call differently from k one-query calls at some context lengths (in `transformers`'
eager bf16 as much as in ours). So a lossless method on the bf16 target can part from bf16 ``ar``
at a near-tie — no more often than bf16 ``ar`` parts from float32 ``ar`` (tested below, as for
float16 weights in test_runtime.py). What is exact: with ``kernels="mkl"`` (``F.linear``, what
`transformers` calls) the bf16 runtime computes the eager bf16 forward bit for bit (Llama family).
"""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from specdecode import SpeculativeDecoder
from specdecode.errors import InvalidSettingError, ModelLoadError
from specdecode.models import row_kernels
from specdecode.models.cache import KVCache
from specdecode.models.loading import LoadedModel, load_model, resolve_dtype
from specdecode.models.layer_skip import SkipSet
from specdecode.models.native import NativeDecoder
from specdecode.models.runner import Readout, TargetRunner
from specdecode.models.heads import SCREENS, ScreenedHead, TunedHead, offered_screens
from specdecode.models.kernels import (BF16_KERNELS, COPIED, ROW_BUCKETS, KernelPlan, TunedLinear, exact_half_pack,
                                       tune_kernels, weight_copy)
from specdecode.models.runtime import build_runtime
from tiny_models import VOCAB, tiny_config

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the bf16 kernels need oneDNN")


def _tiny_bf16(arch: str, seed: int = 0, vocab: int = VOCAB, half_exact: bool = False) -> torch.nn.Module:
    """A tiny bf16 model; ``half_exact``: its weights rounded through float16 first (random weights
    have a few values below float16's range, which real checkpoints' bf16 weights do not)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab), dtype=torch.float32)
    model.generation_config.eos_token_id = None
    if half_exact:
        model = model.half()
    return model.to(torch.bfloat16).eval()


def test_every_bf16_kernel_computes_the_bf16_product():
    """Each candidate is the bf16 product within bf16 rounding of the exact one."""
    torch.manual_seed(0)
    weight = (torch.randn(96, 48) * 0.2).bfloat16()
    bias = torch.randn(96).bfloat16()
    copies = {kernel: weight_copy(kernel, weight) for kernel in COPIED}
    assert copies["fp16"] is not None  # bf16 values in float16's normal range convert exactly
    assert exact_half_pack(torch.tensor([[1e-30, 1.0]]).bfloat16()) is None  # below it they do not
    copies = {kernel: copy for kernel, copy in copies.items() if copy is not None}  # dpbf16: AVX-512 BF16 only
    with torch.inference_mode():
        for kernel in BF16_KERNELS:
            if kernel in COPIED and kernel not in copies:
                continue
            linear = TunedLinear(weight, bias, KernelPlan((kernel,) * 5), copies)
            for rows in (1, 3, 8, 16, 40):
                x = torch.randn(1, rows, 48).bfloat16()
                exact = x.double() @ weight.double().t() + bias.double()
                out = linear(x)
                assert out.dtype == torch.bfloat16 and out.shape == (1, rows, 96)
                torch.testing.assert_close(out.double(), exact, rtol=2 ** -7, atol=2 ** -7 * exact.abs().max().item())
    plan = tune_kernels([TunedLinear(weight, bias, KernelPlan(("mkl",) * 5), copies)])
    assert set(plan.kernels) <= set(BF16_KERNELS) and len(plan.measured_ms) == len(ROW_BUCKETS)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_bf16_runtime_tunes_products_and_head_and_leaves_the_model_alone(arch, tmp_path):
    model = _tiny_bf16(arch, seed=1)
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    types = [type(m) for m in model.modules()]
    plan = build_runtime(model, plan_cache=tmp_path / "plans.json")
    assert plan is not None and plan.quantize is None and plan.decoder is not None
    assert set(plan.kernels.kernels) <= set(BF16_KERNELS)
    if row_kernels.bf16_available():  # screened, candidates rescored on the row kernel
        assert isinstance(plan.head, ScreenedHead) and plan.head.bf16 and set(plan.head.plan.kernels) <= set(SCREENS)
        assert "screened exact bf16 head" in plan.describe()
    else:
        assert isinstance(plan.head, TunedHead) and set(plan.head.plan.kernels) <= set(BF16_KERNELS)
        assert "bf16 head by rows" in plan.describe()
    assert "bfloat16 products" in plan.describe()
    assert any(isinstance(m, TunedLinear) for m in plan.model.modules())
    assert [type(m) for m in model.modules()] == types  # the loaded model keeps its own modules
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == before
    stored = json.loads((tmp_path / "plans.json").read_text())
    assert len(stored) == 2 and all("|bfloat16|" in key or "|bf16-target" in key for key in stored)  # layers, head
    with pytest.raises(InvalidSettingError, match="not a bf16 kernel"):
        build_runtime(model, kernels="wxt")


def test_naming_a_kernel_that_cannot_run_here_gets_one_line():
    model = AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB), dtype=torch.float32).eval()
    for kernels in ("fp16", "dpbf16"):
        with pytest.raises(InvalidSettingError, match=f"the {kernels} kernel cannot run here"):
            build_runtime(model, kernels=kernels)


@pytest.mark.parametrize("kernels, attention", [("mkl", "model"), ("onednn", "auto"), ("mkl", "float32"), ("fp16", "auto"),
                                                ("dpbf16", "auto")])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_bf16_fast_runtime_computes_the_bf16_eager_forward(arch, kernels, attention):
    """With ``F.linear`` products and bf16 attention the Llama family bit for bit (the same
    products, norms and attention in fewer ops); otherwise (oneDNN's prepacked products, float32
    attention — one rounding instead of bf16's —, Gemma 3's sliding layers reading only their
    window) as close to the same weights' float64 forward as `transformers`' bf16 is."""
    if kernels == "dpbf16" and not row_kernels.bf16_available():
        pytest.skip("needs AVX-512 BF16 and a C compiler")
    model = _tiny_bf16(arch, seed=2, half_exact=kernels == "fp16")
    plan = build_runtime(model, kernels=kernels, attention=attention)
    assert (plan.decoder.attention_dtype == torch.float32) == ("float32 attention" in plan.describe())
    if attention != "auto":
        assert plan.decoder.attention_dtype == (torch.float32 if attention == "float32" else None)
    fast, eager = TargetRunner(model, plan), TargetRunner(model)
    exact = (kernels, attention, arch) in (("mkl", "model", "llama"), ("mkl", "model", "qwen2"))
    context = [(7 * i + 3) % VOCAB for i in range(13)]

    @torch.inference_mode()
    def run(runner):
        kv = KVCache()
        out = [runner.forward(kv, context, Readout(rows=1))]
        for chunk in ([5], [6, 7, 8], [9] * 9):
            out.append(runner.forward(kv, chunk, Readout(top_k=1)))
        return [t for f in out for t in (f.logits, f.hidden)]

    truth = run(TargetRunner(_tiny_bf16(arch, seed=2, half_exact=kernels == "fp16").double()))  # float64 arithmetic
    fast_out, eager_out = run(fast), run(eager)
    if exact:
        assert all(torch.equal(a, b) for a, b in zip(fast_out, eager_out))
    else:  # over every logit and hidden state the forwards produce (one tensor's error is noisy)
        error = sum(float((a.double() - c).norm() ** 2) for a, c in zip(fast_out, truth)) ** 0.5
        eager_error = sum(float((b.double() - c).norm() ** 2) for b, c in zip(eager_out, truth)) ** 0.5
        assert error <= 1.5 * eager_error, (error, eager_error)


@pytest.mark.skipif(not row_kernels.bf16_available(), reason="needs AVX-512 BF16 and a C compiler")
@pytest.mark.parametrize("screen", offered_screens())
def test_screened_bf16_head_gives_the_bf16_logits_of_its_full_product(screen):
    """Every value a top-k consumer reads equals the full bf16 product's, bit for bit, for any row
    count; the argmax too where two columns tie in bf16 (the first wins, as over the full row)."""
    torch.manual_seed(9)
    weight = (torch.randn(3_000, 64) * 0.1).bfloat16()
    weight[1:60] = (weight[0].float() * (1 + torch.randn(59, 1) * 2e-3)).bfloat16()  # within bf16's rounding
    bias = (torch.randn(3_000) * 0.5).bfloat16()
    head = ScreenedHead(weight, bias, softcap=None, screens=screen)
    hidden = (torch.randn(9, 64) * 20).bfloat16().float()
    hidden[:5] = weight[0].float() * 300
    full = head.full(hidden)
    for k in (1, 10):
        out = head.top(hidden, k)
        top = torch.topk(full, k, dim=1)
        assert torch.equal(out.gather(1, top.indices), top.values), k
        assert torch.equal(torch.topk(out, k, dim=1).values, top.values), k
        assert torch.equal(out.argmax(1), full.argmax(1)), k
        alone = torch.cat([head.top(hidden[i:i + 1], k) for i in range(9)])
        assert torch.equal(alone.gather(1, top.indices), top.values), k


@pytest.mark.skipif(not row_kernels.bf16_available(), reason="needs AVX-512 BF16 and a C compiler")
def test_screened_bf16_head_keeps_a_column_its_rounding_ties_with_the_best():
    """Column 1's float32 sum exceeds column 0's by 2⁻⁹, and both round to 1.0 in bf16: the bf16
    argmax is column 0 (the first of a tie), which only the bound's bf16 rounding term keeps."""
    weight = torch.zeros(500, 64)
    weight[2:] = torch.randn(498, 64) * 0.01
    weight[0, 0] = weight[1, 0] = weight[1, 1] = 1.0
    hidden = torch.zeros(1, 64)
    hidden[0, 0], hidden[0, 1] = 1.0, 2.0**-9
    head = ScreenedHead(weight.bfloat16(), None, softcap=None, screens="dpbf16")
    full = head.full(hidden)
    assert full[0, 0] == full[0, 1] == 1.0 and int(full.argmax()) == 0
    assert int(head.top(hidden, 1).argmax()) == 0


def test_bf16_fused_projections_equal_their_parts():
    model = _tiny_bf16("llama", seed=4)
    runner = TargetRunner(model, build_runtime(model, kernels="onednn"))
    decoder = runner.decoder
    context = torch.tensor([[(5 * i + 1) % VOCAB for i in range(9)]])
    layer = decoder.module.model.layers[0]
    calls = []
    layer.self_attn.q_proj.register_forward_hook(lambda *args: calls.append(1))
    fused = decoder(KVCache().cache, context)
    assert not calls
    parts = NativeDecoder(decoder.module)(KVCache().cache, context)
    assert calls
    torch.testing.assert_close(fused, parts, rtol=0.05, atol=0.05)


def test_speculation_on_the_bf16_runtime_adds_no_divergence_beyond_bf16_ar():
    """bf16 parts greedy outputs from float32 ``ar`` at near-ties; lossless methods on the bf16
    runtime may part from its own ``ar`` (attention rounding, see the module docstring), but not
    measurably more often than bf16 ``ar`` parts from float32 ``ar``."""
    fp32_model = _tiny_bf16("llama", seed=8, vocab=509).float()
    fp32 = LoadedModel(fp32_model, None, "fp32")
    model = _tiny_bf16("llama", seed=8, vocab=509)
    bf16 = LoadedModel(model, None, "bf16", runtime=build_runtime(model))
    rng = random.Random(0)
    prompts = [[rng.randrange(509) for _ in range(rng.randint(3, 10))] for _ in range(30)]
    reference, own_ar = SpeculativeDecoder(fp32, "ar"), SpeculativeDecoder(bf16, "ar")
    contenders = {"pld": SpeculativeDecoder(bf16, "pld", gamma=6), "sps": SpeculativeDecoder(bf16, "sps", draft=fp32, gamma=4)}
    base, parted = 0, dict.fromkeys(contenders, 0)
    for prompt in prompts:
        bf16_ar = own_ar.generate(prompt, max_new_tokens=30).token_ids
        base += bf16_ar != reference.generate(prompt, max_new_tokens=30).token_ids
        for name, decoder in contenders.items():
            parted[name] += decoder.generate(prompt, max_new_tokens=30).token_ids != bf16_ar
    n = len(prompts)
    slack = 3 * max(1.0, (base * (1 - base / n)) ** 0.5)
    assert base > 0  # bf16 is another target: the test has divergence to compare against
    for name in contenders:
        assert parted[name] <= base + slack, (parted, base)


def test_dtype_auto_is_chosen_by_timing_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDECODE_CACHE", str(tmp_path / "cache"))
    directory = tmp_path / "model"
    _tiny_bf16("llama", seed=6).float().save_pretrained(directory)
    auto = load_model(str(directory), dtype="auto")
    choices = json.loads((tmp_path / "cache" / "dtype-choices.json").read_text())
    (key, entry), = choices.items()
    assert set(entry["ms"]) == {"float32", "bfloat16"} and all(ms > 0 for ms in entry["ms"].values())
    assert entry["dtype"] == min(entry["ms"], key=entry["ms"].get)  # the faster one, as measured
    assert str(next(auto.model.parameters()).dtype) == f"torch.{entry['dtype']}"
    assert auto.runner.describe().startswith(f"dtype auto: {entry['dtype']}")
    assert auto.fingerprint == load_model(str(directory)).fingerprint
    other = "float32" if entry["dtype"] == "bfloat16" else "bfloat16"
    (tmp_path / "cache" / "dtype-choices.json").write_text(json.dumps({key: {**entry, "dtype": other}}))
    again = load_model(str(directory), dtype="auto")  # read from the cache, not measured again
    assert str(next(again.model.parameters()).dtype) == f"torch.{other}" and "cached" in again.runner.describe()
    quantized = load_model(str(directory), dtype="auto", quantize="fp16")  # quantized weights are float32's
    assert next(quantized.model.parameters()).dtype == torch.float32


def test_dtype_names_the_machine_cannot_run_get_one_line():
    for bad in ("int4", "bf8", "float8"):
        with pytest.raises(ModelLoadError) as info:
            resolve_dtype(bad, torch.device("cpu"))
        message = str(info.value)
        assert "\n" not in message and "float32" in message and "bfloat16" in message and "auto" in message
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("auto") == torch.float32


class _UpcastAtAttention(NativeDecoder):
    """The decoder as it was before the cache kept upcast keys: the cache in the model's dtype, its
    whole history upcast at every attention call."""

    def store(self, cache, k, v, index):
        return cache.update(k, v, index)

    def store_placeholder(self, cache, index, layer, n, like):
        placeholder = like.new_zeros(1, layer.kv_heads, n, layer.head_dim)
        cache.update(placeholder, placeholder, index)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_upcast_attention_keeps_the_cache_upcast_with_the_same_floats(arch):
    """With float32 attention the bf16 decoder keeps its keys and values upcast (made once a token,
    not for the whole history at every step): the same hidden states bit for bit, for the target's
    chains and trees and for an int8 self-draft sharing its cache (which must attend as the target
    does, and not make the shared cache reallocate at every step)."""
    model = _tiny_bf16(arch, seed=5, half_exact=True)
    plan = build_runtime(model, attention="float32")
    decoder = plan.decoder
    old = _UpcastAtAttention(decoder.module, attention_dtype=torch.float32)
    old.layers = decoder.layers  # the same fused products
    context = torch.tensor([[(11 * i + 2) % VOCAB for i in range(21)]])

    @torch.inference_mode()
    def run(dec):
        cache = KVCache().cache
        out = [dec(cache, context)]
        for ids in ([[4]], [[5, 6, 7]], [[8]]):
            out.append(dec(cache, torch.tensor(ids)))
        positions = torch.tensor([[cache.get_seq_length()] * 2])  # two siblings: a tree level
        out.append(dec(cache, torch.tensor([[9, 10]]), positions, torch.ones(1, 1, 2, cache.get_seq_length() + 2,
                                                                            dtype=torch.bool)))
        out.append(dec(cache, torch.tensor([[3, 1]]), skip=SkipSet.of([1], [0], layers=len(dec.layers))))
        return out, cache

    new_out, cache = run(decoder)
    old_out, old_cache = run(old)
    assert all(torch.equal(a, b) for a, b in zip(new_out, old_out))
    assert all(layer.keys.dtype == torch.float32 for layer in cache.layers)
    assert all(torch.equal(a.keys, b.keys.float()) for a, b in zip(cache.layers, old_cache.layers))

    runner = TargetRunner(model, plan)
    draft = runner.skipping(SkipSet.of([1], [], layers=len(decoder.layers)), int8=True)
    assert draft.decoder.attention_dtype == torch.float32
    with torch.inference_mode():
        kv = runner.new_cache()
        runner.forward(kv, context[0].tolist(), Readout.hidden_only())
        buffer = kv.cache.layers[0]._key_buffer.data_ptr()
        for _ in range(3):
            draft.forward(kv, [5, 6], Readout.hidden_only())
            kv.crop(21)
            runner.forward(kv, [5], Readout(top_k=1))
            kv.crop(21)
        assert kv.cache.layers[0]._key_buffer.data_ptr() == buffer
