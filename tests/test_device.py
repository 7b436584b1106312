"""The device-parametrised part of the suite: what `scripts/gpu_check.sh` runs on a CUDA machine.

On a CPU-only machine only the ``cpu`` cases run; with CUDA present the same checks run there, in
float32 (exact: lossless methods equal ar) and in bfloat16 (reduced precision: checked to run and
to agree with ar on most tokens, never required to be identical).
"""

import pytest
import torch

from specdecode import SpeculativeDecoder
from tiny_models import perturbed_copy, tiny_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _on(loaded, device: str, dtype: torch.dtype):
    loaded.model.to(device=device, dtype=dtype)
    return loaded


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_lossless_methods_equal_ar_on_device(device, arch):
    target = _on(tiny_model(arch, seed=1, vocab=211), device, torch.float32)
    draft = _on(perturbed_copy(tiny_model(arch, seed=1, vocab=211), 0.05), device, torch.float32)
    prompt = [5, 9, 13, 5, 9, 13, 2]
    expected = SpeculativeDecoder(target, "ar").generate(prompt, max_new_tokens=24).token_ids
    for decoder in (SpeculativeDecoder(target, "pld"), SpeculativeDecoder(target, "sps", draft=draft, gamma=3),
                    SpeculativeDecoder(target, "ssd", skip_mlp=[1]),
                    SpeculativeDecoder(target, "mtad", draft=draft, beams=2, gamma=3)):
        assert decoder.generate(prompt, max_new_tokens=24).token_ids == expected, decoder.method


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_runs_in_bfloat16_on_device(device):
    target = _on(tiny_model("llama", seed=2, vocab=211), device, torch.bfloat16)
    draft = _on(perturbed_copy(tiny_model("llama", seed=2, vocab=211), 0.05), device, torch.bfloat16)
    settings = dict(max_new_tokens=16, temperature=1.0, top_k=10, top_p=0.9, seed=0)
    for method, options in (("ar", {}), ("sps", dict(draft=draft)), ("mtad", dict(draft=draft))):
        result = SpeculativeDecoder(target, method, **options).generate([1, 2, 3], **settings)
        assert len(result.token_ids) == 16 and all(0 <= t < 211 for t in result.token_ids)
