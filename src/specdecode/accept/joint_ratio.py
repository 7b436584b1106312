"""MTAD's verification: accept the longest draft prefix whose joint target/draft ratio clears τ.

r_i = Σ_{j≤i} (log p(x_j|·) − log q(x_j|·)); accept a = max{i : r_i > log τ} (0 if none), then
sample one token from the target at position a + 1. Note "longest", not "until the first
failure": the cumulative ratio can recover after a dip. With a greedy (one-hot) target, a
mismatch makes r = −∞ from there on, so greedy MTAD keeps exactly the prefix greedy decoding
would produce.

Over a tree (``draft.parents``) it verifies multi-candidate MTAD's tree of beams as the reference
code does: a node at depth d passes where its path's joint target probability is at least τ
times the *largest* joint draft probability among the depth-d beams (the best draft the tree
offers at that length, not the node's own); the deepest depth with a passing node is accepted,
along the passing node of highest joint target probability. Greedy stays exact for the same
reason as the chain rule: only the greedy path has a finite target probability.
"""

from __future__ import annotations

import math

import torch

from specdecode.accept.rules import Verdict, sampling_readout
from specdecode.errors import InvalidSettingError
from specdecode.models.runner import Readout
from specdecode.propose.base import Draft
from specdecode.sampling import SamplingSettings, process_logits, sample


class JointRatioAcceptance:

    def __init__(self, sampling: SamplingSettings, generator: torch.Generator | None, threshold: float = 0.5) -> None:
        if not threshold > 0:
            raise InvalidSettingError(f"threshold (acceptance threshold tau) must be > 0, got {threshold}")
        self.sampling, self.generator, self.log_threshold = sampling, generator, math.log(threshold)

    def readout(self, draft: Draft) -> Readout:
        return sampling_readout(self.sampling)  # every row: the longest passing prefix may pass a failing one

    def __call__(self, draft: Draft, target_logits: torch.Tensor,  # [k + 1, V] (tree: [nodes + 1, V])
                 ) -> Verdict:
        p = process_logits(target_logits, self.sampling)
        if len(draft) and draft.log_q is None:
            raise InvalidSettingError("joint-ratio acceptance needs the draft's log-probabilities")
        if draft.parents is not None:
            return self._tree(draft, p)
        accepted = 0
        if len(draft):
            k = len(draft)
            log_p = torch.log(p[torch.arange(k), torch.tensor(draft.tokens)])
            ratio = torch.cumsum(log_p - draft.log_q.to(log_p), dim=0)
            passing = (ratio > self.log_threshold).nonzero()
            accepted = int(passing[-1]) + 1 if len(passing) else 0
        return Verdict(accepted, self._next_token(p[accepted]))

    def _tree(self, draft: Draft, p: torch.Tensor) -> Verdict:
        """Multi-candidate MTAD: rows of ``p`` follow nodes (0: the last token), see the module docstring."""
        step_log_p = torch.log(p[torch.tensor(draft.parents), torch.tensor(draft.tokens)]).tolist()
        depth, log_p, log_q = [0], [0.0], [0.0]                 # per node, node 0 first
        for parent, lp, lq in zip(draft.parents, step_log_p, draft.log_q.tolist()):
            depth.append(depth[parent] + 1)
            log_p.append(log_p[parent] + lp)
            log_q.append(log_q[parent] + lq)
        best_draft: dict[int, float] = {}
        for node in range(1, len(depth)):
            best_draft[depth[node]] = max(best_draft.get(depth[node], -math.inf), log_q[node])
        chosen = 0
        for node in range(1, len(depth)):
            if log_p[node] - best_draft[depth[node]] > self.log_threshold and (
                    depth[node] > depth[chosen] or (depth[node] == depth[chosen] and log_p[node] > log_p[chosen])):
                chosen = node
        path = [chosen]
        while path[-1]:
            path.append(draft.parents[path[-1] - 1])
        return Verdict(depth[chosen], self._next_token(p[chosen]), tuple(reversed(path)))

    def _next_token(self, p: torch.Tensor) -> int:
        return int(p.argmax()) if self.sampling.greedy else sample(p, self.generator)


class AcceptAll:
    """Keep the whole draft (it already came from the target's own distribution: MTJD), then one
    token sampled from the target's conditional after it."""

    def __init__(self, sampling: SamplingSettings, generator: torch.Generator | None) -> None:
        self.sampling, self.generator = sampling, generator

    def readout(self, draft: Draft) -> Readout:
        return sampling_readout(self.sampling)

    def __call__(self, draft: Draft, target_logits: torch.Tensor,  # [k + 1, V] (tree: [nodes + 1, V])
                 ) -> Verdict:
        p = process_logits(target_logits[len(draft)], self.sampling)
        return Verdict(len(draft), sample(p, self.generator))
