"""``specdecode bench --concurrency 1,4,16``: aggregate throughput of batched decoding (issue 28).

The prompts are served in waves of ``c`` requests decoded together (``BatchStepper``: every step
verifies all requests' drafts in one target forward), and the aggregate rate is every new token
over the wall time of all waves; the decoding rate leaves out each wave's prefill (long prompts'
prefills otherwise pull every method's ratio toward 1: about half the wall time on the dev
prompts at c = 4). Each method is measured at each concurrency in the same run, wave by wave
(every method's wave back to back, the order rotating), after a warm-up at the largest one.
Greedy runs check that every request's tokens equal the same method's at concurrency 1 (batched
decoding is lossless per request in float32/float64); reduced precision reports how many differ
instead.

`transformers`' assisted generation refuses batches, so only our methods run here.
"""

from __future__ import annotations

import sys
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from specdecode.bench.contenders import OurMethod, parse_spec
from specdecode.bench.dataset import BenchPrompt
from specdecode.bench.metrics import EnergyMeter
from specdecode.bench.runner import BASELINE, WARMUP_TOKENS, BenchConfig, build_contenders, encode_prompts, environment
from specdecode.engine.batch import BatchMemory, BatchStepper
from specdecode.errors import InvalidSettingError
from specdecode.models.loading import LoadedModel, pair_draft
from specdecode.timing import clock


@dataclass
class ThroughputRow:
    method: str
    concurrency: int
    requests: int
    new_tokens: int
    seconds: float
    prefill_seconds: float  # of ``seconds``: prefilling each wave's prompts, before its first step
    target_forwards: int  # batched verification steps
    differing_from_solo: int | None = None  # greedy: requests whose tokens differ from concurrency 1

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def decoding_tokens_per_s(self) -> float:
        decoding = self.seconds - self.prefill_seconds
        return self.new_tokens / decoding if decoding > 0 else 0.0


def parse_concurrency(text: str) -> tuple[int, ...]:
    """``"1,4,16"`` → (1, 4, 16), each ≥ 1, 1 first (the solo reference)."""
    try:
        levels = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise InvalidSettingError(f"--concurrency takes comma-separated integers like 1,4,16, not {text!r}") from None
    if not levels or levels[0] < 1:
        raise InvalidSettingError(f"--concurrency levels must be >= 1, got {text!r}")
    return tuple(sorted({1, *levels}))


def run_throughput(
    target: LoadedModel,
    prompts: list[BenchPrompt],
    methods: Sequence[str],
    concurrency: Sequence[int],
    draft: LoadedModel | None = None,
    config: BenchConfig | None = None,
    adaptive_drafts: bool = False,
    progress: bool = True,
) -> tuple[list[ThroughputRow], dict]:
    """Every method at every concurrency on ``prompts``; returns the rows and the environment."""
    config = config or BenchConfig()
    if draft is not None:
        pair_draft(target, draft)
    contenders = build_contenders(target, draft, [parse_spec(m) for m in methods], [], config.sampling)
    encoded = encode_prompts(target, prompts, config)
    widest = max(concurrency)
    memories = {contender.label: BatchMemory() for contender in contenders}  # learnt across waves, as a server does

    def serve_wave(contender: OurMethod, wave: int, max_new_tokens: int, c: int) -> tuple[list, float, float, int]:
        """Requests ``wave .. wave + c`` decoded together: results, seconds, of which prefill, steps."""
        start = clock(target.device)
        settings = config.settings(wave, max_new_tokens)
        generations = [contender.start(p, settings) for p in encoded[wave:wave + c]]
        stepper = BatchStepper(generations, adaptive_drafts=adaptive_drafts, memory=memories[contender.label])
        stepper.prefill_pending()  # the wave's prompts, together (the first step would do it)
        prefill = clock(target.device) - start
        forwards = 0
        while stepper.active:
            stepper.step()
            forwards += 1
        if stepper.failed:
            raise next(iter(stepper.failed.values()))
        return [g.result() for g in generations], clock(target.device) - start, prefill, forwards

    for contender in contenders:  # untimed: lazy initialisation and kernel planning at every row count
        serve_wave(contender, 0, min(WARMUP_TOKENS, config.max_new_tokens), widest)

    rows: list[ThroughputRow] = []
    solo: dict[str, list[list[int]]] = {}
    with tqdm(total=len(concurrency) * len(contenders), desc="throughput", disable=not progress,
              file=sys.stderr) as bar:
        for level, c in enumerate(concurrency):
            results = {contender.label: [] for contender in contenders}
            totals = {contender.label: [0.0, 0.0, 0] for contender in contenders}  # seconds, prefill, steps
            for index, wave in enumerate(range(0, len(encoded), c)):
                # every method's wave back to back, the order rotating: a drift of the machine (its
                # bandwidth moved 1.6x within minutes on a shared host) hits every method alike
                shift = (level + index) % len(contenders)
                for contender in contenders[shift:] + contenders[:shift]:
                    done, seconds, prefill, forwards = serve_wave(contender, wave, config.max_new_tokens, c)
                    results[contender.label] += done
                    total = totals[contender.label]
                    total[0], total[1], total[2] = total[0] + seconds, total[1] + prefill, total[2] + forwards
            for contender in contenders:
                tokens = [r.token_ids for r in results[contender.label]]
                if c == 1:
                    solo[contender.label] = tokens
                differing = (sum(a != b for a, b in zip(tokens, solo[contender.label]))
                             if config.sampling.greedy else None)
                seconds, prefill, forwards = totals[contender.label]
                rows.append(ThroughputRow(contender.label, c, len(tokens), sum(map(len, tokens)), seconds,
                                          prefill, int(forwards), differing))
                bar.update()
    meta = environment(target, draft, EnergyMeter(target.device))
    meta["adaptive_drafts"] = adaptive_drafts
    return rows, meta


def render_throughput(rows: list[ThroughputRow], meta: dict, config: BenchConfig, prompts: int) -> str:
    levels = sorted({r.concurrency for r in rows})
    methods = list(dict.fromkeys(r.method for r in rows))
    rate = {(r.method, r.concurrency): r.tokens_per_s for r in rows}
    decoding = {(r.method, r.concurrency): r.decoding_tokens_per_s for r in rows}
    exact = meta.get("exact", False)
    sampling = "greedy" if config.sampling.greedy else (
        f"sampling (temperature {config.temperature}, top-k {config.top_k}, top-p {config.top_p})")
    lines = [
        "# specdecode bench --concurrency — aggregate throughput of batched decoding", "",
        f"{sampling} · {config.max_new_tokens} new tokens per request (EOS ignored) · {prompts} prompts served "
        f"in waves of c concurrent requests · adaptive drafts: {'on' if meta.get('adaptive_drafts') else 'off'}", "",
        f"{meta['cpu']} ({', '.join(meta['features'])}) · runtime: {meta['runtime']}", "",
        f"{meta['device']} · {meta['dtype']} · torch threads {meta['threads']} · torch {meta['torch']}", "",
        "## Aggregate tokens/s (× the same method at c = 1)", "",
        "| method | " + " | ".join(f"c = {c}" for c in levels) + " |",
        "|---|" + "---:|" * len(levels),
    ]
    for method in methods:
        cells = [f"{rate[(method, c)]:.1f} ({rate[(method, c)] / rate[(method, 1)]:.2f}×)" for c in levels]
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    lines += ["", f"## Speedup over `{BASELINE}` at the same concurrency", "",
              "| method | " + " | ".join(f"c = {c}" for c in levels) + " |", "|---|" + "---:|" * len(levels)]
    for method in methods:
        lines.append(f"| `{method}` | " + " | ".join(f"{rate[(method, c)] / rate[(BASELINE, c)]:.2f}×"
                                                      for c in levels) + " |")
    lines += ["", "## Decoding only: tokens/s with each wave's prefill left out (× `"
              f"{BASELINE}` at the same concurrency)", "",
              "| method | " + " | ".join(f"c = {c}" for c in levels) + " |", "|---|" + "---:|" * len(levels)]
    for method in methods:
        lines.append(f"| `{method}` | " + " | ".join(
            f"{decoding[(method, c)]:.1f} ({decoding[(method, c)] / decoding[(BASELINE, c)]:.2f}×)" for c in levels) + " |")
    if config.sampling.greedy:
        word = "must be 0: in float32/float64 batched decoding is lossless per request" if exact else (
            "reduced precision: a batched forward rounds differently from a solo one")
        lines += ["", f"## Requests whose greedy tokens differ from the same method at c = 1 ({word})", "",
                  "| method | " + " | ".join(f"c = {c}" for c in levels) + " |", "|---|" + "---:|" * len(levels)]
        for method in methods:
            cells = [str(next(r.differing_from_solo for r in rows if r.method == method and r.concurrency == c))
                     for c in levels]
            lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_throughput(rows: list[ThroughputRow], meta: dict, config: BenchConfig, prompts: int, out: str | Path,
                     command: str) -> list[Path]:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "table.md"
    table.write_text(render_throughput(rows, meta, config, prompts))
    summary = folder / "summary.json"
    summary.write_text(json.dumps({"meta": meta, "config": asdict(config),
                                   "rows": [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in rows]}, indent=1))
    (folder / "COMMAND.txt").write_text(command + "\n")
    return [table, summary, folder / "COMMAND.txt"]


def lossless_failures(rows: list[ThroughputRow], meta: dict) -> list[str]:
    """Methods whose batched greedy tokens differ from their solo ones in an exact (float32/64) run."""
    if not meta.get("exact"):
        return []
    return sorted({r.method for r in rows if r.differing_from_solo})

