"""One table of model families (models/families.py): every entry decodes losslessly on the fast
runtime and eagerly, self-drafts included; a model outside the table still decodes on the plain
`transformers` path, and what needs the layout refuses it in one line naming the families."""

import random

import pytest
import torch

from specdecode import SpeculativeDecoder
from specdecode.errors import InvalidSettingError
from specdecode.models.families import FAMILIES, family_or_none
from specdecode.models.loading import LoadedModel
from specdecode.models.runtime import build_runtime
from tiny_models import ARCHITECTURES, OTHER_FAMILIES, UNSUPPORTED, VOCAB, tiny_model

TYPES = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text", "gpt2": "gpt2", "qwen3": "qwen3",
         "mistral": "mistral"}


def test_every_family_in_the_table_has_a_tiny_test_model():
    assert set(FAMILIES) == {TYPES[arch] for arch in (*ARCHITECTURES, *OTHER_FAMILIES)}
    for arch in (*ARCHITECTURES, *OTHER_FAMILIES):
        assert family_or_none(tiny_model(arch).model) is FAMILIES[TYPES[arch]]


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("arch", OTHER_FAMILIES)
def test_the_other_families_decode_losslessly(arch, fast):
    loaded = tiny_model(arch, seed=2)
    model = loaded.model.float() if fast else loaded.model
    target = LoadedModel(model, None, loaded.name, runtime=build_runtime(model) if fast else None)
    draft = tiny_model(arch, seed=3)
    if fast:
        draft.model.float()
    rng = random.Random(arch)
    for _ in range(2):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 12))]
        expected = SpeculativeDecoder(target.eager(), "ar").generate(prompt, max_new_tokens=20).token_ids
        for method, options in (("ar", {}), ("pld", dict(gamma=4)), ("sps", dict(draft=draft, gamma=3)),
                                ("ssd", dict(skip_attention=[1], skip_mlp=[2], max_draft=4))):
            result = SpeculativeDecoder(target, method, **options).generate(prompt, max_new_tokens=20)
            assert result.token_ids == expected, (method, fast)


def test_a_model_outside_the_table_decodes_and_self_drafting_names_the_families():
    loaded = tiny_model(UNSUPPORTED, seed=1)
    model = loaded.model.float()
    assert family_or_none(model) is None
    fast = LoadedModel(model, None, "tiny-opt", runtime=build_runtime(model))
    assert fast.runtime is not None and fast.runtime.decoder is None and fast.runtime.head is None
    prompt = [5, 6, 7, 5, 6, 7, 5]
    expected = SpeculativeDecoder(fast.eager(), "ar").generate(prompt, max_new_tokens=16).token_ids
    for method in ("ar", "pld"):
        assert SpeculativeDecoder(fast, method).generate(prompt, max_new_tokens=16).token_ids == expected
    with pytest.raises(InvalidSettingError, match="supported families: Gemma 3") as info:
        SpeculativeDecoder(fast, "ssd")
    assert "\n" not in str(info.value) and "'opt'" in str(info.value)
    with torch.inference_mode():
        assert torch.equal(model(torch.tensor([prompt])).logits, loaded.model(torch.tensor([prompt])).logits)
