"""Teacher data for draft distillation: the target's own answers, scored by the target.

The draft must imitate the target on the text it will meet at decoding time, which is the
target's own output, so the target first answers the training prompts (sampled, for variety);
then one teacher-forced pass over prompt + answer keeps the target's top-k next-token
log-probabilities at every answer position and the last ``prompt_positions`` prompt positions
(DistillSpec's on-policy data, stored sparsely: the full 262k-wide distributions of 100k positions
would take 100 GB; and scoring every position of long prompts would cost most of the run).

Chunks are written one batch at a time, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specdecode.errors import InvalidSettingError
from specdecode.models.loading import LoadedModel


@dataclass
class TeacherSequence:
    """One training sequence: token ids, where the answer starts, and the target's top-k at each position."""

    ids: torch.Tensor  # [T] int64
    prompt_len: int
    top_ids: torch.Tensor  # [T-1-label_start, k] int64: target's top-k for the token after position label_start + i
    top_logprobs: torch.Tensor  # [T-1-label_start, k] float32
    label_start: int = 0


def collect_teacher_data(
    target: LoadedModel,
    prompts: list[str] | list[list[int]],
    out_dir: str | Path,
    *,
    max_new_tokens: int = 128,
    max_prompt_tokens: int = 512,
    samples_per_prompt: int = 1,
    prompt_positions: int = 32,
    max_sequences: int | None = None,
    temperature: float = 0.8,
    top_k: int = 16,
    batch_size: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> list[TeacherSequence]:
    """Answer every prompt with the target and keep its top-``top_k`` distributions (resumable)."""
    if not prompts:
        raise InvalidSettingError("no training prompts")
    if target.tokenizer is None and any(isinstance(p, str) for p in prompts):
        raise InvalidSettingError(f"target {target.name!r} has no tokenizer: give token-id prompts")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [p for p in prompts for _ in range(samples_per_prompt)]
    random.Random(seed).shuffle(jobs)  # every batch mixes domains, so a partial run is still a fair sample
    jobs = jobs[:max_sequences]
    batches = [jobs[i: i + batch_size] for i in range(0, len(jobs), batch_size)]
    sequences: list[TeacherSequence] = []
    for index, batch in enumerate(tqdm(batches, desc="teacher data", unit="batch", disable=not progress)):
        chunk = out / f"chunk_{index:05d}.pt"
        if not chunk.exists():
            answered = _answer(target, batch, max_new_tokens, max_prompt_tokens, temperature, seed + index)
            scored = [_score(target, ids, prompt_len, max(0, prompt_len - 1 - prompt_positions), top_k)
                      for ids, prompt_len in answered]
            torch.save([s.__dict__ for s in scored], chunk.with_suffix(".tmp"))
            chunk.with_suffix(".tmp").rename(chunk)  # a half-written chunk is never mistaken for a done one
        sequences.extend(TeacherSequence(**row) for row in torch.load(chunk))
    return sequences


@torch.inference_mode()
def _answer(target: LoadedModel, prompts: list[str] | list[list[int]], max_new_tokens: int, max_prompt_tokens: int,
            temperature: float, seed: int) -> list[tuple[torch.Tensor, int]]:
    tokenizer = target.tokenizer
    encoded = [(tokenizer(p)["input_ids"] if isinstance(p, str) else p)[-max_prompt_tokens:] for p in prompts]
    width = max(len(ids) for ids in encoded)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    input_ids = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in encoded], device=target.device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=target.device)
    torch.manual_seed(seed)
    generated = target.model.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
        temperature=temperature, top_k=0, top_p=1.0, pad_token_id=pad,
    )[:, width:]
    results = []
    for ids, answer in zip(encoded, generated):
        answer = answer.tolist()
        for position, token in enumerate(answer):
            if token in target.eos_token_ids:
                answer = answer[: position + 1]
                break
        results.append((torch.tensor(list(ids) + answer), len(ids)))
    return results


@torch.inference_mode()
def _score(target: LoadedModel, ids: torch.Tensor, prompt_len: int, label_start: int, top_k: int) -> TeacherSequence:
    """Teacher-forced pass; the LM head runs in slices so 262k-wide logits never exist for all positions."""
    hidden = target.model.base_model(input_ids=ids[None].to(target.device)).last_hidden_state[0, label_start:-1]
    head = target.model.get_output_embeddings()
    softcap = getattr(target.config.get_text_config(), "final_logit_softcapping", None)
    top_ids, top_logprobs = [], []
    for start in range(0, hidden.shape[0], 64):
        logits = head(hidden[start: start + 64]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        values, indices = torch.log_softmax(logits, dim=-1).topk(top_k, dim=-1)
        top_ids.append(indices.cpu())
        top_logprobs.append(values.cpu())
    return TeacherSequence(ids.cpu(), prompt_len, torch.cat(top_ids), torch.cat(top_logprobs), label_start)
