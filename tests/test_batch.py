"""Batched speculative decoding (issue 28): several requests verified in one target forward.

Every request in a batch must decode exactly what it decodes alone (greedy): on every tiny
architecture, float64 eager (one forward per request: the fallback) and float32 on the fast
runtime (the native decoder's ragged batched forward), for the methods that batch; requests of
different lengths join and leave mid-batch; one leaving mid-batch corrupts no other's cache.
"""

from __future__ import annotations

import random

import pytest
import torch

from specdecode import SpeculativeDecoder
from specdecode.engine.batch import BatchStepper, Survival, _drafter
from specdecode.models.loading import LoadedModel
from specdecode.models.runner import Readout
from specdecode.models.runtime import build_runtime
from test_draft_head import _head
from tiny_models import ARCHITECTURES, VOCAB, perturbed_copy, tiny_model


def _target(arch: str, fast: bool) -> LoadedModel:
    loaded = tiny_model(arch, seed=0)
    if not fast:
        return loaded
    model = loaded.model.float()
    return LoadedModel(model, None, loaded.name, runtime=build_runtime(model))


def _draft(arch: str) -> LoadedModel:
    """A separate draft model (``sps``, ``mtad``) on the fast runtime: the tiny target, perturbed."""
    model = perturbed_copy(tiny_model(arch, seed=0), 0.05).model.float()
    return LoadedModel(model, None, f"tiny-{arch}-draft", runtime=build_runtime(model))


def _prompts(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        motif = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 5))]
        prompts.append(motif * rng.randint(1, 4) + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 9))])
    return prompts


def _methods(target: LoadedModel) -> list[tuple[str, dict]]:
    head = _head(target, vocab_ids=list(range(VOCAB)))
    if target.runner.native:
        head.freeze()  # the head's own fast runtime: its batched forward, as shipped heads run
    methods = [("ar", {}), ("pld", dict(gamma=4)), ("pld", dict(gamma=8, max_ngram=2)),
               ("ssd", dict(skip_attention=[1], skip_mlp=[2], max_draft=4)),
               ("eagle", dict(head=head, gamma=3))]
    return methods


@pytest.mark.parametrize("fast", [False, True], ids=["float64-eager", "float32-fast"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_greedy_equals_each_request_alone(arch, fast):
    target = _target(arch, fast)
    if fast and arch != "gpt2":
        assert target.runner.native  # the batched forward, not the fallback
    prompts = _prompts(hash(arch) % 997, 5)
    lengths = [1, 7, 40, 23, 12]  # leave at different steps; 40 crosses Gemma's window of 8 often
    for method, options in _methods(target):
        decoder = SpeculativeDecoder(target, method, **options)
        alone = [decoder.generate(p, max_new_tokens=n).token_ids for p, n in zip(prompts, lengths)]
        generations = [decoder.start(p, max_new_tokens=n) for p, n in zip(prompts, lengths)]
        BatchStepper(generations).run()
        batched = [g.result() for g in generations]
        assert [r.token_ids for r in batched] == alone, (method, options)
        assert all(r.stats.new_tokens == n for r, n in zip(batched, lengths))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_other_chain_methods_batch_losslessly_too(arch):
    """``sps`` and greedy chain ``mtad`` (a separate draft model: ``sps`` requests draft together,
    ``mtad``'s beams per request), ``pld-eagle`` and ``pld-ssd`` (lookup, else a head or a
    self-draft): each request of a batch decodes what it decodes alone."""
    target = _target(arch, fast=True)
    draft = _draft(arch)
    head = _head(target, vocab_ids=list(range(VOCAB))).freeze()
    prompts = _prompts(hash(arch) % 991, 4)
    lengths = [3, 30, 17, 9]
    for method, options in [("sps", dict(draft=draft, gamma=3)), ("mtad", dict(draft=draft, beams=2, gamma=3)),
                            ("pld-eagle", dict(head=head, head_gamma=3)), ("pld-ssd", dict(gamma=6))]:
        decoder = SpeculativeDecoder(target, method, **options)
        alone = [decoder.generate(p, max_new_tokens=n).token_ids for p, n in zip(prompts, lengths)]
        generations = [decoder.start(p, max_new_tokens=n) for p, n in zip(prompts, lengths)]
        BatchStepper(generations).run()
        results = [g.result() for g in generations]
        assert [r.token_ids for r in results] == alone, method
        assert results[1].stats.extra["batch_requests_sum"] > results[1].stats.target_forwards  # really batched
        assert results[1].stats.proposed_tokens > 0  # and drafting


def test_generate_takes_a_list_of_prompts_and_returns_one_result_each():
    target = _target("llama", fast=True)
    decoder = SpeculativeDecoder(target, "pld", gamma=4)
    prompts = _prompts(3, 4)
    results = decoder.generate(prompts, max_new_tokens=20)
    assert [r.token_ids for r in results] == [decoder.generate(p, max_new_tokens=20).token_ids for p in prompts]
    for result in results:
        assert result.stats.new_tokens == 20 and result.stats.target_forwards >= 1
        assert result.stats.extra["batch_steps"] == result.stats.target_forwards
    assert results[0].stats.extra["batch_requests_sum"] > results[0].stats.target_forwards  # batched with others
    single = decoder.generate(prompts[0], max_new_tokens=5)  # one prompt (token ids): one result
    assert single.token_ids == results[0].token_ids[:5]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_requests_join_and_leave_mid_batch_and_a_removed_one_corrupts_nothing(arch):
    target = _target(arch, fast=True)
    decoder = SpeculativeDecoder(target, "pld", gamma=5)
    prompts = _prompts(11, 6)
    lengths = [30, 9, 25, 40, 3, 18]
    alone = [decoder.generate(p, max_new_tokens=n).token_ids for p, n in zip(prompts, lengths)]
    generations = [decoder.start(p, max_new_tokens=n) for p, n in zip(prompts, lengths)]
    stepper = BatchStepper(generations[:2])
    steps = 0
    while stepper.active or steps < 6:
        if steps == 2:
            stepper.add(generations[2])
            stepper.add(generations[3])
        if steps == 3:
            stepper.remove(generations[3])  # its client went away mid-batch
        if steps == 5:
            stepper.add(generations[4])
            stepper.add(generations[5])
        stepper.step()
        steps += 1
    for index, (generation, expected) in enumerate(zip(generations, alone)):
        if index == 3:
            assert generation.stop_reason is None and generation.generated == expected[:len(generation.generated)]
        else:
            assert generation.result().token_ids == expected, index


def test_a_row_cap_cuts_drafts_and_stays_lossless():
    target = _target("qwen2", fast=True)
    decoder = SpeculativeDecoder(target, "pld", gamma=8, max_ngram=1)
    prompts = [[5, 6, 7] * 6, [9, 9, 9, 9, 9, 9], [1, 2, 3, 4] * 3, [8, 1] * 5]
    alone = [decoder.generate(p, max_new_tokens=24).token_ids for p in prompts]
    generations = [decoder.start(p, max_new_tokens=24) for p in prompts]
    stepper = BatchStepper(generations, max_batch_rows=6)
    while stepper.active:
        added = stepper.step()
        assert sum(len(v) for v in added.values()) <= 6 + len(added)  # each row adds at most one token
    assert [g.result().token_ids for g in generations] == alone


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_forward_batch_rows_equal_each_requests_forward(arch):
    target = _target(arch, fast=True)
    runner = target.runner
    rng = random.Random(arch)
    contexts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (3, 17, 1, 9)]
    feeds = [[rng.randrange(VOCAB) for _ in range(n)] for n in (1, 5, 3, 12)]
    with torch.inference_mode():
        solo, batch_kvs = [], []
        for context, feed in zip(contexts, feeds):
            kv = runner.new_cache()
            runner.forward(kv, context, Readout.hidden_only())
            solo.append(runner.forward(kv, feed, Readout()))
            kv.crop(len(context))
            batch_kvs.append(kv)
        outs = runner.forward_batch(batch_kvs, feeds, [Readout()] * len(feeds))
        for kv, context, feed, alone, out in zip(batch_kvs, contexts, feeds, solo, outs):
            assert kv.token_ids == context + feed and len(kv) == kv.cache.get_seq_length()
            torch.testing.assert_close(out.hidden, alone.hidden, rtol=1e-5, atol=1e-5)
            assert torch.equal(out.logits.argmax(-1), alone.logits.argmax(-1))
        top = runner.forward_batch([runner.new_cache(), runner.new_cache()], [[1, 2], [3]],
                                   [Readout(top_k=1), Readout.hidden_only()])
        assert top[0].logits.shape == (2, VOCAB) and top[1].logits is None and top[1].hidden.shape[0] == 1


def test_seeded_sampling_in_a_batch_draws_what_each_request_draws_alone():
    target = _target("qwen2", fast=False)  # float64: the batch changes no logit
    decoder = SpeculativeDecoder(target, "pld", gamma=4)
    prompts = _prompts(5, 3)
    settings = dict(max_new_tokens=25, temperature=0.8, top_k=20)
    alone = [decoder.generate(p, seed=i, **settings).token_ids for i, p in enumerate(prompts)]
    generations = [decoder.start(p, seed=i, **settings) for i, p in enumerate(prompts)]
    BatchStepper(generations).run()
    assert [g.result().token_ids for g in generations] == alone


def test_greedy_chains_read_the_head_as_each_request_alone_reads_it():
    target = _target("llama", fast=True)
    runner, rng = target.runner, random.Random(1)
    contexts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (4, 9, 2, 13)]
    feeds = [[rng.randrange(VOCAB) for _ in range(n)] for n in (11, 1, 6, 9)]
    with torch.inference_mode():
        kvs, solo = [], []
        for context, feed in zip(contexts, feeds):
            kv = runner.new_cache()
            runner.forward(kv, context, Readout.hidden_only())
            greedy = runner.forward(kv, feed, Readout(top_k=1)).logits.argmax(-1).tolist()
            # a draft that matches the target's choices for a while, then does not
            draft = [*greedy[:len(feed) // 2], (greedy[len(feed) // 2] + 1) % VOCAB, *feed[len(feed) // 2 + 2:]]
            kv.crop(len(context))
            readout = Readout(top_k=1, until_mismatch=tuple(draft[:len(feed) - 1]))
            solo.append((readout, runner.forward(kv, [feed[0], *draft[:len(feed) - 1]], readout).logits))
            kv.crop(len(context))
            kvs.append(kv)
        outs = runner.forward_batch(kvs, [[f[0], *r.until_mismatch] for f, (r, _) in zip(feeds, solo)],
                                    [r for r, _ in solo])
        for (readout, alone), out in zip(solo, outs):
            first_miss = next((i for i, (c, t) in enumerate(zip(alone.argmax(-1).tolist(), readout.until_mismatch))
                               if c != t), len(readout.until_mismatch))
            assert out.logits.argmax(-1).tolist()[:first_miss + 1] == alone.argmax(-1).tolist()[:first_miss + 1]
            assert torch.isinf(out.logits[-1]).all() == torch.isinf(alone[-1]).all()  # rows past the miss skipped


def test_adaptive_drafts_cut_rows_and_stay_lossless():
    from specdecode.engine.batch import LinearCost

    costs = LinearCost()
    for rows in range(1, 20):
        costs.add(rows, 0.05 + 0.01 * rows)
    a, b = costs.line()
    assert abs(a - 0.05) < 1e-9 and abs(b - 0.01) < 1e-9
    target = _target("llama", fast=True)
    decoder = SpeculativeDecoder(target, "pld", gamma=8, max_ngram=1)
    prompts = [[5, 6, 7] * 6, [9, 9, 9, 9, 9, 9], [1, 2, 3, 4] * 3, [8, 1] * 5, [3, 1, 4, 1, 5, 9, 2, 6]]
    alone = [decoder.generate(p, max_new_tokens=30).token_ids for p in prompts]
    generations = [decoder.start(p, max_new_tokens=30) for p in prompts]
    stepper = BatchStepper(generations, adaptive_drafts=True)
    costs.add = lambda rows, seconds: None  # keep the line: rows cost 10 ms each on top of 50 ms
    stepper.costs = costs
    stepper.run()
    assert [g.result().token_ids for g in generations] == alone
    full = [decoder.start(p, max_new_tokens=30) for p in prompts]
    BatchStepper(full).run()
    assert sum(g.stats.proposed_tokens for g in generations) < sum(g.stats.proposed_tokens for g in full)


def test_a_batch_attends_as_the_runtime_does_alone():
    """Where the runtime upcasts attention (bf16 models, float32 attention), the batched forward does
    too: two requests' one-token steps in a batch are bit for bit their own steps (before, the batch
    attended in bf16)."""
    model = tiny_model("llama", seed=5).model.to(torch.bfloat16)
    runtime = build_runtime(model, kernels="mkl", attention="float32")
    assert runtime.decoder.attention_dtype == torch.float32
    runner = LoadedModel(model, None, "tiny-bf16", runtime=runtime).runner
    contexts = [[(3 * i + 1) % VOCAB for i in range(40)], [(5 * i + 2) % VOCAB for i in range(25)]]
    outs = []
    with torch.inference_mode():
        for batched in (False, True):
            kvs = [runner.new_cache() for _ in contexts]
            for kv, context in zip(kvs, contexts):
                runner.forward(kv, context, Readout.hidden_only())
            steps = [[7], [9]]
            outs.append(runner.forward_batch(kvs, steps, [Readout()] * 2) if batched
                        else [runner.forward(kv, step) for kv, step in zip(kvs, steps)])
    for alone, together in zip(*outs):
        assert torch.equal(alone.hidden, together.hidden) and torch.equal(alone.logits, together.logits)


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_chunked_prefill_interleaves_with_decoding_and_stays_lossless(arch):
    """With ``prefill_chunk`` a long prompt joins over several steps while the requests already
    decoding keep adding tokens; every request still decodes what it decodes alone (greedy), the
    eagle head included (it reads the prompt's hidden states, gathered over the chunks)."""
    target = _target(arch, fast=True)
    rng = random.Random(4)
    long_prompt = [rng.randrange(VOCAB) for _ in range(29)]
    short = _prompts(11, 3)
    for method, options in _methods(target):
        decoder = SpeculativeDecoder(target, method, **options)
        solo = [decoder.generate(p, max_new_tokens=12) for p in [*short, long_prompt]]
        alone = [r.token_ids for r in solo]
        stepper = BatchStepper(prefill_chunk=4)
        first = [decoder.start(p, max_new_tokens=12) for p in short]
        for generation in first:
            stepper.add(generation)
        stepper.step()
        late = decoder.start(long_prompt, max_new_tokens=12)
        stepper.add(late)
        progress_while_prefilling = 0
        chunks = 0
        while late.kv is None or late in stepper._prefilling:
            added = stepper.step()
            chunks += 1
            if late in stepper._prefilling:
                assert late not in added  # no step of its own before its prompt is in
                progress_while_prefilling += sum(len(tokens) for tokens in added.values())
        assert chunks >= 7 and progress_while_prefilling > 0  # 28 prompt tokens to prefill, at most 4 a step
        stepper.run()
        results = [g.result() for g in [*first, late]]
        assert [r.token_ids for r in results] == alone, (method, options)
        # the same drafts as alone: a drafter reading the prompt's hidden states saw all the chunks
        assert [(r.stats.proposed_tokens, r.stats.accepted_tokens) for r in results] == [
            (r.stats.proposed_tokens, r.stats.accepted_tokens) for r in solo], (method, options)


def test_chunked_prefill_setting_is_checked():
    with pytest.raises(Exception, match="prefill_chunk must be >= 1"):
        BatchStepper(prefill_chunk=0)


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
@pytest.mark.parametrize("method", ["eagle", "ssd", "sps"])
def test_drafters_of_a_batch_draft_together_what_each_drafts_alone(arch, method, monkeypatch):
    """Batch-aware drafting: the requests' drafters share one draft forward a level (the head's, the
    skipping target's, or the draft model's), and each request drafts the tokens it drafts alone
    (float32; its own confidence stop or γ), greedy and seeded sampling alike."""
    from specdecode.engine.loop import Generation
    from specdecode.models.draft_head import DraftHead
    from specdecode.models.runner import TargetRunner

    target = _target(arch, fast=True)
    head = _head(target, vocab_ids=list(range(VOCAB))).freeze()
    options = {"eagle": dict(head=head, gamma=4, min_confidence=0.05),
               "ssd": dict(skip_attention=[1], skip_mlp=[0], max_draft=5, threshold=0.3),
               "sps": dict(draft=_draft(arch), gamma=4)}[method]
    decoder = SpeculativeDecoder(target, method, **options)
    calls = []
    batched_of = (DraftHead, "forward_batch") if method == "eagle" else (TargetRunner, "forward_batch")
    real = getattr(*batched_of)

    def counted(self, *args):  # the real batched forward, counting the requests it serves
        calls.append(len(args[2] if method == "eagle" else args[0]))
        return real(self, *args)

    monkeypatch.setattr(*batched_of, counted)
    prompts = _prompts(11, 4)
    for settings in (dict(), dict(temperature=0.9, top_k=30)):
        runs = []
        for together in (False, True):
            generations = [decoder.start(p, max_new_tokens=n, seed=i, **settings)  # rooms of 2, 3 and more tokens
                           for i, (p, n) in enumerate(zip(prompts, (3, 4, 12, 12)))]
            for generation in generations:
                generation.prefill()
            calls.clear()
            steps = Generation.propose_together(generations) if together else [g.propose() for g in generations]
            runs.append(steps)
            assert max(calls) == (len(prompts) if together else 1), calls
        for alone, together in zip(*runs):
            assert together.draft.tokens == alone.draft.tokens and len(alone.draft.tokens) >= 1
            if settings:
                torch.testing.assert_close(together.draft.probs, alone.draft.probs, rtol=1e-4, atol=1e-6)


def _fixed_costs(a: float, b: float):
    """A row-cost line that stays ``a + b·rows`` whatever the step measures."""
    from specdecode.engine.batch import LinearCost

    costs = LinearCost()
    for rows in range(1, 20):
        costs.add(rows, a + b * rows)
    costs.add = lambda rows, seconds: None
    return costs


@pytest.mark.parametrize("method", ["ssd", "eagle"])
def test_draft_budgets_skip_drafting_that_cannot_pay(method):
    """Batch-aware speculation decides before drafting: where rows cost more than they can return
    no request drafts at all (no draft forward), where they are cheap every request drafts; the
    output stays each request's own."""
    target = _target("llama", fast=True)
    options = dict(skip_attention=[1], skip_mlp=[2], max_draft=4, threshold=0.01) if method == "ssd" else dict(
        head=_head(target, vocab_ids=list(range(VOCAB))).freeze(), gamma=4, min_confidence=0.0)
    decoder = SpeculativeDecoder(target, method, **options)
    prompts = _prompts(3, 3)
    alone = [decoder.generate(p, max_new_tokens=12).token_ids for p in prompts]
    for (a, b), drafts in (((0.01, 1.0), False), ((1.0, 0.001), True)):
        generations = [decoder.start(p, max_new_tokens=12) for p in prompts]
        stepper = BatchStepper(generations, adaptive_drafts=True)
        stepper.costs = _fixed_costs(a, b)
        stepper.run()
        assert [g.result().token_ids for g in generations] == alone
        assert all((g.stats.draft_forwards > 0) == drafts for g in generations), [g.stats.draft_forwards for g in generations]


def test_draft_budgets_count_what_drafting_costs():
    """Rows cheap but every draft level dear (a head step or a self-draft forward on a CPU costs far
    more than the row it feeds): no request drafts; the same rows with drafting cheap: all draft.
    Before, the budget counted rows only and drafted as if a level were free."""
    target = _target("llama", fast=True)
    decoder = SpeculativeDecoder(target, "ssd", skip_attention=[1], skip_mlp=[2], max_draft=4, threshold=0.01)
    prompts = _prompts(3, 3)
    alone = [decoder.generate(p, max_new_tokens=12).token_ids for p in prompts]
    for level_s, drafts in ((2.0, False), (1e-5, True)):
        generations = [decoder.start(p, max_new_tokens=12) for p in prompts]
        stepper = BatchStepper(generations, adaptive_drafts=True)
        stepper.costs = _fixed_costs(1.0, 0.001)  # rows nearly free against the step
        (group,) = stepper._drafting_groups(generations)  # the three draft together
        stepper.draft_costs[group[0]] = _fixed_costs(0.0, level_s)
        stepper.run()
        assert [g.result().token_ids for g in generations] == alone
        assert all((g.stats.draft_forwards > 0) == drafts for g in generations), [g.stats.draft_forwards for g in generations]


def test_keep_chances_learn_that_a_matching_lookup_is_kept_whole():
    """A lookup draft (`pld`) is kept wholesale or rejected at its first token: the chance to keep
    its 8th token is about that of its 1st. One geometric α (kept over drafted: 0.5) put it at
    0.5^8 and cut pld's batched drafts to a third — a batch of `pld` fell below batched `ar`."""
    target = _target("llama", fast=True)
    decoder = SpeculativeDecoder(target, "pld", gamma=8)
    generations = [decoder.start(p, max_new_tokens=40) for p in _prompts(5, 3)]
    stepper = BatchStepper(generations)
    for _ in range(20):  # the drafter's rounds so far: half kept whole, half rejected at once
        stepper.survival.setdefault(_drafter(generations[0]), Survival()).observe(8, 8)  # (no fading)
        stepper.survival[_drafter(generations[0])].observe(8, 0)
    for generation in generations[:2]:
        generation.stats.accepted_lengths.append(8)
        stepper._observe(generation, 8)
    pooled = stepper.keep_chances(generations[2], 8)  # no round of its own: the drafter's
    assert abs(pooled[0] - 23 / 44) < 1e-12  # (22 kept + 1) / (42 tested + 2)
    assert pooled[7] > 0.35  # ~0.52 · (23/24)^7, where one α put it at 0.5^8 = 0.004
    own = stepper.keep_chances(generations[0], 8)  # kept its one draft whole: above the pool
    assert all(o > p for o, p in zip(own, pooled)) and own == sorted(own, reverse=True)
    stepper.remove(generations[0])
    assert stepper.keep_chances(generations[0], 8) == pooled  # its own rounds left with it
    fading = Survival(decay=0.5)  # a drafter's pool: older rounds weigh less
    fading.observe(1, 1)
    fading.observe(1, 0)
    assert fading.tested == [1.5] and fading.kept == [0.5]


def test_linear_cost_predicts_before_its_line_is_known():
    from specdecode.engine.batch import LinearCost

    cost = LinearCost()
    assert cost.predict(3) == 0.0
    for _ in range(3):
        cost.add(2, 0.010)  # one count only: in proportion
    assert abs(cost.predict(4) - 0.020) < 1e-12
    for levels in range(1, 9):
        cost.add(levels, 0.002 + 0.004 * levels)
    a, b = cost.line()
    assert abs(cost.predict(5) - (a + 5 * b)) < 1e-12


def test_a_request_that_never_drafts_takes_no_draft_budget():
    """In a batch mixing `ar` with a drafting method, `ar`'s requests are rows, not drafters: before,
    they drew draft budget (rows and expected tokens that never came) ahead of the drafters."""
    target = _target("llama", fast=True)
    prompts = _prompts(4, 3)
    drafting = SpeculativeDecoder(target, "pld", gamma=8).start(prompts[0], max_new_tokens=20)
    plain = [SpeculativeDecoder(target, "ar").start(p, max_new_tokens=20) for p in prompts[1:]]
    stepper = BatchStepper([drafting, *plain], adaptive_drafts=True)
    stepper.costs = _fixed_costs(0.05, 0.001)  # rows nearly free: every drafter drafts
    budgets = stepper._draft_budgets(stepper._drafting_groups(stepper.active))
    assert budgets[drafting] > 0 and all(budgets[g] == 0 for g in plain), budgets


def test_a_batched_generation_is_freed_as_soon_as_it_is_dropped():
    """Its KV cache goes with the last reference, without Python's cycle collector: a reference
    cycle (a generation and its own unstarted step generator) kept every batched request's cache
    until the collector ran — the server grew from 4.7 to 10 GB in a 10-minute soak."""
    import gc
    import weakref

    target = _target("llama", fast=True)
    decoder = SpeculativeDecoder(target, "pld", gamma=4)
    gc.collect()
    gc.disable()
    try:
        generations = [decoder.start(p, max_new_tokens=6) for p in _prompts(1, 3)]
        stepper = BatchStepper(generations)
        stepper.step()
        stepper.remove(generations[0])  # a client that went away
        stepper.run()
        assert all(len(g.result().token_ids) == 6 for g in generations[1:])
        refs = [weakref.ref(g) for g in generations] + [weakref.ref(g.kv) for g in generations]
        del generations, stepper
        assert [r() is None for r in refs] == [True] * len(refs)
    finally:
        gc.enable()


def test_what_a_batch_learns_is_kept_for_the_next_one():
    """A stepper knows no costs until eight steps of varied rows, so a short batch drafted without
    budgets from start to end (stop 32: `pld` at 16 streams, 0.70× batched `ar` in a benchmark that
    started a stepper a wave). Steppers sharing a BatchMemory — a decoder's generate_batch calls, a
    benchmark's waves, the server's one stepper — start from what the earlier ones measured; the
    budgets stay lossless."""
    from specdecode.engine.batch import BatchMemory

    target = _target("llama", fast=True)
    decoder = SpeculativeDecoder(target, "pld", gamma=8, max_ngram=1)
    prompts = [[5, 6, 7] * 6, [9, 9, 9, 9, 9, 9], [1, 2, 3, 4] * 3, [8, 1] * 5, [3, 1, 4, 1, 5, 9, 2, 6]]
    alone = [decoder.generate(p, max_new_tokens=20).token_ids for p in prompts]
    memory = BatchMemory()
    BatchStepper([decoder.start(p, max_new_tokens=20) for p in prompts], adaptive_drafts=True, memory=memory).run()
    assert memory.costs.line() is not None and memory.rest_s is not None and memory.survival
    generations = [decoder.start(p, max_new_tokens=20) for p in prompts]
    second = BatchStepper(generations, adaptive_drafts=True, memory=memory)
    assert second.costs is memory.costs and second._draft_budgets(second._drafting_groups(second.active)) != {}
    assert BatchStepper().costs.line() is None  # without the memory: nothing known yet
    second.run()
    assert [g.result().token_ids for g in generations] == alone
    results = decoder.generate(prompts, max_new_tokens=20)  # the decoder's own memory, kept across calls
    learnt = len(decoder._batch_memory.costs.samples)
    assert [r.token_ids for r in results] == alone and learnt > 0
    decoder.generate(prompts, max_new_tokens=20)
    assert len(decoder._batch_memory.costs.samples) > learnt
