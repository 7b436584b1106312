"""The KV cache must give exactly a fresh forward's logits after any sequence of crops."""

import random

import pytest
import torch

from specdecode.models.cache import KVCache, forward
from tiny_models import ARCHITECTURES, VOCAB, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_after_random_crops_match_fresh_forward(arch):
    loaded = tiny_model(arch)
    rng = random.Random(arch)
    kv = KVCache()
    sequence = [rng.randrange(VOCAB) for _ in range(5)]
    with torch.inference_mode():
        forward(loaded.model, kv, sequence[:-1], logits_to_keep=1)
        # grow well past Gemma's sliding window (8), rejecting random "drafts" along the way
        while len(sequence) < 60:
            draft = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 6))]
            logits = forward(loaded.model, kv, [sequence[-1], *draft], logits_to_keep=len(draft) + 1)
            full = loaded.model(torch.tensor([sequence + draft])).logits[0, -(len(draft) + 1):]
            torch.testing.assert_close(logits, full, rtol=1e-9, atol=1e-9)
            keep = rng.randint(0, len(draft))
            kv.crop(len(sequence) + keep)
            sequence += draft[:keep] + [rng.randrange(VOCAB)]


def test_sync_keeps_common_prefix():
    loaded = tiny_model("llama")
    kv = KVCache()
    with torch.inference_mode():
        forward(loaded.model, kv, [1, 2, 3, 4, 5], logits_to_keep=1)
        assert kv.sync([1, 2, 9, 9]) == [9, 9]
        assert kv.token_ids == [1, 2]
        assert kv.cache.get_seq_length() == 2
