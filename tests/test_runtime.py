"""The fast CPU runtime keeps float32 exactness: same tokens, same top-k values, same fingerprint."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from specdecode import SpeculativeDecoder
from specdecode.errors import InvalidSettingError
from specdecode.models.int8 import pack_int8
from specdecode.models.loading import LoadedModel, load_model
from specdecode.models.runner import TargetRunner
from specdecode.models.heads import ScreenedHead, offered_screens
from specdecode.models.kernels import KERNELS, ROW_BUCKETS, Fp16WeightLinear, Int8WeightLinear, KernelPlan, TunedLinear, tune_kernels
from specdecode.models.runtime import build_runtime
from specdecode.sampling import SamplingSettings, process_logits
from tiny_models import ARCHITECTURES, VOCAB, tiny_config

pytestmark = pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines, reason="the CPU runtime needs fbgemm"
)


def _tiny_fp32(arch: str, seed: int = 0, vocab: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab), dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return model.eval()


def _pair(arch: str, seed: int = 0, vocab: int = VOCAB, kernels: str = "auto") -> tuple[LoadedModel, LoadedModel]:
    """The same float32 weights twice: plain, and with the runtime installed."""
    plain = _tiny_fp32(arch, seed, vocab)
    fast = _tiny_fp32(arch, seed, vocab)
    runtime = build_runtime(fast.eval(), kernels=kernels)
    assert runtime is not None
    return LoadedModel(plain, None, f"plain-{arch}"), LoadedModel(fast, None, f"fast-{arch}", runtime=runtime)


def _exact_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (hidden.double() @ weight.double().t()).float()


def test_kth_floor_never_exceeds_the_kth_highest_value():
    """The screen's candidate floor may sit below each row's k-th highest value (more rows rescored)
    but never above it (a true top-k row missed): top values crowded into one block, a tail block,
    fewer blocks than k; and it is the k-th value itself when the top k lie in different blocks."""
    from specdecode.models.heads import KTH_BLOCK, _kth_floor

    generator = torch.Generator().manual_seed(0)
    for vocab in (KTH_BLOCK * 40, KTH_BLOCK * 40 + 17, KTH_BLOCK * 2 + 5):
        values = torch.randn(5, vocab, generator=generator)
        values[0, 10:30] += 50             # row 0: its top 20 all in the first block
        values[1, -3:] += 50               # row 1: its top 3 in the tail block
        for k in (1, 3, 10, 20):
            floor = _kth_floor(values, k)
            kth = torch.topk(values, k, dim=1).values[:, -1:]
            assert bool((floor <= kth).all()), (vocab, k)
    spread = torch.full((2, KTH_BLOCK * 16), -1.0)
    spread[:, torch.arange(10) * KTH_BLOCK + 3] = torch.arange(10, dtype=torch.float32)
    assert torch.equal(_kth_floor(spread, 10), torch.zeros(2, 1))


@pytest.mark.parametrize("screen", offered_screens())
def test_screened_head_finds_the_exact_top_k_among_near_ties(screen):
    torch.manual_seed(0)
    weight = torch.randn(20_000, 64) * 0.05
    # rows that differ from row 0 by less than float16 can tell apart: near-ties by construction
    weight[1:200] = weight[0] + torch.randn(199, 64) * 1e-6
    head = ScreenedHead(weight, None, softcap=None, screens=screen)
    hidden = torch.randn(6, 64) * 30
    hidden[0] = weight[0] * 400  # row 0 and its near-copies lead
    exact = _exact_logits(hidden, weight)
    for k in (1, 5, 10, 50):
        out = head.top(hidden, k)
        top_exact = torch.topk(exact, k, dim=1)
        top_out = torch.topk(out, k, dim=1)
        assert torch.equal(top_out.indices.sort(1).values, top_exact.indices.sort(1).values), k
        assert torch.equal(out.gather(1, top_exact.indices), top_exact.values)
    assert torch.equal(head.top(hidden, 1).argmax(1), exact.argmax(1))


@pytest.mark.parametrize("screen", offered_screens())
def test_screened_head_keeps_its_screen_buffer_and_each_call_is_exact(screen):
    """The screen writes into a buffer the head keeps between calls (a fresh >32 MB one page-faults
    each call); a call of fewer rows after one of more, or of more rows after fewer (the buffer
    grows), still gives every row's exact argmax, and ``top_columns`` names ascending columns whose
    logits are the exact ones."""
    torch.manual_seed(5)
    weight = torch.randn(3_000, 64) * 0.1
    head = ScreenedHead(weight, None, softcap=None, screens=screen)
    for rows in (9, 3, 9, 17, 2):
        hidden = torch.randn(rows, 64) * 20
        exact = _exact_logits(hidden, weight)
        assert torch.equal(head.top(hidden, 1).argmax(1), exact.argmax(1)), rows
        columns, logits = head.top_columns(hidden, 1)
        assert torch.all(columns[1:] > columns[:-1]) and torch.equal(logits, exact[:, columns])
        assert torch.equal(columns[logits.argmax(1)], exact.argmax(1))
    kept = head._screened_rows(4)
    assert kept is not None and kept.data_ptr() == head._screened_rows(17).data_ptr()  # reused, not reallocated
    columns, logits = head.top_columns(torch.randn(0, 64), 1)  # no rows: no columns (a reduction over none)
    assert columns.numel() == 0 and logits.shape == (0, 0) and head.top(torch.randn(0, 64), 1).shape == (0, 3_000)


def test_screened_head_stops_after_the_block_of_the_first_mismatch():
    torch.manual_seed(1)
    weight = torch.randn(5_000, 32)
    head = ScreenedHead(weight, None, softcap=None)
    hidden = torch.randn(11, 32) * 5
    full = head.top(hidden, 1).max(dim=1)  # what greedy matching reads: each row's top value and index

    def same_top(out, rows):
        top = out[rows].max(dim=1)
        return torch.equal(top.values, full.values[rows]) and torch.equal(top.indices, full.indices[rows])

    choices = full.indices.tolist()
    assert same_top(head.top(hidden, 1, until_mismatch=choices[:10]), slice(None))  # all accepted: every row
    for wrong in (0, 3, 4, 6, 9):
        draft = list(choices[:10])
        draft[wrong] = (draft[wrong] + 1) % 5_000
        out = head.top(hidden, 1, until_mismatch=draft)
        computed = (wrong // 4 + 1) * 4
        assert same_top(out, slice(computed)), wrong
        assert torch.isneginf(out[computed:]).all(), wrong


def test_greedy_verification_skips_the_head_after_a_rejection_and_stays_exact():
    """Long prompt-lookup drafts on a repetitive prompt: some verifications stop the head early,
    and the tokens still equal plain `ar`'s."""
    plain, fast = _pair("llama", seed=5, vocab=3001)
    head = fast.runtime.head
    screened_rows = []
    screen = head._top
    head._top = lambda hidden, k, **options: (screened_rows.append(hidden.shape[0]), screen(hidden, k, **options))[1]
    prompt = [11, 12, 13, 14, 15, 16, 17, 18] * 3 + [11, 12, 13, 99, 15, 16]
    expected = SpeculativeDecoder(plain, "ar").generate(prompt, max_new_tokens=40).token_ids
    result = SpeculativeDecoder(fast, "pld", gamma=10).generate(prompt, max_new_tokens=40)
    assert result.token_ids == expected
    assert sum(screened_rows) < result.stats.proposed_tokens + result.stats.target_forwards, screened_rows


@pytest.mark.parametrize("screen", offered_screens())
def test_screened_head_with_bias_and_large_logits_is_exact(screen):
    """The bf16 screen rounds each screened value (relative 2⁻⁸): large logits, a bias and rows
    a few roundings apart must still leave the exact top k among the rescored rows."""
    torch.manual_seed(4)
    weight = torch.randn(8_000, 40) * 0.2
    weight[1:100] = weight[0] * (1 + torch.randn(99, 1) * 3e-3)  # logits within bf16's rounding of row 0's
    bias = torch.randn(8_000) * 2
    head = ScreenedHead(weight, bias, softcap=None, screens=screen)
    hidden = torch.randn(20, 40) * 50
    hidden[:10] = weight[0] * 600
    exact = ((hidden.double() @ weight.double().t()) + bias.double()).float()
    for k in (1, 10):
        out = head.top(hidden, k)
        top = torch.topk(exact, k, dim=1)
        assert torch.equal(out.gather(1, top.indices), top.values), k
        assert torch.equal(torch.topk(out, k, dim=1).indices.sort(1).values, top.indices.sort(1).values), k


@pytest.mark.parametrize("screen", offered_screens())
def test_screen_error_stays_inside_its_bound_on_adversarial_inputs(screen):
    """Inputs whose rounding errors all push the same way while the rounded product cancels to ~0:
    the bound's input term (not the output rounding, which is ~0 here) must cover the error."""
    torch.manual_seed(6)
    dim = 64
    weight = torch.randn(3_000, dim).to(torch.bfloat16).float()  # exact in bf16 (and float16: small values)
    weight[0] = torch.tensor([1.0, -1.0] * (dim // 2)) * 0.5
    base = torch.tensor([1.0, 1.0] * (dim // 2))  # base · w_0 = 0 exactly
    ulp = 2.0**-7  # bf16 spacing in [1, 2)
    hidden = (base + 0.49 * ulp * torch.sign(weight[0]))[None]  # rounds back to base in bf16
    head = ScreenedHead(weight, None, softcap=None, screens=screen)
    values, bound = head.screens[screen](hidden)
    exact = (hidden.double() @ weight.double().t()).float()
    rho = head.screens[screen].output_rounding
    assert bool(((values - exact).abs() <= bound + rho * values.abs() + 1e-6).all())


@pytest.mark.skipif("int8" not in offered_screens(), reason="needs AVX-512 VNNI and a C compiler")
def test_int8_screen_bound_covers_its_input_rounding():
    """The int8 screen reads the input as int16 with a scale: inputs whose roundings all push one
    way while the rounded product is exactly 0, on weights the int8 copy holds exactly (so only
    the input term of the bound can cover the error, and it must)."""
    torch.manual_seed(7)
    dim, step = 64, 2.0**-8
    q = torch.randint(-127, 128, (500, dim)).float()
    q[:, ::32] = 127  # every group of 32 has a 127: its scale is exactly `step`
    q[0] = torch.tensor([0.0] + [127.0, -127.0] * ((dim - 2) // 2) + [0.0])  # sums to 0 against a constant
    weight = q * step
    t = 2.0**-10
    hidden = torch.full((1, dim), 1000.0)
    hidden[0, 0] = 32767.0  # the row's maximum, on the int16 grid: the scale is exactly t
    hidden[0, 1:] += 0.49 * torch.sign(weight[0, 1:])
    hidden = hidden * t
    head = ScreenedHead(weight, None, softcap=None, screens="int8")
    values, bound = head.screens["int8"](hidden)
    exact = (hidden.double() @ weight.double().t()).float()
    assert values[0, 0] == 0 and exact[0, 0] > 1e-3  # the rounded input cancels, the true one does not
    assert bool(((values - exact).abs() <= bound + 1e-6).all())


def test_selection_survives_a_screen_that_errs_by_its_whole_bound():
    """A screen that lowers every true top-k value and raises every other one by the full bound
    ``A + ρ|s|`` (the worst the bound allows): the rescored rows must still hold the exact top k."""
    torch.manual_seed(7)
    weight = torch.randn(6_000, 32) * 0.3
    head = ScreenedHead(weight, None, softcap=None, screens=offered_screens()[0])

    class Adversary:
        output_rounding = 2.0**-8 / (1 - 2.0**-8)

        def __call__(self, hidden, out=None):  # the screen protocol: out may be ignored
            exact = (hidden.double() @ weight.double().t()).float()
            bound = torch.full((hidden.shape[0], 1), 0.05)
            rho, inner = self.output_rounding, 0.999  # just inside the bound
            top = torch.zeros_like(exact, dtype=torch.bool).scatter_(1, torch.topk(exact, 10, dim=1).indices, True)
            down = exact - inner * bound
            down = torch.where(down >= 0, down / (1 + inner * rho), down / (1 - inner * rho))
            up = exact + inner * bound
            up = torch.where(up >= 0, up / (1 - inner * rho), up / (1 + inner * rho))
            return torch.where(top, down, up), bound

    head.screens = {name: Adversary() for name in head.plan.kernels}
    hidden = torch.randn(5, 32) * 40
    exact = (hidden.double() @ weight.double().t()).float()
    for k in (1, 10):
        top = torch.topk(exact, k, dim=1)
        assert torch.equal(head.top(hidden, k).gather(1, top.indices), top.values), k


def test_screen_plan_covers_every_row_count_and_says_which():
    torch.manual_seed(5)
    weight = torch.randn(4_000, 32)
    head = ScreenedHead(weight, None, softcap=None)
    assert set(head.plan.kernels) <= set(offered_screens()) and len(head.plan.kernels) == len(ROW_BUCKETS)
    assert set(head.screens) == set(head.plan.kernels)  # an unused copy of the head is not kept
    hidden = torch.randn(ROW_BUCKETS[-1] + 3, 32)  # more rows than the largest bucket
    exact = (hidden.double() @ weight.double().t()).float()
    assert torch.equal(head.top(hidden, 1).argmax(1), exact.argmax(1))
    assert "screened exact float32 head, screen by rows 1:" in head.describe()
    with pytest.raises(InvalidSettingError, match="head screen 'int4'"):
        ScreenedHead(weight, None, softcap=None, screens="int4")


def test_screened_head_softcap_keeps_order_and_values():
    torch.manual_seed(1)
    weight = torch.randn(5_000, 32) * 0.1
    head = ScreenedHead(weight, None, softcap=5.0)
    hidden = torch.randn(3, 32) * 10
    capped = torch.tanh(_exact_logits(hidden, weight) / 5.0) * 5.0
    out = head.top(hidden, 3)
    top = torch.topk(capped, 3, dim=1)
    assert torch.allclose(out.gather(1, top.indices), top.values, atol=1e-6)


@pytest.mark.parametrize("screen", offered_screens())
@pytest.mark.parametrize("top_k", [1, 10])
def test_processed_distribution_is_unchanged(top_k, screen):
    torch.manual_seed(2)
    weight = torch.randn(30_000, 48) * 0.05
    head = ScreenedHead(weight, None, softcap=None, screens=screen)
    hidden = torch.randn(4, 48) * 20
    settings = SamplingSettings(temperature=0.7, top_k=top_k, top_p=0.9)
    assert settings.exact_top == top_k
    full = process_logits(_exact_logits(hidden, weight), settings)
    screened = process_logits(head.top(hidden, settings.exact_top), settings)
    assert torch.allclose(full, screened, atol=1e-6)


def test_exact_top_says_what_processing_reads():
    assert SamplingSettings().exact_top == 1
    assert SamplingSettings(temperature=1.0, top_k=10).exact_top == 10
    assert SamplingSettings(temperature=1.0, top_p=0.9).exact_top is None


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_product_kernel_returns_rows_in_row_major_order(kernel):
    """A plan may pick a different kernel for k rows than for 1, and what follows a product rounds
    by memory layout (RMSNorm sums a strided row in another order): so every kernel's output must
    be laid out alike. W @ xᵀ returned a column-major view until the native decoder normed q and k
    as one view of the joined projection, and a tiny model's mixed plan changed the floats."""
    model = build_runtime(_tiny_fp32("llama"), kernels=kernel).model
    linear = next(m for m in model.modules() if isinstance(m, TunedLinear))
    for rows in (1, 3, 9):
        x = torch.randn(1, rows, linear.in_features)
        assert linear(x).is_contiguous(), (kernel, rows)


@pytest.mark.parametrize("kernels", ["auto", *KERNELS])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_methods_with_the_runtime_equal_plain_ar(arch, kernels):
    plain, fast = _pair(arch, seed=3, vocab=3001, kernels=kernels)
    assert fast.runtime.head is not None
    # GPT-2 projects with Conv1D modules, which keep their kernel; the others' linears get tuned ones
    assert any(isinstance(m, TunedLinear) for m in fast.runtime.model.modules()) == (arch != "gpt2")
    assert not any(isinstance(m, TunedLinear) for m in fast.model.modules())  # the loaded model is left alone
    rng = random.Random(arch)
    ar = SpeculativeDecoder(plain, "ar")
    for _ in range(3):
        prompt = [rng.randrange(3001) for _ in range(rng.randint(2, 12))]
        max_new = rng.choice([5, 30])
        expected = ar.generate(prompt, max_new_tokens=max_new).token_ids
        for decoder in (SpeculativeDecoder(fast, "ar"), SpeculativeDecoder(fast, "pld", gamma=rng.randint(2, 8)),
                        SpeculativeDecoder(fast, "sps", draft=plain, gamma=3),
                        SpeculativeDecoder(fast, "ssd", skip_mlp=[1])):
            assert decoder.generate(prompt, max_new_tokens=max_new).token_ids == expected, decoder.method


def test_top_k_sampling_with_the_runtime_reproduces_plain_sampling():
    plain, fast = _pair("llama", seed=4, vocab=2003)
    settings = dict(max_new_tokens=25, temperature=1.0, top_k=10, top_p=0.9, seed=11)
    for method in ("ar", "pld"):
        expected = SpeculativeDecoder(plain, method).generate([5, 6, 7, 5, 6], **settings).token_ids
        assert SpeculativeDecoder(fast, method).generate([5, 6, 7, 5, 6], **settings).token_ids == expected


def test_every_kernel_computes_the_float32_product():
    torch.manual_seed(0)
    reference = torch.nn.Linear(48, 40)
    linear = TunedLinear(reference.weight, reference.bias, KernelPlan(("mkl",) * 5),
                         {"onednn": torch.ops.mkldnn._reorder_linear_weight(reference.weight.detach(), 8)})
    model = torch.nn.Sequential(linear)
    with torch.inference_mode():
        for kernel in KERNELS:
            linear.plan = KernelPlan(tuple(kernel for _ in range(5)))
            for rows in (1, 3, 8, 16, 40):
                x = torch.randn(1, rows, 48)
                torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    plan = tune_kernels([linear])
    assert set(plan.kernels) <= set(KERNELS) and len(plan.measured_ms) == len(ROW_BUCKETS)


def test_kernel_plan_is_cached_per_machine_and_shape(tmp_path):
    cache = tmp_path / "plans.json"
    prepared = _prepared(cache)
    stored = json.loads(cache.read_text())
    products = {key: plan for key, plan in stored.items() if "|head-screen|" not in key}
    assert list(products.values()) == [list(prepared.kernels.kernels)]
    if len(offered_screens()) > 1:  # the head's screen plan is cached beside it
        assert [plan for key, plan in stored.items() if "|head-screen|" in key] == [list(prepared.head.plan.kernels)]
    earlier = ["wxt", "mkl"] * (len(ROW_BUCKETS) // 2) + ["wxt"] * (len(ROW_BUCKETS) % 2)  # a plan from an earlier run
    cache.write_text(json.dumps({**stored, next(iter(products)): earlier}))
    assert _prepared(cache).kernels.kernels == tuple(earlier)
    cache.write_text(json.dumps({**stored, next(iter(products)): ["wxt", "mkl"]}))  # bucket count changed: re-tune
    assert len(_prepared(cache).kernels.kernels) == len(ROW_BUCKETS)
    with pytest.raises(InvalidSettingError, match="unknown kernel"):
        build_runtime(_tiny_fp32("llama"), kernels="blas")
    with pytest.raises(InvalidSettingError, match="unknown attention kernel"):
        build_runtime(_tiny_fp32("llama"), attention_kernel="flash")


def _prepared(cache):
    return build_runtime(_tiny_fp32("qwen2", seed=1), plan_cache=cache)


def test_runtime_leaves_parameters_and_state_dict_alone():
    plain, fast = _pair("gemma3")
    assert plain.fingerprint == fast.fingerprint
    assert plain.model.state_dict().keys() == fast.model.state_dict().keys()


@pytest.mark.parametrize("quantize, cls, tolerance", [("fp16", Fp16WeightLinear, 1e-2), ("int8", Int8WeightLinear, 0.25)])
def test_quantized_weights_are_close_but_a_different_target(quantize, cls, tolerance):
    plain = _tiny_fp32("qwen2", seed=5)
    model = _tiny_fp32("qwen2", seed=5)
    quant = build_runtime(model, quantize=quantize).model
    assert any(isinstance(m, cls) for m in quant.modules())
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        a, b = plain(ids).logits, quant(ids).logits
        assert torch.equal(model(ids).logits, a)  # the loaded model keeps its float32 products
    assert 0 < (a - b).abs().max() < tolerance * a.abs().max()
    assert plain.state_dict().keys() == model.state_dict().keys()


def test_int8_target_quantises_each_row_on_its_own():
    """The int8 target's inputs are quantised on a calibrated static grid: a row's product does not
    depend on the other rows of the call (a k-token verification computes what 1-token steps do),
    unlike per-call dynamic quantisation."""
    quant = build_runtime(_tiny_fp32("llama", seed=6), quantize="int8").model
    linears = [m for m in quant.modules() if isinstance(m, Int8WeightLinear)]
    assert linears and all(m.static is not None for m in linears)  # the calibration reached every layer
    linear = linears[0]
    rows = torch.randn(9, linear.in_features) * 3
    rows[0, 0] = 40.0  # an outlier in one row must not change the others' quantisation
    with torch.inference_mode():
        together = linear(rows)
        apart = torch.cat([linear(rows[i:i + 1]) for i in range(9)])
        assert torch.equal(together, apart)
        linear.static = None
        linear.packed = pack_int8(linear.weight, linear.bias)
        dynamic_together, dynamic_apart = linear(rows), torch.cat([linear(rows[i:i + 1]) for i in range(9)])
    assert not torch.equal(dynamic_together, dynamic_apart)  # what the static grid is for


def test_runtime_refuses_what_it_cannot_do():
    with pytest.raises(InvalidSettingError, match="unknown quantize"):
        build_runtime(_tiny_fp32("llama"), quantize="int3")
    with pytest.raises(InvalidSettingError, match="float32 model"):
        build_runtime(_tiny_fp32("llama").double(), quantize="fp16")
    float64 = build_runtime(_tiny_fp32("llama").double())  # no kernels, only the native decoder
    assert float64.head is None and float64.kernels is None and float64.decoder is not None
    assert build_runtime(_tiny_fp32("gpt2").double()) is None


def test_fingerprint_follows_the_weights_not_the_dtype(tmp_path):
    model = _tiny_fp32("llama", seed=6)
    model.save_pretrained(tmp_path)
    fp32 = load_model(str(tmp_path))
    bf16 = load_model(str(tmp_path), dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert fp32.fingerprint == bf16.fingerprint
    assert load_model(str(tmp_path), dtype="auto").fingerprint == fp32.fingerprint


def test_the_eager_runner_runs_the_model_as_loaded_beside_the_fast_one():
    plain = _tiny_fp32("llama", seed=7, vocab=1009)
    model = _tiny_fp32("llama", seed=7, vocab=1009)
    quant = LoadedModel(model, None, "fp16", quantize="fp16", runtime=build_runtime(model, quantize="fp16"))
    ids = [3, 1, 4, 1, 5]
    with torch.inference_mode():
        expected = plain(torch.tensor([ids])).logits[0]
        for _ in range(2):  # either mode, in any order: neither changes the other
            eager = quant.eager()
            assert eager.runtime is None and eager.quantize is None and eager.model is model
            assert torch.equal(eager.runner.forward(eager.runner.new_cache(), ids).logits, expected)
            assert not torch.equal(quant.runner.forward(quant.runner.new_cache(), ids).logits, expected)
            assert torch.equal(TargetRunner(model).forward(quant.runner.new_cache(), ids).logits, expected)


def test_speculation_adds_no_divergence_beyond_reduced_precision_ar():
    """float16 weights part greedy outputs from float32 ar at near-ties; speculative methods on the
    same float16 target may part too, but not measurably more often than float16 ar itself
    (one-sided: pld's divergent prompts ≤ ar's + 3 standard deviations of a binomial count)."""
    fp32 = LoadedModel(_tiny_fp32("llama", seed=8, vocab=509), None, "fp32")
    quant_model = _tiny_fp32("llama", seed=8, vocab=509)
    quant = LoadedModel(quant_model, None, "fp16", runtime=build_runtime(quant_model, quantize="fp16"))
    rng = random.Random(0)
    prompts = [[rng.randrange(509) for _ in range(rng.randint(3, 10))] for _ in range(40)]
    reference = SpeculativeDecoder(fp32, "ar")
    contenders = {"ar": SpeculativeDecoder(quant, "ar"), "pld": SpeculativeDecoder(quant, "pld", gamma=6),
                  "sps": SpeculativeDecoder(quant, "sps", draft=fp32, gamma=4)}
    diverged = {name: 0 for name in contenders}
    for prompt in prompts:
        expected = reference.generate(prompt, max_new_tokens=40).token_ids
        for name, decoder in contenders.items():
            diverged[name] += decoder.generate(prompt, max_new_tokens=40).token_ids != expected
    n, base = len(prompts), diverged["ar"]
    slack = 3 * max(1.0, (base * (1 - base / n)) ** 0.5)
    for name in ("pld", "sps"):
        assert diverged[name] <= base + slack, diverged


def test_a_head_with_an_odd_inner_dimension_is_screened_without_the_paired_kernels():
    """Our row kernels read inputs in pairs: a head of odd width gets the stock screens only, and
    stays exact."""
    assert not {"int8", "dpbf16"} & set(offered_screens(63))
    torch.manual_seed(8)
    weight = torch.randn(700, 63)
    head = ScreenedHead(weight, None, softcap=None)
    hidden = torch.randn(3, 63) * 10
    assert torch.equal(head.top(hidden, 1).argmax(1), _exact_logits(hidden, weight).argmax(1))
