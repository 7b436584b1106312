"""Tree attention: run several branches that share one cached prefix in a single forward.

Each new token sees the cached context plus the tree tokens named in its ``visible`` row (its
ancestors and itself), at an explicit position. Beams of MTAD's drafter share the prompt's KV
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


def forward_tree(
    model: torch.nn.Module,
    kv: KVCache,
    new_ids: list[int],
    new_positions: list[int],
    visible: torch.Tensor,
    context_len: int,
    tree_positions: list[int],
) -> torch.Tensor:
    """Append tree tokens to ``kv`` and return their logits ``[n, V]``.

    ``kv`` must hold ``context_len`` context tokens followed by the earlier tree tokens (whose
    positions are ``tree_positions``). Callers crop the tree tokens away when they are done.
    """
    device = next(model.parameters()).device
    positions = torch.tensor(new_positions, dtype=torch.long, device=device)
    all_tree_positions = torch.tensor([*tree_positions, *new_positions], dtype=torch.long, device=device)
    mask = tree_attention_mask(model, context_len, all_tree_positions, visible.to(device), positions)
    out = model(
        input_ids=torch.tensor([new_ids], dtype=torch.long, device=device),
        attention_mask=mask,
        position_ids=positions[None],
        past_key_values=kv.cache,
        use_cache=True,
    )
    kv.token_ids.extend(new_ids)
    logits = out.logits[0]
    return logits.to(torch.promote_types(logits.dtype, torch.float32))
