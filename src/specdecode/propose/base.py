"""What a drafter (proposer) hands to the acceptance rule, and the interface every drafter meets."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from specdecode.models.cache import KVCache


@dataclass
class Draft:
    """Proposed continuation of the current sequence.

    ``probs[i]`` is the (processed) draft distribution the i-th token was drawn from, needed by
    speculative sampling; ``None`` means the tokens were chosen deterministically (n-gram lookup,
    greedy drafts), which acceptance rules treat as a one-hot draft distribution.
    ``log_q`` holds the draft log-probability of each drafted token (MTAD's joint ratio).
    ``parents`` makes the draft a tree verified in one forward: token i continues
    ``[last token, *tokens][parents[i]]`` (0 = the sequence's last token); None is a chain.
    """

    tokens: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None
    log_q: torch.Tensor | None = None
    parents: list[int] | None = None

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class DraftStats:
    """Counters a drafter keeps for one generation; ``extra`` ends up in ``GenerationStats.extra``
    (what a drafter decided per request, e.g. KNN-SSD's routing)."""

    forwards: int = 0
    proposed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Proposer:
    """Drafts tokens for one generation; a fresh instance serves each request.

    The base class proposes nothing, which makes every step one target forward: autoregressive
    decoding.
    """

    def __init__(self) -> None:
        self.stats = DraftStats()

    def bind_target_cache(self, target_cache: KVCache) -> None:
        """See the target's KV cache once, before the prefill.

        A self-draft (the target with layers skipped) reads the context from it instead of
        prefilling a cache of its own. It may append draft tokens during :meth:`propose` but must
        crop them off again: when ``propose`` returns, the cache must hold what it held before.
        """

    def on_prefill(self, prompt_hidden: torch.Tensor) -> None:
        """See the target's final hidden states over the prompt (KNN routing uses them)."""

    def propose(self, sequence: list[int], max_tokens: int) -> Draft:
        """Draft at most ``max_tokens`` tokens continuing ``sequence`` (prompt + generated so far)."""
        return Draft()

    @property
    def drafts(self) -> bool:
        """Whether it ever drafts: not the base class (``ar``), whose request a batch's draft budget
        must not count as a drafter."""
        return type(self).propose is not Proposer.propose

    def batch_key(self) -> Hashable | None:
        """Proposers of several requests (in a batch, ``engine/batch.py``) of the same class whose keys
        are equal and not None draft together in :meth:`propose_batch`: each draft forward then
        reads the drafter's weights once for all of them. None: this one drafts alone."""
        return None

    @classmethod
    def propose_batch(cls, proposers: Sequence[Proposer], sequences: Sequence[list[int]],
                      max_tokens: Sequence[int]) -> list[Draft]:
        """:meth:`propose` of each of ``proposers`` (one class, equal batch keys); a drafter that
        shares its forwards overrides this, and its :meth:`propose` is then a batch of one."""
        return [p.propose(s, m) for p, s, m in zip(proposers, sequences, max_tokens)]

    def observe(self, proposed: int, accepted: int) -> None:
        """Learn from the outcome of the last verification (adaptive draft lengths)."""

    def observe_hidden(self, hidden: torch.Tensor) -> None:
        """See the target's final hidden states ``[a + 1, H]`` at the positions the last verification
        kept (the previous last token and the ``a`` accepted ones): feature-level heads read them."""


def draft_chains(
    limits: Sequence[int],
    first: dict[int, torch.Tensor],
    extend: Callable[[list[int], list[int]], Sequence[torch.Tensor]],
    choose: Callable[[int, torch.Tensor], tuple[int, torch.Tensor | None, bool]],
) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Several requests' chain drafts, level by level: the loop every drafter that drafts together
    shares. ``first[i]``: request ``i``'s logits for its first draft token (a request without
    them drafts nothing); ``choose(i, logits)``: its token, the distribution it was drawn from
    (None: greedy) and whether it may go on; ``extend(requests, tokens)``: those requests' next
    logits after their last tokens, in one draft forward. A request stops after ``limits[i]``
    tokens or when ``choose`` says so. Returns each request's tokens and distributions."""
    tokens: list[list[int]] = [[] for _ in limits]
    probs: list[list[torch.Tensor]] = [[] for _ in limits]
    live, logits = list(first), list(first.values())
    while live:
        going = []
        for i, row in zip(live, logits):
            token, dist, go_on = choose(i, row)
            tokens[i].append(token)
            if dist is not None:
                probs[i].append(dist)
            if go_on and len(tokens[i]) < limits[i]:
                going.append(i)
        live = going
        if live:
            logits = extend(live, [tokens[i][-1] for i in live])
    return tokens, probs
