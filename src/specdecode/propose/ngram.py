"""Prompt-lookup (n-gram) drafting (Saxena 2023; `transformers`' ``prompt_lookup_num_tokens``).

The draft is the continuation of the most recent earlier occurrence of the sequence's last
n-gram, trying the longest n first. It costs no model forward at all.
"""

from __future__ import annotations

from specdecode.errors import InvalidSettingError
from specdecode.propose.base import Draft, Proposer


class NgramProposer(Proposer):
    def __init__(self, num_tokens: int = 10, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if num_tokens < 1:
            raise InvalidSettingError(f"pld num_tokens (gamma) must be >= 1, got {num_tokens}")
        if not 1 <= min_ngram <= max_ngram:
            raise InvalidSettingError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        super().__init__()
        self.num_tokens, self.max_ngram, self.min_ngram = num_tokens, max_ngram, min_ngram

    def propose(self, sequence: list[int], max_tokens: int) -> Draft:
        limit = min(self.num_tokens, max_tokens)
        if limit < 1:
            return Draft()
        for n in range(min(self.max_ngram, len(sequence) - 1), self.min_ngram - 1, -1):
            tail = sequence[-n:]
            # most recent earlier occurrence whose continuation is non-empty
            for start in range(len(sequence) - n - 1, -1, -1):
                if sequence[start:start + n] == tail:
                    continuation = sequence[start + n:start + n + limit]
                    self.stats.proposed += len(continuation)
                    return Draft(tokens=continuation)
        return Draft()
