"""The native decoder (models/native.py) computes what `transformers` computes, and every
lossless method stays equal to `ar` with it: chains, trees, layer-skip and int8 self-drafts."""

import random

import pytest
import torch

from specdecode import SpeculativeDecoder
from specdecode.models.cache import KVCache
from specdecode.models.layer_skip import SkipSet
from specdecode.models.loading import LoadedModel
from specdecode.models.native import NativeDecoder
from specdecode.models.runner import Readout, TargetRunner
from specdecode.models.runtime import build_runtime
from tiny_models import VOCAB, tiny_model

NATIVE = ("llama", "qwen2", "gemma3")


def _native(arch: str, seed: int = 0, attention_kernel: str = "auto") -> LoadedModel:
    loaded = tiny_model(arch, seed=seed)
    runtime = build_runtime(loaded.model, attention_kernel=attention_kernel)
    assert runtime is not None and runtime.decoder is not None
    return LoadedModel(loaded.model, None, loaded.name, runtime=runtime)


@pytest.mark.parametrize("attention_kernel", ["torch", "chain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("arch", NATIVE)
def test_native_forward_equals_transformers(arch, dtype, attention_kernel):
    """Bit for bit for the Llama family in float32 and float64 (with MKL products and torch's
    attention, as `transformers` runs them); for Gemma 3, whose sliding layers read only their
    window, and with our float32 chain-attention kernel, up to the rounding of the attention sums;
    bf16 up to bf16 rounding (its attention in bf16: no kernel)."""
    model = tiny_model(arch, seed=1).model.to(dtype)
    runtime = build_runtime(model, kernels="mkl", attention="model", attention_kernel=attention_kernel)
    native, eager = TargetRunner(model, runtime), TargetRunner(model)
    assert native.native and not eager.native
    assert runtime.decoder.chain_kernel == (attention_kernel == "chain" and dtype == torch.float32)
    exact = dict(rtol=0, atol=0)
    if arch == "gemma3" or runtime.decoder.chain_kernel:
        exact = dict(rtol=1e-5, atol=1e-5) if dtype != torch.bfloat16 else dict(rtol=0.05, atol=0.05)
    context = [(7 * i + 3) % VOCAB for i in range(13)]  # past Gemma's window of 8
    skip = SkipSet.of(attention=[1], mlp=[0, 2])

    @torch.inference_mode()  # as decoding runs (the chain kernel has no backward: it runs with autograd off)
    def run(runner):
        kv = KVCache()
        out = [runner.forward(kv, context, Readout(rows=1))]
        for chunk in ([5], [6, 7, 8], [9] * 9):  # one token, a few, and a window's worth
            out.append(runner.forward(kv, chunk))
        out.append(runner.verify(kv, [1, 2, 3, 4, 5], [0, 0, 1, 1]))
        kv.crop(20)
        return [t for f in out for t in (f.logits, f.hidden)], [layer.keys for layer in kv.cache.layers]

    for fast, reference in ((native, eager), (native.skipping(skip), eager.skipping(skip))):
        (fast_out, fast_keys), (reference_out, reference_keys) = run(fast), run(reference)
        for a, b in zip(fast_out + fast_keys, reference_out + reference_keys):
            torch.testing.assert_close(a, b, **exact)


@pytest.mark.parametrize("attention_kernel", ["torch", "chain"])
@pytest.mark.parametrize("arch", NATIVE)
def test_lossless_methods_with_the_native_decoder_equal_ar(arch, attention_kernel):
    target = _native(arch, seed=2, attention_kernel=attention_kernel)
    draft = tiny_model(arch, seed=3)
    rng = random.Random(arch)
    plain = tiny_model(arch, seed=2)  # the same weights through `transformers`
    for _ in range(3):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 12))]
        max_new = rng.choice([5, 30])
        expected = SpeculativeDecoder(plain, "ar").generate(prompt, max_new_tokens=max_new).token_ids
        for method, options in (("ar", {}), ("pld", dict(gamma=rng.randint(2, 8))), ("sps", dict(draft=draft, gamma=3)),
                                ("ssd", dict(skip_attention=[1], skip_mlp=[2], max_draft=4)),
                                ("ssd", dict(skip_mlp=[0], int8=True))):
            result = SpeculativeDecoder(target, method, **options).generate(prompt, max_new_tokens=max_new)
            assert result.token_ids == expected, (method, options)


@pytest.mark.parametrize("quantize", [None, "fp16", "int8"])
def test_native_decoder_runs_the_fused_projections(quantize):
    """q/k/v and gate/up run as one product each (the parts are not called), with the same
    hidden states as the parts — on the target in every runtime mode and on an int8 self-draft."""
    model = tiny_model("llama", seed=4).model.float()
    runner = TargetRunner(model, build_runtime(model, quantize=quantize))
    context = [(5 * i + 1) % VOCAB for i in range(9)]
    for draft in (runner, runner.skipping(SkipSet.of(attention=[0]), int8=True),
                  runner.skipping(SkipSet.of(mlp=[1]), int8=True)):
        decoder = draft.decoder
        layer = decoder.module.model.layers[0]
        calls = []
        for part in (layer.self_attn.q_proj, layer.mlp.gate_proj):
            part.register_forward_hook(lambda *args: calls.append(1))
        fused = decoder(KVCache().cache, torch.tensor([context]), skip=draft.skip)
        assert not calls
        parts = NativeDecoder(decoder.module)(KVCache().cache, torch.tensor([context]), skip=draft.skip)
        assert calls and torch.equal(fused, parts)
        assert torch.equal(fused[0, -3:], draft.forward(KVCache(), context, Readout(rows=3)).hidden)
