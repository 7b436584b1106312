"""A lean decoder forward for the Llama family and Gemma 3: the same arithmetic with fewer ops.

After the fast runtime put the big products near the memory floor, a one-token step of the
embedded Gemma 3 still spent ~35 of its ~55 ms in the layers *outside* the products (2 threads,
AVX2 EPYC): `transformers`' per-module dispatch, masks built for every call, RMSNorms written as
ten small ops with dtype round trips. This forward walks the same modules and the same
``DynamicCache`` but computes each sub-layer in the fewest ops that give the *same* floats (the
norms in the same order, rotary as ``q·cos + rotate_half(q)·sin``, ``a.scaling``): logits equal
`transformers`' bit for bit on the embedded model inside its sliding window and for the Llama
family (beyond the window SDPA's masked path rounds differently: float32 rounding, tested).

A :class:`NativeDecoder` is built once per module tree at load time (the runtime's; see
``models/runtime.py``) and holds everything it reads per step: the norms' float32 scales, the
layers' product modules, fused projections (``models/fused.py``: q/k/v as one product, gate/up as
one — one weight read and one kernel call instead of three, and the same floats: each output
column is the same dot product in the same order, tested against the parts). Self-drafts run
through it with a :class:`~specdecode.models.layer_skip.SkipSet`: a skipped attention appends
zero placeholders to keep cache lengths equal, a skipped MLP is left out. Tree masks from
``models/tree.py`` (one bool mask per attention type) pass through unchanged. In chain forwards
a sliding-window layer attends only to the keys its window can reach, not to the whole history
the cache keeps for exact rollback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from specdecode.models import row_kernels
from specdecode.models.families import decoder_layers, family_of
from specdecode.models.layer_skip import SkipSet

# a fused product for a group of projections that read one input, or None to run the parts
FusedGroup = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Norm:
    """An RMSNorm with `transformers`' arithmetic: its float32 scale ((1 + w) for Gemma's norms, w
    for Llama's), eps, and whether it is Gemma's (which multiplies before casting back)."""

    scale: torch.Tensor
    eps: float
    gemma: bool

    @classmethod
    def of(cls, module: nn.Module, gemma: bool) -> _Norm:
        weight = module.weight.detach()
        eps = float(getattr(module, "eps", None) or module.variance_epsilon)
        # Gemma adds 1 in float32; Llama multiplies by its weight as stored (float64 stays float64)
        return cls((1.0 + weight.float()) if gemma else weight.to(torch.promote_types(weight.dtype, torch.float32)),
                   eps, gemma)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the hot path: one fused op, the same floats as the four-op form
            return F.rms_norm(x, self.scale.shape, self.scale, self.eps)
        if self.gemma:  # bf16 / float16: normalise and scale in float32, round once (three ops)
            return F.rms_norm(x.float(), self.scale.shape, self.scale, self.eps).to(x.dtype)
        return _scaled(_normalized(x, self.eps), self.scale, self.gemma, x.dtype)


def _normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x`` over its root mean square, in float32 (for float32 ``F.rms_norm`` without a weight: the
    same floats as the four-op form, and multiplying by the weight afterwards equals passing it)."""
    return F.rms_norm(x.float(), x.shape[-1:], None, eps)  # .float() is a no-op on float32


def _scaled(normed: torch.Tensor, scale: torch.Tensor, gemma: bool, dtype: torch.dtype) -> torch.Tensor:
    """Gemma multiplies by its weight in float32, then casts; Llama casts, then multiplies."""
    if gemma or dtype == torch.float32:
        return (normed * scale).to(dtype)
    return scale.to(dtype) * normed.to(dtype)


def _joined(parts: Sequence[nn.Module], fused: FusedGroup | None) -> FusedGroup:
    """The parts' outputs side by side: the fused product, or the parts concatenated."""
    if fused is not None:
        return fused
    return lambda x: torch.cat([part(x) for part in parts], dim=-1)


@dataclass(frozen=True)
class NativeLayer:
    """What one decoder layer's step reads, gathered once."""

    input_norm: _Norm
    post_attention_norm: _Norm
    pre_feedforward_norm: _Norm | None  # Gemma's sandwich norms; None for Llama's two
    post_feedforward_norm: _Norm | None
    qkv: FusedGroup  # x [1, n, H] -> q, k, v side by side [1, n, (heads + 2 kv_heads) * head_dim]
    o_proj: nn.Module
    gate_up: FusedGroup  # x [1, n, H] -> gate, up side by side [1, n, 2 I]
    intermediate: int
    down_proj: nn.Module
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    qk_norm: _Norm | None  # q_norm's scale on each query head's row and k_norm's on each key head's
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float

    @classmethod
    def of(cls, layer: nn.Module, gemma: bool, fused: dict[str, FusedGroup]) -> NativeLayer:
        attention, mlp = layer.self_attn, layer.mlp
        head_dim = attention.head_dim
        heads, kv_heads = attention.q_proj.out_features // head_dim, attention.k_proj.out_features // head_dim
        sandwich = hasattr(layer, "pre_feedforward_layernorm")
        qk_norm = None
        if hasattr(attention, "q_norm"):
            q, k = _Norm.of(attention.q_norm, gemma), _Norm.of(attention.k_norm, gemma)
            if q.eps != k.eps:
                raise ValueError("q_norm and k_norm with different eps")
            qk_norm = _Norm(torch.cat([q.scale.expand(heads, -1), k.scale.expand(kv_heads, -1)]), q.eps, gemma)
        return cls(
            input_norm=_Norm.of(layer.input_layernorm, gemma),
            post_attention_norm=_Norm.of(layer.post_attention_layernorm, gemma),
            pre_feedforward_norm=_Norm.of(layer.pre_feedforward_layernorm, gemma) if sandwich else None,
            post_feedforward_norm=_Norm.of(layer.post_feedforward_layernorm, gemma) if sandwich else None,
            qkv=_joined((attention.q_proj, attention.k_proj, attention.v_proj), fused.get("qkv")),
            o_proj=attention.o_proj,
            gate_up=_joined((mlp.gate_proj, mlp.up_proj), fused.get("gate_up")),
            intermediate=mlp.gate_proj.out_features,
            down_proj=mlp.down_proj,
            act_fn=mlp.act_fn,
            qk_norm=qk_norm, heads=heads, kv_heads=kv_heads, head_dim=head_dim, scaling=attention.scaling,
        )

    def attention_inputs(self, x: torch.Tensor, cos: torch.Tensor,
                         signed_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys (normed where the model norms them, rotated) and values ``[1, heads, n, d]``
        of normed input ``x [1, n, H]``.

        q and k are normed and rotated as one ``[1, n, heads + kv_heads, d]`` view of the joined
        projection: a third of the ops of doing them apart, the same floats. Rotation is
        ``x·cos + roll(x, d/2)·signed_sin`` with ``signed_sin = (−sin₁, sin₂)``: ``rotate_half(x)·sin``
        element for element, since negating a factor negates a product exactly.
        """
        return self.split_heads(self.qkv(x), cos, signed_sin)

    def split_heads(self, qkv: torch.Tensor, cos: torch.Tensor,
                    signed_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`attention_inputs` after the projection: ``qkv [1, n, ...]`` (one request's rows of
        a batched product, ``models/batch.py``) normed, rotated and split into heads."""
        n, head_dim, heads, kv_heads = qkv.shape[1], self.head_dim, self.heads, self.kv_heads
        qk = qkv[..., :(heads + kv_heads) * head_dim].view(1, n, heads + kv_heads, head_dim)
        v = qkv[..., (heads + kv_heads) * head_dim:].view(1, n, kv_heads, head_dim).transpose(1, 2)
        if self.qk_norm is not None:
            qk = _scaled(_normalized(qk, self.qk_norm.eps), self.qk_norm.scale, self.qk_norm.gemma, qk.dtype)
        qk = qk * cos + qk.roll(head_dim // 2, -1) * signed_sin
        q, k = qk.transpose(1, 2).split([heads, kv_heads], dim=1)
        return q, k, v


    def attention_residual(self, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """``hidden [1, n, H]`` plus the output projection of the heads' outputs ``attended [1, n, heads·d]``
        (normed first where the family norms after each sub-layer: Gemma's sandwich)."""
        out = self.o_proj(attended)
        return hidden + (self.post_attention_norm(out) if self.pre_feedforward_norm is not None else out)

    def feed_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [1, n, H]`` plus the MLP sub-layer's output."""
        sandwich = self.pre_feedforward_norm is not None
        gate, up = self.gate_up((self.pre_feedforward_norm if sandwich else self.post_attention_norm)(hidden)).split(
            self.intermediate, dim=-1)
        out = self.down_proj(self.act_fn(gate) * up)
        return hidden + (self.post_feedforward_norm(out) if sandwich else out)

def _rotary_factors(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, n, d]`` cos and sin as ``[1, n, 1, d]`` factors for :meth:`NativeLayer.attention_inputs`."""
    half = sin.shape[-1] // 2
    return cos[:, :, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, :, None]


def _window_start(past: int, window: int | None) -> int:
    """First key position any of the new tokens can see: sliding layers skip older history."""
    return 0 if window is None else max(0, past - window + 1)


def window_of(config: object, layer_type: str) -> int | None:
    """How many positions back a layer of ``layer_type`` attends (None: the whole history)."""
    return getattr(config, "sliding_window", None) if layer_type == "sliding_attention" else None


def _chain_mask(past: int, n: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Causal (and sliding-window) mask of ``n`` new tokens after ``past`` cached ones, over the
    keys from :func:`_window_start` on; None where all of those are visible (one new token)."""
    if n == 1:
        return None
    start = _window_start(past, window)
    key_positions = torch.arange(start, past + n, device=device)
    positions = torch.arange(past, past + n, device=device)[:, None]
    mask = key_positions[None, :] <= positions
    if window is not None:
        mask = mask & (key_positions[None, :] > positions - window)
    return mask[None, None]


class NativeDecoder:
    """The decoder stack of ``model`` (a supported family, see ``models/families.py``) run in the
    fewest ops; ``fused[(layer index, "qkv" | "gate_up")]`` are the runtime's fused products.
    ``attention_dtype``: attention runs on queries, keys and values upcast to it (exactly) and its
    output is rounded back once — the bf16 runtime's choice where torch's bf16 attention kernel is
    slower than its float32 one (7–9× for one query on AVX-512 BF16, docs/perf.md); None: the
    model's dtype, as `transformers` runs it. ``chain_kernel``: chain rows (no tree mask) attend in
    float32 through our kernel (``row_kernels.chain_attention``: every request of a batched step in
    one call, each row's sums in one fixed order) where the runtime timed it faster than torch's."""

    def __init__(self, model: nn.Module, fused: dict[tuple[int, str], FusedGroup] | None = None,
                 attention_dtype: torch.dtype | None = None, chain_kernel: bool = False) -> None:
        family = family_of(model, "the native decoder")
        fused = fused or {}
        self.attention_dtype = attention_dtype
        self.chain_kernel = chain_kernel
        self.module = model  # the module tree it reads
        base = model.base_model
        self.embed_tokens, self.rotary_emb, self.norm = base.embed_tokens, base.rotary_emb, _Norm.of(
            base.norm, family.gemma_norms)
        self.gemma_rotary = family.gemma_norms  # Gemma's rotary module takes the layer type
        self.config = model.config.get_text_config()
        self.layers = [NativeLayer.of(layer, family.gemma_norms,
                                      {name: f for (index, name), f in fused.items() if index == i})
                       for i, layer in enumerate(decoder_layers(model))]
        self.types = list(getattr(self.config, "layer_types", None) or ["full_attention"] * len(self.layers))

    def __call__(
        self,
        cache: DynamicCache,
        input_ids: torch.Tensor | None,  # [1, n]; None where inputs_embeds are given
        position_ids: torch.Tensor | None = None,  # [1, n]; None: the n positions after the cache
        attention_mask: torch.Tensor | dict[str, torch.Tensor] | None = None,  # a tree mask (models/tree.py)
        skip: SkipSet | None = None,
        inputs_embeds: torch.Tensor | None = None,  # [1, n, H]: inputs not from the token embedding (a draft head's)
    ) -> torch.Tensor:
        """Final (post-norm) hidden states ``[1, n, H]`` of ``input_ids`` on top of ``cache``, which it
        extends — what ``model.base_model(...)`` returns as ``last_hidden_state``."""
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        n = hidden.shape[1]
        past = cache.get_seq_length()
        chain = position_ids is None
        if chain:
            position_ids = torch.arange(past, past + n, device=hidden.device)[None]
        types = self.types
        kernel = chain and attention_mask is None and self.chain_kernel_runs(hidden)
        rotary, masks, starts = {}, {}, dict.fromkeys(types, 0)
        for layer_type in set(types):
            if self.gemma_rotary:
                rotary[layer_type] = _rotary_factors(*self.rotary_emb(hidden, position_ids, layer_type))
            else:
                rotary[layer_type] = _rotary_factors(*self.rotary_emb(hidden, position_ids))
            if isinstance(attention_mask, dict):
                masks[layer_type] = attention_mask[layer_type]
            elif attention_mask is not None or not chain:
                masks[layer_type] = attention_mask
            elif not kernel:
                window = window_of(self.config, layer_type)
                masks[layer_type] = _chain_mask(past, n, window, hidden.device)
                starts[layer_type] = _window_start(past, window)
        skipped_attention, skipped_mlp = (skip.attention, skip.mlp) if skip is not None else ((), ())
        for index, layer in enumerate(self.layers):
            if index in skipped_attention:
                self.store_placeholder(cache, index, layer, n, hidden)
            else:
                q, k, v = layer.attention_inputs(layer.input_norm(hidden), *rotary[types[index]])
                k, v = self.store(cache, k, v, index)
                if kernel:
                    attended = self.attend_chains(q, [k], [v], [n], window_of(self.config, types[index]), layer.scaling)
                else:
                    start = starts[types[index]]
                    if start:
                        k, v = k[..., start:, :], v[..., start:, :]
                    attended = self.attend(q, k, v, masks[types[index]], layer.scaling).transpose(1, 2).reshape(1, n, -1)
                hidden = layer.attention_residual(hidden, attended)
            if index not in skipped_mlp:
                hidden = layer.feed_forward(hidden)
        return self.norm(hidden)

    def store(self, cache: DynamicCache, k: torch.Tensor, v: torch.Tensor,
              index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append layer ``index``'s new keys and values ``[1, kv_heads, n, d]`` to ``cache``; return
        its whole history. Where attention runs upcast, the history is kept upcast (exact, made
        once per token): upcasting it at every step copied the whole context twice a layer — 5 ms
        of a 25 ms bf16 step at 1,000 tokens (docs/perf.md, stop 28)."""
        wide = self.attention_dtype
        if wide is not None:
            k, v = k.to(wide), v.to(wide)
        return cache.update(k, v, index)

    def store_placeholder(self, cache: DynamicCache, index: int, layer: NativeLayer, n: int,
                          like: torch.Tensor) -> None:
        """Zero keys and values for ``n`` positions of a skipped attention sub-layer (a self-draft's),
        in the dtype :meth:`store` keeps, so that every layer of the cache keeps the same length."""
        placeholder = like.new_zeros(1, layer.kv_heads, n, layer.head_dim, dtype=self.attention_dtype or like.dtype)
        cache.update(placeholder, placeholder, index)

    def chain_kernel_runs(self, hidden: torch.Tensor) -> bool:
        """Whether chain rows of ``hidden`` attend through the kernel: asked for, attention in float32,
        and autograd off (the kernel has no backward; decoding runs in inference mode)."""
        return self.chain_kernel and (self.attention_dtype or hidden.dtype) == torch.float32 and not torch.is_grad_enabled()

    def attend_chains(self, q: torch.Tensor,  # [1, heads, N, d]: every request's rows, request after request
                      keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],  # each [1, kv_heads, t_r, d]
                      rows: Sequence[int], window: int | None, scaling: float) -> torch.Tensor:
        """Chain attention ``[1, N, heads·d]`` of several requests' rows, each over its own cache (its
        new keys and values stored), in one kernel call; in float32, rounded back once to ``q``'s dtype."""
        out = row_kernels.chain_attention(q.float(), keys, values, rows, window, scaling)
        return out if q.dtype == torch.float32 else out.to(q.dtype)

    def attend(self, q: torch.Tensor,  # [1, heads, n, d]
               k: torch.Tensor, v: torch.Tensor,  # [1, kv_heads, t, d]
               mask: torch.Tensor | None,  # [1, 1, n, t] bool, None: all visible
               scaling: float) -> torch.Tensor:
        """Attention ``[1, heads, n, d]``, in ``attention_dtype`` where one is set (exact upcasts — the
        keys and values are already upcast by :meth:`store` —, one rounding of the output back)."""
        wide = self.attention_dtype
        if wide is None or q.dtype == wide:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        return F.scaled_dot_product_attention(q.to(wide), k.to(wide), v.to(wide), attn_mask=mask, scale=scaling,
                                              enable_gqa=True).to(q.dtype)
