"""The native decoder (models/native.py) computes what `transformers` computes, and every
lossless method stays equal to `ar` with it: chains, trees, layer-skip and int8 self-drafts."""

import random

import pytest
import torch

from specdecode import SpeculativeDecoder
from specdecode.models import fused as fused_registry
from specdecode.models.cache import KVCache, forward_with_hidden
from specdecode.models.layer_skip import SkipSet, layer_skip_view
from specdecode.models.loading import LoadedModel
from specdecode.models.runtime import prepare_runtime, runtime_of
from specdecode.models.tree import forward_candidates
from tiny_models import VOCAB, tiny_model

NATIVE = ("llama", "qwen2", "gemma3")


def _native(arch: str, seed: int = 0) -> LoadedModel:
    loaded = tiny_model(arch, seed=seed)
    assert prepare_runtime(loaded.model) is not None and runtime_of(loaded.model).native
    return loaded


def _both(model: torch.nn.Module, fn):
    """``fn()`` through the native decoder and through `transformers` (runtime off)."""
    native = fn()
    runtime = model.__dict__.pop("specdecode_runtime")
    try:
        return native, fn()
    finally:
        model.__dict__["specdecode_runtime"] = runtime


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("arch", NATIVE)
def test_native_forward_equals_transformers(arch, dtype):
    """Bit for bit for the Llama family in float32 and float64 (with MKL products, as
    `transformers` runs them); for Gemma 3, whose sliding layers read only their window, up to the
    rounding of a shorter attention sum; bf16 up to bf16 rounding."""
    model = tiny_model(arch, seed=1).model.to(dtype)
    prepare_runtime(model, kernels="mkl")
    exact = dict(rtol=0, atol=0)
    if arch == "gemma3":
        exact = dict(rtol=1e-5, atol=1e-5) if dtype != torch.bfloat16 else dict(rtol=0.05, atol=0.05)
    context = [(7 * i + 3) % VOCAB for i in range(13)]  # past Gemma's window of 8
    for view in (model, layer_skip_view(model, SkipSet.of(attention=[1], mlp=[0, 2]))):
        def run(view=view):
            kv = KVCache()
            out = [forward_with_hidden(view, kv, context, 1)]
            for chunk in ([5], [6, 7, 8], [9] * 9):  # one token, a few, and a window's worth
                out.append(forward_with_hidden(view, kv, chunk, len(chunk)))
            tree = forward_candidates(view, kv, [1, 2, 3, 4, 5], [0, 0, 1, 1])
            kv.crop(20)
            return [t for pair in [*out, tree] for t in pair], [layer.keys for layer in kv.cache.layers]
        (native, native_keys), (reference, reference_keys) = _both(model, run)
        for a, b in zip(native + native_keys, reference + reference_keys):
            torch.testing.assert_close(a, b, **exact)


@pytest.mark.parametrize("arch", NATIVE)
def test_lossless_methods_with_the_native_decoder_equal_ar(arch):
    target = _native(arch, seed=2)
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


def _without_fusion(fn):
    """``fn()`` with every fused projection unregistered: the parts run one by one."""
    saved = dict(fused_registry._FUSED)
    fused_registry._FUSED.clear()
    try:
        return fn()
    finally:
        fused_registry._FUSED.update(saved)


@pytest.mark.parametrize("quantize", [None, "fp16", "int8"])
def test_native_decoder_runs_the_fused_projections(quantize):
    """q/k/v and gate/up run as one product each (the parts are not called), with the same
    hidden states as the parts — on the target in every runtime mode and on an int8 self-draft."""
    loaded = tiny_model("llama", seed=4)
    loaded.model.float()
    prepare_runtime(loaded.model, quantize=quantize)
    context = [(5 * i + 1) % VOCAB for i in range(9)]
    for view in (loaded.model, layer_skip_view(loaded.model, SkipSet.of(attention=[0]), int8=True),
                 layer_skip_view(loaded.model, SkipSet.of(mlp=[1]), int8=True)):
        layer = view.model.layers[0]
        calls = []
        for part in (getattr(layer.self_attn, "q_proj", None), layer.mlp.gate_proj):
            if part is not None:
                part.register_forward_hook(lambda *args: calls.append(1))
        fused = forward_with_hidden(view, KVCache(), context, 3)[1]
        assert not calls
        parts = _without_fusion(lambda: forward_with_hidden(view, KVCache(), context, 3)[1])
        assert calls and torch.equal(fused, parts)
