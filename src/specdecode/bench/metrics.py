"""Benchmark metrics: per-prompt measurements and their aggregation per method × column.

Definitions (also in docs/benchmarking.md):

* **tokens/s** = Σ new tokens / Σ wall-clock seconds (per prompt: median over repeats).
* **speedup** = tokens/s of the method / tokens/s of our ``ar`` on the same prompts, same run.
* **τ** = Σ new tokens / Σ target forwards that emit tokens (1.0 for autoregressive decoding).
* **acceptance rate** = Σ accepted draft tokens / Σ proposed draft tokens.
* **draft cost** = Σ drafting time / Σ verification time: what drafting costs per step, in units
  of one target (verification) forward.
* **identical** = prompts whose greedy output equals ``ar``'s token for token.
* **perplexity** = exp(mean NLL) of the generated tokens under the target's raw distribution
  (temperature 1, no top-k / top-p), token-weighted over the prompts.
* **energy / token** = GPU energy (NVML counter delta) / new tokens; not measured on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specdecode.bench.record import Record
from specdecode.engine.stats import DRAFT_COST_KEYS
from specdecode.models.runner import Readout
from specdecode.models.loading import LoadedModel


def first_mismatch(tokens: list[int], reference: list[int]) -> int | None:
    """Index of the first position where ``tokens`` differs from ``reference`` (None: identical)."""
    for index, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return index
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def generated_nll(target: LoadedModel, prompt_ids: list[int], generated: list[int]) -> float:
    """Summed negative log-likelihood of ``generated`` after ``prompt_ids`` under the raw target."""
    if not generated:
        return 0.0
    with torch.inference_mode():
        # the last prompt token's logits predict the first generated token; the last token predicts nothing
        runner = target.runner
        logits = runner.forward(runner.new_cache(), [*prompt_ids, *generated[:-1]], Readout(rows=len(generated))).logits
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        picked = log_probs[torch.arange(len(generated)), torch.tensor(generated, device=log_probs.device)]
    return float(-picked.sum())


class EnergyMeter:
    """Cumulative energy: NVML on an NVIDIA GPU; on a CPU, the RAPL package counters the kernel
    exposes under ``/sys/class/powercap`` (Intel, and AMD Zen on recent kernels). Where neither
    exists it measures nothing and says why."""

    def __init__(self, device: torch.device, powercap: Path = Path("/sys/class/powercap")) -> None:
        self.handle: Any = None
        self.unavailable: str | None = None
        self.packages: list[Path] = []  # RAPL package zones (their energy_uj counters)
        if device.type == "cpu":
            self.packages = sorted(zone for zone in powercap.glob("*-rapl:*") if zone.name.count(":") == 1
                                   and (zone / "energy_uj").is_file())
            first = self._read_packages_j() if self.packages else None
            if first is None:
                self.packages = []
                self.unavailable = (f"not measured: cpu run on a machine that exposes no readable RAPL / powercap "
                                    f"energy counter ({powercap})")
            self._last, self._total = first or [], 0.0
            return
        if device.type != "cuda":
            self.unavailable = f"not measured: {device.type} run (energy needs NVML on an NVIDIA GPU or RAPL on a CPU)"
            return
        try:
            import pynvml
        except ImportError:
            self.unavailable = "not measured: NVML bindings missing (pip install 'specdecode[gpu]')"
            return
        try:
            pynvml.nvmlInit()
            # NVML numbers GPUs physically; this matches CUDA's numbering unless CUDA_VISIBLE_DEVICES remaps it
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except pynvml.NVMLError as exc:
            self.handle, self.unavailable = None, f"not measured: NVML error ({exc})"

    def _read_packages_j(self) -> list[float] | None:
        try:
            return [int((zone / "energy_uj").read_text()) / 1e6 for zone in self.packages]
        except (OSError, ValueError):  # unreadable without privileges on some kernels
            return None

    def read_j(self) -> float | None:
        """Joules consumed (GPU: since the driver loaded; CPU packages: since the meter was made,
        counter wrap-arounds included); None when not measurable."""
        if self.packages:
            now = self._read_packages_j()
            if now is None:
                return None
            for i, (zone, value) in enumerate(zip(self.packages, now)):
                delta = value - self._last[i]
                if delta < 0:  # the counter wrapped at max_energy_range_uj
                    delta += int((zone / "max_energy_range_uj").read_text()) / 1e6
                self._total += delta
                self._last[i] = value
            return self._total
        if self.handle is None:
            return None
        import pynvml

        return pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0


@dataclass(frozen=True)
class Aggregate:
    """One method over a set of prompts (a category or all of them)."""

    prompts: int
    new_tokens: int
    seconds: float
    tokens_per_second: float
    speedup: float | None
    tau: float
    acceptance_rate: float | None
    draft_cost: float | None
    round_ms: dict[str, float] | None  # per verification round: draft (and its parts), verify, accept, ms
    zero_draft_speedup: float | None  # the ceiling: speedup over ar were drafting free (τ against verification)
    identical: int | None  # prompts identical to ar (greedy runs), of ``prompts``
    perplexity: float | None
    energy_per_token_j: float | None


def _throughput(records: list[Record]) -> float:
    seconds = sum(r.time for r in records)
    return sum(r.stats.new_tokens for r in records) / seconds if seconds > 0 else 0.0


def round_costs(records: list[Record]) -> dict[str, float]:
    """Milliseconds per verification round: drafting (and the parts its drafter recorded,
    ``DRAFT_COST_KEYS``), the verification forward, the acceptance rule with tree compaction."""
    rounds = sum(r.stats.target_forwards for r in records)
    if not rounds:
        return {}
    costs = {"draft": sum(r.stats.draft_s for r in records)}
    for key in DRAFT_COST_KEYS:
        if any(key in r.stats.extra for r in records):
            costs[key.removeprefix("draft_").removesuffix("_s")] = sum(r.stats.extra.get(key, 0.0) for r in records)
    costs["verify"] = sum(r.stats.verify_s for r in records)
    costs["accept"] = sum(r.stats.accept_s for r in records)
    return {part: seconds * 1000 / rounds for part, seconds in costs.items()}


def aggregate(records: list[Record], baseline: list[Record]) -> Aggregate:
    """Aggregate ``records`` of one method; ``baseline`` holds ar's records for the same prompts."""
    new_tokens = sum(r.stats.new_tokens for r in records)
    forwards = sum(r.stats.target_forwards for r in records)
    proposed = sum(r.stats.proposed_tokens for r in records)
    accepted = sum(r.stats.accepted_tokens for r in records)
    verify_s = sum(r.stats.verify_s for r in records)
    tps, base_tps = _throughput(records), _throughput(baseline)
    draft_cost = round_ms = zero_draft_speedup = None
    if proposed and verify_s > 0 and all(r.draft_timed for r in records):
        draft_s = sum(r.stats.draft_s for r in records)
        draft_cost = draft_s / verify_s
        round_ms = round_costs(records)
        undrafted = sum(r.time for r in records) - draft_s
        if undrafted > 0 and base_tps > 0:
            zero_draft_speedup = new_tokens / undrafted / base_tps
    compared = [r.identical for r in records]
    scored = [r.nll for r in records]
    energy = [r.energy_j for r in records]
    return Aggregate(
        prompts=len(records),
        new_tokens=new_tokens,
        seconds=sum(r.time for r in records),
        tokens_per_second=tps,
        speedup=tps / base_tps if base_tps > 0 else None,
        tau=new_tokens / forwards if forwards else 0.0,
        acceptance_rate=accepted / proposed if proposed else None,
        draft_cost=draft_cost,
        round_ms=round_ms,
        zero_draft_speedup=zero_draft_speedup,
        identical=sum(bool(c) for c in compared) if None not in compared else None,
        perplexity=math.exp(sum(scored) / new_tokens) if None not in scored and new_tokens else None,
        energy_per_token_j=sum(energy) / new_tokens if None not in energy and new_tokens else None,
    )
