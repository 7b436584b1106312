"""Greedy matching and speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

Both rules see the target's logits at ``k + 1`` positions for a draft of ``k`` tokens: position
``i`` is the target's prediction for draft token ``i``, position ``k`` the bonus position. They
return how many draft tokens to keep and the one token the target contributes after them, so
every step emits at least one token — with ``k == 0`` this is plain autoregressive decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from specdecode.models.runner import Readout
from specdecode.propose.base import Draft
from specdecode.sampling import SamplingSettings, process_logits, sample


@dataclass(frozen=True)
class Verdict:
    """``accepted`` draft tokens are kept, then ``next_token``. For a tree draft ``path`` lists the
    kept nodes as indices into ``[last token, *draft.tokens]`` (starting with 0)."""

    accepted: int
    next_token: int
    path: tuple[int, ...] | None = None


class AcceptanceRule(Protocol):
    def readout(self, draft: Draft) -> Readout:
        """What the rule will read of the target's logits for ``draft`` (the runner computes no more)."""
        ...

    def __call__(self, draft: Draft, target_logits: torch.Tensor,  # [k + 1, V] (tree: [nodes + 1, V])
                 ) -> Verdict: ...


def greedy_readout(draft: Draft) -> Readout:
    """Greedy matching reads each row's argmax, and a chain's rows only up to its first mismatch."""
    return Readout(top_k=1, until_mismatch=tuple(draft.tokens) if draft.parents is None else None)


def sampling_readout(sampling: SamplingSettings) -> Readout:
    """A rule that processes every row as :func:`process_logits` does reads what that reads."""
    return Readout(top_k=sampling.exact_top)


class GreedyMatch:
    """Keep draft tokens while they equal the target's argmax: lossless w.r.t. greedy decoding."""

    readout = staticmethod(greedy_readout)

    def __call__(self, draft: Draft, target_logits: torch.Tensor,  # [k + 1, V] (tree: [nodes + 1, V])
                 ) -> Verdict:
        choices = target_logits.argmax(dim=-1).tolist()
        accepted = 0
        while accepted < len(draft) and draft.tokens[accepted] == choices[accepted]:
            accepted += 1
        return Verdict(accepted, choices[accepted])


class GreedyTreeMatch:
    """Greedy matching over a tree draft: from the root, follow the child that equals the target's
    argmax for as long as there is one; lossless like :class:`GreedyMatch`."""

    lossless = True
    readout = staticmethod(greedy_readout)

    def __call__(self, draft: Draft, target_logits: torch.Tensor,  # [k + 1, V] (tree: [nodes + 1, V])
                 ) -> Verdict:
        if draft.parents is None:
            return GreedyMatch()(draft, target_logits)
        choices = target_logits.argmax(dim=-1).tolist()
        children: dict[tuple[int, int], int] = {}
        for node, (parent, token) in enumerate(zip(draft.parents, draft.tokens), start=1):
            children.setdefault((parent, token), node)
        path = [0]
        while (path[-1], choices[path[-1]]) in children:
            path.append(children[(path[-1], choices[path[-1]])])
        return Verdict(len(path) - 1, choices[path[-1]], tuple(path))


class SpeculativeSampling:
    """Accept token x with probability min(1, p(x)/q(x)); on rejection sample norm(max(0, p − q)).

    The output is distributed exactly as sampling from the processed target ``p``. A draft
    without ``probs`` was chosen deterministically, i.e. q is one-hot on the drafted token.
    """

    def __init__(self, sampling: SamplingSettings, generator: torch.Generator | None) -> None:
        self.sampling = sampling
        self.generator = generator

    def readout(self, draft: Draft) -> Readout:
        return sampling_readout(self.sampling)

    def __call__(self, draft: Draft, target_logits: torch.Tensor,  # [k + 1, V] (tree: [nodes + 1, V])
                 ) -> Verdict:
        p = process_logits(target_logits, self.sampling)
        k = len(draft)
        if k:
            idx = torch.arange(k, device=p.device)
            tokens = torch.tensor(draft.tokens, device=p.device)
            p_tok = p[idx, tokens]
            q_tok = draft.probs[idx, tokens] if draft.probs is not None else torch.ones_like(p_tok)
            ratios = (p_tok / q_tok).clamp(max=1.0)
            draws = torch.rand(k, generator=self.generator, device=p.device, dtype=ratios.dtype)
            rejected = (draws >= ratios).nonzero()
            if len(rejected):
                i = int(rejected[0])
                if draft.probs is not None:
                    residual = (p[i] - draft.probs[i]).clamp(min=0)
                else:
                    residual = p[i].clone()
                    residual[draft.tokens[i]] = 0
                total = residual.sum()
                # total == 0 only when p == q, where rejection has probability 0; guard rounding
                dist = residual / total if total > 0 else p[i]
                return Verdict(i, sample(dist, self.generator))
        return Verdict(k, sample(p[k], self.generator))
