"""Frequency-ranked sub-vocabularies (FR-Spec, Zhao et al. 2025) for cheap draft heads.

On a 262k-vocabulary model the LM head costs as much as every layer together; a draft that
scores only the N most frequent tokens of calibration text is far cheaper and loses little,
because drafts are mostly accepted on common tokens anyway. Draft logits over the subset are
scattered back into the full vocabulary (``-inf`` elsewhere), so acceptance rules stay exact:
a token the draft cannot propose simply has q = 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from specdecode.errors import InvalidSettingError
from specdecode.models.int8 import Int8Linear


def frequent_token_ids(
    token_id_lists: Iterable[Sequence[int]],
    size: int,
    always_include: Iterable[int] = (),
) -> torch.Tensor:
    """The ``size`` most frequent ids in ``token_id_lists`` (plus ``always_include``), most frequent first."""
    if size < 1:
        raise InvalidSettingError(f"sub-vocabulary size must be >= 1, got {size}")
    counts: Counter[int] = Counter()
    for ids in token_id_lists:
        counts.update(int(t) for t in ids)
    forced = list(dict.fromkeys(int(t) for t in always_include))
    ranked = forced + [t for t, _ in counts.most_common() if t not in set(forced)]
    if not ranked:
        raise InvalidSettingError("no calibration tokens to rank")
    return torch.tensor(ranked[:size], dtype=torch.long)


def expand_logits(sub_logits: torch.Tensor, token_ids: torch.Tensor, vocab_size: int,
                  fill: float = float("-inf")) -> torch.Tensor:
    """Scatter ``[..., n]`` values over ``token_ids`` into ``[..., vocab_size]``, ``fill`` elsewhere
    (``-inf`` for logits, 0 for probabilities)."""
    full = sub_logits.new_full((*sub_logits.shape[:-1], vocab_size), fill)
    full[..., token_ids.to(sub_logits.device)] = sub_logits
    return full


def validate_token_ids(token_ids: torch.Tensor, vocab_size: int, what: str = "sub-vocabulary") -> None:
    """Refuse a mapping that points outside the target's vocabulary or repeats ids."""
    if token_ids.ndim != 1 or token_ids.numel() == 0:
        raise InvalidSettingError(f"{what} must be a non-empty 1-D list of token ids")
    if int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab_size:
        raise InvalidSettingError(f"{what} has ids outside the target vocabulary [0, {vocab_size})")
    if token_ids.unique().numel() != token_ids.numel():
        raise InvalidSettingError(f"{what} repeats token ids")


class SubVocabHead(nn.Module):
    """Logits over ``token_ids`` only, from the model's output-embedding rows (float or int8 copy)."""

    def __init__(self, model: nn.Module, token_ids: torch.Tensor, int8: bool) -> None:
        super().__init__()
        head = model.get_output_embeddings()
        weight = head.weight.detach()[token_ids]
        bias = head.bias.detach()[token_ids] if getattr(head, "bias", None) is not None else None
        self.weight, self.bias = weight, bias
        self.int8 = Int8Linear(weight, bias) if int8 else None
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.int8(hidden) if self.int8 is not None else nn.functional.linear(hidden, self.weight, self.bias)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
