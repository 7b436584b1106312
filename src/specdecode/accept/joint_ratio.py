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

The tree rule reads the target's rows level by level (``Readout.on_demand``): a node's row is
read only where some node below it could still pass — a path's target probability only falls
going down, so a node whose own joint target probability clears no deeper depth's bar has no
passing descendant — and the chosen node's row for the next token (the next level's rows are
read along while a head call costs about what one row does). The verdict is the one that reading
every row gives; the head, most of a wide tree's verification, runs on a few rows.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from specdecode.accept.rules import Verdict, sampling_readout
from specdecode.errors import InvalidSettingError
from specdecode.models.runner import LogitRows, Readout
from specdecode.propose.base import Draft
from specdecode.sampling import SamplingSettings, process_logits, sample


class JointRatioAcceptance:

    def __init__(self, sampling: SamplingSettings, generator: torch.Generator | None, threshold: float = 0.5) -> None:
        if not threshold > 0:
            raise InvalidSettingError(f"threshold (acceptance threshold tau) must be > 0, got {threshold}")
        self.sampling, self.generator, self.log_threshold = sampling, generator, math.log(threshold)

    def readout(self, draft: Draft) -> Readout:
        # a chain reads every row (the longest passing prefix may pass a failing one); a tree, the rows of its walk
        return replace(sampling_readout(self.sampling), on_demand=draft.parents is not None)

    def __call__(self, draft: Draft, target_logits: torch.Tensor | LogitRows,  # [k + 1, V] (tree: [nodes + 1, V])
                 ) -> Verdict:
        if len(draft) and draft.log_q is None:
            raise InvalidSettingError("joint-ratio acceptance needs the draft's log-probabilities")
        if draft.parents is not None:
            return self._tree(draft, LogitRows.of(target_logits))
        p = process_logits(target_logits, self.sampling)  # a chain's readout is not on demand: a tensor
        accepted = 0
        if len(draft):
            k = len(draft)
            log_p = torch.log(p[torch.arange(k), torch.tensor(draft.tokens)])
            ratio = torch.cumsum(log_p - draft.log_q.to(log_p), dim=0)
            passing = (ratio > self.log_threshold).nonzero()
            accepted = int(passing[-1]) + 1 if len(passing) else 0
        return Verdict(accepted, self._next_token(p[accepted]))

    def _tree(self, draft: Draft, rows: LogitRows) -> Verdict:
        """Multi-candidate MTAD: row ``n`` of ``rows`` follows node ``n`` (0: the last token), see the
        module docstring."""
        parents, nodes = draft.parents, len(draft) + 1
        depth, log_q = [0], [0.0]                               # per node, node 0 first
        children: list[list[int]] = [[] for _ in range(nodes)]
        for node, (parent, lq) in enumerate(zip(parents, draft.log_q.tolist() if nodes > 1 else []), start=1):
            depth.append(depth[parent] + 1)
            log_q.append(log_q[parent] + lq)
            children[parent].append(node)
        best_draft: dict[int, float] = {}
        for node in range(1, nodes):
            best_draft[depth[node]] = max(best_draft.get(depth[node], -math.inf), log_q[node])
        deepest = list(depth)                                   # the deepest depth in each node's subtree
        for node in range(nodes - 1, 0, -1):
            deepest[parents[node - 1]] = max(deepest[parents[node - 1]], deepest[node])

        def passes(value: float, at_depth: int) -> bool:
            return value - best_draft[at_depth] > self.log_threshold

        def worth_reading(node: int) -> bool:  # could a node below it pass? (a path's log p only falls)
            return any(passes(log_p[node], d) for d in range(depth[node] + 1, deepest[node] + 1))

        log_p = [0.0] + [-math.inf] * (nodes - 1)
        p: dict[int, torch.Tensor] = {}
        level = [0] if nodes > 1 else []
        while level:
            below = [kid for node in level for kid in children[node]]  # likely next: those with children first
            logits = rows(level, likely=sorted(below, key=lambda kid: not children[kid]))
            for node, row in zip(level, process_logits(logits, self.sampling)):
                p[node] = row
                kids = children[node]
                for kid, lp in zip(kids, torch.log(row[[draft.tokens[k - 1] for k in kids]]).tolist()):
                    log_p[kid] = log_p[node] + lp
            level = [kid for node in level for kid in children[node] if children[kid] and worth_reading(kid)]
        chosen = 0
        for node in range(1, nodes):
            if passes(log_p[node], depth[node]) and (
                    depth[node] > depth[chosen] or (depth[node] == depth[chosen] and log_p[node] > log_p[chosen])):
                chosen = node
        path = [chosen]
        while path[-1]:
            path.append(parents[path[-1] - 1])
        bonus = p[chosen] if chosen in p else process_logits(rows([chosen]), self.sampling)[0]
        return Verdict(depth[chosen], self._next_token(bonus), tuple(reversed(path)))

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
