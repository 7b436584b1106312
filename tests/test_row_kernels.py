"""The row kernels of ``models/row_kernels.py`` against float64, and each row alike at any row count."""

import pytest
import torch

from specdecode.models import row_kernels


@pytest.mark.skipif(not row_kernels.bf16_available(), reason="needs AVX-512 BF16 and a C compiler")
def test_the_avx512_bf16_kernel_sums_each_row_alike_whatever_the_row_count():
    """Each row's product is a float32 sum of exact bf16 products, the same bits whether the row
    comes alone or among 2-40 others (that is what makes a k-token verification's products those
    of k one-token steps); output columns not a multiple of 16 and a bias included; 3,100 outputs
    (194 blocks) are run in tiles that every pass reads, ending in a part tile, at 1 or 2 threads."""
    torch.manual_seed(0)
    for out_features, in_features in ((37, 48), (96, 64), (1000, 130), (3100, 66)):
        weight = (torch.randn(out_features, in_features) * 0.2).bfloat16()
        bias = torch.randn(out_features)
        packed = row_kernels.pack_bf16(weight)
        x = torch.randn(40, in_features).bfloat16()
        exact = x.double() @ weight.double().t() + bias.double()
        for out_dtype in (torch.float32, torch.bfloat16):
            alone = torch.cat([row_kernels.bf16_product(x[i:i + 1], packed, out_features, bias, out_dtype) for i in range(40)])
            for rows in (2, 5, 8, 11, 40):
                together = row_kernels.bf16_product(x[:rows], packed, out_features, bias, out_dtype)
                assert together.dtype == out_dtype and torch.equal(together, alone[:rows])
            # float32: a sum of in_features exact products, each add rounded (γ_d bound, generously)
            tolerance = 2 ** -7 if out_dtype == torch.bfloat16 else in_features * 2 ** -23
            torch.testing.assert_close(alone.double(), exact, rtol=tolerance,
                                       atol=tolerance * float((x.double().abs() @ weight.double().abs().t()).max()))
    assert row_kernels.pack_bf16(torch.randn(16, 7).bfloat16()) is None  # odd inner dimension: not offered
    assert row_kernels.pack_bf16(torch.randn(16, 8)) is None  # float32: not offered


@pytest.mark.skipif(not row_kernels.int8_available(), reason="needs AVX-512 VNNI and a C compiler")
def test_the_int8_kernel_computes_its_rounded_product_and_each_row_alike():
    """The int8 product is ``(xq·t) @ w̃ᵀ`` within float32 rounding of its few group sums (``w̃``
    the int8 copy with its scales, exact in float64), the same bits for a row alone or among
    others; odd group and block remainders included, and a weight run in tiles (3,100 outputs)."""
    torch.manual_seed(1)
    for out_features, in_features in ((37, 48), (1000, 130), (64, 640), (3100, 66)):
        weight = torch.randn(out_features, in_features) * 0.05
        copy = row_kernels.Int8Groups(weight)
        exact_copy = copy.dequantized()
        assert float((exact_copy - weight.double()).abs().max()) <= float(weight.abs().max()) / 254 * 1.0001
        x = torch.randn(20, in_features) * 30
        xq, t = row_kernels.quantize_rows(x)
        rounded = xq.double() * t.double()[:, None]
        # within half a step, plus the float32 division's rounding (32767 · 2⁻²⁴ of a step)
        assert bool(((rounded - x.double()).abs() <= t.double()[:, None] * (0.5 + 32767 * 2.0**-24)).all())
        alone = torch.cat([row_kernels.int8_product(xq[i:i + 1], t[i:i + 1], copy) for i in range(20)])
        for rows in (2, 5, 8, 9, 20):
            assert torch.equal(row_kernels.int8_product(xq[:rows], t[:rows], copy), alone[:rows])
        magnitude = rounded.abs() @ exact_copy.abs().t()
        error = (alone.double() - rounded @ exact_copy.t()).abs()
        assert bool((error <= (in_features // 32 + 4) * 2.0**-24 * magnitude + 1e-30).all())


@pytest.mark.skipif(not row_kernels.int8_available(), reason="needs AVX-512 VNNI and a C compiler")
def test_the_q8_kernel_computes_its_rounded_product_and_each_row_alike():
    """The q8 product (rows too as int8 with a scale per 32 inputs, fed offset by 128) is ``x̃ @ w̃ᵀ``
    within float32 rounding of its group sums, the same bits for a row alone or among others; input
    widths that are no multiple of 32 (zero-padded), odd block remainders and a tiled weight; the
    rows' rounding within half a step of each group's scale, an outlier group included."""
    torch.manual_seed(3)
    for out_features, in_features in ((37, 48), (1000, 130), (64, 640), (3100, 66)):
        weight = torch.randn(out_features, in_features) * 0.05
        copy = row_kernels.Int8Groups(weight, "quads")
        assert torch.equal(copy.dequantized(), row_kernels.Int8Groups(weight).dequantized())  # the int8 screen's copy
        exact_copy = copy.dequantized()
        x = torch.randn(20, in_features) * 3
        x[:, 5] = 400.0  # an outlier: only its own group's scale grows
        xu, xs, rounded = row_kernels.quantize_groups(x)
        steps = xs.double().repeat_interleave(32, dim=1)[:, :in_features]
        assert bool(((rounded - x.double()).abs() <= steps * (0.5 + 127 * 2.0**-24)).all())
        assert float((rounded[:, 32:] - x[:, 32:].double()).abs().max()) < 0.1  # the other groups stay fine
        alone = torch.cat([row_kernels.q8_product(xu[i:i + 1], xs[i:i + 1], copy) for i in range(20)])
        for rows in (2, 5, 8, 9, 20):
            assert torch.equal(row_kernels.q8_product(xu[:rows], xs[:rows], copy), alone[:rows])
        magnitude = rounded.abs() @ exact_copy.abs().t()
        error = (alone.double() - rounded @ exact_copy.t()).abs()
        assert bool((error <= (in_features // 32 + 4) * 2.0**-24 * magnitude + 1e-30).all())


def test_a_tuned_plan_is_keyed_by_the_row_kernels_version(monkeypatch):
    """A plan timed the kernels as they were: a changed kernel (here, tiled passes) is timed again."""
    from specdecode.models.kernels import plan_key

    before = plan_key([(8, 8)])
    monkeypatch.setattr(row_kernels, "source_digest", lambda: "another")
    assert plan_key([(8, 8)]) != before


@pytest.mark.skipif(not row_kernels.chain_attention_available(), reason="needs a C compiler with OpenMP")
@pytest.mark.parametrize("head_dim", [256, 24])  # the embedded model's, and one that is not a multiple of 16
def test_chain_attention_is_each_requests_causal_attention_and_each_row_alike(head_dim):
    """One call attends every request's chain rows over its own cache as torch's attention does with
    the causal (and sliding-window) chain mask, within float32 rounding, grouped query heads
    included; a row's output is the same bits alone, among its request's other rows, or beside
    other requests (what keeps a k-row verification equal to k one-row steps, and a batched
    request equal to itself alone)."""
    from specdecode.models.native import _chain_mask, _window_start

    torch.manual_seed(2)
    heads, kv_heads, rows = 4, 2, [1, 3, 5, 1]
    pasts = [0, 9, 20, 300]
    buffers = [(torch.randn(1, kv_heads, p + n + 7, head_dim), torch.randn(1, kv_heads, p + n + 7, head_dim))
               for p, n in zip(pasts, rows)]  # caches with spare capacity, as GrowingLayer keeps them
    keys = [k[:, :, :p + n] for (k, _), p, n in zip(buffers, pasts, rows)]
    values = [v[:, :, :p + n] for (_, v), p, n in zip(buffers, pasts, rows)]
    q = torch.randn(1, sum(rows), heads + kv_heads, head_dim).transpose(1, 2)[:, :heads]  # a view, as split_heads gives
    scale = head_dim ** -0.5
    for window in (None, 6):
        together = row_kernels.chain_attention(q, keys, values, rows, window, scale)
        at = 0
        for r, (p, n) in enumerate(zip(pasts, rows)):
            start = _window_start(p, window)
            expected = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, at:at + n], keys[r][:, :, start:], values[r][:, :, start:], attn_mask=_chain_mask(p, n, window, q.device),
                scale=scale, enable_gqa=True).transpose(1, 2).reshape(1, n, -1)
            torch.testing.assert_close(together[:, at:at + n], expected, rtol=1e-5, atol=1e-6)
            alone = row_kernels.chain_attention(q[:, :, at:at + n], [keys[r]], [values[r]], [n], window, scale)
            assert torch.equal(alone, together[:, at:at + n])
            for i in range(n):  # row i as a one-row step: the cache holds the keys up to its position
                step = row_kernels.chain_attention(q[:, :, at + i:at + i + 1], [keys[r][:, :, :p + i + 1]],
                                                   [values[r][:, :, :p + i + 1]], [1], window, scale)
                assert torch.equal(step, together[:, at + i:at + i + 1])
            at += n
