"""On-policy feature data for a draft head: the target's own text and its final hidden states.

A draft head reads the target's last hidden states, so its training data is (token ids, the
target's post-norm hidden state at every position). Both come from one batched ``generate``:
rows of a batch run in one forward each step (several times the tokens per second of one row
at a time on a CPU), and ``output_hidden_states`` returns the prompt's hidden states from the
prefill and each generated token's from its step — the prompt positions are free training data,
and no second, teacher-forced pass is needed. The target's next-token distribution at a
position is ``head(hidden)``: the trainer recomputes it over the draft vocabulary, so nothing
262k-wide is ever stored.

Rows mix greedy answers (what greedy decoding meets), sampled answers (T 1, top-k 10, top-p 0.9:
what sampling meets) and unconditional samples from BOS (diversity). Chunks are written one
batch at a time, so a run stopped by its time budget resumes where it stopped.
"""

from __future__ import annotations

import random
import time
from itertools import zip_longest
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specdecode.errors import InvalidSettingError
from specdecode.models.loading import LoadedModel


@dataclass
class FeatureSequence:
    """Token ids ``[T]`` and the target's final hidden states ``[T-1, H]`` at positions 0..T-2."""

    ids: torch.Tensor
    hidden: torch.Tensor
    prompt_len: int


@dataclass(frozen=True)
class _Job:
    prompt: tuple[int, ...]
    greedy: bool


def plan_jobs(prompts: list[list[int]], bos: int, samples_per_prompt: int, unconditional: int,
              seed: int) -> list[list[_Job]]:
    """Batches of one decoding mode each: every prompt once greedy, ``samples_per_prompt`` times
    sampled, plus ``unconditional`` sampled rows from BOS alone, shuffled."""
    rng = random.Random(seed)
    greedy = [_Job(tuple(p), True) for p in prompts]
    sampled = [_Job(tuple(p), False) for p in prompts for _ in range(samples_per_prompt)]
    sampled += [_Job((bos,), False)] * unconditional
    rng.shuffle(greedy)
    rng.shuffle(sampled)
    return [greedy, sampled]


def collect_head_data(
    target: LoadedModel,
    prompts: list[list[int]],
    out_dir: str | Path,
    *,
    rows: int = 16,
    samples_per_prompt: int = 2,
    unconditional: int = 64,
    max_new_tokens: int = 128,
    max_prompt_tokens: int = 384,
    budget_s: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[FeatureSequence]:
    """Generate (or resume) feature data within ``budget_s`` seconds; return every finished chunk."""
    if not prompts:
        raise InvalidSettingError("no training prompts")
    if rows < 1:
        raise InvalidSettingError(f"rows per batch must be >= 1, got {rows}")
    bos = getattr(target.tokenizer, "bos_token_id", None) if target.tokenizer is not None else None
    trimmed = [p[-max_prompt_tokens:] for p in prompts]
    greedy, sampled = plan_jobs(trimmed, 0 if bos is None else bos, samples_per_prompt, unconditional, seed)
    runs = [[jobs[i: i + rows] for i in range(0, len(jobs), rows)] for jobs in (greedy, sampled)]
    # alternate greedy and sampled batches, so a run cut short by its budget still holds both
    order = [batch for pair in zip_longest(*runs) for batch in pair if batch]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sequences: list[FeatureSequence] = []
    for index, batch in enumerate(tqdm(order, desc="head data", unit="batch", disable=not progress)):
        chunk = out / f"chunk_{index:05d}.pt"
        if not chunk.exists():
            if budget_s is not None and time.perf_counter() - started > budget_s:
                continue
            rows_out = _generate(target, batch, max_new_tokens, seed + index)
            torch.save([r.__dict__ for r in rows_out], chunk.with_suffix(".tmp"))
            chunk.with_suffix(".tmp").rename(chunk)  # a half-written chunk is never mistaken for a done one
        sequences.extend(FeatureSequence(**row) for row in torch.load(chunk))
    return sequences


@torch.inference_mode()
def _generate(target: LoadedModel, jobs: list[_Job], max_new_tokens: int, seed: int) -> list[FeatureSequence]:
    """One left-padded batched ``generate``; the hidden states come back with the tokens."""
    pad = getattr(target.tokenizer, "pad_token_id", None) or 0
    width = max(len(j.prompt) for j in jobs)
    device = target.device
    input_ids = torch.tensor([[pad] * (width - len(j.prompt)) + list(j.prompt) for j in jobs], device=device)
    mask = torch.tensor([[0] * (width - len(j.prompt)) + [1] * len(j.prompt) for j in jobs], device=device)
    torch.manual_seed(seed)
    sampling = {} if jobs[0].greedy else dict(temperature=1.0, top_k=10, top_p=0.9)
    out = target.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                do_sample=not jobs[0].greedy, pad_token_id=pad, output_hidden_states=True,
                                return_dict_in_generate=True, **sampling)
    # the last entry of each step's hidden states is the final, post-norm one (what the head reads)
    hidden = torch.cat([step[-1] for step in out.hidden_states], dim=1)  # [B, width + new - 1, H]
    results = []
    for row, job in enumerate(jobs):
        answer = out.sequences[row, width:].tolist()
        for position, token in enumerate(answer):
            if token in target.eos_token_ids:
                answer = answer[: position + 1]
                break
        ids = list(job.prompt) + answer
        start = width - len(job.prompt)
        states = hidden[row, start: start + len(ids) - 1].to(torch.float16).cpu().clone()
        results.append(FeatureSequence(torch.tensor(ids, dtype=torch.int32), states, len(job.prompt)))
    return results
