"""What a draft is worth before any decoding run: its cost per forward and its greedy agreement
(a draft model's: :func:`forward_ms`, :func:`greedy_agreement`; a draft head's step: :func:`head_forward_ms`).

Under greedy speculative decoding with draft length γ and per-token agreement α, each target
forward yields (1 − α^(γ+1)) / (1 − α) tokens, so these two numbers predict ``sps``'s speed.
"""

from __future__ import annotations

import itertools

import torch

from specdecode.models.cache import KVCache
from specdecode.models.draft_head import DraftHead
from specdecode.models.loading import LoadedModel
from specdecode.models.runner import Readout
from specdecode.timing import time_call


@torch.inference_mode()
def greedy_agreement(target: LoadedModel, draft: LoadedModel, prompts: list[list[int]], max_new_tokens: int = 64) -> float:
    """Fraction of the target's greedy answer tokens that the draft predicts as its own argmax."""
    hits = total = 0
    for ids in prompts:
        prompt = torch.tensor([ids], device=target.device)
        answer = target.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                       max_new_tokens=max_new_tokens, do_sample=False)[0]
        logits = draft.model(input_ids=answer[None].to(draft.device)).logits[0]
        predicted = logits[len(ids) - 1: -1].argmax(-1).to(answer.device)
        hits += int((predicted == answer[len(ids):]).sum())
        total += len(answer) - len(ids)
    return hits / max(1, total)


@torch.inference_mode()
def forward_ms(model: LoadedModel, context: list[int], repeats: int = 20) -> float:
    """Median wall time of one single-token forward (with the LM head) after ``context``."""
    kv = model.runner.new_cache()
    model.runner.forward(kv, context, Readout(rows=1))
    tokens = itertools.cycle(context)
    return time_call(lambda: model.runner.forward(kv, [next(tokens)], Readout(rows=1)), repeats, warmup=3) * 1000


@torch.inference_mode()
def head_forward_ms(head: DraftHead, hidden: torch.Tensor, ids: list[int], repeats: int = 20) -> float:
    """Median wall time of one single-position head step (fc, layer, norm, reduced head) after a context."""
    kv = KVCache()
    hidden = hidden.to(head.fc.weight.dtype)
    context = min(len(ids) - 2, 200)
    head(hidden[None, :context], torch.tensor([ids[1: context + 1]]), kv)
    positions = (step % (len(ids) - 1) for step in itertools.count(context))

    def step() -> None:
        t = next(positions)
        head.logits(head(hidden[None, t: t + 1], torch.tensor([[ids[t + 1]]]), kv)[0, -1]).argmax()

    return time_call(step, repeats, warmup=3) * 1000
