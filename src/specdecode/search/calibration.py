"""Calibration prompts for the skip-set search, and the target's own greedy answers to them.

The autoregressive continuations are computed once per search: they are the baseline the
measured objective compares against, the ground truth the simulated objective replays (a
greedy self-draft is accepted exactly where it agrees with them), and the text the
reduced-vocabulary head counts token frequencies on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from specdecode.api import SpeculativeDecoder
from specdecode.errors import InvalidSettingError
from specdecode.models.loading import LoadedModel


def load_prompts(
    path: str | os.PathLike[str],
    category: str | None = None,
    field: str = "category",
) -> list[str]:
    """First-turn prompts of a JSON-lines file (Spec-Bench ``turns``, or ``prompt`` / ``text``).

    ``category`` keeps only the records whose ``field`` equals it.
    """
    records = load_labelled_prompts(path, field)
    prompts = [text for label, text in records if category is None or label == category]
    if not prompts:
        present = ", ".join(sorted({label for label, _ in records}))
        raise InvalidSettingError(f"no prompts of {field} {category!r} in {Path(path).name} (present: {present})")
    return prompts


def load_labelled_prompts(path: str | os.PathLike[str], field: str = "category") -> list[tuple[str, str]]:
    """Every record's ``(field value, first-turn prompt)``, in file order."""
    source = Path(path)
    try:
        lines = source.read_text(encoding="utf-8").split("\n")  # not splitlines(): U+2028 may sit inside a JSON string
    except FileNotFoundError:
        raise InvalidSettingError(f"data file not found: {str(path)!r}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidSettingError(f"cannot read data file {str(path)!r}: {exc}") from None
    records: list[tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise InvalidSettingError(f"{source.name} line {number} is not JSON") from None
        if not isinstance(record, dict):
            raise InvalidSettingError(f"{source.name} line {number} is not a JSON object")
        text = _prompt_text(record)
        if text is None:
            raise InvalidSettingError(f"{source.name} line {number} has no 'turns', 'prompt' or 'text' field")
        records.append((str(record.get(field)), text))
    if not records:
        raise InvalidSettingError(f"no prompts in {source.name}")
    return records


def _prompt_text(record: dict) -> str | None:
    turns = record.get("turns")
    if isinstance(turns, list) and turns and isinstance(turns[0], str):
        return turns[0]
    for key in ("prompt", "text"):
        if isinstance(record.get(key), str):
            return record[key]
    return None


@dataclass
class CalibrationSet:
    """Tokenised prompts with the target's greedy continuations and how long those took."""

    prompts: list[list[int]]
    continuations: list[list[int]]
    ar_seconds: list[float]
    max_new_tokens: int

    @property
    def ar_tokens_per_second(self) -> float:
        return sum(map(len, self.continuations)) / sum(self.ar_seconds)


def calibrate(target: LoadedModel, prompts: list[str] | list[list[int]], max_new_tokens: int = 32) -> CalibrationSet:
    """Run the target autoregressively (greedy) on every prompt."""
    if not prompts:
        raise InvalidSettingError("calibration needs at least one prompt")
    if max_new_tokens < 1:
        raise InvalidSettingError(f"calibration max_new_tokens must be >= 1, got {max_new_tokens}")
    decoder = SpeculativeDecoder(target, "ar")
    ids = [decoder.encode(p) for p in prompts]
    continuations, seconds = [], []
    for prompt in ids:
        result = decoder.generate(prompt, max_new_tokens=max_new_tokens)
        continuations.append(result.token_ids)
        seconds.append(result.stats.total_s)
    return CalibrationSet(ids, continuations, seconds, max_new_tokens)
