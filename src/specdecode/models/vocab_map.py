"""Drafts with a reduced vocabulary that still speak the target's token ids.

A distilled draft for a 262k-vocabulary target keeps only the N most frequent tokens (FR-Spec):
its embedding and tied head are N+1 rows instead of 262k, which is what makes it small enough to
ship and cheap enough to run. ``vocab_map.json`` beside the model lists, for every draft id, the
target id it stands for; the last draft id stands for every other token on the input side.

:func:`apply_vocab_map` swaps the loaded model's input embedding and head for thin wrappers, so
the model reads target ids and writes target-vocabulary logits (``-inf`` outside its subset):
every drafter and `transformers`' ``generate(assistant_model=...)`` use it unchanged.

A draft may also read its input through the target's own full embedding table
(``"input": "target"`` in the map): then no context token is blurred into the "unknown" row, at no
cost in size (the table is the target's, borrowed when the two are paired by
:func:`pair_target_embedding`) or speed (an embedding lookup is a gather). Gemma 3's 262k table is
what makes this matter: its 8k most frequent tokens leave 13 % of answer tokens unseen.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from specdecode.errors import VocabularyMismatchError
from specdecode.models.frequent_vocab import expand_logits, validate_token_ids

VOCAB_MAP_FILE = "vocab_map.json"
FORMAT = "specdecode-vocab-map/1"


@dataclass(frozen=True)
class VocabMap:
    """Draft id i stands for target id ``target_ids[i]``; draft id ``len(target_ids)`` is "any other token"."""

    target_ids: tuple[int, ...]
    target_vocab_size: int
    tokenizer_sha: str | None = None  # digest of the target tokenizer's vocabulary, checked when both are known
    reads_target_embedding: bool = False  # input tokens go through the target's embedding table, not the draft's

    @property
    def unknown_id(self) -> int:
        return len(self.target_ids)

    def validate(self, draft_vocab_size: int | None = None) -> None:
        try:
            validate_token_ids(torch.tensor(self.target_ids, dtype=torch.long), self.target_vocab_size, "vocab map")
        except Exception as exc:  # InvalidSettingError from the shared validator, reworded for a draft
            raise VocabularyMismatchError(f"inconsistent draft vocabulary map: {exc}") from None
        if draft_vocab_size is not None and draft_vocab_size != self.unknown_id + 1:
            raise VocabularyMismatchError(
                f"inconsistent draft vocabulary map: it maps {len(self.target_ids)} ids (+1 unknown) but the "
                f"draft model has {draft_vocab_size} output rows"
            )

    def save(self, directory: str | Path) -> None:
        payload = {"format": FORMAT, "target_vocab_size": self.target_vocab_size, "tokenizer_sha": self.tokenizer_sha,
                   "input": "target" if self.reads_target_embedding else "draft", "target_ids": list(self.target_ids)}
        (Path(directory) / VOCAB_MAP_FILE).write_text(json.dumps(payload))

    @classmethod
    def load(cls, directory: str | Path) -> VocabMap | None:
        """The map saved in ``directory``, or None when the model there uses the full vocabulary."""
        path = Path(directory) / VOCAB_MAP_FILE
        if not path.is_file():
            return None
        try:
            payload = json.loads(path.read_text())
            if payload.get("format") != FORMAT:
                raise ValueError(f"format {payload.get('format')!r}, expected {FORMAT!r}")
            ids = payload["target_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError("target_ids must be a list of integers")
            sha = payload.get("tokenizer_sha")
            if sha is not None and not isinstance(sha, str):
                raise ValueError("tokenizer_sha must be a string")
            source = payload.get("input", "draft")
            if source not in ("draft", "target"):
                raise ValueError(f"input must be 'draft' or 'target', got {source!r}")
            return cls(tuple(ids), int(payload["target_vocab_size"]), sha, source == "target")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise VocabularyMismatchError(f"corrupt draft vocabulary map {path}: {exc}") from None


class MappedEmbedding(nn.Module):
    """Input embedding that takes target ids: the draft's own rows (unknown ones share one), or the target's table."""

    def __init__(self, embedding: nn.Module, draft_id_of: torch.Tensor, reads_target_embedding: bool) -> None:
        super().__init__()
        self.inner = embedding
        self.reads_target_embedding = reads_target_embedding
        self.register_buffer("draft_id_of", draft_id_of, persistent=False)
        self.lend(None)

    def lend(self, target_embedding: nn.Module | None) -> None:
        """Borrow the target's table. Kept out of the module tree, so the draft's .to() or state_dict never touch it."""
        object.__setattr__(self, "target_embedding", target_embedding)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.reads_target_embedding:
            return self.inner(self.draft_id_of[input_ids])
        if self.target_embedding is None:
            raise VocabularyMismatchError("this draft reads its target's embedding table: pair it with its target "
                                          "first (specdecode.pair_draft(target, draft))")
        return self.target_embedding(input_ids).to(self.inner.weight.dtype)


class MappedHead(nn.Module):
    """Output head that scores the draft's subset and scatters it into the target's vocabulary."""

    def __init__(self, head: nn.Module, target_ids: torch.Tensor, vocab_map: VocabMap) -> None:
        super().__init__()
        self.inner = head
        self.vocab_map = vocab_map
        self.vocab_size = vocab_map.target_vocab_size
        self.register_buffer("target_ids", target_ids, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def own(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of the draft's own ids (column j: target id ``target_ids[j]``)."""
        return self.inner(hidden)[..., : self.target_ids.numel()]  # the "unknown" row is never proposed

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return expand_logits(self.own(hidden), self.target_ids, self.vocab_size)


def tokenizer_digest(tokenizer) -> str:
    """A digest of a tokenizer's token → id table: equal digests mean ids mean the same strings."""
    table = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]), ensure_ascii=False)
    return hashlib.sha256(table.encode()).hexdigest()[:16]


def vocab_map_of(model: nn.Module) -> VocabMap | None:
    return getattr(model.get_output_embeddings(), "vocab_map", None)


def apply_vocab_map(model: nn.Module, vocab_map: VocabMap) -> nn.Module:
    """Make ``model`` (a reduced-vocabulary causal LM) read and write target ids, in place."""
    vocab_map.validate(int(model.get_output_embeddings().weight.shape[0]))
    device = next(model.parameters()).device
    target_ids = torch.tensor(vocab_map.target_ids, dtype=torch.long, device=device)
    draft_id_of = torch.full((vocab_map.target_vocab_size,), vocab_map.unknown_id, dtype=torch.long, device=device)
    draft_id_of[target_ids] = torch.arange(target_ids.numel(), device=device)
    model.set_input_embeddings(MappedEmbedding(model.get_input_embeddings(), draft_id_of,
                                               vocab_map.reads_target_embedding))
    model.set_output_embeddings(MappedHead(model.get_output_embeddings(), target_ids, vocab_map))
    # From outside the model now reads and writes the target's vocabulary; `transformers` compares
    # config vocabulary sizes to decide whether an assistant shares the target's tokenizer.
    model.config.get_text_config().vocab_size = vocab_map.target_vocab_size
    return model


def awaits_target_embedding(model: nn.Module) -> bool:
    """Whether ``model`` is a draft that cannot run until its target lends it an embedding table."""
    embedding = model.get_input_embeddings()
    return (isinstance(embedding, MappedEmbedding) and embedding.reads_target_embedding
            and embedding.target_embedding is None)


def pair_target_embedding(draft: nn.Module, target: nn.Module) -> None:
    """Lend ``target``'s input embedding table to a ``draft`` whose map says it reads it (else do nothing)."""
    embedding = draft.get_input_embeddings()
    if isinstance(embedding, MappedEmbedding) and embedding.reads_target_embedding:
        embedding.lend(target.get_input_embeddings())
