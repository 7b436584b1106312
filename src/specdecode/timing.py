"""Timing, one rule for every measurement: ``warmup`` untimed calls first (they fill caches and
pick kernels), then a statistic of ``repeats`` timed calls — the median for a typical cost, the
minimum for a floor. A CUDA device's queued work is finished before the clock is read.

The benchmark's per-run wall clock (:func:`clock`) and the cost measurements of the searches, the
distillation reports and the scripts all read time here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def clock(device: torch.device | None = None) -> float:
    """Seconds, after ``device`` (when it is a CUDA device) has finished its queued work."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def time_call(
    step: Callable[[], Any],
    repeats: int,
    warmup: int = 1,
    statistic: Callable[[list[float]], float] = statistics.median,
    after: Callable[[], Any] | None = None,
    device: torch.device | None = None,
) -> float:
    """Seconds one call of ``step`` takes: ``statistic`` of ``repeats`` timed calls after ``warmup``
    untimed ones. ``after`` runs after every call, outside the timing (e.g. cut a KV cache back so
    that every call sees the same context)."""
    samples = []
    for _ in range(warmup + repeats):
        start = clock(device)
        step()
        samples.append(clock(device) - start)
        if after is not None:
            after()
    return statistic(samples[warmup:])
