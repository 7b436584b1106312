"""The one place that decides where a generation ends: EOS, ``max_new_tokens``, stop strings.

A speculative step can emit several tokens at once; the checker cuts them at the first stop so
that every method ends exactly where autoregressive decoding would.
"""

from __future__ import annotations

from typing import Any

from specdecode.errors import InvalidSettingError


class StopChecker:
    def __init__(
        self,
        max_new_tokens: int,
        eos_token_ids: frozenset[int],
        stop_strings: tuple[str, ...] = (),
        tokenizer: Any | None = None,
    ) -> None:
        if stop_strings and tokenizer is None:
            raise InvalidSettingError("stop strings need a model with a tokenizer")
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = eos_token_ids
        self.stop_strings = stop_strings
        self.tokenizer = tokenizer

    def cut(self, generated: list[int], new: list[int]) -> tuple[list[int], str | None]:
        """Return the part of ``new`` to keep after ``generated``, and why generation stops (or None)."""
        room = self.max_new_tokens - len(generated)
        kept, reason = new, None
        for index, token in enumerate(new):
            if token in self.eos_token_ids:
                kept, reason = new[: index + 1], "eos"
                break
        if len(kept) > room:
            kept, reason = kept[:room], "length"
        elif len(kept) == room and reason is None:
            reason = "length"
        if self.stop_strings:
            kept, reason = self._cut_at_stop_string(generated, kept, reason)
        return kept, reason

    def _cut_at_stop_string(
        self, generated: list[int], new: list[int], reason: str | None
    ) -> tuple[list[int], str | None]:
        def contains_stop(ids: list[int]) -> bool:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            return any(stop in text for stop in self.stop_strings)

        if not new or not contains_stop(generated + new):
            return new, reason
        for end in range(1, len(new) + 1):  # the earliest token at which a stop string appears
            if contains_stop(generated + new[:end]):
                return new[:end], "stop_string"
        return new, reason
