"""The one object that runs a model: :class:`TargetRunner`.

Everything that feeds tokens to a model goes through a runner — the engine's verification, the
drafters' forwards (a self-draft is the same runner with sub-layers skipped), the offline tools'.
The runner owns the model, its runtime plan (``models/runtime.py``: tuned products, fused
projections, the screened head, the native decoder; or none) and makes its KV caches. It reads
nothing from the model's modules that the model did not have when it was loaded and writes
nothing to them, so one loaded model can serve a fast runner and an eager (reference) runner to
several threads at once.

A forward's consumer says what it reads in one :class:`Readout`: every logit, only each row's
top k (the screened head computes those exactly and leaves the rest ``-inf``), the rows of a
greedy chain until its first mismatch, the rows it asks for as it goes (:class:`LogitRows`), or
no logits at all (hidden states only).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from specdecode.models.batch import batched_hidden, greedy_chains
from specdecode.models.cache import KVCache
from specdecode.models.frequent_vocab import SubVocabHead
from specdecode.models.layer_skip import Int8Copies, SkipSet, layer_skip_view, shallow_replace
from specdecode.models.native import NativeDecoder
from specdecode.models.heads import HEAD_BLOCK_ROWS, ScreenedHead
from specdecode.models.vocab_map import MappedHead
from specdecode.models.runtime import RuntimePlan, int8_fused_projections
from specdecode.models.families import decoder_layers
from specdecode.models.tree import ancestors_visible, depths, tree_attention_mask

MAX_CACHED_HEADS = 24  # sub-vocabulary heads kept per model (a bundle has one per domain)


@dataclass(frozen=True)
class Readout:
    """What the consumer of a forward reads.

    ``rows``: logits of the last ``rows`` positions fed (None: all of them; 0: none — hidden states
    only, which skips the LM head: on a 262k vocabulary it costs as much as all layers together).
    ``top_k``: the consumer reads only each row's top ``k`` (greedy: 1; top-k sampling: k); a
    screened head computes those exactly and leaves the rest ``-inf``. None: every logit.
    ``until_mismatch`` (``top_k == 1``, a chain): the draft tokens the rows predict; no row after
    the first one whose argmax differs from its draft token is read, so a screened head may
    leave them ``-inf``.
    ``own_vocabulary``: logits over the model's own reduced vocabulary (column ``j`` is target
    token ``runner.vocabulary_ids[j]``), not widened to the target's: a reduced-vocabulary draft
    (8k ids) then never writes or reads 262k-wide rows. Same as the default for other models.
    ``on_demand``: the forward's logits are a :class:`LogitRows` that runs the head on the rows
    the consumer asks for, when it asks (a rule that walks a tree reads only the rows on its
    walk); forwards of several requests together may still return them all computed.
    """

    rows: int | None = None
    top_k: int | None = None
    until_mismatch: tuple[int, ...] | None = None
    own_vocabulary: bool = False
    on_demand: bool = False

    @classmethod
    def hidden_only(cls) -> Readout:
        return cls(rows=0)


class LogitRows:
    """A forward's logits, row by row as they are asked for (``Readout.on_demand``).

    On a 262k vocabulary the head is most of a verification's cost at tree widths — its screen
    reads 335 MB a call and turns compute-bound past a few rows (~11 ms for one row, ~36-45 ms for 25
    on a 2-core Zen 4, docs/perf.md) — while a rule that walks a tree needs only the rows of the
    nodes it can still accept through. Each row is computed once; its values are those an
    all-rows readout gives that row (the head works row by row). A call also reads rows the
    caller expects to ask for next (``likely``) while the call stays within ``block`` rows, which
    cost about what one does. ``computed``: rows the head has run on so far.
    """

    def __init__(self, compute: Callable[[list[int]], torch.Tensor], count: int, block: int = 1) -> None:
        self._compute, self._count, self._block = compute, count, block
        self._rows: dict[int, torch.Tensor] = {}

    @classmethod
    def of(cls, logits: torch.Tensor | LogitRows) -> LogitRows:
        """``logits`` as rows on demand (a tensor: rows read from it)."""
        return logits if isinstance(logits, LogitRows) else cls(lambda indices: logits[indices], logits.shape[0])

    def __len__(self) -> int:
        return self._count

    @property
    def computed(self) -> int:
        return len(self._rows)

    def __call__(self, indices: Sequence[int], likely: Sequence[int] = ()) -> torch.Tensor:
        """Logits ``[len(indices), V]`` of those rows."""
        missing = [i for i in dict.fromkeys(indices) if i not in self._rows]
        if missing:
            ahead = [i for i in dict.fromkeys(likely) if i not in self._rows and i not in missing]
            missing += ahead[:max(0, self._block - len(missing))]
            if min(missing) < 0 or max(missing) >= self._count:
                raise IndexError(f"rows {missing} of a forward of {self._count}")
            self._rows.update(zip(missing, self._compute(missing)))
        return torch.stack([self._rows[i] for i in indices])


@dataclass
class Forward:
    """What one forward returns: ``logits [rows, V]`` (None for :meth:`Readout.hidden_only`; a
    :class:`LogitRows` for ``Readout.on_demand``) and the final (post-norm) hidden states
    ``[rows, H]`` of the same positions (all positions fed when no logits were read)."""

    logits: torch.Tensor | LogitRows | None
    hidden: torch.Tensor


@dataclass
class _Shared:
    """What the runners of one model share: per-model artifacts built on first use."""

    int8_copies: Int8Copies = field(default_factory=Int8Copies)
    int8_decoder: NativeDecoder | None = None
    sub_vocab_heads: OrderedDict[tuple[tuple[int, ...], bool], SubVocabHead] = field(default_factory=OrderedDict)


class TargetRunner:
    """Runs ``model`` under ``plan`` (None: `transformers`' own forward and head — the eager mode).

    ``skip``: the runner is a self-draft of the model, skipping those sub-layers (see
    :meth:`skipping`).
    """

    def __init__(self, model: nn.Module, plan: RuntimePlan | None = None, *, skip: SkipSet | None = None,
                 int8: bool = False, int8_head: bool = False, _shared: _Shared | None = None) -> None:
        self.model, self.plan = model, plan
        self.skip, self.int8 = skip, int8
        self._shared = _shared or _Shared()
        self._decoder: NativeDecoder | None = None
        self._module = model if plan is None else plan.model  # the tree `transformers`' forward runs
        if plan is not None and plan.decoder is not None:
            self._decoder = self._int8_decoder() if int8 else plan.decoder  # skips by ``skip`` itself
        elif skip is not None or int8:
            self._module = layer_skip_view(self._module, skip or SkipSet(),
                                           self._shared.int8_copies if int8 else None, int8_head=int8_head)
        self._head = plan.head if plan is not None else None  # screened (exact) head, where the plan has one
        self._lm_head = self._module.get_output_embeddings()
        if int8_head and self._decoder is not None:
            self._lm_head = self._shared.int8_copies(model.get_output_embeddings())
        text = model.config.get_text_config()
        self._softcap = getattr(text, "final_logit_softcapping", None)

    # -- modes ----------------------------------------------------------------------------------

    def eager(self) -> TargetRunner:
        """The reference mode: `transformers`' kernels and the model's own weights, nothing else."""
        return TargetRunner(self.model, None, _shared=self._shared)

    def skipping(self, skip: SkipSet, int8: bool = False, int8_head: bool = False) -> TargetRunner:
        """This model as a self-draft that skips the sub-layers in ``skip`` (sharing every weight);
        ``int8`` runs the kept sub-layers on int8 copies of their weights, ``int8_head`` its head
        (where the runtime does not screen the head)."""
        skip.check(len(decoder_layers(self.model)))
        return TargetRunner(self.model, self.plan, skip=skip, int8=int8, int8_head=int8_head, _shared=self._shared)

    def describe(self) -> str:
        return self.plan.describe() if self.plan is not None else "eager"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def module(self) -> nn.Module:
        """The module tree this runner's `transformers` forward runs (the model, or the runtime's
        shallow copy with faster products): for callers that batch it themselves."""
        return self._module

    @property
    def decoder(self) -> NativeDecoder | None:
        """The native decoder this runner runs (None: `transformers`' forward)."""
        return self._decoder

    @property
    def screened_head(self) -> ScreenedHead | None:
        return self._head

    @property
    def native(self) -> bool:
        return self._decoder is not None

    # -- caches ---------------------------------------------------------------------------------

    def new_cache(self) -> KVCache:
        return KVCache()

    # -- forwards -------------------------------------------------------------------------------

    def forward(
        self,
        kv: KVCache,
        new_ids: Sequence[int],
        readout: Readout = Readout(),
        *,
        positions: torch.Tensor | None = None,  # [1, n] explicit positions (a tree); None: after the cache
        mask: torch.Tensor | dict[str, torch.Tensor] | None = None,  # tree masks from models/tree.py
    ) -> Forward:
        """Run ``new_ids`` (n tokens) on top of ``kv``, which it extends; return what ``readout`` reads."""
        input_ids = torch.tensor([list(new_ids)], dtype=torch.long, device=self.device)  # [1, n]
        if self._decoder is not None:
            hidden = self._decoder(kv.cache, input_ids, positions, mask, self.skip)[0]  # [n, H]
        else:
            hidden = self._module.base_model(input_ids=input_ids, past_key_values=kv.cache, use_cache=True,
                                             position_ids=positions, attention_mask=mask).last_hidden_state[0]
        kv.token_ids.extend(new_ids)
        rows = len(new_ids) if readout.rows is None else readout.rows
        if rows == 0:
            return Forward(None, hidden)
        hidden = hidden[-rows:]
        if readout.on_demand:
            return Forward(LogitRows(lambda indices: self.logits(hidden[indices], readout), rows, HEAD_BLOCK_ROWS),
                           hidden)
        return Forward(self.logits(hidden, readout), hidden)

    def forward_batch(self, kvs: Sequence[KVCache], id_lists: Sequence[Sequence[int]],
                      readouts: Sequence[Readout]) -> list[Forward]:
        """:meth:`forward` of several requests' chains (each on its own cache, which it extends) in
        one forward where the runner has the native decoder — every product reads its weights once
        for all rows (``models/batch.py``) — else one forward a request. Requests that read the
        same top ``k`` share one head call (greedy chains block by block, as alone)."""
        if not (len(kvs) == len(id_lists) == len(readouts)):
            raise ValueError("forward_batch needs one cache, one id list and one readout per request")
        if len({id(kv) for kv in kvs}) != len(kvs):
            raise ValueError("forward_batch needs a distinct cache per request")
        decoder = self._decoder
        if decoder is None or len(kvs) == 1 or any(not ids for ids in id_lists):
            return [self.forward(kv, ids, readout) for kv, ids, readout in zip(kvs, id_lists, readouts)]
        input_ids = torch.tensor([[t for ids in id_lists for t in ids]], dtype=torch.long, device=self.device)
        hidden = batched_hidden(decoder, [kv.cache for kv in kvs], [len(ids) for ids in id_lists],
                                decoder.embed_tokens(input_ids), self.skip)  # [N, H]
        spans, offset = [], 0
        for kv, ids in zip(kvs, id_lists):
            kv.token_ids.extend(ids)
            spans.append((offset, offset + len(ids)))
            offset += len(ids)
        outs: list[Forward | None] = [None] * len(kvs)
        # requests that read the same top k (over the same vocabulary) share one head call
        groups: dict[tuple[int | None, bool], list[int]] = {}
        for index, ((start, end), readout) in enumerate(zip(spans, readouts)):
            rows = end - start if readout.rows is None else readout.rows
            if rows == 0:
                outs[index] = Forward(None, hidden[start:end])
            else:
                spans[index] = (end - rows, end)
                groups.setdefault((readout.top_k, readout.own_vocabulary), []).append(index)
        for (top_k, own_vocabulary), members in groups.items():
            rows = [hidden[spans[i][0]:spans[i][1]] for i in members]
            chains = [readouts[i].until_mismatch for i in members]
            if top_k == 1 and self._head is not None and all(c is not None for c in chains):
                for i, h, logits in zip(members, rows, greedy_chains(self._head, rows, chains)):
                    outs[i] = Forward(logits, h)
                continue
            logits = self.logits(torch.cat(rows), Readout(top_k=top_k, own_vocabulary=own_vocabulary))
            at = 0
            for i, h in zip(members, rows):
                outs[i] = Forward(logits[at:at + len(h)], h)
                at += len(h)
        return outs  # type: ignore[return-value]

    @property
    def vocabulary_ids(self) -> torch.Tensor | None:
        """Target ids of a reduced-vocabulary model's own logits (``Readout.own_vocabulary``); None
        where the model scores the whole vocabulary."""
        head = self._lm_head
        return head.target_ids if isinstance(head, MappedHead) else None

    def logits(self, hidden: torch.Tensor, readout: Readout = Readout()) -> torch.Tensor:
        """The LM head on final hidden states ``[n, H]``: logits ``[n, V]``, float32 or wider."""
        if readout.own_vocabulary and isinstance(self._lm_head, MappedHead):
            logits = self._lm_head.own(hidden)
            if self._softcap:
                logits = torch.tanh(logits / self._softcap) * self._softcap
            return logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self._head is not None:
            if readout.top_k:
                return self._head.top(hidden, readout.top_k, readout.until_mismatch)
            return self._head.full(hidden)
        logits = self._lm_head(hidden)
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def forward_tree(
        self,
        kv: KVCache,
        new_ids: Sequence[int],
        new_positions: Sequence[int],
        visible: torch.Tensor,  # [n, t + n] bool: new token i sees tree slot j (earlier tree tokens, then new)
        context_len: int,
        tree_positions: Sequence[int],
        readout: Readout = Readout(),
    ) -> Forward:
        """Append tree tokens to ``kv``, which holds ``context_len`` context tokens followed by the
        earlier tree tokens (at ``tree_positions``). Callers crop the tree tokens away, or keep one
        branch with :func:`~specdecode.models.tree.keep_path`, when they are done."""
        positions = torch.tensor(list(new_positions), dtype=torch.long, device=self.device)
        every_position = torch.tensor([*tree_positions, *new_positions], dtype=torch.long, device=self.device)
        mask = tree_attention_mask(self.model, context_len, every_position, visible.to(self.device), positions)
        return self.forward(kv, new_ids, readout, positions=positions[None], mask=mask)

    def verify(self, kv: KVCache, ids: Sequence[int], parents: Sequence[int] | None,
               readout: Readout = Readout()) -> Forward:
        """Candidates in one forward: a chain (``parents`` None), or a tree rooted at ``ids[0]`` where
        ``parents[i] < i + 1`` is the index in ``ids`` of the parent of ``ids[i + 1]`` (a tree
        computes every row: ``readout.until_mismatch`` applies to chains only)."""
        if parents is None:
            return self.forward(kv, ids, readout)
        start = len(kv)
        tree = [-1, *parents]
        positions = [start + d for d in depths(tree)]
        return self.forward_tree(kv, ids, positions, ancestors_visible(tree), start, [],
                                 replace(readout, until_mismatch=None))

    # -- per-model artifacts --------------------------------------------------------------------

    def sub_vocab_head(self, token_ids: tuple[int, ...], int8: bool) -> SubVocabHead:
        """A head scoring only ``token_ids`` (FR-Spec), built once and shared by the model's runners;
        the most recently used few are kept."""
        heads = self._shared.sub_vocab_heads
        key = (token_ids, int8)
        if key in heads:
            heads.move_to_end(key)
        else:
            heads[key] = SubVocabHead(self.model, torch.tensor(token_ids, dtype=torch.long, device=self.device), int8)
            while len(heads) > MAX_CACHED_HEADS:
                heads.popitem(last=False)
        return heads[key]

    def _int8_decoder(self) -> NativeDecoder:
        """The native decoder over int8 copies of every linear layer (the int8 self-draft)."""
        shared = self._shared
        if shared.int8_decoder is None:
            linears = {m: shared.int8_copies(m) for layer in decoder_layers(self.model)
                       for m in layer.modules() if isinstance(m, nn.Linear)}
            # attention as the target runs it: the draft shares (and extends) the target's cache
            shared.int8_decoder = NativeDecoder(shallow_replace(self.model, linears),
                                                int8_fused_projections(self.model), self.plan.decoder.attention_dtype,
                                                self.plan.decoder.chain_kernel)
        return shared.int8_decoder
