"""MTAD's beam sampler: the tensor bookkeeping draws exactly what the list-based original drew.

``_Reference`` is the sampler as it was before the rewrite (per-level Python lists, scores over the
whole vocabulary, 262k-wide rows for the shipped draft): for the same seed and drafter state the
new sampler must hand the drafter the same rows, tokens and visibility masks, and return the same
draft (tokens, parents, log q), in every sampling mode; with a reduced-vocabulary draft, the new
one works on the draft's own ids while the reference works on the widened rows.
"""

from __future__ import annotations

import math

import pytest
import torch

from specdecode.models.loading import LoadedModel
from specdecode.models.vocab_map import VocabMap, apply_vocab_map
from specdecode.propose.base import Draft
from specdecode.propose.beam_sampler import BeamSampleProposer, ModelDrafter
from specdecode.sampling import SamplingSettings, process_logits
from tiny_models import tiny_model


def _drafter(loaded) -> ModelDrafter:
    # the drafter takes the model's runner where the TargetRunner seam exists, else the model
    return ModelDrafter(loaded.runner if hasattr(loaded, "runner") else loaded.model)


class _Reference(BeamSampleProposer):
    """The original implementation, verbatim but for the recorded calls."""

    def _log_q(self, logits):
        if self.sampling.greedy:
            return torch.log_softmax(logits, dim=-1)
        return torch.log(process_logits(logits, self.sampling))

    def _choose(self, scores):
        flat = scores.reshape(-1)
        finite = int(torch.isfinite(flat).sum())
        count = self.beams if self.with_replacement and not self.sampling.greedy else min(self.beams, finite)
        if self.sampling.greedy:
            picks = torch.topk(flat, count).indices
        else:
            support = torch.topk(flat, min(finite, flat.numel())).indices if finite < flat.numel() else None
            probs = torch.softmax(flat if support is None else flat[support], dim=-1)
            picks = torch.multinomial(probs, count, replacement=self.with_replacement, generator=self.generator)
            if support is not None:
                picks = support[picks]
        vocab = scores.shape[-1]
        return picks // vocab, picks % vocab

    def propose(self, sequence, max_tokens):
        depth = min(self.depth, max_tokens)
        if depth < 1:
            return Draft()
        root = self.drafter.root(sequence)
        if root is None:
            return Draft()
        log_q = self._log_q(root)
        _, local = self._choose(log_q[None])
        beam_tokens = self.drafter.to_target(local)[:, None]
        beam_log_q = log_q[local][:, None]
        score = beam_log_q[:, 0] - torch.logsumexp(beam_log_q[:, 0], dim=0)
        beam_slots = [[] for _ in range(len(local))]
        rows = [0] * len(local)
        fed = 0
        node_tokens, node_parents, node_log_q = beam_tokens[:, 0].tolist(), [0] * len(local), [beam_log_q[:, 0]]
        beam_nodes = list(range(1, len(local) + 1))
        for _ in range(1, depth):
            width = len(beam_tokens)
            visible = torch.zeros(width, fed + width, dtype=torch.bool)
            for i, slots in enumerate(beam_slots):
                visible[i, slots] = True
                visible[i, fed + i] = True
            logits = self.drafter.extend(rows, beam_tokens[:, -1].tolist(), visible)
            log_q = self._log_q(logits)
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
            return Draft(tokens=node_tokens, log_q=torch.cat(node_log_q), parents=node_parents)
        best = int(score.argmax())
        return Draft(tokens=beam_tokens[best].tolist(), log_q=beam_log_q[best])


def _record(drafter: ModelDrafter) -> list:
    """Record every extend call's (rows, tokens, visible) on ``drafter``."""
    calls: list = []
    inner = drafter.extend

    def extend(rows, tokens, visible):
        calls.append((list(rows), list(tokens), visible.clone()))
        return inner(rows, tokens, visible)

    drafter.extend = extend
    return calls


def _paths(draft: Draft) -> list[tuple[int, ...]]:
    """Each node's tokens from the root (a chain: its prefixes)."""
    parents = draft.parents if draft.parents is not None else list(range(len(draft)))
    paths: list[tuple[int, ...]] = [()]
    for token, parent in zip(draft.tokens, parents):
        paths.append(paths[parent] + (token,))
    return paths[1:]


SETTINGS = [
    SamplingSettings(),                                     # greedy
    SamplingSettings(temperature=1.0, top_k=10, top_p=0.9),  # the paper's
    SamplingSettings(temperature=0.7, top_k=5),
    SamplingSettings(temperature=1.0, top_k=3),              # fewer candidates a row than beams
    SamplingSettings(temperature=1.3, top_p=0.8),            # no top-k: the dense path
    SamplingSettings(temperature=1.0),                       # no filter at all
]


def _compare(target_loaded, draft_new, draft_ref, settings, beams, depth, tree, with_replacement, seeds=3,
             sequences=((1, 2, 3), (4,) * 12)):
    calls_new, calls_ref = _record(draft_new), _record(draft_ref)
    for seed in range(seeds):
        new = BeamSampleProposer(draft_new, settings, torch.Generator().manual_seed(seed), beams, depth,
                                 with_replacement, tree)
        ref = _Reference(draft_ref, settings, torch.Generator().manual_seed(seed), beams, depth,
                         with_replacement, tree)
        for sequence in sequences:
            for max_tokens in (depth, 2):
                calls_new.clear()
                calls_ref.clear()
                draft_new.kv.crop(0), draft_ref.kv.crop(0)  # the root forward needs a token not yet cached
                a, b = new.propose(list(sequence), max_tokens), ref.propose(list(sequence), max_tokens)
                assert a.tokens == b.tokens, (seed, sequence)
                assert a.log_q.dtype == b.log_q.dtype and torch.allclose(a.log_q, b.log_q, rtol=0, atol=1e-12)
                assert len(calls_new) == len(calls_ref)
                if with_replacement:
                    # duplicate beams tie in score: which of two identical beams a pick continues is
                    # arbitrary (topk's order among ties), so compare the token paths, not beam indices
                    assert _paths(a) == _paths(b)
                    continue
                assert a.parents == b.parents
                for (rows_a, tok_a, vis_a), (rows_b, tok_b, vis_b) in zip(calls_new, calls_ref):
                    assert rows_a == rows_b and tok_a == tok_b and torch.equal(vis_a, vis_b)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"T{s.temperature}-k{s.top_k}-p{s.top_p}")
@pytest.mark.parametrize("tree", [False, True])
def test_same_draws_as_the_list_based_sampler(settings, tree):
    draft = tiny_model("llama", seed=9)
    for beams, depth in ((4, 4), (3, 2), (1, 3), (5, 1)):
        _compare(None, _drafter(draft), _drafter(draft), settings, beams, depth, tree, False)


@pytest.mark.parametrize("tree", [False, True])
def test_same_draws_with_replacement(tree):
    draft = tiny_model("qwen2", seed=3)
    for settings in SETTINGS[1:4]:
        _compare(None, _drafter(draft), _drafter(draft), settings, 4, 3, tree, True)


def _reduced_draft(vocab=97, kept=40, seed=5):
    """A tiny draft with a reduced vocabulary (``kept`` target ids + the "unknown" row), as the shipped draft."""
    model = tiny_model("gemma3", seed=seed, vocab=kept + 1).model
    ids = tuple(int(i) for i in torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:kept])
    apply_vocab_map(model, VocabMap(ids, vocab))
    return LoadedModel(model=model, tokenizer=None, name="tiny-reduced"), ids  # wrapped after the map, as loading does


@pytest.mark.parametrize("settings", [s for s in SETTINGS if s.top_k or s.top_p < 1 or s.greedy],
                         ids=lambda s: f"T{s.temperature}-k{s.top_k}-p{s.top_p}")
@pytest.mark.parametrize("tree", [False, True])
def test_reduced_vocabulary_draft_samples_over_its_own_ids(settings, tree):
    """The new drafter's logits are the draft's ids only; the reference's are the widened 97-wide
    rows (``-inf`` outside), as before. Same draws (greedy log q: equal up to the log-softmax's rounding)."""
    loaded, ids = _reduced_draft()
    narrow, wide = _drafter(loaded), _drafter(loaded)
    assert narrow.vocab_ids.tolist() == list(ids)
    wide.vocab_ids = None  # the original: full-width logits, token ids = rows
    assert narrow.root([1, 2, 3]).shape == (len(ids),) and wide.root([1, 2, 3]).shape == (97,)
    narrow.reset(), wide.reset()
    _compare(None, narrow, wide, settings, 4, 3, tree, False, seeds=3)


def test_reduced_vocabulary_without_filters_keeps_the_distribution():
    """No top-k, no top-p on a reduced draft: its whole row is finite, drawn in vocabulary order
    (the one documented change of random-number use), so compare distributions, not draws."""
    loaded, ids = _reduced_draft(kept=6)
    settings = SamplingSettings(temperature=1.0)
    narrow, wide = _drafter(loaded), _drafter(loaded)
    wide.vocab_ids = None
    n = 1500
    counts = {}
    for name, drafter, cls in (("new", narrow, BeamSampleProposer), ("ref", wide, _Reference)):
        proposer = cls(drafter, settings, torch.Generator().manual_seed(1), 2, 2)
        tally: dict = {}
        for _ in range(n):
            drafter.kv.crop(0)
            key = tuple(proposer.propose([1, 2, 3], 2).tokens)
            tally[key] = tally.get(key, 0) + 1
        counts[name] = tally
    keys = set(counts["new"]) | set(counts["ref"])
    tv = 0.5 * sum(abs(counts["new"].get(k, 0) - counts["ref"].get(k, 0)) / n for k in keys)
    assert tv < 0.08, tv


def test_cost_breakdown_in_stats():
    draft = tiny_model("llama", seed=9)
    proposer = BeamSampleProposer(_drafter(draft), SamplingSettings(temperature=1.0, top_k=10, top_p=0.9),
                                  torch.Generator().manual_seed(0), 4, 4, tree=True)
    for round_ in range(3):
        proposer.propose([1, 2, 3, round_], 4)
    extra = proposer.stats.extra
    assert extra["draft_rounds"] == 3
    assert extra["draft_forward_s"] > 0 and extra["draft_bookkeeping_s"] > 0 and extra["draft_tree_s"] > 0
    assert proposer.stats.forwards == 12


def test_tree_draft_structure():
    """Every level's beams in level order, each under its parent beam's node (0 = the last token)."""
    draft = tiny_model("llama", seed=9)
    proposer = BeamSampleProposer(_drafter(draft), SamplingSettings(temperature=1.0),
                                  torch.Generator().manual_seed(0), 3, 4, tree=True)
    result = proposer.propose([1, 2, 3], 4)
    assert len(result.tokens) == len(result.parents) == len(result.log_q) == 12
    assert result.parents[:3] == [0, 0, 0]
    for level in range(1, 4):
        assert all(3 * (level - 1) + 1 <= p <= 3 * level for p in result.parents[3 * level: 3 * level + 3])


@pytest.mark.parametrize("options, error", [
    (dict(min_joint=-0.1), "min_joint"), (dict(min_joint=1.0), "min_joint"),
    (dict(min_share=-0.5), "min_share"), (dict(min_share=1.0), "min_share"),
])
def test_bad_adaptive_options(options, error):
    from specdecode.errors import InvalidSettingError

    with pytest.raises(InvalidSettingError, match=error) as caught:
        BeamSampleProposer(_drafter(tiny_model("llama")), SamplingSettings(), None, 4, 4, **options)
    assert "\n" not in str(caught.value)


def _joint_by_level(draft: Draft, widths: list[int]) -> list[float]:
    """The best joint draft log-probability among each level's nodes of a tree draft."""
    joint = [0.0]
    for parent, log_q in zip(draft.parents, draft.log_q.tolist()):
        joint.append(joint[parent] + log_q)
    out, start = [], 1
    for width in widths:
        out.append(max(joint[start:start + width]))
        start += width
    return out


@pytest.mark.parametrize("settings", [SamplingSettings(), SamplingSettings(temperature=1.0, top_k=10, top_p=0.9)],
                         ids=["greedy", "sampling"])
def test_min_joint_stops_at_the_first_level_below_it(settings):
    """The draws up to the stop are the unthresholded sampler's, so its tree truncated after the first
    level whose best joint draft probability is below ``min_joint`` is what comes out."""
    draft = tiny_model("llama", seed=9)
    drafter = _drafter(draft)
    for min_joint in (0.3, 0.05, 0.01, 0.002):
        for seed in range(4):
            full = BeamSampleProposer(drafter, settings, torch.Generator().manual_seed(seed), 3, 4, tree=True)
            drafter.kv.crop(0)
            reference = full.propose([1, 2, 3], 4)
            best = _joint_by_level(reference, [3] * 4)
            below = [level for level, value in enumerate(best) if value < math.log(min_joint)]
            levels = below[0] + 1 if below else 4
            cut = BeamSampleProposer(drafter, settings, torch.Generator().manual_seed(seed), 3, 4, tree=True,
                                     min_joint=min_joint)
            drafter.kv.crop(0)
            result = cut.propose([1, 2, 3], 4)
            assert result.tokens == reference.tokens[: 3 * levels] and result.parents == reference.parents[: 3 * levels]
            assert cut.stats.extra["draft_levels"] == levels and cut.stats.forwards == levels


def test_min_share_thins_the_beams():
    draft = tiny_model("llama", seed=9)
    drafter = _drafter(draft)
    settings = SamplingSettings(temperature=1.0, top_k=10, top_p=0.9)
    # at most one beam can hold half a level's mass: a single beam a level, i.e. a chain
    single = BeamSampleProposer(drafter, settings, torch.Generator().manual_seed(0), 4, 4, tree=True, min_share=0.5)
    for round_ in range(5):
        result = single.propose([1, 2, 3, round_], 4)
        assert result.parents == [0, 1, 2, 3]
    assert single.stats.extra["draft_beams"] == 5 * 4
    # a small share keeps some beams and drops others; every kept node still continues a kept one
    thin = BeamSampleProposer(drafter, settings, torch.Generator().manual_seed(0), 4, 4, tree=True, min_share=0.15)
    counts = []
    for round_ in range(8):
        result = thin.propose([4, 5, 6, round_], 4)
        assert all(parent < node for node, parent in enumerate(result.parents, start=1))
        counts.append(len(result.tokens))
    assert 4 <= min(counts) and max(counts) <= 16 and thin.stats.extra["draft_beams"] == sum(counts)


@pytest.mark.parametrize("tree", [False, True])
def test_adaptive_greedy_mtad_equals_ar(tree):
    from specdecode import SpeculativeDecoder

    target, draft = tiny_model("gemma3", seed=2), tiny_model("gemma3", seed=9)
    ar = SpeculativeDecoder(target, "ar")
    decoder = SpeculativeDecoder(target, "mtad", draft=draft, beams=3, gamma=4, tree=tree)
    start = decoder._start

    def adaptive_start(settings):
        proposer, rule = start(settings)
        proposer.min_joint, proposer.min_share = 0.05, 0.2
        return proposer, rule

    decoder._start = adaptive_start
    for prompt in ([1, 2, 3], [5] * 9 + [6]):
        result = decoder.generate(prompt, max_new_tokens=30)
        assert result.token_ids == ar.generate(prompt, max_new_tokens=30).token_ids
        assert result.stats.extra["draft_levels"] < 4 * result.stats.extra["draft_rounds"]


def test_generation_stats_carry_the_breakdown():
    from specdecode import SpeculativeDecoder

    target = tiny_model("llama", seed=2)
    decoder = SpeculativeDecoder(target, "mtad", draft=tiny_model("llama", seed=9), beams=3, gamma=3)
    stats = decoder.generate([1, 2, 3], max_new_tokens=12, seed=0, temperature=1.0, top_k=10).stats
    breakdown = stats.draft_cost_breakdown
    assert set(breakdown) == {"draft_forward_s", "draft_bookkeeping_s", "draft_tree_s"}
    assert stats.extra["draft_rounds"] == stats.target_forwards
    assert sum(breakdown.values()) * stats.extra["draft_rounds"] <= stats.draft_s
    assert SpeculativeDecoder(target, "ar").generate([1, 2], max_new_tokens=3).stats.draft_cost_breakdown == {}


def test_sps_on_a_reduced_draft_reads_its_own_ids_and_hands_over_wide_distributions():
    """``Readout(own_vocabulary=True)`` gives the reduced draft's own columns (what the widened row
    holds at its ids); the sps proposer samples there and hands the verifier distributions over
    the target's vocabulary equal to processing the widened rows."""
    from specdecode.models.runner import Readout
    from specdecode.propose.draft_model import DraftModelProposer
    from specdecode.sampling import process_logits

    loaded, ids = _reduced_draft()
    runner = loaded.runner
    assert runner.vocabulary_ids.tolist() == list(ids)
    with torch.inference_mode():
        own = runner.forward(runner.new_cache(), [1, 2, 3], Readout(rows=1, own_vocabulary=True)).logits
        wide = runner.forward(runner.new_cache(), [1, 2, 3], Readout(rows=1)).logits
        assert own.shape == (1, len(ids)) and wide.shape == (1, 97)
        assert torch.equal(own, wide[:, list(ids)])
        settings = SamplingSettings(temperature=0.8, top_k=5, top_p=0.9)
        proposer = DraftModelProposer(runner, settings, torch.Generator().manual_seed(0), gamma=3)
        draft = proposer.propose([1, 2, 3], 3)
        check = runner.new_cache()
        rows = [runner.forward(check, [1, 2, 3], Readout(rows=1)).logits[-1]]
        for token in draft.tokens[:-1]:
            rows.append(runner.forward(check, [token], Readout(rows=1)).logits[-1])
        torch.testing.assert_close(draft.probs, process_logits(torch.stack(rows), settings))
        assert set(draft.tokens) <= set(ids)


def test_a_batched_forward_of_a_reduced_draft_reads_its_own_ids():
    """``forward_batch`` (sps drafting together) keeps ``Readout.own_vocabulary``: each request gets
    the reduced draft's own columns, as its forward alone does."""
    from specdecode.models.runner import Readout
    from specdecode.models.runtime import build_runtime

    loaded, ids = _reduced_draft()
    model = loaded.model.float()
    runner = LoadedModel(model, None, "tiny-reduced", runtime=build_runtime(model)).runner
    assert runner.native and runner.vocabulary_ids.tolist() == list(ids)
    readout = Readout(rows=1, own_vocabulary=True)
    with torch.inference_mode():
        together = runner.forward_batch([runner.new_cache(), runner.new_cache()], [[1, 2, 3], [4, 5]], [readout] * 2)
        for out, prompt in zip(together, ([1, 2, 3], [4, 5])):
            alone = runner.forward(runner.new_cache(), prompt, readout).logits
            assert out.logits.shape == (1, len(ids))
            torch.testing.assert_close(out.logits, alone)
