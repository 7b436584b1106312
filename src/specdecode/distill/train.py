"""Distillation loop: minimise KL(target ‖ draft) on the teacher's sparse top-k distributions.

Forward KL on the target's own text is DistillSpec's recommendation for greedy and low-temperature
drafting (the draft must put its mode where the target's is). The teacher's mass on tokens the
draft cannot emit is dropped and the rest renormalised: those positions can never be drafted
correctly, and pushing the draft's "unknown" row up for them would only teach it to waste mass.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from specdecode.distill.teacher import TeacherSequence
from specdecode.errors import InvalidSettingError
from specdecode.models.vocab_map import VocabMap


@dataclass
class TrainSettings:
    steps: int = 600
    batch_size: int = 8
    max_len: int = 384  # keep the last max_len tokens of each sequence: the answer and its nearest context
    lr: float = 2e-4
    warmup: int = 30
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 50
    train_head: bool = False  # the head rows are the target's own; frozen (as in EAGLE and Kangaroo) they cannot overfit

    def validate(self) -> None:
        for name in ("steps", "batch_size", "max_len", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InvalidSettingError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InvalidSettingError(f"learning rate must be > 0, got {self.lr}")


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)  # draft argmax == target argmax on answer tokens


@dataclass
class _Batch:
    input_ids: torch.Tensor  # [B, L] draft ids
    target_input_ids: torch.Tensor  # [B, L] the same tokens in target ids (0 where padded)
    attention_mask: torch.Tensor  # [B, L]
    teacher_ids: torch.Tensor  # [B, L, k] draft ids of the teacher's top-k
    teacher_probs: torch.Tensor  # [B, L, k] renormalised over the ids the draft has; 0 = ignore
    answer: torch.Tensor  # [B, L] bool: positions predicting an answer token


def train_draft(
    student: nn.Module,
    vocab_map: VocabMap,
    sequences: list[TeacherSequence],
    settings: TrainSettings,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    stop_at: int | None = None,
    target_embedding: nn.Module | None = None,
) -> TrainLog:
    """Train ``student`` in place; resumes from ``checkpoint`` when it exists, and keeps it up to date.

    ``stop_at`` ends this run early after that step (checkpointed), for time-boxed runs on a shared
    machine. A student that reads the target's embedding table is fed ``target_embedding``'s
    (frozen) output instead of its own input rows.
    """
    settings.validate()
    if not sequences:
        raise InvalidSettingError("no teacher sequences to train on")
    if vocab_map.reads_target_embedding and target_embedding is None:
        raise InvalidSettingError("this student reads the target's embedding table: pass target_embedding")
    draft_id_of = torch.full((vocab_map.target_vocab_size,), -1, dtype=torch.long)
    draft_id_of[torch.tensor(vocab_map.target_ids)] = torch.arange(len(vocab_map.target_ids))
    student.get_output_embeddings().weight.requires_grad_(settings.train_head)
    trained = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, settings))
    log, start = TrainLog(), 0
    path = Path(checkpoint) if checkpoint else None
    signature = _run_signature(student, vocab_map, settings)
    if path is not None and path.is_file():
        state = torch.load(path, weights_only=False)
        changed = sorted(k for k in signature | state.get("signature", {})
                         if signature.get(k) != state.get("signature", {}).get(k))
        if changed:
            raise InvalidSettingError(f"checkpoint {path} belongs to a run with other {', '.join(changed)}: "
                                      "rerun with that run's settings, or delete it to start over")
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        log, start = state["log"], state["step"]
    student.train()
    bar = tqdm(total=settings.steps, initial=start, desc="distill", unit="step", disable=not progress)
    end = settings.steps if stop_at is None else min(stop_at, settings.steps)
    for step in range(start, end):
        rng = random.Random(settings.seed * 1_000_003 + step)  # batch of step s is the same after a resume
        batch = _make_batch(rng.sample(sequences, min(settings.batch_size, len(sequences))), draft_id_of,
                            vocab_map.unknown_id, settings.max_len)
        if vocab_map.reads_target_embedding:
            with torch.no_grad():
                embeds = target_embedding(batch.target_input_ids).to(student.dtype)
            logits = student(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits.float()
        else:
            logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        picked = logprobs.gather(-1, batch.teacher_ids)
        weight = batch.teacher_probs.sum(-1) > 0
        loss = -(batch.teacher_probs * picked).sum(-1)[weight].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            hits = (logits.argmax(-1) == batch.teacher_ids[..., 0])[batch.answer & weight]
        log.losses.append(loss.item())
        log.agreement.append(float(hits.float().mean()) if hits.numel() else math.nan)
        bar.set_postfix(loss=f"{sum(log.losses[-20:]) / len(log.losses[-20:]):.3f}",
                        agree=f"{_nanmean(log.agreement[-20:]):.2f}")
        bar.update()
        if path is not None and ((step + 1) % settings.checkpoint_every == 0 or step + 1 == end):
            state = {"model": student.state_dict(), "optimizer": optimizer.state_dict(),
                     "schedule": schedule.state_dict(), "log": log, "step": step + 1, "signature": signature}
            torch.save(state, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
    bar.close()
    student.eval()
    return log


def _run_signature(student: nn.Module, vocab_map: VocabMap, settings: TrainSettings) -> dict[str, object]:
    """What a checkpoint must match to be resumed: the same student shape, vocabulary and schedule."""
    options = {k: v for k, v in asdict(settings).items() if k != "checkpoint_every"}
    shapes = {name: list(p.shape) for name, p in student.state_dict().items()}
    digest = hashlib.sha256(json.dumps([vocab_map.target_ids, vocab_map.reads_target_embedding]).encode())
    return {"settings": options, "student": shapes, "vocabulary": digest.hexdigest()[:16]}


def _lr_factor(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _make_batch(rows: list[TeacherSequence], draft_id_of: torch.Tensor, unknown: int, max_len: int) -> _Batch:
    width = min(max_len, max(len(r.ids) - 1 for r in rows))
    k = rows[0].top_ids.shape[1]
    input_ids = torch.full((len(rows), width), unknown, dtype=torch.long)
    target_input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    teacher_ids = torch.zeros((len(rows), width, k), dtype=torch.long)
    teacher_probs = torch.zeros((len(rows), width, k))
    answer = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, row in enumerate(rows):
        start = max(0, len(row.ids) - 1 - width)
        ids = row.ids[start:-1]
        n = len(ids)
        mapped = draft_id_of[ids]
        input_ids[b, :n] = torch.where(mapped >= 0, mapped, unknown)
        target_input_ids[b, :n] = ids
        mask[b, :n] = 1
        first = max(start, row.label_start)  # earlier positions have no teacher labels: weight 0
        offset = first - start
        teacher = draft_id_of[row.top_ids[first - row.label_start:]]
        probs = row.top_logprobs[first - row.label_start:].float().exp() * (teacher >= 0)
        teacher_ids[b, offset:n] = teacher.clamp_min(0)
        teacher_probs[b, offset:n] = probs / probs.sum(-1, keepdim=True).clamp_min(1e-9)
        answer[b, :n] = torch.arange(start, start + n) >= row.prompt_len - 1
    return _Batch(input_ids, target_input_ids, mask, teacher_ids, teacher_probs, answer)


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan
