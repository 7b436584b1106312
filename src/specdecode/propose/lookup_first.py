"""Prompt lookup first, a model's draft where lookup finds nothing.

Prompt lookup costs no forward, and where an answer repeats its context (summaries, RAG, code,
math restating the question) it drafts long runs that are accepted whole. Elsewhere (translation,
open questions) it finds no n-gram, and the step decodes a single token. The fallback drafter
fills those steps. The lookup's ``min_ngram`` decides what counts as a find: a one-token match
exists almost always in a long context and is seldom right, so the hybrid methods default to 2.

The fallback sees every hook (the target's cache, the prompt's and every verification's hidden
states), so a feature-level head stays in step on the steps lookup drafts, too.
"""

from __future__ import annotations

import torch

from specdecode.models.cache import KVCache
from specdecode.propose.base import Draft, Proposer
from specdecode.propose.ngram import NgramProposer


class LookupFirstProposer(Proposer):
    def __init__(self, lookup: NgramProposer, fallback: Proposer) -> None:
        super().__init__()
        self.lookup, self.fallback = lookup, fallback
        self.last: Proposer = lookup
        self.stats.extra.update(lookup_drafts=0, fallback_drafts=0)

    def bind_target_cache(self, target_cache: KVCache) -> None:
        self.fallback.bind_target_cache(target_cache)

    def on_prefill(self, prompt_hidden: torch.Tensor) -> None:
        self.fallback.on_prefill(prompt_hidden)

    def observe_hidden(self, hidden: torch.Tensor) -> None:
        self.fallback.observe_hidden(hidden)

    def observe(self, proposed: int, accepted: int) -> None:
        self.last.observe(proposed, accepted)

    def propose(self, sequence: list[int], max_tokens: int) -> Draft:
        draft = self.lookup.propose(sequence, max_tokens)
        self.last = self.lookup
        if not draft.tokens:
            draft = self.fallback.propose(sequence, max_tokens)
            self.last = self.fallback
        self.stats.extra["lookup_drafts" if self.last is self.lookup else "fallback_drafts"] += bool(draft.tokens)
        self.stats.forwards = self.fallback.stats.forwards
        self.stats.proposed = self.lookup.stats.proposed + self.fallback.stats.proposed
        return draft
