"""Tree attention: run several branches that share one cached prefix in a single forward.

Each new token sees the cached context plus the tree tokens named in its ``visible`` row (its
ancestors and itself), at an explicit position (the forward itself is the runner's:
``TargetRunner.forward_tree`` and ``TargetRunner.verify``). Beams of MTAD's drafter share the prompt's KV
cache this way instead of copying it once per beam, and the target can verify several candidate
continuations in one forward. Masks are passed to `transformers` as ready-made 4-D masks (one
per attention type, so sliding-window layers keep their window).
"""

from __future__ import annotations

import torch

from specdecode.errors import InvalidSettingError
from specdecode.models.cache import KVCache


def _layer_types(config) -> set[str]:
    types = getattr(config, "layer_types", None)
    return set(types) if types else {"full_attention"}


def tree_attention_mask(
    model: torch.nn.Module,
    context_len: int,
    tree_positions: torch.Tensor,
    visible: torch.Tensor,
    new_positions: torch.Tensor,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Mask for ``n`` new tokens over ``context_len`` cached tokens + ``t`` earlier tree tokens + themselves.

    ``visible[i, j]`` says whether new token ``i`` may see tree slot ``j`` (earlier tree tokens
    first, then the new tokens); every new token sees the whole context.
    """
    config = model.config.get_text_config()
    impl = getattr(config, "_attn_implementation", "sdpa") or "sdpa"
    if impl not in ("sdpa", "eager"):
        raise InvalidSettingError(f"tree attention needs the 'sdpa' or 'eager' attention implementation, not {impl!r}")
    device = visible.device
    n = visible.shape[0]
    key_positions = torch.cat([torch.arange(context_len, device=device), tree_positions.to(device)])
    allowed = torch.cat([torch.ones(n, context_len, dtype=torch.bool, device=device), visible], dim=1)
    masks: dict[str, torch.Tensor] = {}
    for layer_type in _layer_types(config):
        mask = allowed
        if layer_type == "sliding_attention" and getattr(config, "sliding_window", None):
            mask = mask & (key_positions[None, :] > new_positions[:, None] - config.sliding_window)
        mask = mask[None, None]
        if impl == "eager":
            dtype = next(model.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
        masks[layer_type] = mask
    return masks if len(masks) > 1 or "full_attention" not in masks else masks["full_attention"]


def ancestors_visible(parents: list[int]) -> torch.Tensor:
    """``visible[i, j]``: node j is node i or one of its ancestors (``parents[i] < i``, -1 for a root)."""
    visible = torch.eye(len(parents), dtype=torch.bool)
    for node, parent in enumerate(parents):
        if parent >= 0:
            visible[node] |= visible[parent]
    return visible


def depths(parents: list[int]) -> list[int]:
    out: list[int] = []
    for parent in parents:
        out.append(0 if parent < 0 else out[parent] + 1)
    return out


def keep_path(kv: KVCache, start: int, kept: list[int]) -> None:
    """After a tree forward appended nodes at ``start``.., keep the context and the nodes ``kept``
    (in order): the cache then holds exactly what a chain forward of the accepted path would.
    Exact for sliding-window layers too, since the cache keeps every layer's full history."""
    index = torch.tensor([*range(start), *(start + k for k in kept)], dtype=torch.long)
    for layer in kv.cache.layers:
        layer.keys = layer.keys.index_select(-2, index.to(layer.keys.device))
        layer.values = layer.values.index_select(-2, index.to(layer.values.device))
    kv.token_ids[:] = [kv.token_ids[i] for i in index.tolist()]
