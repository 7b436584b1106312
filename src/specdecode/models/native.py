"""A lean decoder forward for the Llama family and Gemma 3: the same arithmetic with fewer ops.

After the fast runtime put the big products near the memory floor, a one-token step of the
embedded Gemma 3 still spent ~35 of its ~55 ms in the layers *outside* the products (2 threads,
AVX2 EPYC): `transformers`' per-module dispatch, masks built for every call, RMSNorms written as
ten small ops with dtype round trips. This forward walks the same modules and the same
``DynamicCache`` but computes each sub-layer in the fewest ops that give the *same* floats (the
norms in the same order, rotary as ``q·cos + rotate_half(q)·sin``, ``a.scaling``): logits equal
`transformers`' bit for bit on the embedded model inside its sliding window and for the Llama
family (beyond the window SDPA's masked path rounds differently: float32 rounding, tested).

It reads the layers of the module it is given, so layer-skip views (``models/layer_skip.py``)
run through it too: a skipped attention appends zero placeholders to keep cache lengths equal,
a skipped MLP is left out, int8 sub-layers call their own linear modules. Tree masks from
``models/tree.py`` (one bool mask per attention type) pass through unchanged. In chain forwards
a sliding-window layer attends only to the keys its window can reach, not to the whole history
the cache keeps for exact rollback. Where the runtime registered a fused projection
(``models/fused.py``: q/k/v as one product, gate/up as one) it runs that instead of the parts —
one weight read and one kernel call instead of three, and the same floats: each output column is
the same dot product in the same order (tested against the parts).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from specdecode.models.fused import joined, project
from specdecode.models.layer_skip import decoder_layers, is_skipped_attention, is_skipped_mlp

NATIVE_MODEL_TYPES = ("llama", "qwen2", "gemma3_text")

# per RMSNorm: the float32 weight it multiplies by ((1 + w) for Gemma's norms, w for Llama's), eps,
# and whether it is Gemma's (which multiplies before casting back to the model's dtype)
_NORMS: weakref.WeakKeyDictionary[nn.Module, tuple[torch.Tensor, float, bool]] = weakref.WeakKeyDictionary()


def supports_native(model: nn.Module) -> bool:
    config = model.config.get_text_config()
    return (getattr(config, "model_type", None) in NATIVE_MODEL_TYPES
            and not getattr(config, "attn_logit_softcapping", None)
            and not getattr(config, "use_bidirectional_attention", False)
            and hasattr(model, "base_model"))


def _norm_parameters(module: nn.Module) -> tuple[torch.Tensor, float, bool]:
    norm = _NORMS.get(module)
    if norm is None:
        gemma = "Gemma" in type(module).__name__
        weight = module.weight.detach().float()
        norm = ((1.0 + weight) if gemma else weight, float(getattr(module, "eps", None) or module.variance_epsilon),
                gemma)
        _NORMS[module] = norm
    return norm


def _norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's RMSNorm with `transformers`' arithmetic: in float32, cast back afterwards."""
    scale, eps, gemma = _norm_parameters(module)
    if x.dtype == torch.float32:  # the hot path: one fused op, the same floats as the four-op form
        return F.rms_norm(x, scale.shape, scale, eps)
    return _scaled(_normalized(x, eps), scale, gemma, x.dtype)


def _normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x`` over its root mean square, in float32 (for float32 ``F.rms_norm`` without a weight: the
    same floats as the four-op form, and multiplying by the weight afterwards equals passing it)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], None, eps)
    wide = x.float()
    return wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)


def _scaled(normed: torch.Tensor, scale: torch.Tensor, gemma: bool, dtype: torch.dtype) -> torch.Tensor:
    """Gemma multiplies by its weight in float32, then casts; Llama casts, then multiplies."""
    if gemma or dtype == torch.float32:
        return (normed * scale).to(dtype)
    return scale.to(dtype) * normed.to(dtype)


def _head_norms(attention: nn.Module, heads: int, kv_heads: int) -> tuple[torch.Tensor, float, bool]:
    """q_norm's scale on each query head's row and k_norm's on each key head's, stacked
    ``[heads + kv_heads, head_dim]``: both norms as one op over the joined q/k heads."""
    stacked = _NORMS.get(attention)
    if stacked is None:
        (q_scale, eps, gemma), (k_scale, k_eps, _) = (_norm_parameters(attention.q_norm),
                                                      _norm_parameters(attention.k_norm))
        if k_eps != eps:
            raise ValueError("q_norm and k_norm with different eps")
        stacked = (torch.cat([q_scale.expand(heads, -1), k_scale.expand(kv_heads, -1)]), eps, gemma)
        _NORMS[attention] = stacked
    return stacked


def _attention_inputs(attention: nn.Module, x: torch.Tensor, cos: torch.Tensor,
                      signed_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys (normed where the model norms them, rotated) and values, ``[1, heads, n, d]``.

    q and k are normed and rotated as one ``[1, n, heads + kv_heads, d]`` view of the joined
    projection: a third of the ops of doing them apart, the same floats. Rotation is
    ``x·cos + roll(x, d/2)·signed_sin`` with ``signed_sin = (−sin₁, sin₂)``: ``rotate_half(x)·sin``
    element for element, since negating a factor negates a product exactly.
    """
    n, head_dim = x.shape[1], attention.head_dim
    parts = (attention.q_proj, attention.k_proj, attention.v_proj)
    heads, kv_heads = (part.out_features // head_dim for part in parts[:2])
    qkv = joined(x, *parts)
    qk = qkv[..., :(heads + kv_heads) * head_dim].view(1, n, heads + kv_heads, head_dim)
    v = qkv[..., (heads + kv_heads) * head_dim:].view(1, n, kv_heads, head_dim).transpose(1, 2)
    if hasattr(attention, "q_norm"):
        scale, eps, gemma = _head_norms(attention, heads, kv_heads)
        qk = _scaled(_normalized(qk, eps), scale, gemma, qk.dtype)
    qk = qk * cos + qk.roll(head_dim // 2, -1) * signed_sin
    q, k = qk.transpose(1, 2).split([heads, kv_heads], dim=1)
    return q, k, v


def _rotary_factors(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, n, d]`` cos and sin as ``[1, n, 1, d]`` factors for :func:`_attention_inputs`."""
    half = sin.shape[-1] // 2
    return cos[:, :, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, :, None]


def _window_start(past: int, window: int | None) -> int:
    """First key position any of the new tokens can see: sliding layers skip older history."""
    return 0 if window is None else max(0, past - window + 1)


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


def native_forward(
    model: nn.Module,
    cache: DynamicCache,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Final (post-norm) hidden states ``[1, n, H]`` of ``input_ids`` on top of ``cache``, which it
    extends — what ``model.base_model(...)`` returns as ``last_hidden_state``."""
    base = model.base_model
    config = model.config.get_text_config()
    hidden = base.embed_tokens(input_ids)
    n = input_ids.shape[1]
    past = cache.get_seq_length()
    chain = position_ids is None
    if chain:
        position_ids = torch.arange(past, past + n, device=input_ids.device)[None]
    layers = decoder_layers(model)
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * len(layers))
    rotary = {}
    for layer_type in set(types):
        if "Gemma" in type(base.rotary_emb).__name__:
            rotary[layer_type] = _rotary_factors(*base.rotary_emb(hidden, position_ids, layer_type))
        else:
            rotary[layer_type] = _rotary_factors(*base.rotary_emb(hidden, position_ids))
    masks: dict[str, torch.Tensor | None] = {}
    starts = dict.fromkeys(types, 0)
    for layer_type in set(types):
        if isinstance(attention_mask, dict):
            masks[layer_type] = attention_mask[layer_type]
        elif attention_mask is not None or not chain:
            masks[layer_type] = attention_mask
        else:
            window = getattr(config, "sliding_window", None) if layer_type == "sliding_attention" else None
            masks[layer_type] = _chain_mask(past, n, window, input_ids.device)
            starts[layer_type] = _window_start(past, window)
    sandwich = hasattr(layers[0], "pre_feedforward_layernorm")  # Gemma: norms after each sub-layer too
    for index, layer in enumerate(layers):
        attention, mlp = layer.self_attn, layer.mlp
        if is_skipped_attention(attention):
            placeholder = hidden.new_zeros(1, attention.kv_heads, n, attention.head_dim)
            cache.update(placeholder, placeholder, index)
        else:
            q, k, v = _attention_inputs(attention, _norm(layer.input_layernorm, hidden), *rotary[types[index]])
            k, v = cache.update(k, v, index)
            start = starts[types[index]]
            if start:
                k, v = k[..., start:, :], v[..., start:, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[types[index]],
                                                 scale=attention.scaling, enable_gqa=True)
            out = attention.o_proj(out.transpose(1, 2).reshape(1, n, -1))
            hidden = hidden + (_norm(layer.post_attention_layernorm, out) if sandwich else out)
        if not is_skipped_mlp(mlp):
            x = _norm(layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm, hidden)
            gate, up = project(x, mlp.gate_proj, mlp.up_proj)
            out = mlp.down_proj(mlp.act_fn(gate) * up)
            hidden = hidden + (_norm(layer.post_feedforward_layernorm, out) if sandwich else out)
    return _norm(base.norm, hidden)
