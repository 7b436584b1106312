"""Greedy speculative methods must reproduce autoregressive greedy decoding token for token."""

import random

import pytest

from specdecode import SpeculativeDecoder
from tiny_models import ARCHITECTURES, VOCAB, perturbed_copy, tiny_model


def _prompts(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        motif = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))]
        prompts.append((motif * rng.randint(1, 4) + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 8))]))
    return prompts


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pld_and_sps_equal_ar_greedy(arch):
    target = tiny_model(arch, seed=0)
    near_draft = perturbed_copy(target, scale=0.05)
    far_draft = tiny_model(arch, seed=7)
    rng = random.Random(arch)
    ar = SpeculativeDecoder(target, "ar")
    for prompt in _prompts(hash(arch) % 1000, 4):
        max_new = rng.choice([1, 2, 17, 40])  # 40 tokens cross Gemma's window of 8 many times
        expected = ar.generate(prompt, max_new_tokens=max_new).token_ids
        assert len(expected) == max_new
        candidates = [
            SpeculativeDecoder(target, "pld", gamma=rng.randint(1, 8), max_ngram=rng.randint(1, 4)),
            SpeculativeDecoder(target, "pld", gamma=rng.randint(1, 8), match="first"),
            SpeculativeDecoder(target, "sps", draft=near_draft, gamma=rng.randint(1, 6)),
            SpeculativeDecoder(target, "sps", draft=far_draft, gamma=3, adaptive_gamma=True),
            SpeculativeDecoder(target, "sps", draft=near_draft, gamma=2, adaptive_gamma=True),
        ]
        for decoder in candidates:
            result = decoder.generate(prompt, max_new_tokens=max_new)
            assert result.token_ids == expected, (decoder.method, decoder.method_options)
            assert result.stats.new_tokens == max_new


def test_prompt_lookup_copies_the_occurrence_it_is_asked_for():
    from specdecode.propose.ngram import NgramProposer

    sequence = [1, 2, 3, 9, 9, 1, 2, 4, 8, 1, 2]
    assert NgramProposer(3, max_ngram=2, match="last").propose(sequence, 10).tokens == [4, 8, 1]
    assert NgramProposer(3, max_ngram=2, match="first").propose(sequence, 10).tokens == [3, 9, 9]
    assert NgramProposer(3, max_ngram=3, match="first").propose([5, 6, 5, 6], 10).tokens == [5, 6]


def test_self_draft_accepts_everything():
    target = tiny_model("llama")
    result = SpeculativeDecoder(target, "sps", draft=target, gamma=5).generate([1, 2, 3], max_new_tokens=30)
    assert result.stats.acceptance_rate == 1.0
    assert result.stats.tokens_per_target_forward == 6.0  # 5 drafts + 1 target token, 5 steps


def test_near_draft_is_partly_accepted():
    """Guards the test above against a draft that is silently never used."""
    target = tiny_model("qwen2")
    stats = SpeculativeDecoder(target, "sps", draft=perturbed_copy(target, 0.01), gamma=4).generate(
        [5, 6, 7], max_new_tokens=40).stats
    assert 0 < stats.acceptance_rate < 1
    assert stats.tokens_per_target_forward > 1.2


def test_eos_cuts_every_method_at_the_same_place():
    target = tiny_model("llama")
    ar_ids = SpeculativeDecoder(target, "ar").generate([3, 4, 5], max_new_tokens=30).token_ids
    eos = ar_ids[12]
    first = ar_ids.index(eos)
    target.model.generation_config.eos_token_id = eos
    try:
        for decoder in (SpeculativeDecoder(target, "ar"), SpeculativeDecoder(target, "sps", draft=target, gamma=6),
                        SpeculativeDecoder(target, "pld")):
            result = decoder.generate([3, 4, 5], max_new_tokens=30)
            assert result.token_ids == ar_ids[: first + 1]
            assert result.stop_reason == "eos"
    finally:
        target.model.generation_config.eos_token_id = None


def test_the_time_of_a_step_is_split_into_its_parts():
    """prefill + draft + verification + acceptance + the rest add up to the wall time, each part
    measured where it happens (the per-round cost breakdown the bench reports)."""
    target = tiny_model("llama", seed=2)
    result = SpeculativeDecoder(target, "mtad", draft=perturbed_copy(target, 0.05), beams=2, gamma=3,
                                tree=True).generate([3, 1, 4, 1, 5, 9], max_new_tokens=20, temperature=1.0, seed=0)
    stats = result.stats
    parts = (stats.prefill_s, stats.draft_s, stats.verify_s, stats.accept_s)
    assert all(part > 0 for part in parts)
    assert sum(parts) + stats.other_s == pytest.approx(stats.total_s)
