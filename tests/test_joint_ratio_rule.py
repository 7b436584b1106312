"""MTAD's chain acceptance rule (``accept/joint_ratio.py``), pinned case by case.

The rule: r_i = Σ_{j≤i} (log p(x_j) − log q(x_j)); accept a = max{i : r_i > log τ} (0 if none),
then one token sampled from the target's row a. The cases sit on both sides of log τ (a few
hundredths away, and exactly on it: ``>`` is strict), with a failing first token and a passing
second (the *longest* passing prefix wins, not "until the first failure"), all failing, all
passing. Loosening the rule (e.g. ``ratio >= log τ − 0.7``) must fail here.
"""

import math

import pytest
import torch

from specdecode.accept.joint_ratio import JointRatioAcceptance
from specdecode.propose.base import Draft
from specdecode.sampling import SamplingSettings, process_logits

TAU = 0.5
LOG_TAU = math.log(TAU)
VOCAB = 16
TOKENS = [0, 1, 2, 3]  # draft token i is scored by target row i
SAMPLING = SamplingSettings(temperature=1.0)


def _marker(row: int) -> int:
    return 8 + row  # takes the rest of row ``row``'s mass, so the sampled next token names its row


def _target_logits(p_draft: list[float]) -> torch.Tensor:
    """Rows 0..k: row i gives draft token i probability ``p_draft[i]`` and the rest to its marker;
    the last row (after the draft) is all marker."""
    k = len(p_draft)
    rows = torch.full((k + 1, VOCAB), 1e-30, dtype=torch.float64)
    for i, p in enumerate(p_draft):
        rows[i, TOKENS[i]] = p
    for i in range(k + 1):
        rows[i, _marker(i)] = 1 - rows[i].sum() + rows[i, _marker(i)]
    return rows.log()


def _verdict(p_draft, q_draft, tau=TAU, seed=0):
    draft = Draft(tokens=TOKENS[: len(p_draft)], log_q=torch.tensor(q_draft, dtype=torch.float64).log())
    rule = JointRatioAcceptance(SAMPLING, torch.Generator().manual_seed(seed), tau)
    return rule(draft, _target_logits(p_draft))


def _next_token_is_from_row(verdict) -> bool:
    row = verdict.accepted
    return verdict.next_token in ({_marker(row)} | ({TOKENS[row]} if row < len(TOKENS) else set()))


def _ratios(p_draft, q_draft) -> list[float]:
    return [sum(math.log(p / q) for p, q in zip(p_draft[: i + 1], q_draft[: i + 1])) for i in range(len(p_draft))]


CASES = {
    # name: (p of each draft token under the target, q under the draft, accepted)
    "all pass": ([0.9, 0.8, 0.7, 0.9], [0.9, 0.8, 0.7, 0.9], 4),
    "all fail": ([0.1, 0.2, 0.1, 0.1], [0.9, 0.8, 0.9, 0.9], 0),
    # r1 = log .25 = −1.386 fails (but lies within 0.7 of log τ), r2 = log .75 passes, r3, r4 fail
    "failing first, passing second": ([0.2, 0.9, 0.1, 0.1], [0.8, 0.3, 0.9, 0.9], 2),
    # pass, fail, pass, fail: the longest passing prefix, 3, not the first failure
    "longest passing prefix wins": ([0.9, 0.1, 0.9, 0.05], [0.9, 0.3, 0.1, 0.9], 3),
    # r1 = log τ − 0.05 just below the threshold, nothing after recovers
    "just below log tau": ([0.5 * math.exp(-0.05), 0.5, 0.5, 0.5], [1.0, 0.5, 0.5, 0.5], 0),
    # r1 = log τ + 0.05 just above, then r2 = log τ − 0.05 just below, then far below
    "just above, then just below": ([0.5 * math.exp(0.05), 0.5 * math.exp(-0.1), 0.1, 0.1],
                                    [1.0, 0.5, 0.9, 0.9], 1),
    # every ratio in (log τ − 0.7, log τ): all must fail
    "inside the 0.7 band below log tau": ([0.4, 0.5, 0.5, 0.5], [1.0, 0.5, 0.5, 0.5], 0),
    # the last token alone brings the cumulative ratio back above log τ
    "recovery at the last token": ([0.2, 0.2, 0.2, 0.9], [0.8, 0.4, 0.4, 0.05], 4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_chain_rule_case(name):
    p_draft, q_draft, accepted = CASES[name]
    ratios = _ratios(p_draft, q_draft)
    # the case means what its name says: every ratio is at least 0.01 away from log τ
    assert all(abs(r - LOG_TAU) > 0.01 for r in ratios), ratios
    expected = max((i + 1 for i, r in enumerate(ratios) if r > LOG_TAU), default=0)
    assert expected == accepted, (ratios, expected)
    for seed in range(3):
        verdict = _verdict(p_draft, q_draft, seed=seed)
        assert verdict.accepted == accepted, (name, ratios)
        assert verdict.path is None
        assert _next_token_is_from_row(verdict), verdict


def _exact_log_p(p_draft) -> torch.Tensor:
    """log p of each draft token exactly as the rule computes it."""
    p = process_logits(_target_logits(p_draft), SAMPLING)
    return torch.log(p[torch.arange(len(p_draft)), torch.tensor(TOKENS[: len(p_draft)])])


def test_ratio_equal_to_log_tau_does_not_pass():
    """τ = 1 and q = p exactly: every cumulative ratio is exactly 0 = log τ, and ``>`` rejects it."""
    p_draft = [0.9, 0.6, 0.7, 0.8]
    log_p = _exact_log_p(p_draft)
    draft = Draft(tokens=TOKENS, log_q=log_p.clone())
    rule = JointRatioAcceptance(SAMPLING, torch.Generator().manual_seed(0), threshold=1.0)
    assert rule.log_threshold == 0.0
    verdict = rule(draft, _target_logits(p_draft))
    assert verdict.accepted == 0 and _next_token_is_from_row(verdict)
    # a hair below τ = 1, the same draft passes whole
    verdict = JointRatioAcceptance(SAMPLING, torch.Generator().manual_seed(0), threshold=1 - 1e-9)(
        draft, _target_logits(p_draft))
    assert verdict.accepted == 4


def test_ratio_exactly_on_log_tau_mid_draft():
    """r1 = 0 > log τ, r2 lands exactly on log τ (float for float, as the rule computes it), r3 and r4
    below: only the first token is accepted; with τ one step lower, two are."""
    p_draft = [0.9, 0.4, 0.1, 0.1]
    log_p = _exact_log_p(p_draft)
    log_q = torch.tensor([0.9, 0.6, 0.9, 0.9], dtype=torch.float64).log()
    log_q[0] = log_p[0]  # r1 = 0 exactly
    # choose log q of token 2 so that log p − log q is exactly log τ (search a few ulps around it)
    lq = float(log_p[1]) - LOG_TAU
    for _ in range(64):
        step = float(log_p[1]) - lq
        if step == LOG_TAU:
            break
        lq = math.nextafter(lq, math.inf if step > LOG_TAU else -math.inf)
    log_q[1] = lq
    ratio = torch.cumsum(log_p - log_q, dim=0)
    assert float(ratio[1]) == LOG_TAU, "no float log q puts r2 exactly on log τ"
    assert float(ratio[0]) == 0.0 and LOG_TAU > float(ratio[2]) > float(ratio[3])
    draft = Draft(tokens=TOKENS, log_q=log_q)
    verdict = JointRatioAcceptance(SAMPLING, torch.Generator().manual_seed(0), TAU)(draft, _target_logits(p_draft))
    assert verdict.accepted == 1 and _next_token_is_from_row(verdict)
    lower = math.nextafter(TAU, 0.0)
    while math.log(lower) == LOG_TAU:
        lower = math.nextafter(lower, 0.0)
    verdict = JointRatioAcceptance(SAMPLING, torch.Generator().manual_seed(0), lower)(draft, _target_logits(p_draft))
    assert verdict.accepted == 2


def test_threshold_scales_the_rule():
    """The same draft against several τ: accepted = the longest prefix with Π p/q > τ."""
    p_draft, q_draft = [0.6, 0.5, 0.9, 0.3], [0.9, 0.9, 0.6, 0.9]
    ratios = _ratios(p_draft, q_draft)  # log .667, log .370, log .556, log .185
    for tau, accepted in ((0.7, 0), (0.6, 1), (0.5, 3), (0.3, 3), (0.1, 4)):
        assert max((i + 1 for i, r in enumerate(ratios) if r > math.log(tau)), default=0) == accepted
        assert _verdict(p_draft, q_draft, tau=tau).accepted == accepted, tau


def test_empty_draft_samples_from_the_first_row():
    rule = JointRatioAcceptance(SAMPLING, torch.Generator().manual_seed(0), TAU)
    verdict = rule(Draft(), _target_logits([]))
    assert verdict.accepted == 0 and verdict.next_token == _marker(0)


def test_greedy_target_keeps_exactly_the_matching_prefix():
    """One-hot target: log p = 0 on the argmax and −inf elsewhere, so the prefix up to the first
    mismatch passes (any draft log q ≤ 0 gives r ≥ 0 > log τ) and nothing after it."""
    p_draft = [0.9, 0.9, 0.05, 0.9]  # token 2 is not row 2's argmax (its marker is)
    draft = Draft(tokens=TOKENS, log_q=torch.tensor([0.3, 0.2, 0.9, 0.9], dtype=torch.float64).log())
    verdict = JointRatioAcceptance(SamplingSettings(), None, TAU)(draft, _target_logits(p_draft))
    assert verdict.accepted == 2 and verdict.next_token == _marker(2)
