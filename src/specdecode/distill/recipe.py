"""``distill_draft``: teacher data → reduced-vocabulary student → training → a loadable draft directory."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from specdecode.distill.student import build_student
from specdecode.distill.teacher import TeacherSequence, collect_teacher_data
from specdecode.distill.train import TrainLog, TrainSettings, train_draft
from specdecode.models.frequent_vocab import frequent_token_ids
from specdecode.models.loading import LoadedModel


def teacher_vocabulary(target: LoadedModel, sequences: list[TeacherSequence], size: int) -> list[int]:
    """The ``size`` most frequent tokens of the teacher text and of the teacher's top-1 choices."""
    lists = [s.ids.tolist() for s in sequences] + [s.top_ids[:, 0].tolist() for s in sequences]
    return frequent_token_ids(lists, min(size, target.vocab_size), always_include=sorted(target.eos_token_ids)).tolist()


def distill_draft(
    target: LoadedModel,
    prompts: list[str],
    out_dir: str | Path,
    *,
    layers: list[int],
    vocab_size: int = 8192,
    samples_per_prompt: int = 2,
    max_new_tokens: int = 128,
    max_sequences: int | None = None,
    train: TrainSettings | None = None,
    progress: bool = True,
) -> tuple[Path, TrainLog]:
    """Distil a draft for ``target`` into ``out_dir`` (resumable: teacher chunks and a checkpoint live there)."""
    train = train or TrainSettings()
    train.validate()
    out = Path(out_dir)
    work = out / "work"
    started = time.perf_counter()
    sequences = collect_teacher_data(target, prompts, work / "teacher", max_new_tokens=max_new_tokens,
                                     samples_per_prompt=samples_per_prompt, max_sequences=max_sequences,
                                     seed=train.seed, progress=progress)
    teacher_seconds = time.perf_counter() - started
    torch.manual_seed(train.seed)
    student, vocab_map = build_student(target, layers, teacher_vocabulary(target, sequences, vocab_size))
    log = train_draft(student, vocab_map, sequences, train, checkpoint=work / "checkpoint.pt", progress=progress,
                      target_embedding=target.model.get_input_embeddings())
    student.to(torch.bfloat16).save_pretrained(out)  # bf16 on disk halves the shipped size; loads as float32
    vocab_map.save(out)
    tokens = sum(len(s.ids) for s in sequences)
    (out / "distill_log.json").write_text(json.dumps({
        "target": target.name, "target_fingerprint": target.fingerprint, "layers": layers,
        "vocab_size": len(vocab_map.target_ids), "prompts": len(prompts), "samples_per_prompt": samples_per_prompt,
        "max_new_tokens": max_new_tokens, "teacher_sequences": len(sequences), "teacher_tokens": tokens,
        "train": asdict(train), "teacher_seconds": round(teacher_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "loss_first_last": [log.losses[0], sum(log.losses[-20:]) / len(log.losses[-20:])],
        "losses": [round(x, 4) for x in log.losses],
    }, indent=1))
    return out, log
