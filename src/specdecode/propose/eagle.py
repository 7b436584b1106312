"""Drafting with a feature-level draft head (EAGLE): chains, dynamic trees, and MTAD's beams.

:class:`HeadDrafter` keeps the head's cache in step with the target's: the loop hands it the
target's final hidden states at every kept position, and entry t of the head's cache is
``(h_t, x_{t+1})``, so it always covers the same positions as the target's cache (all but the
last token). Drafting continues from the last real entry with the head's own predicted
features; the draft entries are cropped off afterwards, so only real features stay cached.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from specdecode.errors import InvalidSettingError
from specdecode.models.cache import KVCache
from specdecode.models.draft_head import DraftHead
from specdecode.models.frequent_vocab import expand_logits
from specdecode.models.tree import tree_attention_mask
from specdecode.propose.base import Draft, Proposer, draft_chains
from specdecode.propose.beam_sampler import TreeDrafter
from specdecode.sampling import SamplingSettings, process_logits, sample


class HeadDrafter(TreeDrafter):
    """A :class:`DraftHead` as a tree drafter over its own reduced vocabulary (``vocab_ids``):
    :meth:`root` and :meth:`extend` return float32 logits ``[..., len(vocab_ids)]``; :meth:`full`
    widens them to the target's vocabulary (``-inf`` elsewhere) where a consumer needs that."""

    def __init__(self, head: DraftHead) -> None:
        self.head = head
        self.vocab_ids = head.vocab_ids.long()
        self.kv = KVCache()
        self.real = 0                             # cache entries built from the target's own features
        self.pending: list[torch.Tensor] = []     # target hidden states not yet fed
        self.last_feature: torch.Tensor | None = None
        self.features: torch.Tensor | None = None  # predicted features of the last returned rows
        self.tree_positions: list[int] = []

    def on_prefill(self, prompt_hidden: torch.Tensor) -> None:
        self.pending.append(prompt_hidden)

    def observe_hidden(self, hidden: torch.Tensor) -> None:
        self.pending.append(hidden)

    def full(self, sub_logits: torch.Tensor) -> torch.Tensor:
        """Logits over the target's vocabulary, ``-inf`` outside the head's."""
        return expand_logits(sub_logits, self.head.vocab_ids, self.head.target_vocab_size)

    def full_probs(self, sub_probs: torch.Tensor) -> torch.Tensor:
        """A distribution over the head's ids as one over the target's vocabulary (0 elsewhere)."""
        return expand_logits(sub_probs, self.vocab_ids, self.head.target_vocab_size, fill=0.0)

    @staticmethod
    def _wide(sub_logits: torch.Tensor) -> torch.Tensor:
        return sub_logits.to(torch.promote_types(sub_logits.dtype, torch.float32))

    def root(self, sequence: list[int]) -> torch.Tensor | None:
        """Feed the pending real positions; logits for the token after ``sequence`` (None before any feature)."""
        return self.roots([self], [sequence])[0]

    @staticmethod
    def roots(drafters: Sequence[HeadDrafter], sequences: Sequence[list[int]]) -> list[torch.Tensor | None]:
        """:meth:`root` of several drafters of one head, their pending positions fed in one head
        forward and their next-token logits read in one product."""
        head = drafters[0].head
        feeding = [(d, s) for d, s in zip(drafters, sequences) if d.pending]
        if feeding:
            hidden, tokens, lengths = [], [], []
            for drafter, sequence in feeding:
                rows = torch.cat(drafter.pending).to(head.fc.weight)
                ids = sequence[drafter.real + 1: drafter.real + 1 + len(rows)]
                if len(ids) != len(rows):
                    raise InvalidSettingError("draft head out of step with the target: hidden states and tokens disagree")
                hidden.append(rows)
                tokens.extend(ids)
                lengths.append(len(ids))
            features = head.forward_batch(torch.cat(hidden), torch.tensor(tokens, device=head.fc.weight.device),
                                          [d.kv for d, _ in feeding], lengths)
            end = 0
            for (drafter, _), n in zip(feeding, lengths):
                end += n
                drafter.pending, drafter.real = [], drafter.real + n
                drafter.last_feature = features[end - 1:end]
        ready = [i for i, (d, s) in enumerate(zip(drafters, sequences))
                 if d.last_feature is not None and d.real == len(s) - 1]
        out: list[torch.Tensor | None] = [None] * len(drafters)
        if ready:
            for i in ready:
                drafters[i].features, drafters[i].tree_positions = drafters[i].last_feature, []
            logits = HeadDrafter._wide(head.logits(torch.cat([drafters[i].last_feature for i in ready])))
            for row, i in enumerate(ready):
                out[i] = logits[row]
        return out

    @staticmethod
    def extend_chains(drafters: Sequence[HeadDrafter], tokens: Sequence[int]) -> torch.Tensor:
        """One more chain token on each drafter (after its last returned row), in one head forward:
        logits ``[len(drafters), V]``. The chain form of :meth:`extend` (``rows=[last]``, every
        earlier draft entry visible), for drafters that draft a chain."""
        head = drafters[0].head
        features = head.forward_batch(torch.cat([d.features[-1:] for d in drafters]),
                                      torch.tensor(list(tokens), device=head.fc.weight.device),
                                      [d.kv for d in drafters], [1] * len(drafters))
        for drafter, feature in zip(drafters, features):
            drafter.tree_positions.append(drafter.real + len(set(drafter.tree_positions)))
            drafter.features = feature[None]
        return HeadDrafter._wide(head.logits(features))

    def extend(self, rows: list[int], tokens: list[int], visible: torch.Tensor) -> torch.Tensor:
        level = len(set(self.tree_positions))
        positions = [self.real + level] * len(tokens)
        device = self.head.fc.weight.device
        all_positions = torch.tensor([*self.tree_positions, *positions], device=device)
        new_positions = torch.tensor(positions, device=device)
        mask = tree_attention_mask(self.head.layers, self.real, all_positions, visible.to(device), new_positions)
        features = self.head(self.features[rows][None], torch.tensor([tokens], device=device), self.kv,
                             position_ids=new_positions[None], attention_mask=mask)[0]
        self.tree_positions += positions
        self.features = features
        return self._wide(self.head.logits(features))

    def reset(self) -> None:
        self.kv.crop(self.real)


class EagleProposer(Proposer):
    """Chain drafting with a draft head: up to γ tokens, stopping early where the head's own
    probability of its token falls below ``min_confidence``. Greedy or sampled (exact under
    speculative sampling: the draft distributions go with the tokens)."""

    def __init__(self, head: DraftHead, sampling: SamplingSettings, generator: torch.Generator | None,
                 gamma: int = 5, min_confidence: float = 0.0) -> None:
        super().__init__()
        if gamma < 1:
            raise InvalidSettingError(f"gamma (draft length) must be >= 1, got {gamma}")
        if not 0 <= min_confidence <= 1:
            raise InvalidSettingError(f"min_confidence must be in [0, 1], got {min_confidence}")
        self.drafter = HeadDrafter(head)
        self.sampling, self.generator = sampling, generator
        self.gamma, self.min_confidence = gamma, min_confidence

    def on_prefill(self, prompt_hidden: torch.Tensor) -> None:
        self.drafter.on_prefill(prompt_hidden)

    def observe_hidden(self, hidden: torch.Tensor) -> None:
        self.drafter.observe_hidden(hidden)

    def batch_key(self) -> Hashable | None:
        return id(self.drafter.head)

    def propose(self, sequence: list[int], max_tokens: int) -> Draft:
        return self.propose_batch([self], [sequence], [max_tokens])[0]

    @classmethod
    def propose_batch(cls, proposers: Sequence[EagleProposer], sequences: Sequence[list[int]],
                      max_tokens: Sequence[int]) -> list[Draft]:
        """Every request's chain drafted level by level, the requests still drafting in one head
        forward a level; each stops at its own γ or below its own ``min_confidence``."""
        limits = [min(p.gamma, m) for p, m in zip(proposers, max_tokens)]
        live = [i for i, limit in enumerate(limits) if limit >= 1]
        roots = HeadDrafter.roots([proposers[i].drafter for i in live], [sequences[i] for i in live]) if live else []

        def choose(i: int, logits: torch.Tensor) -> tuple[int, torch.Tensor | None, bool]:
            proposers[i].stats.forwards += 1
            return proposers[i]._choose(logits)

        tokens, probs = draft_chains(
            limits, {i: row for i, row in zip(live, roots) if row is not None},
            lambda going, last: HeadDrafter.extend_chains([proposers[i].drafter for i in going], last), choose)
        drafts = []
        for proposer, chain, dists in zip(proposers, tokens, probs):
            proposer.drafter.reset()
            proposer.stats.proposed += len(chain)
            drafts.append(Draft(tokens=chain, probs=proposer.drafter.full_probs(torch.stack(dists)) if dists else None))
        return drafts

    def _choose(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None, bool]:
        """The next draft token from the head's logits over its own ids (greedy or sampled; the
        distribution it was drawn from), and whether the head is confident enough to go on."""
        if self.sampling.greedy:
            local = int(logits.argmax())
            dist = None
            confident = not self.min_confidence or float(torch.softmax(logits, -1)[local]) >= self.min_confidence
        else:
            dist = process_logits(logits, self.sampling)
            local = sample(dist, self.generator)
            confident = float(dist[local]) >= self.min_confidence
        return int(self.drafter.vocab_ids[local]), dist, confident


class EagleTreeProposer(Proposer):
    """EAGLE-2's dynamic draft tree (Li et al. 2024b), for greedy verification in one forward.

    Level by level, the ``top_k`` most probable frontier nodes (by the head's joint log-probability
    along their path) are expanded by their ``top_k`` best next tokens; after ``depth`` levels the
    ``nodes`` most probable tokens of the whole tree are verified. A child never outscores its
    parent, so that set is closed under ancestors.
    """

    def __init__(self, head: DraftHead, depth: int = 5, top_k: int = 4, nodes: int = 16) -> None:
        super().__init__()
        for name, value in (("depth", depth), ("top_k", top_k), ("nodes", nodes)):
            if value < 1:
                raise InvalidSettingError(f"{name} must be >= 1, got {value}")
        self.drafter = HeadDrafter(head)
        self.depth, self.top_k, self.nodes = depth, top_k, nodes

    def on_prefill(self, prompt_hidden: torch.Tensor) -> None:
        self.drafter.on_prefill(prompt_hidden)

    def observe_hidden(self, hidden: torch.Tensor) -> None:
        self.drafter.observe_hidden(hidden)

    def propose(self, sequence: list[int], max_tokens: int) -> Draft:
        depth = min(self.depth, max_tokens)
        logits = self.drafter.root(sequence) if depth >= 1 else None
        if logits is None:
            return Draft()
        tokens: list[int] = []
        parents: list[int] = []   # index into [root, *tokens]
        scores: list[float] = []
        slot_of: dict[int, int] = {}  # node -> drafter tree slot, for fed nodes
        rows_of: dict[int, int] = {0: 0}  # node -> row of the drafter's last logits that scored its children
        frontier = self._children(torch.log_softmax(logits[None], dim=-1), [0], [0.0], tokens, parents, scores)
        self.stats.forwards += 1
        for _ in range(1, depth):
            rows = [rows_of[parents[node - 1]] for node in frontier]
            visible = torch.zeros(len(frontier), len(slot_of) + len(frontier), dtype=torch.bool)
            for i, node in enumerate(frontier):
                slot_of[node] = len(slot_of)
                ancestor = node
                while ancestor:
                    visible[i, slot_of[ancestor]] = True
                    ancestor = parents[ancestor - 1]
            rows_of = {node: i for i, node in enumerate(frontier)}
            log_p = torch.log_softmax(self.drafter.extend(rows, [tokens[n - 1] for n in frontier], visible), dim=-1)
            self.stats.forwards += 1
            frontier = self._children(log_p, frontier, [scores[n - 1] for n in frontier], tokens, parents, scores)
        self.drafter.reset()
        keep = sorted(sorted(range(len(tokens)), key=lambda i: -scores[i])[: self.nodes])
        new_index = {old + 1: new + 1 for new, old in enumerate(keep)}
        new_index[0] = 0
        self.stats.proposed += len(keep)
        return Draft(tokens=[tokens[i] for i in keep], parents=[new_index[parents[i]] for i in keep])

    def _children(self, log_p: torch.Tensor, owners: list[int], owner_scores: list[float], tokens: list[int],
                  parents: list[int], scores: list[float]) -> list[int]:
        """Add the top-k children of every row (row i continues node ``owners[i]``); return the
        ``top_k`` best new nodes as the next frontier."""
        values, indices = log_p.topk(min(self.top_k, log_p.shape[-1]), dim=-1)
        indices = self.drafter.to_target(indices)
        start = len(tokens) + 1
        for row, owner in enumerate(owners):
            for value, token in zip(values[row].tolist(), indices[row].tolist()):
                tokens.append(token)
                parents.append(owner)
                scores.append(owner_scores[row] + value)
        added = range(start, len(tokens) + 1)
        return sorted(sorted(added, key=lambda n: -scores[n - 1])[: self.top_k])
