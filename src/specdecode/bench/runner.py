"""The benchmark loop: every contender on every prompt, interleaved, after a warm-up.

For each prompt, all contenders run back to back (their order rotated from prompt to prompt), so
that machine drift — other processes, thermal throttling — hits every method alike, and a
method's speedup is always measured against ``ar`` on the same prompt within seconds.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from specdecode.bench.contenders import EAGER_SUFFIX, Contender, ContenderSpec, OurMethod, parse_spec
from specdecode.bench.dataset import DEFAULT_TEMPLATE, BenchPrompt, check_template, format_prompt
from specdecode.bench.metrics import EnergyMeter, first_mismatch, generated_nll
from specdecode.bench.record import Record
from specdecode.bench.llamacpp import LLAMACPP_PEERS, LlamaCppPeer
from specdecode.bench.peers import HFPeer, peer_names
from specdecode.errors import InvalidSettingError, PromptError
from specdecode.methods import method_names
from specdecode.models.loading import LoadedModel, pair_draft
from specdecode.models.machine import cpu_description
from specdecode.sampling import GenerationSettings, SamplingSettings

BASELINE = "ar"
WARMUP_TOKENS = 16


@dataclass(frozen=True)
class BenchConfig:
    """Generation settings shared by every contender, and how often to run each."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    repeats: int = 1
    warmup: int = 1
    prompt_template: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise InvalidSettingError(f"repeats must be >= 1, got {self.repeats}")
        if self.warmup < 0:
            raise InvalidSettingError(f"warmup must be >= 0, got {self.warmup}")
        check_template(self.prompt_template)
        self.settings(0)  # validates max_new_tokens and sampling

    @property
    def sampling(self) -> SamplingSettings:
        return SamplingSettings(self.temperature, self.top_k, self.top_p)

    def settings(self, prompt_index: int, max_new_tokens: int | None = None) -> GenerationSettings:
        """Every run produces exactly ``max_new_tokens`` tokens (EOS does not stop it), so all
        contenders do the same amount of work; sampling seeds differ per prompt, not per method."""
        return GenerationSettings(
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            sampling=self.sampling,
            seed=self.seed + prompt_index,
            stop_at_eos=False,
        )


@dataclass(frozen=True)
class ContenderInfo:
    label: str
    peer: bool
    lossless: bool


@dataclass
class BenchResult:
    config: BenchConfig
    contenders: list[ContenderInfo]
    records: list[Record]
    meta: dict[str, Any] = field(default_factory=dict)

    def of(self, label: str) -> list[Record]:
        return [r for r in self.records if r.label == label]

    @property
    def greedy(self) -> bool:
        return self.config.sampling.greedy

    @property
    def exact(self) -> bool:
        """float32/float64 weights and kernels: lossless methods must equal ar token for token. In
        reduced precision a k-token forward rounds differently from a 1-token one, so they may part."""
        return bool(self.meta.get("exact", True))

    @property
    def float32_reference(self) -> str | None:
        """The contender that ran the float32 model (``ar@eager``) in a reduced-precision run."""
        label = BASELINE + EAGER_SUFFIX
        return label if not self.exact and any(c.label == label for c in self.contenders) else None

    def mismatches(self) -> dict[str, list[Record]]:
        """Lossless contenders whose greedy output differs from ar in an exact (float32/64) run:
        always a bug (or a numerical tie). Reduced-precision divergence is reported, not flagged."""
        if not self.exact:
            return {}
        lossless = {c.label for c in self.contenders if c.lossless}
        found: dict[str, list[Record]] = {}
        for record in self.records:
            if record.label in lossless and record.identical is False:
                found.setdefault(record.label, []).append(record)
        return found


def build_contenders(
    target: LoadedModel,
    draft: LoadedModel | None,
    methods: list[ContenderSpec | str],
    peers: list[ContenderSpec | str],
    sampling: SamplingSettings,
) -> list[Contender]:
    """Our methods (``ar`` first, added when missing) then the peers; every spec is checked here,
    before anything runs."""
    specs = [parse_spec(m) if isinstance(m, str) else m for m in methods]
    peer_specs = [parse_spec(p) if isinstance(p, str) else p for p in peers]
    if not any(s.label == BASELINE for s in specs):
        specs.insert(0, ContenderSpec(BASELINE))
    labels = [s.label for s in specs + peer_specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise InvalidSettingError(f"method(s) listed twice: {', '.join(duplicates)}")
    for spec in specs:
        if spec.name in peer_names():
            raise InvalidSettingError(f"{spec.name!r} is a transformers peer, not one of our methods: pass it as a peer")
    for spec in peer_specs:
        if spec.name in method_names():
            raise InvalidSettingError(f"{spec.name!r} is one of our methods, not a transformers peer: pass it as a method")
    contenders: list[Contender] = [OurMethod(s, target, draft, sampling) for s in specs]
    contenders += [LlamaCppPeer(s, target) if s.name in LLAMACPP_PEERS else HFPeer(s, target, draft, sampling)
                   for s in peer_specs]
    return contenders


def encode_prompts(target: LoadedModel, prompts: list[BenchPrompt], config: BenchConfig) -> list[list[int]]:
    """The token ids every contender gets for each prompt."""
    if not prompts:
        raise PromptError("no prompts to benchmark")
    if target.tokenizer is None:
        raise PromptError(f"model {target.name!r} has no tokenizer: the benchmark needs one to encode its prompts")
    encoded = []
    for prompt in prompts:
        ids = list(target.tokenizer(format_prompt(prompt, config.prompt_template))["input_ids"])
        if len(ids) + config.max_new_tokens > target.max_context:
            raise PromptError(
                f"question {prompt.question_id!r}: {len(ids)} prompt tokens + max_new_tokens "
                f"{config.max_new_tokens} exceed the model's context of {target.max_context}"
            )
        encoded.append(ids)
    return encoded


def run_bench(
    target: LoadedModel,
    prompts: list[BenchPrompt],
    methods: Sequence[ContenderSpec | str],
    peers: Sequence[ContenderSpec | str] = (),
    draft: LoadedModel | None = None,
    config: BenchConfig | None = None,
    progress: bool = True,
) -> BenchResult:
    """Run every contender on every prompt and return the measurements (nothing is written)."""
    config = config or BenchConfig()
    if draft is not None:
        pair_draft(target, draft)
    contenders = build_contenders(target, draft, list(methods), list(peers), config.sampling)
    encoded = encode_prompts(target, prompts, config)
    meter = EnergyMeter(target.device)

    # untimed: first calls pay for lazy initialisation (allocator, thread pools, kernels)
    warm = config.settings(0, min(WARMUP_TOKENS, config.max_new_tokens))
    for contender in tqdm(contenders * config.warmup, desc="warm-up", disable=not progress, file=sys.stderr,
                          leave=False):
        contender.run(encoded[0], warm)

    records: dict[tuple[int, str], Record] = {}
    total = len(prompts) * config.repeats * len(contenders)
    with tqdm(total=total, desc="bench", unit="run", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for index, (prompt, ids) in enumerate(zip(prompts, encoded)):
            settings = config.settings(index)
            shift = index % len(contenders)
            order = contenders[shift:] + contenders[:shift]
            for _ in range(config.repeats):
                for contender in order:
                    bar.set_postfix_str(f"{prompt.category} #{prompt.question_id} {contender.label}")
                    before = meter.read_j()
                    outcome = contender.run(ids, settings)
                    after = meter.read_j()
                    key = (index, contender.label)
                    if key not in records:
                        records[key] = Record(prompt, contender.label, len(ids), outcome.token_ids, [],
                                              outcome.stats, outcome.draft_timed,
                                              [] if before is not None else None)
                    records[key].seconds.append(outcome.seconds)
                    if before is not None and after is not None:
                        records[key].energies_j.append(after - before)  # type: ignore[union-attr]
                    bar.update()

    ordered = [records[(i, c.label)] for i in range(len(prompts)) for c in contenders]
    for record in ordered:
        record.text = target.tokenizer.decode(record.token_ids, skip_special_tokens=True)
    if config.sampling.greedy:
        for i in range(len(prompts)):
            reference = records[(i, BASELINE)].token_ids
            for contender in contenders:
                record = records[(i, contender.label)]
                record.mismatch_at = first_mismatch(record.token_ids, reference)
                record.identical = record.mismatch_at is None
    else:
        pairs = [(records[(i, c.label)], encoded[i]) for i in range(len(prompts)) for c in contenders]
        reference = target.eager()  # perplexity under the float32 target, whatever ran
        for record, ids in tqdm(pairs, desc="perplexity", disable=not progress, file=sys.stderr, leave=False):
            record.nll = generated_nll(reference, ids, record.token_ids)

    result = BenchResult(
        config=config,
        contenders=[ContenderInfo(c.label, c.peer, c.lossless) for c in contenders],
        records=ordered,
        meta=environment(target, draft, meter),
    )
    reference = result.float32_reference
    if reference is not None and config.sampling.greedy:
        for i in range(len(prompts)):
            for contender in contenders:
                record = records[(i, contender.label)]
                record.float32_mismatch_at = first_mismatch(record.token_ids, records[(i, reference)].token_ids)
    return result


def environment(target: LoadedModel, draft: LoadedModel | None, meter: EnergyMeter) -> dict[str, Any]:
    import transformers

    dtype = next(target.model.parameters()).dtype
    return {
        "model": target.name,
        "model_fingerprint": target.fingerprint,
        "exact": dtype in (torch.float32, torch.float64) and target.quantize is None,
        "quantize": target.quantize,
        "runtime": target.runtime.describe() if target.runtime is not None else "eager (transformers kernels)",
        **cpu_description(),
        "draft": None if draft is None else " ".join(
            [draft.name] + ([f"({draft.quantize} weights)"] if draft.quantize else [])
            + ([f"[{draft.runtime.chosen_by}]"] if draft.runtime is not None and draft.runtime.chosen_by else [])),
        "device": str(target.device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "energy": meter.unavailable or "NVML total energy counter",
    }
