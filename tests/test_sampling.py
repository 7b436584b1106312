"""Sampling methods must draw from the target's processed distribution — checked statistically."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from specdecode import SpeculativeDecoder
from specdecode.accept.rules import SpeculativeSampling
from specdecode.propose.base import Draft
from specdecode.sampling import SamplingSettings, process_logits
from tiny_models import tiny_model

SMALL_VOCAB = 7


def _first_tokens(decoder, prompt, settings, n):
    counts = np.zeros(SMALL_VOCAB)
    pairs = {}
    for seed in range(n):
        ids = decoder.generate(prompt, max_new_tokens=2, seed=seed, **settings).token_ids
        counts[ids[0]] += 1
        pairs[tuple(ids)] = pairs.get(tuple(ids), 0) + 1
    return counts, pairs


def _target_pair_distribution(target, prompt, sampling):
    """Exact distribution of the first two sampled tokens by enumeration."""
    with torch.no_grad():
        p1 = process_logits(target.model(torch.tensor([prompt])).logits[0, -1].float(), sampling)
        joint = {}
        for a in range(SMALL_VOCAB):
            p2 = process_logits(target.model(torch.tensor([prompt + [a]])).logits[0, -1].float(), sampling)
            for b in range(SMALL_VOCAB):
                joint[(a, b)] = float(p1[a] * p2[b])
    return p1.double().numpy(), joint


def _pooled_chisquare(pairs: dict, joint: dict, n: int) -> tuple[float, int]:
    """Chi-square p-value of observed first-two-token ``pairs`` against the target's ``joint``
    (tiny cells merged so the approximation holds) and the number of cells compared; a pair the
    target cannot produce fails at once."""
    assert sum(pairs.get(k, 0) for k in joint if joint[k] == 0) == 0
    support = [k for k, v in joint.items() if v > 0]
    observed = np.array([pairs.get(k, 0) for k in support])
    expected = np.array([joint[k] for k in support]) * n
    small = expected < 5
    observed = np.append(observed[~small], observed[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    return chisquare(observed, expected * observed.sum() / expected.sum()).pvalue, len(observed)


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=4, top_p=0.9)])
def test_sps_sampling_matches_target_distribution(settings):
    target = tiny_model("llama", seed=3, vocab=SMALL_VOCAB)
    draft = tiny_model("llama", seed=11, vocab=SMALL_VOCAB)  # a different model: many rejections
    prompt = [1, 2, 3]
    n = 2000
    decoder = SpeculativeDecoder(target, "sps", draft=draft, gamma=2)
    _, pairs = _first_tokens(decoder, prompt, settings, n)
    _, joint = _target_pair_distribution(target, prompt, SamplingSettings(**settings))
    assert _pooled_chisquare(pairs, joint, n)[0] > 1e-3


def test_residual_resampling_is_what_makes_it_exact():
    """A rule that resamples from p (not norm(max(0, p − q))) on rejection must be caught."""
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.1, 0.1, 0.8])
    logits = torch.log(torch.stack([p, p]))
    settings = SamplingSettings(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    rule = SpeculativeSampling(settings, gen)
    n = 20000
    counts = np.zeros(3)
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=gen))
        verdict = rule(Draft(tokens=[x], probs=q[None]), logits)
        counts[x if verdict.accepted else verdict.next_token] += 1
    assert chisquare(counts, p.numpy() * n).pvalue > 1e-3
    # the wrong residual: accept with min(1, p/q), otherwise resample from p itself
    wrong = np.zeros(3)
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=gen))
        keep = torch.rand(1, generator=gen) < min(1.0, float(p[x] / q[x]))
        wrong[x if keep else int(torch.multinomial(p, 1, generator=gen))] += 1
    assert chisquare(wrong, p.numpy() * n).pvalue < 1e-6


@pytest.mark.parametrize("method", ["ar", "pld"])
def test_single_token_methods_match_target_distribution(method):
    target = tiny_model("gemma3", seed=5, vocab=SMALL_VOCAB)
    prompt = [1, 2, 1, 2, 1]  # repetitive, so pld drafts from the prompt
    n = 1500
    counts, _ = _first_tokens(SpeculativeDecoder(target, method), prompt, dict(temperature=1.0), n)
    p1, _ = _target_pair_distribution(target, prompt, SamplingSettings(temperature=1.0))
    assert chisquare(counts, p1 * n).pvalue > 1e-3


def test_sampling_is_reproducible_by_seed():
    target = tiny_model("qwen2", seed=2)
    decoder = SpeculativeDecoder(target, "sps", draft=tiny_model("qwen2", seed=4), gamma=3)
    a = decoder.generate([1, 2, 3], max_new_tokens=20, temperature=1.0, seed=42).token_ids
    b = decoder.generate([1, 2, 3], max_new_tokens=20, temperature=1.0, seed=42).token_ids
    c = decoder.generate([1, 2, 3], max_new_tokens=20, temperature=1.0, seed=43).token_ids
    assert a == b != c


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = process_logits(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])), SamplingSettings(1.0, top_p=0.8))
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    probs = process_logits(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])), SamplingSettings(1.0, top_k=1))
    torch.testing.assert_close(probs, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def _masked_reference(logits, settings):
    """The filters spelled out on the whole row: keep what is >= the k-th value (ties included),
    then the smallest prefix of those reaching top_p."""
    logits = logits / settings.temperature
    kth = torch.topk(logits, settings.top_k, dim=-1).values[..., -1:]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    ordered, order = torch.sort(probs, dim=-1, descending=True)
    drop = (ordered.cumsum(-1) - ordered) >= settings.top_p
    return torch.softmax(logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf")), dim=-1)


def test_top_k_processing_equals_masking_the_whole_row_ties_included():
    """process_logits handles top-k rows on their k best entries only (a 262k-entry row costs ~10 ms
    to mask and normalise), and rows finite on few columns on those columns alone; it must give
    what masking the whole row gives, ties at the k-th place (all kept) and -inf entries included."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        vocab = int(torch.randint(12, 400, (1,), generator=generator))
        logits = torch.randn(3, vocab, generator=generator, dtype=torch.float64) * 3
        top_p = 0.6 + trial % 5 / 10
        if trial % 2:
            # many ties, some at the k-th place; top-p off: which of two tied tokens it drops is arbitrary
            logits, top_p = logits.round(), 1.0
        if trial % 3 == 0:
            logits[:, torch.randperm(vocab, generator=generator)[: vocab // 2]] = float("-inf")
        elif trial % 3 == 1:  # a screened head's rows: finite only on a few columns (processed on those alone)
            logits[:, torch.randperm(vocab, generator=generator)[: vocab - max(1, vocab // 12)]] = float("-inf")
        settings = SamplingSettings(temperature=0.5 + trial / 200, top_k=1 + trial % 10, top_p=top_p)
        torch.testing.assert_close(process_logits(logits, settings), _masked_reference(logits, settings),
                                   rtol=0, atol=1e-12)


def test_sample_draws_from_the_distribution_on_its_support():
    """``sample`` draws among the nonzero entries only (a random number per entry of a 262k row is
    dear): it must still follow the distribution, and never pick a zero-probability id."""
    from specdecode.sampling import sample

    probs = torch.zeros(50_000, dtype=torch.float64)
    support = torch.tensor([3, 17, 4_000, 49_999])
    probs[support] = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    draws = [sample(probs, generator) for _ in range(4000)]
    assert set(draws) <= set(support.tolist())
    counts = [draws.count(int(i)) for i in support]
    assert chisquare(counts, [400, 800, 1200, 1600]).pvalue > 1e-3
