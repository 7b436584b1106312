"""Draft vocabularies of a bundle: rankings of a domain's target text by frequency, and the mixed
configuration's union of the domains' vocabularies."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from specdecode.errors import InvalidSettingError


def rank_vocabulary(texts: Sequence[Sequence[int]], eos: Sequence[int], background: Sequence[int] = ()) -> list[int]:
    """End-of-sequence ids, then the ids of ``texts`` by frequency (ties: first seen), then ``background``."""
    counts: Counter[int] = Counter()
    for ids in texts:
        counts.update(int(t) for t in ids)
    ranked = list(dict.fromkeys([int(t) for t in eos] + [t for t, _ in counts.most_common()]
                                + [int(t) for t in background]))
    if not ranked:
        raise InvalidSettingError("no tokens to rank a draft vocabulary on")
    return ranked


def union_vocabulary(vocabularies: Sequence[Sequence[int]]) -> list[int]:
    """Every id of every vocabulary, taken in turn (each one's most frequent ids come first)."""
    merged: dict[int, None] = {}
    for rank in range(max((len(v) for v in vocabularies), default=0)):
        for vocabulary in vocabularies:
            if rank < len(vocabulary):
                merged.setdefault(int(vocabulary[rank]), None)
    return list(merged)


def rankings(answers: Sequence[Sequence[int]], prompts: Sequence[Sequence[int]], sources: Sequence[str],
              eos: Sequence[int], background: Sequence[int]) -> dict[str, list[int]]:
    texts = {"answers": list(answers), "answers+prompts": [*answers, *prompts]}
    return {name: rank_vocabulary(texts[name], eos, background) for name in sources}
