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

from specdecode.models.fused import project
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


def _norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's RMSNorm with `transformers`' arithmetic: in float32, cast back afterwards."""
    norm = _NORMS.get(module)
    if norm is None:
        gemma = "Gemma" in type(module).__name__
        weight = module.weight.detach().float()
        norm = ((1.0 + weight) if gemma else weight, float(getattr(module, "eps", None) or module.variance_epsilon),
                gemma)
        _NORMS[module] = norm
    scale, eps, gemma = norm
    if x.dtype == torch.float32:  # the hot path: one fused op, the same floats as the four-op form
        return F.rms_norm(x, scale.shape, scale, eps)
    wide = x.float()
    normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * scale).to(x.dtype) if gemma else module.weight * normed.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


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
            rotary[layer_type] = base.rotary_emb(hidden, position_ids, layer_type)
        else:
            rotary[layer_type] = base.rotary_emb(hidden, position_ids)
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
            cos, sin = (t[:, None] for t in rotary[types[index]])
            x = _norm(layer.input_layernorm, hidden)
            head_dim = attention.head_dim
            q, k, v = (p.view(1, n, -1, head_dim).transpose(1, 2)
                       for p in project(x, attention.q_proj, attention.k_proj, attention.v_proj))
            if hasattr(attention, "q_norm"):
                q, k = _norm(attention.q_norm, q), _norm(attention.k_norm, k)
            k, v = cache.update(_rotate(k, cos, sin), v, index)
            start = starts[types[index]]
            if start:
                k, v = k[..., start:, :], v[..., start:, :]
            out = F.scaled_dot_product_attention(_rotate(q, cos, sin), k, v, attn_mask=masks[types[index]],
                                                 scale=attention.scaling, enable_gqa=True)
            out = attention.o_proj(out.transpose(1, 2).reshape(1, n, -1))
            hidden = hidden + (_norm(layer.post_attention_layernorm, out) if sandwich else out)
        if not is_skipped_mlp(mlp):
            x = _norm(layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm, hidden)
            gate, up = project(x, mlp.gate_proj, mlp.up_proj)
            out = mlp.down_proj(mlp.act_fn(gate) * up)
            hidden = hidden + (_norm(layer.post_feedforward_layernorm, out) if sandwich else out)
    return _norm(base.norm, hidden)
