"""Tree attention must give each branch exactly the logits of its own sequential forward."""

import pytest
import torch

from specdecode.models.cache import KVCache
from specdecode.models.runner import Readout
from tiny_models import ARCHITECTURES, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_two_levels_of_branches_match_sequential_forwards(arch):
    loaded = tiny_model(arch, seed=4)
    context = [(7 * i) % 90 for i in range(13)]  # longer than Gemma's window of 8
    kv = KVCache()
    with torch.inference_mode():
        loaded.runner.forward(kv, context, Readout(rows=1)).logits
        P = len(context)
        level1 = [11, 22, 33]
        visible1 = torch.eye(3, dtype=torch.bool)
        logits1 = loaded.runner.forward_tree(kv, level1, [P] * 3, visible1, P, []).logits
        # level 2: children of branches 2, 0, 2 (a branch can have several children)
        parents, level2 = [2, 0, 2], [44, 55, 66]
        visible2 = torch.zeros(3, 6, dtype=torch.bool)
        for i, parent in enumerate(parents):
            visible2[i, parent] = True
            visible2[i, 3 + i] = True
        logits2 = loaded.runner.forward_tree(kv, level2, [P + 1] * 3, visible2, P, [P] * 3).logits
        for i, token in enumerate(level1):
            ref = loaded.model(torch.tensor([context + [token]])).logits[0, -1]
            torch.testing.assert_close(logits1[i], ref, rtol=1e-9, atol=1e-9)
        for i, (parent, token) in enumerate(zip(parents, level2)):
            ref = loaded.model(torch.tensor([context + [level1[parent], token]])).logits[0, -1]
            torch.testing.assert_close(logits2[i], ref, rtol=1e-9, atol=1e-9)
        kv.crop(P)
        after = loaded.runner.forward(kv, [5], Readout(rows=1)).logits[-1]
        torch.testing.assert_close(after, loaded.model(torch.tensor([context + [5]])).logits[0, -1],
                                   rtol=1e-9, atol=1e-9)
