"""What a draft is worth before any decoding run: its cost per forward and its greedy agreement.

Under greedy speculative decoding with draft length γ and per-token agreement α, each target
forward yields (1 − α^(γ+1)) / (1 − α) tokens, so these two numbers predict ``sps``'s speed.
"""

from __future__ import annotations

import time

import torch

from specdecode.models.cache import KVCache, forward
from specdecode.models.loading import LoadedModel


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
    kv = KVCache()
    forward(model.model, kv, context, logits_to_keep=1)
    times = []
    for step in range(repeats + 3):
        started = time.perf_counter()
        forward(model.model, kv, [context[step % len(context)]], logits_to_keep=1)
        times.append(time.perf_counter() - started)
    return sorted(times[3:])[len(times[3:]) // 2] * 1000
