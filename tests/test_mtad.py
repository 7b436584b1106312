"""MTAD and MTJD: acceptance behaviour, distributions, and the quality ordering they promise."""

from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from specdecode import SpeculativeDecoder
from specdecode.errors import InvalidSettingError, VocabularyMismatchError
from specdecode.propose.exact_joint import ExactJointProposer
from specdecode.sampling import SamplingSettings, process_logits, sample
from tiny_models import ARCHITECTURES, tiny_model

PAPER_SAMPLING = dict(temperature=1.0, top_k=10, top_p=0.9)


def _blocks(decoder, prompt, gamma, n, **settings):
    return Counter(
        tuple(decoder.generate(prompt, max_new_tokens=gamma + 1, seed=seed, **settings).token_ids[:gamma])
        for seed in range(n)
    )


def _joint_log_prob(model, prompt, block):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + list(block)])).logits[0, len(prompt) - 1:-1]
    return float(torch.log_softmax(logits, -1)[torch.arange(len(block)), torch.tensor(block)].sum())


@pytest.mark.parametrize("tree", [False, True])
def test_self_draft_accepts_every_token(tree):
    target = tiny_model("llama", seed=1)
    decoder = SpeculativeDecoder(target, "mtad", draft=target, beams=4, gamma=4, threshold=0.5, tree=tree,
                                 min_joint=0)  # the paper's fixed depth: every round drafts 4
    stats = decoder.generate([1, 2, 3], max_new_tokens=25, seed=0, **PAPER_SAMPLING).stats
    assert stats.tokens_per_target_forward == 5.0
    assert stats.acceptance_rate == (0.25 if tree else 1.0)  # a tree offers 4 beams a level, one path is kept


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_mtad_equals_ar(arch):
    target = tiny_model(arch, seed=2)
    ar = SpeculativeDecoder(target, "ar")
    for draft in (target, tiny_model(arch, seed=9)):
        for tree in (False, True):
            decoder = SpeculativeDecoder(target, "mtad", draft=draft, beams=3, gamma=3, tree=tree)
            for prompt in ([1, 2, 3], [5] * 9 + [6]):
                assert decoder.generate(prompt, max_new_tokens=30).token_ids == ar.generate(
                    prompt, max_new_tokens=30).token_ids, tree


@pytest.mark.parametrize("case", [
    # row 0 → p(token 0), p(token 1); row 1 → p(token 2 | node 1); row 2 → p(token 3 | node 2); kept path
    ((0.2, 0.7), 0.95, 0.3, (0, 2, 4)),  # both depth-2 nodes pass: the one of higher target joint
    ((0.2, 0.7), 0.8, 0.1, (0, 2)),      # node 3 passes against its own draft joint, not the depth's best
    ((0.2, 0.1), 0.99, 0.1, (0, 1, 3)),   # the deepest passing node, though its parent failed
])
def test_multi_candidate_verification_follows_the_reference_rule(case):
    """Beams: nodes 1, 2 (tokens 0, 1) at depth 1 with q .6 / .4; node 3 (token 2) under node 1 with
    q .5, node 4 (token 3) under node 2 with q .9: joint q .6, .4, .3, .36. τ = 0.5."""
    from specdecode.accept.joint_ratio import JointRatioAcceptance
    from specdecode.propose.base import Draft

    (p0, p1), p2, p3, path = case
    rows = torch.full((5, 5), 1e-9, dtype=torch.float64)
    rows[0, :2] = torch.tensor([p0, p1])
    rows[1, 2], rows[2, 3] = p2, p3
    rows[:, 4] += 1 - rows.sum(dim=1)  # token 4, never drafted, takes the rest
    draft = Draft(tokens=[0, 1, 2, 3], parents=[0, 0, 1, 2], log_q=torch.tensor([0.6, 0.4, 0.5, 0.9]).log())
    verdict = JointRatioAcceptance(SamplingSettings(temperature=1.0), torch.Generator().manual_seed(0))(
        draft, rows.log())
    assert verdict.path == path and verdict.accepted == len(path) - 1


def _reference_tree_verdict(draft, p, log_threshold):
    """Multi-candidate MTAD's rule read off every row at once (module docstring of accept/joint_ratio.py)."""
    depth, log_p, log_q = [0], [0.0], [0.0]
    step = torch.log(p[torch.tensor(draft.parents, dtype=torch.long), torch.tensor(draft.tokens, dtype=torch.long)]).tolist()
    for parent, lp, lq in zip(draft.parents, step, draft.log_q.tolist()):
        depth.append(depth[parent] + 1)
        log_p.append(log_p[parent] + lp)
        log_q.append(log_q[parent] + lq)
    best = {d: max(q for q, e in zip(log_q, depth) if e == d) for d in set(depth[1:])}
    passing = [n for n in range(1, len(depth)) if log_p[n] - best[depth[n]] > log_threshold]
    chosen = max(passing, key=lambda n: (depth[n], log_p[n], -n), default=0)
    path = [chosen]
    while path[-1]:
        path.append(draft.parents[path[-1] - 1])
    return tuple(reversed(path))


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("greedy", [False, True])
def test_tree_rule_reading_rows_on_demand_gives_the_all_rows_verdict(greedy, block):
    """The tree rule reads only the rows of nodes that something below could still pass through (and
    the next level's along, up to ``block`` rows a call); over random trees and target rows (top-k 3
    of 12 ids, so many drafted tokens get p = 0) its verdict and next token are those of reading
    every row, and it reads fewer rows in total."""
    from specdecode.accept.joint_ratio import JointRatioAcceptance
    from specdecode.models.runner import LogitRows
    from specdecode.propose.base import Draft

    rng = np.random.default_rng(0)
    sampling = SamplingSettings(temperature=0.0 if greedy else 1.0, top_k=3, top_p=0.9)
    read = every = 0
    for case in range(300):
        nodes = int(rng.integers(0, 14))
        parents = [int(rng.integers(0, i + 1)) if rng.random() < 0.7 else i for i in range(nodes)]
        tokens = [int(t) for t in rng.integers(0, 12, nodes)]
        log_q = torch.tensor(rng.uniform(-2.5, 0.0, nodes), dtype=torch.float32)
        logits = torch.tensor(rng.normal(0, 2, (nodes + 1, 12)), dtype=torch.float32)
        threshold = float(rng.choice([0.05, 0.5, 1.0, 2.0]))
        draft = Draft(tokens=tokens, parents=parents, log_q=log_q)
        rows = LogitRows(lambda indices: logits[indices], nodes + 1, block)
        verdict = JointRatioAcceptance(sampling, torch.Generator().manual_seed(case), threshold)(draft, rows)
        p = process_logits(logits, sampling)
        path = _reference_tree_verdict(draft, p, float(np.log(threshold)))
        assert verdict.path == path and verdict.accepted == len(path) - 1, case
        expected = int(p[path[-1]].argmax()) if greedy else sample(p[path[-1]], torch.Generator().manual_seed(case))
        assert verdict.next_token == expected, case
        read, every = read + rows.computed, every + nodes + 1
    assert read < 0.8 * every, (read, every)


def test_node_budget_keeps_the_most_probable_nodes_and_their_ancestors():
    """``nodes``: the budget's nodes are the highest joint draft probabilities, every kept node's
    parent kept, renumbered in level order; each depth keeps its best beam (the rule's bar)."""
    from specdecode.propose.beam_sampler import BeamSampleProposer

    proposer = BeamSampleProposer(None, SamplingSettings(temperature=1.0), None, tree=True, nodes=4)
    # node: parent, step q → joint: 1: root .5 → .5; 2: root .4 → .4; 3: 1 .9 → .45; 4: 2 .9 → .36;
    # 5: 3 .1 → .045; 6: 1 .05 → .025
    parents = [0, 0, 1, 2, 3, 1]
    log_q = torch.tensor([0.5, 0.4, 0.9, 0.9, 0.1, 0.05]).log()
    nodes, kept_parents, kept_log_q = proposer._most_probable(torch.arange(10, 16), parents, log_q)
    assert nodes.tolist() == [10, 11, 12, 13] and kept_parents == [0, 0, 1, 2]
    assert torch.equal(kept_log_q, log_q[:4])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_greedy_tree_mtad_with_a_node_budget_equals_ar(arch):
    target = tiny_model(arch, seed=2)
    ar = SpeculativeDecoder(target, "ar")
    decoder = SpeculativeDecoder(target, "mtad", draft=tiny_model(arch, seed=9), beams=3, gamma=4, tree=True, nodes=5)
    for prompt in ([1, 2, 3], [5] * 9 + [6]):
        result = decoder.generate(prompt, max_new_tokens=30)
        assert result.token_ids == ar.generate(prompt, max_new_tokens=30).token_ids
        assert result.stats.proposed_tokens <= 5 * result.stats.target_forwards


def test_unreachable_threshold_gives_single_token_sampling():
    vocab = 7
    target = tiny_model("qwen2", seed=3, vocab=vocab)
    draft = tiny_model("qwen2", seed=8, vocab=vocab)
    decoder = SpeculativeDecoder(target, "mtad", draft=draft, beams=2, gamma=3, threshold=1e30)
    prompt, n = [1, 2, 3], 800
    counts = np.zeros(vocab)
    for seed in range(n):
        result = decoder.generate(prompt, max_new_tokens=1, seed=seed, temperature=1.0)
        counts[result.token_ids[0]] += 1
    with torch.no_grad():
        p = process_logits(target.model(torch.tensor([prompt])).logits[0, -1], SamplingSettings(1.0))
    assert chisquare(counts, p.double().numpy() * n).pvalue > 1e-3
    stats = decoder.generate([1, 2, 3], max_new_tokens=10, seed=0, temperature=1.0).stats
    assert stats.accepted_tokens == 0


def test_wide_beams_with_perfect_draft_match_exact_mtjd():
    """B ≥ vocab^γ makes beam sampling exhaustive: its block is the joint's mode, as in MTJD with top-k 1."""
    vocab, gamma = 5, 3
    target = tiny_model("llama", seed=4, vocab=vocab)
    prompt, n = [1, 2], 60
    mtad = _blocks(SpeculativeDecoder(target, "mtad", draft=target, beams=vocab ** gamma, gamma=gamma),
                   prompt, gamma, n, temperature=1.0)
    mtjd = _blocks(SpeculativeDecoder(target, "mtjd", gamma=gamma, exact=True), prompt, gamma, n,
                   temperature=1.0, top_k=1)
    tv = 0.5 * sum(abs(mtad[b] - mtjd[b]) / n for b in set(mtad) | set(mtjd))
    assert tv <= 0.05


def test_exact_mtjd_samples_the_block_level_joint():
    vocab, gamma = 4, 2
    target = tiny_model("gemma3", seed=6, vocab=vocab)
    prompt, n = [1, 2, 3], 300
    blocks = _blocks(SpeculativeDecoder(target, "mtjd", gamma=gamma, exact=True), prompt, gamma, n,
                     temperature=1.0, top_k=6)
    proposer = ExactJointProposer(target.model, SamplingSettings(1.0, top_k=6), None, gamma)
    with torch.no_grad():
        all_blocks, joint = proposer.block_log_probs(prompt, gamma)
    probs = process_logits(joint, SamplingSettings(1.0, top_k=6)).numpy()
    keys = [tuple(b) for b in all_blocks.tolist()]
    assert all(probs[keys.index(b)] > 0 for b in blocks)
    support = [i for i, p in enumerate(probs) if p > 0]
    observed = np.array([blocks[keys[i]] for i in support])
    assert chisquare(observed, probs[support] * n).pvalue > 1e-3


def test_joint_likelihood_ordering():
    """MTJD > MTAD (B=4) > single-token sampling in mean joint likelihood of the emitted blocks."""
    vocab, gamma, n = 6, 3, 80
    target = tiny_model("llama", seed=5, vocab=vocab)
    prompt = [1, 2, 3]

    def mean_ll(decoder, **settings):
        blocks = _blocks(decoder, prompt, gamma, n, **settings)
        return sum(c * _joint_log_prob(target.model, prompt, b) for b, c in blocks.items()) / n

    ar = mean_ll(SpeculativeDecoder(target, "ar"), temperature=1.0)
    mtad = mean_ll(SpeculativeDecoder(target, "mtad", draft=target, beams=4, gamma=gamma), temperature=1.0)
    mtjd = mean_ll(SpeculativeDecoder(target, "mtjd", gamma=gamma, exact=True), temperature=1.0, top_k=4)
    assert mtjd > mtad > ar


def test_reproducible_by_seed():
    target = tiny_model("qwen2", seed=2)
    decoder = SpeculativeDecoder(target, "mtad", draft=tiny_model("qwen2", seed=5), beams=3, gamma=3)
    runs = [decoder.generate([4, 5], max_new_tokens=20, seed=s, **PAPER_SAMPLING).token_ids for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


@pytest.mark.parametrize(
    "options, error",
    [(dict(beams=0), "beams"), (dict(gamma=0), "gamma"), (dict(threshold=0.0), "threshold"),
     (dict(threshold=-1.0), "threshold"), (dict(tree=True, nodes=-1), "nodes"), (dict(nodes=4), "nodes")],
)
def test_bad_options(options, error):
    target = tiny_model("llama")
    with pytest.raises(InvalidSettingError, match=error):
        SpeculativeDecoder(target, "mtad", draft=target, **options)


def test_vocabulary_mismatch_refused():
    with pytest.raises(VocabularyMismatchError):
        SpeculativeDecoder(tiny_model("llama"), "mtad", draft=tiny_model("llama", vocab=31))


def test_adaptive_depth_and_width_through_the_method_keep_greedy_exact():
    """min_joint / min_share reach the beam sampler from the method's options (and the CLI's);
    greedy MTAD with them still equals ar, and they do cut levels and beams."""
    target = tiny_model("llama", seed=3)
    draft = tiny_model("llama", seed=4)
    prompt = [5, 9, 13, 5, 9, 13, 2]
    expected = SpeculativeDecoder(target, "ar").generate(prompt, max_new_tokens=20).token_ids
    plain = SpeculativeDecoder(target, "mtad", draft=draft, beams=3, gamma=4).generate(prompt, max_new_tokens=20)
    adaptive = SpeculativeDecoder(target, "mtad", draft=draft, beams=3, gamma=4, min_joint=0.5,
                                  min_share=0.3).generate(prompt, max_new_tokens=20)
    assert plain.token_ids == adaptive.token_ids == expected
    assert adaptive.stats.extra["draft_levels"] < plain.stats.extra["draft_levels"]

