"""Self-speculative decoding: the layer-skip view, the self-draft and the ``ssd`` method."""

import copy
import random

import pytest
import torch

from specdecode import SpeculativeDecoder

from specdecode.errors import InvalidSettingError
from specdecode.models.cache import KVCache
from specdecode.models.families import decoder_layers
from specdecode.models.layer_skip import SkipSet
from specdecode.models.runner import Readout
from specdecode.artifacts.profile import SelfDraftSettings
from specdecode.propose.self_draft import SelfDraftProposer
from specdecode.sampling import GenerationSettings, SamplingSettings
from test_sampling import SMALL_VOCAB, _first_tokens, _pooled_chisquare, _target_pair_distribution
from tiny_models import ARCHITECTURES, VOCAB, tiny_model

LAYERS = 4


def _random_skip(rng: random.Random, layers: int = LAYERS) -> SkipSet:
    return SkipSet.of(rng.sample(range(layers), rng.randint(0, layers)), rng.sample(range(layers), rng.randint(0, layers)))


def _zeroed_reference(model, skip: SkipSet, arch: str):
    """An independent reference: a deep copy whose skipped sub-layers have zero output projections."""
    reference = copy.deepcopy(model)
    for index, layer in enumerate(decoder_layers(reference)):
        attention = layer.attn if arch == "gpt2" else layer.self_attn
        projections = []
        if index in skip.attention:
            projections.append(attention.c_proj if arch == "gpt2" else attention.o_proj)
        if index in skip.mlp:
            projections.append(layer.mlp.c_proj if arch == "gpt2" else layer.mlp.down_proj)
        for projection in projections:
            torch.nn.init.zeros_(projection.weight)
            if projection.bias is not None:
                torch.nn.init.zeros_(projection.bias)
    return reference


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_view_equals_model_with_zeroed_sublayers_and_leaves_target_alone(arch):
    target = tiny_model(arch)
    before = {k: v.clone() for k, v in target.model.state_dict().items()}
    rng = random.Random(arch)
    sequence = [rng.randrange(VOCAB) for _ in range(30)]  # crosses Gemma's window of 8
    with torch.inference_mode():
        expected_target = target.model(torch.tensor([sequence])).logits[0]
        for _ in range(4):
            skip = _random_skip(rng)
            view = target.runner.skipping(skip)
            expected = _zeroed_reference(target.model, skip, arch)(torch.tensor([sequence])).logits[0]
            kv = KVCache()
            chunks = [view.forward(kv, sequence[:5]).logits]
            for start in range(5, 30, 4):
                piece = sequence[start:start + 4]
                chunks.append(view.forward(kv, piece).logits)
            torch.testing.assert_close(torch.cat(chunks), expected, rtol=1e-9, atol=1e-9)
            # skipped attention layers keep placeholders, so every layer has the same length
            assert {layer.get_seq_length() for layer in kv.cache.layers} == {30}
        torch.testing.assert_close(target.model(torch.tensor([sequence])).logits[0], expected_target)
    assert all(torch.equal(before[k], v) for k, v in target.model.state_dict().items())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_propose_lends_the_target_cache_back_unchanged(arch):
    target = tiny_model(arch)
    rng = random.Random(1)
    sequence = [rng.randrange(VOCAB) for _ in range(20)]
    kv = KVCache()
    proposer = SelfDraftProposer(target, SelfDraftSettings(SkipSet.of([1], [0, 2]), threshold=1e-9, max_draft=5),
                                 SamplingSettings(), None)
    proposer.bind_target_cache(kv)
    with torch.inference_mode():
        target.runner.forward(kv, sequence[:-1], Readout(rows=1)).logits
        keys = [layer.keys.clone() for layer in kv.cache.layers]
        draft = proposer.propose(sequence, max_tokens=5)
    assert len(draft) == 5
    assert kv.token_ids == sequence[:-1]
    for layer, saved in zip(kv.cache.layers, keys):
        assert torch.equal(layer.keys, saved)


def _prompts(rng: random.Random, count: int) -> list[list[int]]:
    prompts = [[rng.randrange(VOCAB)]]  # a one-token prompt: no prefill, the draft starts on an empty cache
    for _ in range(count - 1):
        motif = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 5))]
        prompts.append(motif * rng.randint(1, 3) + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))])
    return prompts


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_ssd_equals_ar(arch):
    target = tiny_model(arch, seed=0)
    rng = random.Random(f"ssd-{arch}")
    ar = SpeculativeDecoder(target, "ar")
    for prompt in _prompts(rng, 4):
        max_new = rng.choice([1, 3, 25, 40])  # long runs cross Gemma's sliding window of 8 repeatedly
        expected = ar.generate(prompt, max_new_tokens=max_new).token_ids
        for _ in range(3):
            skip = _random_skip(rng)
            options = dict(skip_attention=list(skip.attention), skip_mlp=list(skip.mlp),
                           threshold=rng.choice([1e-6, 0.05, 0.8]), max_draft=rng.randint(1, 8))
            if rng.random() < 0.5:
                options["draft_vocab"] = rng.sample(range(VOCAB), rng.randint(1, VOCAB))
            options["int8"] = rng.random() < 0.3
            result = SpeculativeDecoder(target, "ssd", **options).generate(prompt, max_new_tokens=max_new)
            assert result.token_ids == expected, options
            assert result.stats.new_tokens == max_new


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_empty_skip_set_accepts_every_draft(arch):
    target = tiny_model(arch)
    stats = SpeculativeDecoder(target, "ssd", threshold=1e-9, max_draft=6).generate([1, 2, 3], max_new_tokens=35).stats
    assert stats.acceptance_rate == 1.0
    assert stats.tokens_per_target_forward == 7.0  # 6 drafts + the target's token, every step
    assert stats.draft_forwards == stats.proposed_tokens == 30


def test_skipping_drafts_worse_but_is_used():
    """Guards the exactness tests against a draft that is silently never used or never wrong."""
    target = tiny_model("llama", layers=6)
    stats = SpeculativeDecoder(target, "ssd", skip_attention=[4], skip_mlp=[5], threshold=1e-9,
                               max_draft=4).generate([5, 6, 7], max_new_tokens=60).stats
    assert 0 < stats.acceptance_rate < 1
    assert stats.tokens_per_target_forward > 1.2


def test_threshold_stops_drafting_early():
    target = tiny_model("qwen2")
    confident = SpeculativeDecoder(target, "ssd", threshold=1e-9, max_draft=5).generate([1, 2], max_new_tokens=30)
    cautious = SpeculativeDecoder(target, "ssd", threshold=1.0, max_draft=5).generate([1, 2], max_new_tokens=30)
    assert confident.stats.proposed_tokens > cautious.stats.proposed_tokens
    # threshold 1: every draft stops after its first token (no top-1 probability exceeds 1)
    assert cautious.stats.proposed_tokens == cautious.stats.target_forwards
    assert confident.token_ids == cautious.token_ids


@pytest.mark.parametrize(("arch", "settings"), [("gemma3", dict(temperature=1.0)),
                                               ("llama", dict(temperature=1.5, top_k=5, top_p=0.95))])
def test_ssd_sampling_matches_target_distribution(arch, settings):
    target = tiny_model(arch, seed=3, vocab=SMALL_VOCAB)
    prompt = [1, 2, 3]
    n = 2000
    # a poor draft (most of the network skipped) whose head only knows ids 0-3: many rejections
    decoder = SpeculativeDecoder(target, "ssd", skip_attention=[1, 2], skip_mlp=[0, 3], draft_vocab=[0, 1, 2, 3],
                                 threshold=1e-9, max_draft=2)
    _, pairs = _first_tokens(decoder, prompt, settings, n)
    _, joint = _target_pair_distribution(target, prompt, SamplingSettings(**settings))
    pvalue, cells = _pooled_chisquare(pairs, joint, n)
    assert cells >= 4  # a near-deterministic target would make the check vacuous
    assert pvalue > 1e-3


def test_sampled_drafts_carry_their_distributions():
    target = tiny_model("llama", vocab=SMALL_VOCAB)
    proposer = SelfDraftProposer(target, SelfDraftSettings(SkipSet.of([0], []), threshold=1e-9, max_draft=3,
                                                           vocab_ids=(4, 1, 2)),
                                 SamplingSettings(temperature=1.0), torch.Generator().manual_seed(0))
    kv = KVCache()
    proposer.bind_target_cache(kv)
    with torch.inference_mode():
        target.runner.forward(kv, [1, 2], Readout(rows=1)).logits
        draft = proposer.propose([1, 2, 3], max_tokens=3)
    assert draft.probs.shape == (3, SMALL_VOCAB)
    torch.testing.assert_close(draft.probs.sum(-1), torch.ones(3, dtype=draft.probs.dtype))
    assert float(draft.probs[:, [0, 3, 5, 6]].abs().sum()) == 0  # outside the draft vocabulary: q = 0
    assert all(t in (4, 1, 2) for t in draft.tokens)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(threshold=0), "threshold must be in (0, 1]"),
        (dict(threshold=1.5), "threshold must be in (0, 1]"),
        (dict(threshold="high"), "threshold must be in (0, 1]"),
        (dict(max_draft=0), "max_draft must be an integer >= 1"),
        (dict(max_draft=2.5), "max_draft must be an integer >= 1"),
        (dict(skip_attention=[4]), "attention layer index 4 out of range: the model has 4 layers"),
        (dict(skip_mlp=[-1]), "mlp layer index -1 out of range"),
        (dict(skip_mlp="1,2"), "must be a list of integers"),
        (dict(draft_vocab=[0, 0]), "repeats token ids"),
        (dict(draft_vocab=[VOCAB]), "outside the target vocabulary"),
        (dict(draft_vocab=100), "needs a profile"),
        (dict(int8="yes"), "int8 must be True or False"),
        (dict(skip_layers=[1]), "unknown option"),
    ],
)
def test_bad_options_are_refused_with_one_line(options, message):
    with pytest.raises(InvalidSettingError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) as info:
        SpeculativeDecoder(tiny_model("llama"), "ssd", **options)
    assert "\n" not in str(info.value)


def test_unsupported_architecture_is_refused():
    target = tiny_model("llama")
    target.model.config.model_type = "mystery"
    try:
        with pytest.raises(InvalidSettingError, match="does not support model type 'mystery'"):
            SpeculativeDecoder(target, "ssd")
    finally:
        target.model.config.model_type = "llama"


def test_skip_mask_round_trip():
    skip = SkipSet.of([3, 1, 1], [0])
    assert skip == SkipSet((1, 3), (0,))
    assert SkipSet.from_mask(skip.as_mask(4), 4) == skip
    with pytest.raises(InvalidSettingError, match="has 8 entries"):
        SkipSet.from_mask([0, 1], 4)


@pytest.mark.real_model
def test_real_model_greedy_ssd_equals_ar(real_model):
    prompt = "The three primary colours are"
    expected = SpeculativeDecoder(real_model, "ar").generate(prompt, max_new_tokens=24)
    for options in (dict(skip_attention=[12, 13, 14], skip_mlp=[15, 16, 17]),
                    dict(skip_attention=[16], int8=True, draft_vocab=list(dict.fromkeys([*range(4096), *expected.token_ids])))):
        result = SpeculativeDecoder(real_model, "ssd", **options).generate(prompt, max_new_tokens=24)
        assert result.token_ids == expected.token_ids, options
        assert result.stats.accepted_tokens > 0


@pytest.mark.real_model
def test_ssd_on_the_embedded_default_drafts_with_the_shipped_profile(real_model):
    """A bare self-draft of the embedded model (full depth, 262k-wide head) is slower than ``ar``:
    without ``profile`` the shipped one applies, ``profile=none`` asks for the bare draft."""
    from specdecode.models.loading import shipped_ssd_profile
    from specdecode.artifacts.profile import load_profile

    shipped = load_profile(shipped_ssd_profile()).settings
    for method in ("ssd", "pld-ssd"):
        proposer, _ = SpeculativeDecoder(real_model, method)._start(GenerationSettings())
        settings = (proposer.fallback if method == "pld-ssd" else proposer).settings
        assert settings == shipped
    bare, _ = SpeculativeDecoder(real_model, "ssd", profile="none")._start(GenerationSettings())
    assert bare.settings.vocab_ids is None and bare.settings != shipped
