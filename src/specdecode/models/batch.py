"""Several requests' chains in one forward (issue 28): the decoder-level parts of
:meth:`TargetRunner.forward_batch`.

On a CPU a decode step is bound by reading the weights; a forward over a few more rows costs far
less than a second forward. :func:`batched_hidden` packs the rows of every request side by side —
ragged, no padding: ``[1, N_total, H]`` — and runs each layer's norms and products (q/k/v, o_proj,
gate/up, down) once on all of them, so each weight is read once per step; the q/k norms and
rotary are per row too (each row at its own position). What depends on the request runs on its
own slice: its cache update, and its causal (and sliding-window) attention over its own cache —
where attention runs in float32, every request's in one call of our kernel
(``row_kernels.chain_attention``: torch's costs ~40-100 µs a call, once a request and a layer). The same
function runs a draft head's layer over several requests (``DraftHead.forward_batch``) and a
self-draft's skipping stack. :func:`greedy_chains` runs the LM head once on the kept rows of every
greedy chain, block by block, so that as alone a chain's rows after its first mismatch skip the
head.

Per row the arithmetic is that of the request's own forward (same norms, same rotary, same
attention over the same keys); only the products see more rows. In float64 each row of a product
is the same dot product; in float32 the fast runtime picks its kernel by row count (as a k-row
verification already does against k one-row steps), so a row may round differently in its last
bit — the tests check greedy output token for token against each request alone, on the tiny
models and on the embedded one.
"""

from __future__ import annotations

from collections.abc import Sequence
import torch

from specdecode.models.layer_skip import SkipSet
from specdecode.models.native import NativeDecoder, _chain_mask, _rotary_factors, _window_start, window_of
from specdecode.models.heads import HEAD_BLOCK_ROWS, ScreenedHead


def greedy_chains(head: ScreenedHead, rows: list[torch.Tensor], drafts: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """:meth:`ScreenedHead.top` ``(k=1, until_mismatch)`` of several chains with one head call per
    block of :data:`HEAD_BLOCK_ROWS` rows of every chain still matching: as alone, the rows after a
    chain's first mismatching block stay ``-inf`` and cost nothing (on the 262k-row head a row
    costs about what all layers do). Each call's exact logits go straight into each chain's rows."""
    outs = [h.new_full((h.shape[0], head.weight.shape[0]), float("-inf"), dtype=torch.float32) for h in rows]
    live, start = list(range(len(rows))), 0
    while live:
        live = [i for i in live if start < rows[i].shape[0]]
        if not live:
            break
        columns, logits = head.top_columns(torch.cat([rows[i][start:start + HEAD_BLOCK_ROWS] for i in live]), 1)
        at, matching = 0, []
        for i in live:
            part = logits[at:at + min(HEAD_BLOCK_ROWS, rows[i].shape[0] - start)]
            at += part.shape[0]
            outs[i][start:start + part.shape[0]].index_copy_(1, columns, part)
            # ascending columns: the first maximum among them is the row's first maximum, as argmax reads it
            if all(c == t for c, t in zip(columns[part.argmax(dim=1)].tolist(), drafts[i][start:])):
                matching.append(i)
        live, start = matching, start + HEAD_BLOCK_ROWS
    return outs


def batched_hidden(decoder: NativeDecoder, caches: Sequence, lengths: Sequence[int], inputs: torch.Tensor,
                   skip: SkipSet | None = None) -> torch.Tensor:
    """Final hidden states ``[N_total, H]`` of several requests' chains — ``inputs [1, N_total, H]``,
    request ``r``'s ``lengths[r]`` rows in order, each after its own cache, which it extends —
    :class:`NativeDecoder`'s forward with the products on all rows at once. The inputs are token
    embeddings for a model's own forward, ``fc([h; e(x)])`` for a draft head's; ``skip``: a
    self-draft's skipped sub-layers (a skipped attention appends zero placeholders, as alone)."""
    device = inputs.device
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    hidden = inputs
    pasts = [cache.get_seq_length() for cache in caches]
    positions = torch.cat([torch.arange(p, p + n, device=device) for p, n in zip(pasts, lengths)])[None]
    config, types = decoder.config, decoder.types
    kernel = decoder.chain_kernel_runs(hidden)  # else torch's attention, a request at a time
    rotary, masks, starts = {}, {}, {}
    for layer_type in set(types):
        # rotary is elementwise in the positions: all rows at once give each request's own factors
        if decoder.gemma_rotary:
            rotary[layer_type] = _rotary_factors(*decoder.rotary_emb(hidden, positions, layer_type))
        else:
            rotary[layer_type] = _rotary_factors(*decoder.rotary_emb(hidden, positions))
        if not kernel:
            window = window_of(config, layer_type)
            masks[layer_type] = [_chain_mask(p, n, window, device) for p, n in zip(pasts, lengths)]
            starts[layer_type] = [_window_start(p, window) for p in pasts]
    requests = list(zip(range(len(caches)), caches, bounds, bounds[1:]))
    skipped_attention, skipped_mlp = (skip.attention, skip.mlp) if skip is not None else ((), ())
    for index, layer in enumerate(decoder.layers):
        layer_type = types[index]
        if index in skipped_attention:
            for _, cache, a, b in requests:
                decoder.store_placeholder(cache, index, layer, b - a, hidden)
            if index not in skipped_mlp:
                hidden = layer.feed_forward(hidden)
            continue
        cos, signed_sin = rotary[layer_type]
        qkv = layer.qkv(layer.input_norm(hidden))  # every request's rows: the weights read once
        # q/k norms and rotary are per row (each row at its own position): all rows at once too
        q_all, k_all, v_all = layer.split_heads(qkv, cos, signed_sin)  # [1, heads, N, d]
        if kernel:  # every request's attention in one call
            stored = [decoder.store(cache, k_all[:, :, a:b], v_all[:, :, a:b], index) for _, cache, a, b in requests]
            attended = decoder.attend_chains(q_all, [k for k, _ in stored], [v for _, v in stored], lengths,
                                             window_of(config, layer_type), layer.scaling)
        else:
            outs = []
            for r, cache, a, b in requests:
                k, v = decoder.store(cache, k_all[:, :, a:b], v_all[:, :, a:b], index)
                start = starts[layer_type][r]
                if start:
                    k, v = k[..., start:, :], v[..., start:, :]
                out = decoder.attend(q_all[:, :, a:b], k, v, masks[layer_type][r], layer.scaling)
                outs.append(out.transpose(1, 2).reshape(1, b - a, -1))
            attended = torch.cat(outs, dim=1)
        hidden = layer.attention_residual(hidden, attended)
        if index not in skipped_mlp:
            hidden = layer.feed_forward(hidden)
    return decoder.norm(hidden)[0]
