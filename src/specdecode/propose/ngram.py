"""Prompt-lookup (n-gram) drafting (Saxena 2023; `transformers`' ``prompt_lookup_num_tokens``).

The draft is the continuation of an earlier occurrence of the sequence's last n-gram, trying the
longest n first: the most recent occurrence (``match="last"``) or the first one (``"first"``, as
the reference implementation, `transformers` and llama.cpp do). It costs no model forward at all.
"""

from __future__ import annotations

from specdecode.errors import InvalidSettingError
from specdecode.propose.base import Draft, Proposer


class NgramProposer(Proposer):
    def __init__(self, num_tokens: int = 10, max_ngram: int = 3, min_ngram: int = 1, match: str = "last") -> None:
        if match not in ("first", "last"):
            raise InvalidSettingError(f"pld match must be 'first' or 'last', got {match!r}")
        if num_tokens < 1:
            raise InvalidSettingError(f"pld num_tokens (gamma) must be >= 1, got {num_tokens}")
        if not 1 <= min_ngram <= max_ngram:
            raise InvalidSettingError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        super().__init__()
        self.num_tokens, self.max_ngram, self.min_ngram, self.match = num_tokens, max_ngram, min_ngram, match

    def propose(self, sequence: list[int], max_tokens: int) -> Draft:
        limit = min(self.num_tokens, max_tokens)
        if limit < 1:
            return Draft()
        for n in range(min(self.max_ngram, len(sequence) - 1), self.min_ngram - 1, -1):
            tail = sequence[-n:]
            # earlier occurrences whose continuation is non-empty, in the order ``match`` prefers
            starts = range(len(sequence) - n - 1, -1, -1) if self.match == "last" else range(len(sequence) - n)
            for start in starts:
                if sequence[start:start + n] == tail:
                    continuation = sequence[start + n:start + n + limit]
                    self.stats.proposed += len(continuation)
                    return Draft(tokens=continuation)
        return Draft()
