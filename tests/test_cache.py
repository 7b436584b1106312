"""The KV cache must give exactly a fresh forward's logits after any sequence of crops."""

import random

import pytest
import torch

from specdecode.models.cache import KVCache
from specdecode.models.runner import Readout
from tiny_models import ARCHITECTURES, VOCAB, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_after_random_crops_match_fresh_forward(arch):
    loaded = tiny_model(arch)
    rng = random.Random(arch)
    kv = KVCache()
    sequence = [rng.randrange(VOCAB) for _ in range(5)]
    with torch.inference_mode():
        loaded.runner.forward(kv, sequence[:-1], Readout(rows=1)).logits
        # grow well past Gemma's sliding window (8), rejecting random "drafts" along the way
        while len(sequence) < 60:
            draft = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 6))]
            logits = loaded.runner.forward(kv, [sequence[-1], *draft], Readout(rows=len(draft) + 1)).logits
            full = loaded.model(torch.tensor([sequence + draft])).logits[0, -(len(draft) + 1):]
            torch.testing.assert_close(logits, full, rtol=1e-9, atol=1e-9)
            keep = rng.randint(0, len(draft))
            kv.crop(len(sequence) + keep)
            sequence += draft[:keep] + [rng.randrange(VOCAB)]


def test_sync_keeps_common_prefix():
    loaded = tiny_model("llama")
    kv = KVCache()
    with torch.inference_mode():
        loaded.runner.forward(kv, [1, 2, 3, 4, 5], Readout(rows=1)).logits
        assert kv.sync([1, 2, 9, 9]) == [9, 9]
        assert kv.token_ids == [1, 2]
        assert kv.cache.get_seq_length() == 2


def test_growing_layer_holds_what_concatenation_would():
    """Appends, crops, tree-style replacement and reset, against `transformers`' concatenating layer;
    and in steady state an append writes into the same buffer (no copy of the history)."""
    from transformers.cache_utils import DynamicLayer

    from specdecode.models.cache import GrowingLayer

    rng = random.Random(0)
    growing, reference = GrowingLayer(), DynamicLayer()
    for step in range(200):
        if step % 37 == 36:  # what keep_path does: new tensors instead of views of the buffer
            index = torch.tensor(sorted(rng.sample(range(growing.get_seq_length()), growing.get_seq_length() // 2)))
            for layer in (growing, reference):
                layer.keys, layer.values = layer.keys.index_select(-2, index), layer.values.index_select(-2, index)
        n = rng.choice([1, 1, 1, 4, 9, 300])
        keys, values = torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
        for got, want in zip(growing.update(keys, values), reference.update(keys, values)):
            assert torch.equal(got, want)
        cut = rng.randint(0, min(n, 6))
        if cut:
            growing.crop(-cut)
            reference.crop(-cut)
    growing.reset()
    assert growing.get_seq_length() == 0 and growing._key_buffer is None
    growing.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    buffer = growing._key_buffer.data_ptr()
    for _ in range(100):
        growing.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    assert growing._key_buffer.data_ptr() == buffer  # capacity 256: no reallocation
    kv = KVCache()
    kv.cache.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), 0)
    assert isinstance(kv.cache.layers[0], GrowingLayer)
