"""MTAD's drafter: beam sampling on an auxiliary model (Qin et al., ICLR 2025).

Width B, depth γ. Step 1 samples B distinct tokens from q(·|ctx); each later step scores every
(beam, token) pair by log P(beam) + log q(token | beam), samples B pairs in proportion to
exp(score) and renormalises the kept beams. The most probable final beam is the draft, with the
draft's per-step log-probabilities along it (the verifier's joint ratio needs them). Greedy mode
is top-B beam search. All beams share the cached prompt through tree attention; the tree
tokens are cropped away afterwards, so the draft cache only ever holds the real sequence.

Unlike the reference code, kept beams are renormalised in log space (log P − logsumexp), which
keeps their relative probabilities exact.
"""

from __future__ import annotations

import torch

from specdecode.errors import InvalidSettingError
from specdecode.models.cache import KVCache, forward
from specdecode.models.tree import forward_tree
from specdecode.propose.base import Draft, Proposer
from specdecode.sampling import SamplingSettings, process_logits


class BeamSampleProposer(Proposer):
    def __init__(
        self,
        model: torch.nn.Module,
        sampling: SamplingSettings,
        generator: torch.Generator | None,
        beams: int = 4,
        depth: int = 4,
        with_replacement: bool = False,
    ) -> None:
        super().__init__()
        if beams < 1:
            raise InvalidSettingError(f"beams (beam width B) must be >= 1, got {beams}")
        if depth < 1:
            raise InvalidSettingError(f"gamma (draft depth) must be >= 1, got {depth}")
        self.model, self.sampling, self.generator = model, sampling, generator
        self.beams, self.depth, self.with_replacement = beams, depth, with_replacement
        self.kv = KVCache()

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
        context_len = len(sequence)
        pending = self.kv.sync(sequence)
        log_q = self._log_q(forward(self.model, self.kv, pending, logits_to_keep=1)[-1])
        self.stats.forwards += 1
        _, tokens = self._choose(log_q[None])
        beam_tokens = tokens[:, None]                   # [B, t] tokens of each beam
        beam_log_q = log_q[tokens][:, None]             # [B, t] per-step draft log-probs
        score = beam_log_q[:, 0] - torch.logsumexp(beam_log_q[:, 0], dim=0)
        beam_slots: list[list[int]] = [[] for _ in range(len(tokens))]  # tree slots of fed ancestors
        tree_positions: list[int] = []
        for step in range(1, depth):
            # feed every beam's last token (at position context_len + step - 1) as a new tree slot
            n_prev, width = len(tree_positions), len(beam_tokens)
            visible = torch.zeros(width, n_prev + width, dtype=torch.bool)
            for i, slots in enumerate(beam_slots):
                visible[i, slots] = True
                visible[i, n_prev + i] = True
            new_positions = [context_len + step - 1] * width
            logits = forward_tree(self.model, self.kv, beam_tokens[:, -1].tolist(), new_positions, visible,
                                  context_len, tree_positions)
            self.stats.forwards += 1
            tree_positions += new_positions
            log_q = self._log_q(logits)                 # [width, V]
            parents, tokens = self._choose(score[:, None] + log_q)
            step_log_q = log_q[parents, tokens]
            beam_tokens = torch.cat([beam_tokens[parents], tokens[:, None]], dim=1)
            beam_log_q = torch.cat([beam_log_q[parents], step_log_q[:, None]], dim=1)
            beam_slots = [beam_slots[p] + [n_prev + p] for p in parents.tolist()]
            score = score[parents] + step_log_q
            score = score - torch.logsumexp(score, dim=0)
        self.kv.crop(context_len)
        best = int(score.argmax())
        self.stats.proposed += depth
        return Draft(tokens=beam_tokens[best].tolist(), log_q=beam_log_q[best])
