"""Prompt lookup first, a model's draft elsewhere: lossless, exact under sampling, both paths used."""

import random

import pytest

from specdecode import SpeculativeDecoder
from specdecode.propose.base import Draft, Proposer
from specdecode.propose.lookup_first import LookupFirstProposer
from specdecode.propose.ngram import NgramProposer
from specdecode.sampling import SamplingSettings
from test_draft_head import _head
from test_sampling import SMALL_VOCAB, _first_tokens, _pooled_chisquare, _target_pair_distribution
from tiny_models import ARCHITECTURES, VOCAB, tiny_model


class _Recording(Proposer):
    """A fallback that drafts one fixed token and records the hooks it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.observed, self.hidden = 0, [], 0

    def propose(self, sequence, max_tokens):
        self.calls += 1
        return Draft(tokens=[0])

    def observe(self, proposed, accepted):
        self.observed.append((proposed, accepted))

    def observe_hidden(self, hidden):
        self.hidden += 1


def test_fallback_drafts_only_where_lookup_finds_no_ngram():
    fallback = _Recording()
    proposer = LookupFirstProposer(NgramProposer(4, max_ngram=3, min_ngram=2), fallback)
    assert proposer.propose([1, 2, 3, 1, 2], 10).tokens == [3, 1, 2]   # the bigram 1 2 occurred
    proposer.observe(3, 1)
    assert proposer.propose([1, 2, 3, 4], 10).tokens == [0]            # only a unigram would match
    proposer.observe(1, 0)
    proposer.observe_hidden(None)
    assert fallback.calls == 1 and fallback.observed == [(1, 0)] and fallback.hidden == 1
    assert proposer.stats.extra == {"lookup_drafts": 1, "fallback_drafts": 1}
    assert proposer.stats.proposed == 3  # the recording fallback keeps no counts of its own


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lookup_first_methods_equal_ar_greedy(arch):
    """Both paths run in every generation: the head must stay in step with the target across the
    steps lookup drafted, and the self-draft must hand back the target's cache as it found it."""
    target = tiny_model(arch, seed=0)
    head = _head(target, noise=0.05)
    rng = random.Random(f"lookup-{arch}")
    ar = SpeculativeDecoder(target, "ar")
    used = {"lookup_drafts": 0, "fallback_drafts": 0}
    for prompt in ([3], [1, 2, 3, 1, 2, 3, 1, 2], [rng.randrange(VOCAB) for _ in range(11)]):
        max_new = rng.choice([2, 17, 40])  # 40 tokens cross Gemma's window of 8 many times
        expected = ar.generate(prompt, max_new_tokens=max_new).token_ids
        for method, options in (("pld-ssd", dict(gamma=rng.randint(1, 8))),
                                ("pld-eagle", dict(head=head, gamma=rng.randint(1, 8), head_gamma=rng.randint(1, 5),
                                                   min_ngram=1)),
                                ("pld-eagle", dict(head=head, min_confidence=0.0))):
            result = SpeculativeDecoder(target, method, **options).generate(prompt, max_new_tokens=max_new)
            assert result.token_ids == expected, (method, options)
            if method == "pld-eagle" and len(prompt) > 1:  # the head drafts at every step lookup leaves
                drafted = result.stats.extra["lookup_drafts"] + result.stats.extra["fallback_drafts"]
                assert drafted >= result.stats.target_forwards - 1  # (the last step may have no room)
            for key in used:
                used[key] += result.stats.extra[key]
    assert used["lookup_drafts"] > 0 and used["fallback_drafts"] > 0


@pytest.mark.parametrize("prompt", [[1, 2, 1, 2], [1, 2, 3]])  # lookup drafts the first step; it cannot
def test_lookup_first_sampling_matches_target_distribution(prompt):
    settings = dict(temperature=0.7, top_k=4, top_p=0.9)
    target = tiny_model("llama", seed=3, vocab=SMALL_VOCAB)
    head = _head(target, vocab_ids=[0, 1, 2, 4, 5, 6], noise=0.3)
    n = 2000
    _, pairs = _first_tokens(SpeculativeDecoder(target, "pld-eagle", head=head, gamma=3, min_ngram=1,
                                                head_gamma=2), prompt, settings, n)
    _, joint = _target_pair_distribution(target, prompt, SamplingSettings(**settings))
    assert _pooled_chisquare(pairs, joint, n)[0] > 1e-3
