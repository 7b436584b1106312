"""Tree attention: run several branches that share one cached prefix in a single forward.

Each new token sees the cached context plus the tree tokens named in its ``visible`` row (its
ancestors and itself), at an explicit position. Beams of MTAD's drafter share the prompt's KV
cache this way instead of copying it once per beam, and the target can verify several candidate
continuations in one forward. Masks are passed to `transformers` as ready-made 4-D masks (one
per attention type, so sliding-window layers keep their window).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specdecode.errors import InvalidSettingError
from specdecode.models.cache import KVCache, forward_with_hidden


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
    """Append tree tokens to ``kv`` and return their logits ``[n, V]`` (see :func:`forward_tree_with_hidden`)."""
    return forward_tree_with_hidden(model, kv, new_ids, new_positions, visible, context_len, tree_positions)[0]


def forward_tree_with_hidden(
    model: torch.nn.Module,
    kv: KVCache,
    new_ids: list[int],
    new_positions: list[int],
    visible: torch.Tensor,
    context_len: int,
    tree_positions: list[int],
    exact_top: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append tree tokens to ``kv``; return their logits ``[n, V]`` and final hidden states ``[n, H]``.

    ``kv`` must hold ``context_len`` context tokens followed by the earlier tree tokens (whose
    positions are ``tree_positions``). Callers crop the tree tokens away, or keep one branch with
    :func:`keep_path`, when they are done.
    """
    device = next(model.parameters()).device
    positions = torch.tensor(new_positions, dtype=torch.long, device=device)
    all_tree_positions = torch.tensor([*tree_positions, *new_positions], dtype=torch.long, device=device)
    mask = tree_attention_mask(model, context_len, all_tree_positions, visible.to(device), positions)
    return forward_with_hidden(model, kv, new_ids, len(new_ids), exact_top, position_ids=positions[None],
                               attention_mask=mask)


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


def forward_candidates(
    model: torch.nn.Module,
    kv: KVCache,
    ids: list[int],
    parents: list[int] | None,
    exact_top: int | None = None,
    until_mismatch: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify candidates in one forward: a chain (``parents`` None), or a tree rooted at ``ids[0]``
    where ``parents[i] < i + 1`` is the index in ``ids`` of the parent of ``ids[i + 1]``.
    ``until_mismatch`` (the draft of a chain, for greedy matching) is passed on to
    :func:`forward_with_hidden`; a tree computes every row."""
    if parents is None:
        return forward_with_hidden(model, kv, ids, len(ids), exact_top, until_mismatch=until_mismatch)
    start = len(kv)
    tree = [-1, *parents]
    positions = [start + d for d in depths(tree)]
    return forward_tree_with_hidden(model, kv, ids, positions, ancestors_visible(tree), start, [], exact_top)


def keep_path(kv: KVCache, start: int, kept: list[int]) -> None:
    """After a tree forward appended nodes at ``start``.., keep the context and the nodes ``kept``
    (in order): the cache then holds exactly what a chain forward of the accepted path would.
    Exact for sliding-window layers too, since the cache keeps every layer's full history."""
    index = torch.tensor([*range(start), *(start + k for k in kept)], dtype=torch.long)
    for layer in kv.cache.layers:
        layer.keys = layer.keys.index_select(-2, index.to(layer.keys.device))
        layer.values = layer.values.index_select(-2, index.to(layer.values.device))
    kv.token_ids[:] = [kv.token_ids[i] for i in index.tolist()]
