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

import math
import time

import torch

from specdecode.errors import InvalidSettingError
from specdecode.models.runner import Readout, TargetRunner
from specdecode.propose.base import Draft, Proposer
from specdecode.sampling import SamplingSettings, _beyond_top_p, process_logits


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
    """A causal LM with its own KV cache; tree levels share the cached sequence through tree attention.

    A reduced-vocabulary draft (the shipped one: 8,192 ids) drafts over its own ids
    (``Readout.own_vocabulary``: no 262k-wide row is written, read or narrowed)."""

    def __init__(self, runner: TargetRunner) -> None:
        self.runner = runner
        self.kv = runner.new_cache()
        ids = runner.vocabulary_ids
        self.vocab_ids = None if ids is None else ids.long()
        self.context_len = 0
        self.level = 0                            # tree levels fed since the last root
        self.tree_positions: list[int] = []

    def root(self, sequence: list[int]) -> torch.Tensor:
        self.context_len, self.tree_positions, self.level = len(sequence), [], 0
        return self.runner.forward(self.kv, self.kv.sync(sequence), Readout(rows=1, own_vocabulary=self.vocab_ids is not None)).logits[-1]

    def extend(self, rows: list[int], tokens: list[int], visible: torch.Tensor) -> torch.Tensor:
        level, self.level = self.level, self.level + 1
        positions = [self.context_len + level] * len(tokens)
        logits = self.runner.forward_tree(self.kv, tokens, positions, visible, self.context_len,
                                          self.tree_positions, Readout(own_vocabulary=self.vocab_ids is not None)).logits
        self.tree_positions += positions
        return logits

    def reset(self) -> None:
        self.kv.crop(self.context_len)


class BeamSampleProposer(Proposer):
    """MTAD's beam sampler (see the module docstring); per level a handful of tensor ops.

    Per level: each fed beam's candidate tokens (its row's top-k for top-k sampling, its top B for
    greedy: the only entries that can be drawn) with their draft log-probs, scored by
    ``score[beam] + log q``; all B picks in one ``multinomial`` (``topk`` for greedy) over those
    candidates; the picks, their parents and log q written into ``[γ, B]`` tables; the tree slots'
    ancestry kept in one preallocated ``[(γ−1)B, (γ−1)B]`` matrix (a new slot's row is its parent's
    row plus itself). The draft (best beam's path, or every node for ``tree``) is read out of the
    tables once at the end.

    Random numbers: the candidates of a level, sorted by score as before, are exactly the entries
    the previous implementation drew from (it sorted the finite entries of the whole
    ``[beams, V]`` score block), so a seed draws the same beams. The one change: with no top-k
    (``top_k == 0``, ``top_p == 1``) on a reduced-vocabulary draft, the whole reduced row is finite
    and is drawn from in vocabulary order instead of score order: the same distribution and the
    same number of random numbers, but other beams for a given seed.

    ``self.stats.extra`` accumulates, per generation, ``draft_forward_s`` (the drafter's root and
    extend calls: its forwards, including the 4-D tree masks it builds from ``visible``),
    ``draft_tree_s`` (the sampler's tree bookkeeping: ancestry rows, node tables) and
    ``draft_bookkeeping_s`` (everything else in :meth:`propose`: candidates, picks, scores, the
    draft), and ``draft_rounds``.

    Adaptive depth and width (both off by default; then every round is B beams × γ levels):
    ``min_joint`` stops deepening after a level where even the best beam's joint draft probability
    (Π q along it) is below ``min_joint`` — as ``min_confidence`` does for ``eagle``: a deeper token
    would rarely pass the joint ratio and costs a drafter step and a verified row. ``min_share``
    drops, after each level's draw, the beams whose share of the level's (renormalised) beam
    probability is below ``min_share`` (the best beam always stays): where the draft is confident
    the other beams carry little mass, and each costs a drafter row (and, for ``tree``, verified
    nodes). Both only shorten or thin the draft; the acceptance rule is unchanged (greedy MTAD
    still equals greedy decoding), but the draft distribution is no longer plain beam sampling's.
    ``draft_levels`` and ``draft_beams`` in ``stats.extra`` count the levels drawn and the beams
    kept over them. ``nodes`` (``tree`` only; 0: all): verify only the tree's ``nodes`` most
    probable nodes by joint draft probability, as EAGLE-2 caps its tree — a wide tree's rows cost
    the target ~1.3 ms each on a 2-core CPU whether kept or not (docs/eagle.md).
    """

    def __init__(
        self,
        drafter: TreeDrafter,
        sampling: SamplingSettings,
        generator: torch.Generator | None,
        beams: int = 4,
        depth: int = 4,
        with_replacement: bool = False,
        tree: bool = False,
        min_joint: float = 0.0,
        min_share: float = 0.0,
        nodes: int = 0,
    ) -> None:
        super().__init__()
        if beams < 1:
            raise InvalidSettingError(f"beams (beam width B) must be >= 1, got {beams}")
        if depth < 1:
            raise InvalidSettingError(f"gamma (draft depth) must be >= 1, got {depth}")
        if not 0 <= min_joint < 1:
            raise InvalidSettingError(f"min_joint (stop deepening below this joint draft probability) must be in "
                                      f"[0, 1), got {min_joint}")
        if not 0 <= min_share < 1:
            raise InvalidSettingError(f"min_share (drop beams below this share of the level) must be in [0, 1), "
                                      f"got {min_share}")
        if nodes < 0:
            raise InvalidSettingError(f"nodes (tree nodes verified, 0: all) must be >= 0, got {nodes}")
        if nodes and not tree:
            raise InvalidSettingError("nodes (a budget of tree nodes) needs tree=true")
        self.drafter, self.sampling, self.generator = drafter, sampling, generator
        self.beams, self.depth, self.with_replacement, self.tree = beams, depth, with_replacement, tree
        self.min_joint, self.min_share, self.nodes = min_joint, min_share, nodes
        slots = (depth - 1) * beams
        self._ancestry = torch.zeros(slots, slots, dtype=torch.bool)  # [slot, slot]: sees (ancestor or itself)
        for key in ("draft_forward_s", "draft_bookkeeping_s", "draft_tree_s"):
            self.stats.extra[key] = 0.0
        for key in ("draft_rounds", "draft_levels", "draft_beams"):
            self.stats.extra[key] = 0

    def on_prefill(self, prompt_hidden: torch.Tensor) -> None:
        self.drafter.on_prefill(prompt_hidden)

    def observe_hidden(self, hidden: torch.Tensor) -> None:
        self.drafter.observe_hidden(hidden)

    def _candidates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Every row's drawable tokens: ``(log_q [rows, c], local [rows, c], subset)``.

        Sampling: exactly the nonzero entries of ``process_logits`` (the same values, bit for bit:
        its top-k path computed here without the scatter into a dense row), its log; greedy: each
        row's top B of the raw log-softmax (one-hot would give log 0 = −inf). ``subset``: ``c`` is
        less than the row (else ``local`` is ``arange(V)``)."""
        settings = self.sampling
        vocab = logits.shape[-1]
        if settings.greedy:
            log_q = torch.log_softmax(logits, dim=-1)
            if self.beams < vocab:
                values, local = torch.topk(log_q, self.beams, dim=-1)
                return values, local, True
            return log_q, torch.arange(vocab, device=logits.device).expand_as(log_q), False
        if 0 < settings.top_k < vocab:
            values, local = torch.topk(logits, settings.top_k + 1, dim=-1)
            values = values / settings.temperature
            if not bool((values[..., -1] == values[..., -2]).any()):  # a tie at the k-th: the dense path keeps all
                values, local = values[..., :-1], local[..., :-1]
                if settings.top_p < 1.0:
                    values = values.masked_fill(_beyond_top_p(values, settings.top_p), float("-inf"))
                return torch.log(torch.softmax(values, dim=-1)), local, True
        log_q = torch.log(process_logits(logits, settings))
        return log_q, torch.arange(vocab, device=logits.device).expand_as(log_q), False

    def _pick(self, flat: torch.Tensor, subset: bool) -> torch.Tensor:
        """Up to B indices into ``flat`` (scores of candidates): sampled ∝ exp(score) in one call, or top B."""
        finite = int(torch.isfinite(flat).sum())
        if self.sampling.greedy:
            return torch.topk(flat, min(self.beams, finite)).indices
        count = self.beams if self.with_replacement else min(self.beams, finite)
        if subset or finite < flat.numel():
            support = torch.topk(flat, finite).indices  # sorted by score: the order the draws follow
            probs = torch.softmax(flat[support], dim=-1)
            return support[torch.multinomial(probs, count, replacement=self.with_replacement,
                                             generator=self.generator)]
        return torch.multinomial(torch.softmax(flat, dim=-1), count, replacement=self.with_replacement,
                                 generator=self.generator)

    def _thin(self, score: torch.Tensor, *columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``min_share``: keep the beams whose renormalised ``score`` (log share) reaches log min_share,
        the best always; ``columns`` (per-beam tensors) follow. Returns the kept score, renormalised,
        and columns."""
        keep = score >= math.log(self.min_share)
        keep[score.argmax()] = True
        if bool(keep.all()):
            return (score, *columns)
        index = keep.nonzero().squeeze(1)
        score = score[index]
        return (score - torch.logsumexp(score, dim=0), *(column[index] for column in columns))

    def propose(self, sequence: list[int], max_tokens: int) -> Draft:
        clock = time.perf_counter
        started = clock()
        timing = [0.0, 0.0]  # drafter calls, tree bookkeeping
        try:
            with torch.no_grad():
                return self._propose(sequence, max_tokens, clock, timing)
        finally:
            extra = self.stats.extra
            extra["draft_forward_s"] += timing[0]
            extra["draft_tree_s"] += timing[1]
            extra["draft_bookkeeping_s"] += clock() - started - timing[0] - timing[1]
            extra["draft_rounds"] += 1

    def _propose(self, sequence: list[int], max_tokens: int, clock, timing: list[float]) -> Draft:
        depth = min(self.depth, max_tokens)
        if depth < 1:
            return Draft()
        t = clock()
        root = self.drafter.root(sequence)
        timing[0] += clock() - t
        if root is None:
            return Draft()
        self.stats.forwards += 1
        log_q, local, subset = self._candidates(root[None])
        flat = log_q.reshape(-1)
        picks = self._pick(flat, subset)
        step, chosen = flat[picks], local.reshape(-1)[picks]
        score = step - torch.logsumexp(step, dim=0)
        joint = step  # Π q along each beam, in log space (``score`` is it renormalised over the beams)
        if self.min_share:
            score, step, chosen, joint = self._thin(score, step, chosen, joint)
        width = step.numel()
        # per level l and beam b: its token (a row of the drafter's vocabulary), parent beam at l − 1, log q
        local_ids = chosen.new_zeros(depth, self.beams)
        parent = torch.zeros(depth, self.beams, dtype=torch.long, device=chosen.device)
        step_log_q = step.new_zeros(depth, self.beams)
        local_ids[0, :width], step_log_q[0, :width] = chosen, step
        widths = [width]
        tokens = self.drafter.to_target(chosen)
        log_min_joint = math.log(self.min_joint) if self.min_joint else None
        if log_min_joint is not None and float(joint.max()) < log_min_joint:
            depth = 1
        ancestry = self._ancestry
        if depth > 1:
            ancestry.zero_()
        fed = previous = 0  # tree slots: the beams fed at the last level start at ``previous``
        for level in range(1, depth):
            # feed the beams of level − 1 as tree slots fed .. fed + width, each seeing its parent's
            # ancestry and itself
            t = clock()
            if level > 1:
                ancestry[fed:fed + width, :fed] = ancestry[previous + parent[level - 1, :width], :fed]
            ancestry.diagonal()[fed:fed + width] = True
            visible = ancestry[fed:fed + width, :fed + width]
            rows = parent[level - 1, :width].tolist()
            timing[1] += clock() - t
            t = clock()
            logits = self.drafter.extend(rows, tokens.tolist(), visible)
            timing[0] += clock() - t
            self.stats.forwards += 1
            log_q, local, subset = self._candidates(logits)
            per_row = log_q.shape[-1]
            picks = self._pick((score[:, None] + log_q).reshape(-1), subset)
            parents = picks // per_row
            step, chosen = log_q.reshape(-1)[picks], local.reshape(-1)[picks]
            score = score[parents] + step
            score = score - torch.logsumexp(score, dim=0)
            joint = joint[parents] + step
            if self.min_share:
                score, step, chosen, parents, joint = self._thin(score, step, chosen, parents, joint)
            previous, fed, width = fed, fed + width, step.numel()
            parent[level, :width], local_ids[level, :width], step_log_q[level, :width] = parents, chosen, step
            widths.append(width)
            tokens = self.drafter.to_target(chosen)
            if log_min_joint is not None and level + 1 < depth and float(joint.max()) < log_min_joint:
                depth = level + 1
                break
        t = clock()
        self.drafter.reset()
        timing[0] += clock() - t
        self.stats.extra["draft_levels"] += depth
        self.stats.extra["draft_beams"] += sum(widths)
        if self.tree:
            t = clock()
            draft = self._tree_draft(local_ids, parent, step_log_q, widths)
            timing[1] += clock() - t
            return draft
        best = int(score.argmax())
        path = [0] * depth
        parents_of = parent.tolist()
        for level in range(depth - 1, -1, -1):
            path[level], best = best, parents_of[level][best]
        levels, beams = torch.arange(depth), torch.tensor(path)
        self.stats.proposed += depth
        return Draft(tokens=self.drafter.to_target(local_ids[levels, beams]).tolist(),
                     log_q=step_log_q[levels, beams])

    def _tree_draft(self, local_ids: torch.Tensor, parent: torch.Tensor, step_log_q: torch.Tensor,
                    widths: list[int]) -> Draft:
        """Every level's beams as one tree: nodes numbered from 1 in level order (0 = the last token),
        each under the node of the beam it was drawn from."""
        firsts = [1]  # node number of each level's first beam
        for width in widths[:-1]:
            firsts.append(firsts[-1] + width)
        nodes = torch.cat([local_ids[level, :width] for level, width in enumerate(widths)])
        parents = torch.cat([torch.zeros(widths[0], dtype=torch.long)] + [
            parent[level, :width] + firsts[level - 1] for level, width in enumerate(widths) if level]).tolist()
        log_q = torch.cat([step_log_q[level, :width] for level, width in enumerate(widths)])
        if self.nodes and len(log_q) > self.nodes:
            nodes, parents, log_q = self._most_probable(nodes, parents, log_q)
        self.stats.proposed += len(log_q)
        return Draft(tokens=self.drafter.to_target(nodes).tolist(), log_q=log_q, parents=parents)

    def _most_probable(self, nodes: torch.Tensor, parents: list[int],
                       log_q: torch.Tensor) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """``nodes`` budget: keep the tree's ``self.nodes`` nodes of highest joint draft probability,
        renumbered in level order. A child's joint is at most its parent's (and it comes a level
        later on ties), so the kept set holds every kept node's ancestors, and every depth keeps
        its best beam if it keeps any — the joint-ratio rule's bar at each depth is unchanged."""
        joint, depth = [0.0], [0]
        for parent, step in zip(parents, log_q.tolist()):
            joint.append(joint[parent] + step)
            depth.append(depth[parent] + 1)
        ranked = sorted(range(1, len(joint)), key=lambda node: (-joint[node], depth[node], node))
        kept = sorted(ranked[:self.nodes])
        renumber = {0: 0, **{node: i + 1 for i, node in enumerate(kept)}}
        index = torch.tensor([node - 1 for node in kept])
        return nodes[index], [renumber[parents[node - 1]] for node in kept], log_q[index]
