"""A feature-level draft head (EAGLE, Li et al. 2024): drafts from the target's own hidden states.

Input at position t: ``fc([h_t ; e(x_{t+1})])`` — the target's final (post-norm) hidden state at
t and the target's embedding of the token that followed — then ``depth`` decoder layers of the
target's own architecture (initialised from its last layers), the final norm (initialised from
the target's), and the target's frozen head rows over a reduced vocabulary. The output is both a
distribution for x_{t+2} and a predicted feature ĥ_{t+1}, which the next draft step reads in
place of the target's (not yet computed) h_{t+1}. Everything the target already understood
about the context arrives through h_t, which is why one layer suffices.

The head keeps its own KV cache (a :class:`KVCache`, so cut-back is an exact crop). The
embedding table and head rows are the target's: lent at pairing time (:func:`pair_head`), never
saved. A saved head records its target's fingerprint and refuses any other target.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from specdecode.errors import InvalidSettingError, ModelLoadError, VocabularyMismatchError
from specdecode.models.batch import batched_hidden
from specdecode.models.cache import KVCache
from specdecode.models.frequent_vocab import validate_token_ids
from specdecode.models.loading import LoadedModel
from specdecode.models.native import NativeDecoder

FORMAT = "specdecode-draft-head/1"
DEFAULT_HEAD = "default-head"  # the head shipped for the embedded default target (see drafts/)
WEIGHTS_FILE = "model.safetensors"


def _unused(key: str) -> bool:
    return "embed_tokens" in key or key.endswith(".wte.weight")


def shipped_head_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "drafts" / "gemma-3-270m-head"


def _layer_source(model: nn.Module) -> nn.ModuleList:
    base = model.base_model
    return base.layers if hasattr(base, "layers") else base.h


HEAD_WEIGHTS = ("float32", "fp16", "auto")  # what a frozen head's products read (DraftHead.freeze)


@dataclass(frozen=True)
class _HeadRuntime:
    """What a frozen head drafts with on a CPU: the native decoder over its layers (None where the
    family has none) and its input projection on the tuned product kernels, or all its products on
    float16 copies of the weights (``weights == "fp16"``)."""

    decoder: NativeDecoder | None
    fc: nn.Module
    dtype: torch.dtype  # what it was built for: a head moved or cast afterwards runs `transformers`' forward
    device: torch.device
    weights: str = "float32"


class DraftHead(nn.Module):
    """``depth`` target-architecture layers over fused (feature, next-token embedding) inputs."""

    def __init__(self, target_config, depth: int, vocab_ids: list[int], target_fingerprint: str,
                 target_vocab_size: int, tokenizer_sha: str | None = None) -> None:
        super().__init__()
        if depth < 1:
            raise ModelLoadError(f"draft head depth must be >= 1, got {depth}")
        validate_token_ids(torch.tensor(vocab_ids, dtype=torch.long), target_vocab_size, "draft head vocabulary")
        text = copy.deepcopy(target_config.get_text_config())
        hidden = int(getattr(text, "hidden_size", None) or text.n_embd)
        if getattr(text, "layer_types", None):
            text.layer_types = list(text.layer_types[-depth:])
        for key in ("num_hidden_layers", "n_layer"):
            if hasattr(text, key):
                setattr(text, key, depth)
        text.vocab_size = 1  # the layers' own embedding table is never used: inputs arrive as embeddings
        text.pad_token_id = None
        for key in ("attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if hasattr(text, key):
                setattr(text, key, 0.0)  # a draft must be deterministic, in training as at decoding time
        from transformers import AutoModel

        self.layers = AutoModel.from_config(text)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.depth, self.hidden_size = depth, hidden
        self.target_config = target_config
        self.target_fingerprint, self.target_vocab_size, self.tokenizer_sha = target_fingerprint, target_vocab_size, tokenizer_sha
        self.softcap = getattr(text, "final_logit_softcapping", None)
        self.register_buffer("vocab_ids", torch.tensor(vocab_ids, dtype=torch.long), persistent=False)
        object.__setattr__(self, "embedding", None)  # lent by the target (kept out of state_dict and .to())
        object.__setattr__(self, "rows", None)
        object.__setattr__(self, "runtime", None)  # the fast runtime of a frozen head (freeze())
        object.__setattr__(self, "runtimes", {})  # what freeze() built, by weights ("float32", "fp16")
        object.__setattr__(self, "weights_choice", "float32")
        object.__setattr__(self, "rows_product", None)  # the lent rows on a tuned kernel (frozen and paired)

    # -- building and pairing -------------------------------------------------------------------

    @classmethod
    def from_target(cls, target: LoadedModel, vocab_ids: list[int], depth: int = 1,
                    tokenizer_sha: str | None = None) -> DraftHead:
        """A fresh head: layers copied from the target's last ``depth``, fc reading the feature as is."""
        head = cls(target.config, depth, vocab_ids, target.fingerprint, target.vocab_size, tokenizer_sha)
        source = _layer_source(target.model)
        for mine, theirs in zip(_layer_source(head.layers), list(source)[-depth:]):
            mine.load_state_dict(theirs.state_dict())
        norm = getattr(head.layers, "norm", None) or getattr(head.layers, "ln_f", None)
        target_norm = getattr(target.model.base_model, "norm", None) or getattr(target.model.base_model, "ln_f", None)
        if norm is not None and target_norm is not None:
            norm.load_state_dict(target_norm.state_dict())
        with torch.no_grad():
            head.fc.weight.mul_(0.1)
            head.fc.weight[:, : head.hidden_size] += torch.eye(head.hidden_size)
        head.to(next(target.model.parameters()).dtype).eval()
        pair_head(target, head)
        return head

    def lend(self, embedding: nn.Module, rows: torch.Tensor) -> None:
        object.__setattr__(self, "embedding", embedding)
        object.__setattr__(self, "rows", rows)
        self._tune_rows()

    def _tune_rows(self) -> None:
        """A frozen, paired head scores its vocabulary on the kernel timed fastest per row count
        (MKL's ``x @ rowsᵀ`` costs ~4 ms for 2-16 rows of the 8k × 640 product on a Zen 4, ``rows @ xᵀ``
        ~1 ms, and MTAD's beams run 4 rows a level), or on float16 copies of the rows with a float16
        runtime; with ``freeze(weights="auto")`` the runtime is chosen here, once paired, by timing
        a draft step of each."""
        candidates = self.runtimes
        if self.weights_choice == "auto" and len(candidates) > 1 and self.rows is not None:
            timed = {name: self._step_ms(runtime) for name, runtime in candidates.items()}
            object.__setattr__(self, "runtime", candidates[min(timed, key=timed.get)])
        object.__setattr__(self, "rows_product", self._rows_product(self.runtime))

    def _rows_product(self, runtime: _HeadRuntime | None) -> nn.Module | None:
        from specdecode.models.kernels import Fp16WeightLinear, tuned_product

        if runtime is None or self.rows is None or (
                self.rows.dtype, self.rows.device) != (runtime.dtype, runtime.device):
            return None
        if runtime.weights == "fp16":
            return Fp16WeightLinear(self.rows, None)
        return tuned_product(self.rows) if self.rows.dtype in (torch.float32, torch.bfloat16) else None

    def _step_ms(self, runtime: _HeadRuntime, context: int = 32, repeats: int = 7) -> float:
        """Median ms of one chain step (a row through the head and its vocabulary) on ``runtime``."""
        object.__setattr__(self, "runtime", runtime)
        object.__setattr__(self, "rows_product", self._rows_product(runtime))
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(1, context + 1, self.hidden_size, generator=generator).to(self.fc.weight)
        ids = torch.randint(0, self.target_vocab_size, (1, context + 1), generator=generator).to(self.fc.weight.device)
        kv, times = KVCache(), []
        with torch.inference_mode():
            self(hidden[:, :context], ids[:, :context], kv)
            for _ in range(repeats + 2):
                start = time.perf_counter()
                self.logits(self(hidden[:, context:], ids[:, context:], kv)[0])
                times.append(time.perf_counter() - start)
                kv.crop(context)
        return statistics.median(times[2:]) * 1000

    # -- running --------------------------------------------------------------------------------

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.embedding is None:
            raise VocabularyMismatchError("this draft head reads its target's embedding and head rows: pair it with "
                                          "its target first (pair_head(target, head))")
        return self.embedding(token_ids).to(self.fc.weight.dtype)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Scores over the draft vocabulary (``vocab_ids`` order) for features ``[..., H]``."""
        product = self.rows_product
        if product is not None and not torch.is_grad_enabled() and features.dtype == self.rows.dtype:
            logits = product(features)
        else:
            logits = features @ self.rows.T
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def forward(self, hidden: torch.Tensor, token_ids: torch.Tensor, kv: KVCache | None = None,
                position_ids: torch.Tensor | None = None, attention_mask=None) -> torch.Tensor:
        """Predicted features ``[B, n, H]`` for inputs ``hidden [B, n, H]`` and ``token_ids [B, n]``.

        With ``kv`` (batch 1) the entries are appended to it (the caller keeps ``kv.token_ids``).
        A frozen head (:meth:`freeze`) drafts on the fast runtime, as the target runs.
        """
        plan = self._fast_plan() if kv is not None else None
        fused = self._fused_input(self.fc if plan is None else plan.fc, hidden, token_ids)
        if plan is not None and plan.decoder is not None:
            out = plan.decoder(kv.cache, None, position_ids, attention_mask, inputs_embeds=fused)
        else:
            out = self.layers(inputs_embeds=fused, past_key_values=None if kv is None else kv.cache,
                              use_cache=kv is not None, position_ids=position_ids,
                              attention_mask=attention_mask).last_hidden_state
        if kv is not None:
            kv.token_ids.extend(token_ids[0].tolist())
        return out

    def forward_batch(self, hidden: torch.Tensor, token_ids: torch.Tensor, kvs: Sequence[KVCache],
                      lengths: Sequence[int]) -> torch.Tensor:
        """:meth:`forward` of several requests' rows in one pass: ``hidden [N, H]`` and ``token_ids
        [N]`` hold request ``r``'s ``lengths[r]`` rows in order, each after its own cache (which it
        extends). On the fast runtime every product reads its weights once for all requests
        (``models/batch.py``); elsewhere it is one forward a request. Predicted features ``[N, H]``."""
        plan = self._fast_plan()
        if plan is None or plan.decoder is None:
            out, at = [], 0
            for kv, n in zip(kvs, lengths):
                out.append(self(hidden[None, at:at + n], token_ids[None, at:at + n], kv)[0])
                at += n
            return torch.cat(out)
        fused = self._fused_input(plan.fc, hidden, token_ids)
        out = batched_hidden(plan.decoder, [kv.cache for kv in kvs], lengths, fused[None])
        at = 0
        for kv, n in zip(kvs, lengths):
            kv.token_ids.extend(token_ids[at:at + n].tolist())
            at += n
        return out

    def _fused_input(self, fc: nn.Module, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """The layers' input ``fc([h ; e(x)])``, by ``fc`` (the head's own, or its runtime's)."""
        return fc(torch.cat([hidden.to(self.fc.weight.dtype), self.embed(token_ids)], dim=-1))

    def _fast_plan(self) -> _HeadRuntime | None:
        """The fast runtime where it applies now: frozen, not training, not moved or cast since."""
        plan = self.runtime
        if plan is None or torch.is_grad_enabled() or (plan.dtype, plan.device) != (
                self.fc.weight.dtype, self.fc.weight.device):
            return None
        return plan

    def freeze(self, weights: str = "float32") -> DraftHead:
        """Mark the head's weights final: on a CPU its drafting then runs on the fast runtime (the
        native decoder and tuned products of ``models/runtime.py``, built here over the same
        weights); a head still being trained keeps `transformers`' forward.

        ``weights`` (a float32 head on a CPU with fbgemm): ``"float32"`` computes with the weights
        as they are; ``"fp16"`` runs every product on float16 copies (float32 activations and
        sums: a draft need not be exact, only consistent — its distributions are what the
        acceptance rules read — and a head step is bound by its products); ``"auto"`` keeps
        whichever drafts a step faster here, timed once the head is paired with its target."""
        from specdecode.models.kernels import Fp16WeightLinear, fbgemm_fp16_available, tuned_linear
        from specdecode.models.runtime import build_runtime

        if weights not in HEAD_WEIGHTS:
            raise InvalidSettingError(f"head weights must be one of {', '.join(HEAD_WEIGHTS)}, got {weights!r}")
        dtype, device = self.fc.weight.dtype, self.fc.weight.device
        runtimes: dict[str, _HeadRuntime] = {}
        plan = build_runtime(self.layers) if device.type == "cpu" else None
        if plan is not None:
            runtimes["float32"] = _HeadRuntime(plan.decoder, tuned_linear(self.fc, plan.kernels), dtype, device)
            if weights != "float32" and dtype == torch.float32 and fbgemm_fp16_available():
                half = build_runtime(self.layers, quantize="fp16")
                runtimes["fp16"] = _HeadRuntime(half.decoder, Fp16WeightLinear(self.fc.weight, None), dtype, device,
                                                "fp16")
        object.__setattr__(self, "runtimes", runtimes)
        object.__setattr__(self, "weights_choice", weights)
        object.__setattr__(self, "runtime", runtimes.get(weights, runtimes.get("float32")))
        self._tune_rows()
        return self

    # -- files ----------------------------------------------------------------------------------

    def weights(self) -> dict[str, torch.Tensor]:
        """The trained parameters: all but the layers' own (unused, one-row) token embedding."""
        return {k: v for k, v in self.state_dict().items() if not _unused(k)}

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        """Weights in bf16 (the lent rows and embedding are not among them), config and vocabulary."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in self.weights().items()},
                  str(out / WEIGHTS_FILE))
        config = {"format": FORMAT, "depth": self.depth, "target_fingerprint": self.target_fingerprint,
                  "target_vocab_size": self.target_vocab_size, "tokenizer_sha": self.tokenizer_sha,
                  "target_config": self.target_config.to_dict(), "vocab_ids": self.vocab_ids.tolist(),
                  **(extra or {})}
        (out / "config.json").write_text(json.dumps(config))
        return out


def load_head(spec: str | Path, weights: str = "auto") -> DraftHead:
    """A saved head directory (``"default-head"``: the one shipped for the embedded default), frozen
    with ``weights`` (:meth:`DraftHead.freeze`)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    directory = shipped_head_dir() if str(spec) == DEFAULT_HEAD else Path(spec).expanduser()
    try:
        config = json.loads((directory / "config.json").read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"format {config.get('format')!r}, expected {FORMAT!r}")
        target_config = AutoConfig.for_model(**config["target_config"])
        head = DraftHead(target_config, int(config["depth"]), config["vocab_ids"], config["target_fingerprint"],
                         int(config["target_vocab_size"]), config.get("tokenizer_sha"))
        missing, unexpected = head.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot load draft head {str(spec)!r}: {str(exc).splitlines()[0][:160]}") from None
    if unexpected or any(not _unused(k) for k in missing):
        raise ModelLoadError(f"draft head {str(spec)!r} does not match its config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    return head.to(torch.float32).eval().freeze(weights)


def pair_head(target: LoadedModel, head: DraftHead) -> None:
    """Refuse a head trained for another target; lend it the target's embedding and head rows."""
    if head.target_fingerprint != target.fingerprint:
        raise VocabularyMismatchError(
            f"draft head was trained for target {head.target_fingerprint}, not {target.name!r} "
            f"({target.fingerprint}): a head reads one target's hidden states and no other's")
    embedding = target.model.get_input_embeddings()
    if embedding.weight.shape[1] != head.hidden_size or head.target_vocab_size != target.vocab_size:
        raise VocabularyMismatchError(f"draft head does not fit target {target.name!r} (hidden or vocabulary size)")
    weight = target.model.get_output_embeddings().weight
    if head.rows is None or head.rows.shape[0] != head.vocab_ids.numel() or head.embedding is not embedding:
        head.lend(embedding, weight.detach()[head.vocab_ids.to(weight.device)].to(head.fc.weight.dtype))
