"""Feature-level draft heads: lossless chains and trees, exact caches, exact sampling, pairing, files."""

import copy
import random

import pytest
import torch

from specdecode import SpeculativeDecoder
from specdecode.errors import InvalidSettingError, VocabularyMismatchError
from specdecode.models.cache import KVCache
from specdecode.models.runner import Readout
from specdecode.models.draft_head import DraftHead, load_head, pair_head
from specdecode.models.tree import keep_path, tree_attention_mask
from specdecode.propose.eagle import HeadDrafter
from specdecode.sampling import SamplingSettings
from test_sampling import SMALL_VOCAB, _first_tokens, _pooled_chisquare, _target_pair_distribution
from tiny_models import ARCHITECTURES, VOCAB, tiny_model

SUBSET = [i for i in range(VOCAB) if i % 5 != 3]  # a reduced draft vocabulary: some tokens never drafted


def _head(target, seed: int = 0, vocab_ids=None, depth: int = 1, noise: float = 0.0) -> DraftHead:
    torch.manual_seed(seed)
    head = DraftHead.from_target(target, vocab_ids or SUBSET, depth=depth)
    with torch.no_grad():
        for param in head.parameters():
            param.add_(torch.randn_like(param) * noise)
    return head


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_eagle_chain_tree_and_mtad_equal_ar_greedy(arch):
    target = tiny_model(arch, seed=0)
    head = _head(target)
    rng = random.Random(arch)
    ar = SpeculativeDecoder(target, "ar")
    for prompt in ([3], [1, 2, 3, 1, 2, 3, 1, 2], [rng.randrange(VOCAB) for _ in range(11)]):
        max_new = rng.choice([2, 17, 40])  # 40 tokens cross Gemma's window of 8 many times
        expected = ar.generate(prompt, max_new_tokens=max_new).token_ids
        for method, options in (("eagle", dict(gamma=rng.randint(1, 6))),
                                ("eagle", dict(gamma=4, min_confidence=0.3)),
                                ("eagle-tree", dict(gamma=rng.randint(1, 5), top_k=3, nodes=rng.randint(1, 10))),
                                ("eagle-mtad", dict(beams=3, gamma=3)),
                                ("eagle-mtad", dict(beams=3, gamma=rng.randint(1, 4), tree=True))):
            result = SpeculativeDecoder(target, method, head=head, **options).generate(prompt, max_new_tokens=max_new)
            assert result.token_ids == expected, (method, options)


def test_head_drafts_are_accepted_when_the_head_knows_the_answer():
    """Guards the test above against a head that is never used: a depth-0-like head that copies
    the target's feature forward drafts the target's own next token often on a repetitive prompt."""
    target = tiny_model("llama", seed=0)
    stats = SpeculativeDecoder(target, "eagle", head=_head(target, vocab_ids=list(range(VOCAB))), gamma=3).generate(
        [1, 2, 3] * 5, max_new_tokens=40).stats
    tree = SpeculativeDecoder(target, "eagle-tree", head=_head(target, vocab_ids=list(range(VOCAB))), gamma=3,
                              top_k=4, nodes=12).generate([1, 2, 3] * 5, max_new_tokens=40).stats
    assert stats.proposed_tokens > 0 and tree.proposed_tokens > 0
    assert tree.tokens_per_target_forward >= stats.tokens_per_target_forward * 0.9


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_head_cache_follows_the_target_exactly(arch):
    """After a generation the head's cache equals a fresh head pass over the target's features of
    the whole sequence: hidden states and tokens line up, drafts were cut back exactly."""
    target = tiny_model(arch, seed=1)
    head = _head(target, noise=0.05)
    prompt = [4, 8, 15, 16, 23, 42, 4, 8, 15]
    generation = SpeculativeDecoder(target, "eagle", head=head, gamma=3).start(prompt, max_new_tokens=30)
    sequence = prompt + generation.result().token_ids
    with torch.inference_mode():
        cached = generation.proposer.drafter.root(sequence)
        hidden = target.model.base_model(input_ids=torch.tensor([sequence])).last_hidden_state[0, :-1]
        fresh = head.logits(head(hidden[None], torch.tensor([sequence[1:]]))[0, -1])
    torch.testing.assert_close(cached, fresh, rtol=1e-9, atol=1e-9)  # over the head's own ids


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_frozen_head_drafts_on_the_fast_runtime_with_the_same_features(arch):
    """freeze() runs the head's layers on the native decoder (where the family has one): the same
    features as `transformers`' forward over a chain and then a tree level on the head's cache, and
    greedy eagle / multi-candidate eagle-mtad with it still equal ar."""
    target = tiny_model(arch, seed=3)
    head = _head(target, noise=0.05)
    frozen = copy.deepcopy(head).freeze()
    pair_head(target, frozen)
    assert (frozen.runtime is not None and frozen.runtime.decoder is not None) == (arch != "gpt2")
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 11, head.hidden_size, dtype=torch.float64, generator=generator)  # past Gemma's window
    ids = torch.tensor([[(7 * i + 2) % VOCAB for i in range(11)]])
    positions = torch.tensor([11, 11, 11])
    mask = tree_attention_mask(head.layers, 11, positions, torch.eye(3, dtype=torch.bool), positions)
    outputs = []
    with torch.inference_mode():
        for drafter in (head, frozen):
            kv = KVCache()
            chain = drafter(hidden, ids, kv)
            level = drafter(chain[:, -1:].expand(1, 3, -1), torch.tensor([[1, 2, 3]]), kv,
                            position_ids=positions[None], attention_mask=mask)
            outputs.append(torch.cat([chain, level], dim=1))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-9, atol=1e-9)
    prompt = [4, 8, 15, 16, 23, 42, 4, 8, 15]
    expected = SpeculativeDecoder(target, "ar").generate(prompt, max_new_tokens=30).token_ids
    for method, options in (("eagle", dict(gamma=4)), ("eagle-mtad", dict(beams=3, gamma=3, tree=True))):
        result = SpeculativeDecoder(target, method, head=frozen, **options).generate(prompt, max_new_tokens=30)
        assert result.token_ids == expected, method


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_head_cut_back_is_exact(arch):
    target = tiny_model(arch, seed=2)
    head = _head(target, noise=0.05)
    drafter = HeadDrafter(head)
    sequence = [(7 * i) % 90 for i in range(14)]  # longer than Gemma's window of 8
    with torch.inference_mode():
        hidden = target.model.base_model(input_ids=torch.tensor([sequence + [5, 6]])).last_hidden_state[0]
        drafter.on_prefill(hidden[:11])
        drafter.root(sequence[:12])
        drafter.extend([0], [9], torch.ones(1, 1, dtype=torch.bool))
        drafter.extend([0], [10], torch.ones(1, 2, dtype=torch.bool))
        drafter.reset()
        drafter.observe_hidden(hidden[11:14])
        cached = drafter.root(sequence + [5])
        fresh = head.logits(head(hidden[None, :14], torch.tensor([(sequence + [5])[1:]]))[0, -1])
    torch.testing.assert_close(cached, fresh, rtol=1e-9, atol=1e-9)  # over the head's own ids


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tree_compaction_keeps_exactly_the_accepted_path(arch):
    target = tiny_model(arch, seed=4)
    context = [(5 * i + 1) % 90 for i in range(13)]  # longer than Gemma's window of 8
    tree = [context[-1], 11, 22, 33, 44, 55, 66]
    parents = [0, 0, 1, 2, 2, 4]  # of tree[1:]
    with torch.inference_mode():
        for path in ([0], [0, 2, 4, 6], [0, 1, 3]):
            kv = KVCache()
            target.runner.forward(kv, context[:-1], Readout(rows=1)).logits
            out = target.runner.verify(kv, tree, parents)
            logits, hidden = out.logits, out.hidden
            branch = [tree[i] for i in path]
            ref = target.runner.forward(KVCache(), context[:-1] + branch, Readout(rows=len(branch)))
            ref_logits, ref_hidden = ref.logits, ref.hidden
            torch.testing.assert_close(logits[path], ref_logits, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(hidden[path], ref_hidden, rtol=1e-9, atol=1e-9)
            keep_path(kv, len(context) - 1, path)
            assert kv.token_ids == context[:-1] + branch
            after = target.runner.forward(kv, [7, 8, 9] * 4, Readout(rows=12)).logits  # walks past the window
            fresh = target.model(torch.tensor([context[:-1] + branch + [7, 8, 9] * 4])).logits[0, -12:]
            torch.testing.assert_close(after, fresh, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=4, top_p=0.9)])
def test_eagle_sampling_matches_target_distribution(settings):
    target = tiny_model("llama", seed=3, vocab=SMALL_VOCAB)
    head = _head(target, vocab_ids=[0, 1, 2, 4, 5, 6], noise=0.3)  # token 3 is never drafted
    prompt = [1, 2, 3]
    n = 2000
    _, pairs = _first_tokens(SpeculativeDecoder(target, "eagle", head=head, gamma=2), prompt, settings, n)
    _, joint = _target_pair_distribution(target, prompt, SamplingSettings(**settings))
    assert _pooled_chisquare(pairs, joint, n)[0] > 1e-3


def test_eagle_mtad_keeps_its_properties():
    target = tiny_model("qwen2", seed=5)
    head = _head(target, noise=0.05)
    paper = dict(temperature=1.0, top_k=10, top_p=0.9)
    decoder = SpeculativeDecoder(target, "eagle-mtad", head=head, beams=3, gamma=3)
    first = decoder.generate([1, 2, 3], max_new_tokens=20, seed=7, **paper)
    assert decoder.generate([1, 2, 3], max_new_tokens=20, seed=7, **paper).token_ids == first.token_ids
    assert len(first.token_ids) == 20 and first.stats.proposed_tokens > 0
    # an unreachable threshold accepts nothing: one sampled token per target forward
    never = SpeculativeDecoder(target, "eagle-mtad", head=head, threshold=1e9).generate(
        [1, 2, 3], max_new_tokens=10, seed=1, **paper).stats
    assert never.tokens_per_target_forward == 1.0


@pytest.mark.parametrize("options, error", [(dict(min_confidence=1.5), r"min_confidence must be in \[0, 1\]"),
                                             (dict(min_confidence="abc"), "takes a number")])
def test_eagle_refuses_a_confidence_that_is_not_a_probability(options, error):
    target = tiny_model("llama")
    with pytest.raises(InvalidSettingError, match=error):
        SpeculativeDecoder(target, "eagle", head=_head(target), **options)


def test_tree_needs_greedy():
    target = tiny_model("llama")
    with pytest.raises(InvalidSettingError):
        SpeculativeDecoder(target, "eagle-tree", head=_head(target)).generate([1, 2], max_new_tokens=3,
                                                                               temperature=1.0)


def test_head_for_another_target_is_refused_with_one_line(tmp_path):
    target = tiny_model("llama", seed=0)
    head = _head(target)
    other = tiny_model("llama", seed=1)
    with pytest.raises(VocabularyMismatchError) as error:
        pair_head(other, head)
    assert "\n" not in str(error.value) and other.name in str(error.value)
    head.save(tmp_path / "head")
    with pytest.raises(VocabularyMismatchError):
        SpeculativeDecoder(other, "eagle", head=str(tmp_path / "head"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_round_trip(tmp_path, arch):
    target = tiny_model(arch, seed=6)
    head = _head(target, depth=2, noise=0.05)
    head.save(tmp_path / "head")
    loaded = load_head(tmp_path / "head")
    pair_head(target, loaded)
    assert loaded.depth == 2 and loaded.vocab_ids.tolist() == SUBSET
    state = loaded.weights()
    assert set(state) == set(head.weights())
    for key, value in head.weights().items():
        torch.testing.assert_close(state[key], value.to(torch.bfloat16).to(state[key].dtype))
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    hidden = torch.randn(1, 5, head.hidden_size, dtype=torch.float64)
    with torch.inference_mode():
        for param in head.parameters():  # the saved precision; the float64 head and the loaded float32 one
            param.copy_(param.to(torch.bfloat16))
        torch.testing.assert_close(loaded(hidden, ids), head(hidden, ids).float(), rtol=1e-4, atol=1e-4)


def test_feature_data_are_the_targets_hidden_states(tmp_path):
    """Batched, left-padded generation returns per row what a plain teacher-forced pass computes."""
    from specdecode.distill.head_data import collect_head_data

    target = tiny_model("gemma3", seed=3)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [14]]
    sequences = collect_head_data(target, prompts, tmp_path, rows=3, samples_per_prompt=1, unconditional=1,
                                  max_new_tokens=12, progress=False)
    assert len(sequences) == 7 and len(list(tmp_path.glob("chunk_*.pt"))) == 3
    for seq in sequences:
        assert len(seq.hidden) == len(seq.ids) - 1
        with torch.inference_mode():
            fresh = target.model.base_model(input_ids=seq.ids.long()[None]).last_hidden_state[0, :-1]
        torch.testing.assert_close(seq.hidden.double(), fresh, rtol=2e-3, atol=2e-3)  # stored as float16
    again = collect_head_data(target, prompts, tmp_path, rows=3, samples_per_prompt=1, unconditional=1,
                              max_new_tokens=12, budget_s=0.0, progress=False)
    assert [s.ids.tolist() for s in again] == [s.ids.tolist() for s in sequences]  # resumed from the chunks


def test_an_earlier_runs_chunks_load_and_a_foreign_width_is_refused(tmp_path):
    from specdecode.distill.head_data import collect_head_data, load_feature_chunks

    target = tiny_model("llama", seed=3)
    made = collect_head_data(target, [[1, 2, 3], [4, 5]], tmp_path, rows=2, samples_per_prompt=1, unconditional=0,
                             max_new_tokens=6, progress=False, teacher_forced=[[7, 8, 9, 10, 11]])
    loaded = load_feature_chunks(tmp_path, target.model.config.hidden_size)
    assert sorted(s.ids.tolist() for s in loaded) == sorted(s.ids.tolist() for s in made)
    with pytest.raises(InvalidSettingError, match="hidden size"):
        load_feature_chunks(tmp_path, target.model.config.hidden_size + 1)
    with pytest.raises(InvalidSettingError, match="no feature chunks"):
        load_feature_chunks(tmp_path / "empty", target.model.config.hidden_size)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_replayed_chain_drafting_is_what_the_engine_does(arch):
    """evaluate_head's τ and eagle_sweep's predictions replay greedy drafting on recorded features
    instead of running the target: the replay must draft and accept exactly what ``eagle`` does."""
    from specdecode.distill.head_data import FeatureSequence
    from specdecode.distill.train_head import replay_chain

    target = tiny_model(arch, seed=0)
    head = _head(target, vocab_ids=list(range(VOCAB)))
    prompt = [1, 2, 3] * 5
    for gamma, confidence in ((4, 0.0), (3, 0.2)):
        result = SpeculativeDecoder(target, "eagle", head=head, gamma=gamma, min_confidence=confidence).generate(
            prompt, max_new_tokens=40)
        ids = torch.tensor(prompt + result.token_ids)
        with torch.inference_mode():
            hidden = target.model.base_model(input_ids=ids[None]).last_hidden_state[0, :-1]
        chain = replay_chain(head, [FeatureSequence(ids, hidden, len(prompt))], gamma, confidence)
        assert chain.accepted == result.stats.accepted_lengths
        assert sum(chain.drafted) == result.stats.proposed_tokens and chain.head_steps == result.stats.draft_forwards
        assert chain.tokens == len(result.token_ids)
        assert 0 < result.stats.accepted_tokens < result.stats.proposed_tokens  # the test sees both outcomes


def test_training_lowers_the_loss_and_resumes(tmp_path):
    from specdecode.distill.head_data import collect_head_data
    from specdecode.distill.train_head import HeadTrainSettings, evaluate_head, train_head

    target = tiny_model("llama", seed=3)
    prompts = [[i, (i * 7) % VOCAB, (i * 13) % VOCAB] for i in range(6)]
    sequences = collect_head_data(target, prompts, tmp_path / "data", rows=6, samples_per_prompt=1,
                                  unconditional=0, max_new_tokens=24, progress=False)
    head = _head(target, vocab_ids=list(range(VOCAB)))
    before = evaluate_head(head, sequences, gamma=3)
    settings = HeadTrainSettings(budget_s=60, max_steps=30, windows=4, window=16, lr=3e-3)
    log = train_head(head, sequences, settings, checkpoint=tmp_path / "ckpt.pt", progress=False)
    assert log.steps == 30 and sum(log.losses[-5:]) < sum(log.losses[:5])
    after = evaluate_head(head, sequences, gamma=3)
    assert after["first_token_agreement"] > before["first_token_agreement"]
    assert 1.0 <= after["tau"] <= 4.0
    settings.max_steps = 35  # a larger budget resumes from the checkpoint
    assert train_head(head, sequences, settings, checkpoint=tmp_path / "ckpt.pt", progress=False).steps == 35
    settings.lr = 1e-3
    with pytest.raises(InvalidSettingError):  # another recipe than the checkpoint's
        train_head(head, sequences, settings, checkpoint=tmp_path / "ckpt.pt", progress=False)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_unrolled_training_backpropagates_through_the_heads_cache(arch):
    """Training-time test appends each unroll step to the head's cache. The cache's in-place
    buffer (``GrowingLayer``) once overwrote keys autograd had saved from the step before: every
    unroll of 2 or more failed on Gemma 3 270M (one key head)."""
    from specdecode.distill.head_data import FeatureSequence
    from specdecode.distill.train_head import HeadTrainSettings, head_loss

    target = tiny_model(arch, seed=2)
    head = _head(target, noise=0.05)
    ids = [(11 * i + 3) % VOCAB for i in range(40)]
    with torch.inference_mode():
        hidden = target.model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0, :-1].clone()
    sequences = [FeatureSequence(torch.tensor(ids), hidden, 4)]
    head.train()
    loss, kls = head_loss(head, sequences, [(0, 0, 20), (0, 12, 24)], HeadTrainSettings(unroll=3))
    loss.backward()
    assert len(kls) == 3 and all(p.grad is not None for p in head.fc.parameters())


def _fp32_with_runtime(arch: str, seed: int):
    from specdecode.models.loading import LoadedModel
    from specdecode.models.runtime import build_runtime

    model = tiny_model(arch, seed=seed).model.float().eval()
    runtime = build_runtime(model)
    if runtime is None:
        pytest.skip("the fast runtime needs fbgemm on a CPU")
    return LoadedModel(model=model, tokenizer=None, name=f"tiny-{arch}-{seed}-fp32", runtime=runtime)


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_fast_batched_generation_equals_generate(arch):
    """The data generator's own loop (base model + the runtime's screened exact head) gives
    ``generate``'s greedy tokens and hidden states on left-padded rows; sampled tokens lie in the
    target's top k at every step."""
    from specdecode.distill.head_data import _generate, _generate_fast, _Job, _fast_head

    target = _fp32_with_runtime(arch, seed=3)
    assert _fast_head(target) is not None
    prompts = [(1, 2, 3), (4, 5, 6, 7, 8, 9, 10, 11, 12, 13), (14,)]
    greedy = [_Job(p, True) for p in prompts]
    slow, fast = _generate(target, greedy, 14, 0), _generate_fast(target, greedy, 14, 0)
    for a, b in zip(slow, fast):
        assert a.ids.tolist() == b.ids.tolist() and a.prompt_len == b.prompt_len
        torch.testing.assert_close(a.hidden, b.hidden, rtol=0, atol=2e-3)
    for row in _generate_fast(target, [_Job(p, False) for p in prompts], 14, 5):
        with torch.inference_mode():
            logits = target.model(input_ids=row.ids.long()[None]).logits[0]
        for t in range(row.prompt_len, len(row.ids)):
            assert int(row.ids[t]) in logits[t - 1].topk(10).indices.tolist()


def test_teacher_forced_rows_come_first_and_are_the_targets_features(tmp_path):
    from specdecode.distill.head_data import collect_head_data

    target = tiny_model("gemma3", seed=3)
    texts = [[(3 * i + 1) % VOCAB for i in range(30)], [5, 6, 7, 8, 9], [1, 2]]  # the last is too short
    sequences = collect_head_data(target, [[1, 2, 3]], tmp_path, rows=1, samples_per_prompt=0, unconditional=0,
                                  max_new_tokens=4, progress=False, teacher_forced=texts, max_text_tokens=16)
    forced = [s for s in sequences if s.prompt_len == 0]
    assert [s.ids.tolist() for s in forced] == [texts[0][:16], texts[0][16:], texts[1]]
    assert sequences[: len(forced)] == forced and len(list(tmp_path.glob("tf_*.pt"))) == 1
    for seq in forced:
        with torch.inference_mode():
            fresh = target.model.base_model(input_ids=seq.ids.long()[None]).last_hidden_state[0, :-1]
        torch.testing.assert_close(seq.hidden.double(), fresh, rtol=2e-3, atol=2e-3)


def test_head_drafts_on_its_own_vocabulary_and_widens_q_exactly():
    """Chains and beams draft over the head's reduced ids; the q handed to speculative sampling
    is the processed distribution over the whole vocabulary (zero outside the head's ids), and
    MTAD's log q is that of the widened logits."""
    from specdecode.propose.beam_sampler import BeamSampleProposer
    from specdecode.propose.eagle import EagleProposer
    from specdecode.sampling import process_logits

    target = tiny_model("llama", seed=7)
    head = _head(target, noise=0.2)
    prompt = [4, 8, 15, 16, 23, 42]
    with torch.inference_mode():
        hidden = target.model.base_model(input_ids=torch.tensor([prompt])).last_hidden_state[0, :-1]
    settings = SamplingSettings(temperature=0.8, top_k=7, top_p=0.9)
    proposer = EagleProposer(head, settings, torch.Generator().manual_seed(0), gamma=3)
    proposer.on_prefill(hidden)
    with torch.inference_mode():
        draft = proposer.propose(prompt, 3)
        reference = HeadDrafter(head)
        reference.on_prefill(hidden)
        logits = reference.root(prompt)
        assert logits.shape == (len(SUBSET),)
        expected = [process_logits(reference.full(logits), settings)]
        for i, token in enumerate(draft.tokens[:-1]):
            logits = reference.extend([0], [token], torch.ones(1, i + 1, dtype=torch.bool))[0]
            expected.append(process_logits(reference.full(logits), settings))
    assert draft.probs.shape == (3, VOCAB) and set(draft.tokens) <= set(SUBSET)
    torch.testing.assert_close(draft.probs, torch.stack(expected), rtol=1e-12, atol=1e-12)
    outside = [i for i in range(VOCAB) if i not in SUBSET]
    assert float(draft.probs[:, outside].abs().sum()) == 0.0

    beams = BeamSampleProposer(HeadDrafter(head), settings, torch.Generator().manual_seed(1), beams=3, depth=1)
    beams.on_prefill(hidden)
    with torch.inference_mode():
        draft = beams.propose(prompt, 1)
        fresh = HeadDrafter(head)
        fresh.on_prefill(hidden)
        wide = torch.log(process_logits(fresh.full(fresh.root(prompt)), settings))
    assert draft.tokens[0] in SUBSET
    torch.testing.assert_close(draft.log_q, wide[draft.tokens], rtol=1e-12, atol=1e-12)



def test_argmax_weight_adds_the_cross_entropy_on_the_targets_top_token():
    from specdecode.distill.head_data import FeatureSequence
    from specdecode.distill.train_head import HeadTrainSettings, head_loss

    target = tiny_model("llama", seed=2)
    head = _head(target, noise=0.05)
    ids = [(11 * i + 3) % VOCAB for i in range(30)]
    with torch.inference_mode():
        hidden = target.model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0, :-1].clone()
    sequences = [FeatureSequence(torch.tensor(ids), hidden, 4)]
    picks = [(0, 0, 20)]
    with torch.no_grad():
        kl, _ = head_loss(head, sequences, picks, HeadTrainSettings(unroll=1))
        both, _ = head_loss(head, sequences, picks, HeadTrainSettings(unroll=1, argmax_weight=0.5))
        log_q = torch.log_softmax(head.logits(head(hidden[None, :20], torch.tensor([ids[1:21]]))[0]), -1)
        top = head.logits(hidden[1:21]).argmax(-1)
        nll = -log_q[torch.arange(20), top].mean()
    torch.testing.assert_close(both - kl, 0.5 * nll, rtol=1e-4, atol=1e-6)
    with pytest.raises(InvalidSettingError):
        HeadTrainSettings(argmax_weight=-1.0).validate()


def test_train_head_refuses_bad_training_settings_before_loading_anything(tmp_path, capsys):
    from specdecode.cli.main import main

    assert main(["train-head", "--max-steps", "0", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_steps" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_head_on_float16_weights_drafts_nearly_the_same_and_methods_stay_lossless(arch):
    """freeze(weights="fp16"): every product of the head (its input projection, its layers, its
    vocabulary rows) on float16 copies of the weights — the features it predicts stay within
    float16 rounding of the float32 head's, and greedy methods with it still equal ar; "auto"
    keeps one of the two by timing once paired; anything else is refused."""
    from specdecode.models.kernels import Fp16WeightLinear
    from specdecode.models.loading import LoadedModel
    from specdecode.models.runtime import build_runtime

    base = tiny_model(arch, seed=3)
    model = base.model.float()
    target = LoadedModel(model, None, base.name, runtime=build_runtime(model))
    head = _head(target, noise=0.05, vocab_ids=list(range(VOCAB)))
    exact, half, auto = (copy.deepcopy(head).freeze(w) for w in ("float32", "fp16", "auto"))
    for frozen in (exact, half, auto):
        pair_head(target, frozen)
    assert exact.runtime.weights == "float32" and half.runtime.weights == "fp16"
    assert auto.runtime.weights in ("float32", "fp16") and set(auto.runtimes) == {"float32", "fp16"}
    assert isinstance(half.rows_product, Fp16WeightLinear) and isinstance(half.runtime.fc, Fp16WeightLinear)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 11, head.hidden_size, generator=generator)
    ids = torch.tensor([[(7 * i + 2) % VOCAB for i in range(11)]])
    with torch.inference_mode():
        features = [frozen(hidden, ids, KVCache()) for frozen in (exact, half)]
        logits = [frozen.logits(f[0]) for frozen, f in zip((exact, half), features)]
    assert not torch.equal(features[0], features[1])  # it did compute on other weights
    torch.testing.assert_close(features[1], features[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(logits[1], logits[0], rtol=2e-2, atol=2e-2)
    prompt = [4, 8, 15, 16, 23, 42, 4, 8, 15]
    expected = SpeculativeDecoder(target, "ar").generate(prompt, max_new_tokens=30).token_ids
    for method, options in (("eagle", dict(gamma=4)), ("eagle-mtad", dict(beams=3, gamma=3))):
        assert SpeculativeDecoder(target, method, head=half, **options).generate(
            prompt, max_new_tokens=30).token_ids == expected, method
    with pytest.raises(InvalidSettingError, match="head weights"):
        copy.deepcopy(head).freeze("int4")
    with pytest.raises(InvalidSettingError, match="head_weights"):
        SpeculativeDecoder(target, "eagle", head=half, head_weights="fp16")
