"""Stage 1 of a bundle build, data collection: the target's greedy answers to a domain's build
prompts (vocabulary text and the search's ground truth), checkpointed, and the calibration
subsets the searches replay."""

from __future__ import annotations

from collections.abc import Sequence

from specdecode.models.loading import LoadedModel
from specdecode.routing.progress import BuildLog, Checkpoints, digest
from specdecode.search.calibration import CalibrationSet, calibrate


def calibrate_domain(target: LoadedModel, name: str, prompts: list[list[int]], tokens: int, store: Checkpoints,
               log: BuildLog) -> CalibrationSet:
    identity = digest({"model": target.fingerprint, "prompts": prompts, "tokens": tokens})
    saved = store.load(f"{name}.calibration.json", identity)
    if saved is not None:
        log(f"{name}: ar answers of {len(prompts)} build prompts reused from the checkpoint")
        return CalibrationSet(saved["prompts"], saved["continuations"], saved["ar_seconds"], tokens)
    log(f"{name}: greedy ar answers ({tokens} tokens) to {len(prompts)} build prompts")
    calibration = calibrate(target, prompts, tokens)
    store.save(f"{name}.calibration.json", identity, {"prompts": calibration.prompts,
                                                      "continuations": calibration.continuations,
                                                      "ar_seconds": calibration.ar_seconds})
    return calibration


def cut_calibration(calibration: CalibrationSet, indices: Sequence[int], tokens: int) -> CalibrationSet:
    """The calibration of ``indices``, continuations cut to ``tokens`` (ar time scaled to match)."""
    continuations = [calibration.continuations[i][:tokens] for i in indices]
    seconds = [calibration.ar_seconds[i] * len(c) / max(1, len(calibration.continuations[i]))
               for i, c in zip(indices, continuations)]
    return CalibrationSet([calibration.prompts[i] for i in indices], continuations, seconds, tokens)


def interleave(sets: list[CalibrationSet], size: int) -> CalibrationSet:
    """``size`` calibration prompts taken in turn from each set: the mixed profile's calibration."""
    picks = [(s, i) for i in range(max(len(s.prompts) for s in sets)) for s in sets if i < len(s.prompts)][:size]
    return CalibrationSet([s.prompts[i] for s, i in picks], [s.continuations[i] for s, i in picks],
                          [s.ar_seconds[i] for s, i in picks], sets[0].max_new_tokens)
