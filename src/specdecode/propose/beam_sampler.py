"""MTAD's drafter: beam sampling on an auxiliary model (Qin et al., ICLR 2025).

Width B, depth γ. Step 1 samples B distinct tokens from q(·|ctx); each later step scores every
(beam, token) pair by log P(beam) + log q(token | beam), samples B pairs in proportion to
exp(score) and renormalises the kept beams. The most probable final beam is the draft, with the
draft's per-step log-probabilities along it (the verifier's joint ratio needs them). Greedy mode
is top-B beam search. All beams share the cached prompt through tree attention; the tree
tokens are cropped away afterwards, so the draft cache only ever holds the real sequence.

Unlike the reference code, kept beams are renormalised in log space (log P − logsumexp), which
keeps their relative probabilities exact.

Multi-candidate MTAD (``tree=True``, the reference code's ``TreeMTADStrategy``): instead of the
best final beam, every beam of every level is handed over as one draft tree (B nodes a level,
each continuing the beam it was drawn from), which the target verifies in one forward with tree
attention; ``accept/joint_ratio.py`` picks the path.

The auxiliary model is a :class:`TreeDrafter`: a causal LM (:class:`ModelDrafter`) or a
feature-level draft head (``propose/eagle.py``), which needs to know which earlier output each
new tree token continues (it reads that output's predicted feature).
"""

from __future__ import annotations

import torch

from specdecode.errors import InvalidSettingError
from specdecode.models.cache import KVCache, forward
from specdecode.models.tree import forward_tree
from specdecode.propose.base import Draft, Proposer
from specdecode.sampling import SamplingSettings, process_logits


class TreeDrafter:
    """A draft model run over a tree of continuations of the current sequence.

    :meth:`root` gives the logits ``[V]`` after the sequence; each :meth:`extend` feeds one level
    of tree tokens, token i continuing row ``rows[i]`` of the previous call's logits (of the root
    for the first level), seeing the tree slots fed so far that ``visible[i]`` names plus itself;
    :meth:`reset` drops the tree again. The feed hooks mirror :class:`Proposer`'s.

    The logits are over the drafter's own vocabulary: row ``j`` of the last axis is target token
    ``vocab_ids[j]`` (``None``: the target's whole vocabulary, ``j`` is the token id). A draft
    head with a reduced vocabulary drafts on its few thousand ids and never widens its logits to
    the target's vocabulary; tokens handed to :meth:`extend` are target ids.
    """

    vocab_ids: torch.Tensor | None = None

    def to_target(self, local: torch.Tensor) -> torch.Tensor:
        """Target token ids of rows ``local`` of this drafter's logits."""
        return local if self.vocab_ids is None else self.vocab_ids[local]

    def on_prefill(self, prompt_hidden: torch.Tensor) -> None:
        """See the target's hidden states over the prompt."""

    def observe_hidden(self, hidden: torch.Tensor) -> None:
        """See the target's hidden states at the positions the last verification kept."""

    def root(self, sequence: list[int]) -> torch.Tensor | None:
        raise NotImplementedError

    def extend(self, rows: list[int], tokens: list[int], visible: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


class ModelDrafter(TreeDrafter):
    """A causal LM with its own KV cache; tree levels share the cached sequence through tree attention."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.kv = KVCache()
        self.context_len = 0
        self.tree_positions: list[int] = []

    def root(self, sequence: list[int]) -> torch.Tensor:
        self.context_len, self.tree_positions = len(sequence), []
        return forward(self.model, self.kv, self.kv.sync(sequence), logits_to_keep=1)[-1]

    def extend(self, rows: list[int], tokens: list[int], visible: torch.Tensor) -> torch.Tensor:
        level = len(set(self.tree_positions))
        positions = [self.context_len + level] * len(tokens)
        logits = forward_tree(self.model, self.kv, tokens, positions, visible, self.context_len, self.tree_positions)
        self.tree_positions += positions
        return logits

    def reset(self) -> None:
        self.kv.crop(self.context_len)


class BeamSampleProposer(Proposer):
    def __init__(
        self,
        drafter: TreeDrafter,
        sampling: SamplingSettings,
        generator: torch.Generator | None,
        beams: int = 4,
        depth: int = 4,
        with_replacement: bool = False,
        tree: bool = False,
    ) -> None:
        super().__init__()
        if beams < 1:
            raise InvalidSettingError(f"beams (beam width B) must be >= 1, got {beams}")
        if depth < 1:
            raise InvalidSettingError(f"gamma (draft depth) must be >= 1, got {depth}")
        self.drafter, self.sampling, self.generator = drafter, sampling, generator
        self.beams, self.depth, self.with_replacement, self.tree = beams, depth, with_replacement, tree

    def on_prefill(self, prompt_hidden: torch.Tensor) -> None:
        self.drafter.on_prefill(prompt_hidden)

    def observe_hidden(self, hidden: torch.Tensor) -> None:
        self.drafter.observe_hidden(hidden)

    def _log_q(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft log-probs: processed for sampling; raw for greedy (one-hot would give log 0 = -inf)."""
        if self.sampling.greedy:
            return torch.log_softmax(logits, dim=-1)
        return torch.log(process_logits(logits, self.sampling))

    def _choose(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick up to B (row, token) pairs from ``scores [rows, V]``: sampled ∝ exp(score), or top-B."""
        flat = scores.reshape(-1)
        finite = int(torch.isfinite(flat).sum())
        count = self.beams if self.with_replacement and not self.sampling.greedy else min(self.beams, finite)
        if self.sampling.greedy:
            picks = torch.topk(flat, count).indices
        else:
            # restrict to the support first: a top-k filtered row has at most top_k finite entries
            support = torch.topk(flat, min(finite, flat.numel())).indices if finite < flat.numel() else None
            probs = torch.softmax(flat if support is None else flat[support], dim=-1)
            picks = torch.multinomial(probs, count, replacement=self.with_replacement, generator=self.generator)
            if support is not None:
                picks = support[picks]
        vocab = scores.shape[-1]
        return picks // vocab, picks % vocab

    def propose(self, sequence: list[int], max_tokens: int) -> Draft:
        depth = min(self.depth, max_tokens)
        if depth < 1:
            return Draft()
        root = self.drafter.root(sequence)
        if root is None:
            return Draft()
        log_q = self._log_q(root)
        self.stats.forwards += 1
        _, local = self._choose(log_q[None])            # rows of the drafter's (maybe reduced) vocabulary
        beam_tokens = self.drafter.to_target(local)[:, None]  # [B, t] target token ids of each beam
        beam_log_q = log_q[local][:, None]              # [B, t] per-step draft log-probs
        score = beam_log_q[:, 0] - torch.logsumexp(beam_log_q[:, 0], dim=0)
        beam_slots: list[list[int]] = [[] for _ in range(len(local))]  # tree slots of fed ancestors
        rows = [0] * len(local)                        # logits row each beam's last token was drawn from
        fed = 0
        # the tree of every level's beams: nodes numbered from 1 in level order (0 = the last token)
        node_tokens, node_parents, node_log_q = beam_tokens[:, 0].tolist(), [0] * len(local), [beam_log_q[:, 0]]
        beam_nodes = list(range(1, len(local) + 1))
        for _ in range(1, depth):
            # feed every beam's last token as a new tree slot
            width = len(beam_tokens)
            visible = torch.zeros(width, fed + width, dtype=torch.bool)
            for i, slots in enumerate(beam_slots):
                visible[i, slots] = True
                visible[i, fed + i] = True
            logits = self.drafter.extend(rows, beam_tokens[:, -1].tolist(), visible)
            self.stats.forwards += 1
            log_q = self._log_q(logits)                 # [width, V]
            parents, local = self._choose(score[:, None] + log_q)
            step_log_q = log_q[parents, local]
            beam_tokens = torch.cat([beam_tokens[parents], self.drafter.to_target(local)[:, None]], dim=1)
            beam_log_q = torch.cat([beam_log_q[parents], step_log_q[:, None]], dim=1)
            beam_slots = [beam_slots[p] + [fed + p] for p in parents.tolist()]
            rows = parents.tolist()
            fed += width
            score = score[parents] + step_log_q
            score = score - torch.logsumexp(score, dim=0)
            node_parents += [beam_nodes[p] for p in parents.tolist()]
            beam_nodes = list(range(len(node_tokens) + 1, len(node_tokens) + 1 + len(parents)))
            node_tokens += beam_tokens[:, -1].tolist()
            node_log_q.append(step_log_q)
        self.drafter.reset()
        if self.tree:
            self.stats.proposed += len(node_tokens)
            return Draft(tokens=node_tokens, log_q=torch.cat(node_log_q), parents=node_parents)
        best = int(score.argmax())
        self.stats.proposed += depth
        return Draft(tokens=beam_tokens[best].tolist(), log_q=beam_log_q[best])
