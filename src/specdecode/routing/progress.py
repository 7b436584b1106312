"""What every stage of a bundle build shares: its progress log (with the time budget) and its
per-domain checkpoints, keyed by a digest of what the stage was given, so a rerun resumes."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


class BuildLog:
    def __init__(self, progress: bool, budget_s: float | None, spent_s: float = 0.0) -> None:
        self.progress, self.budget_s = progress, budget_s
        self.started = time.perf_counter() - spent_s

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def __call__(self, message: str) -> None:
        if self.progress:
            budget = f"/{self.budget_s:.0f}s budget" if self.budget_s else ""
            print(f"[{self.elapsed:6.0f}s{budget}] {message}", file=sys.stderr, flush=True)


class Checkpoints:
    """Per-domain files under ``directory``: calibration (ar answers) and the finished domain."""

    def __init__(self, directory: str | Path | None) -> None:
        self.directory = Path(directory) if directory is not None else None

    def path(self, name: str) -> Path | None:
        return self.directory / name if self.directory is not None else None

    def load(self, name: str, identity: str) -> dict[str, Any] | None:
        path = self.path(name)
        if path is None or not path.exists():
            return None
        data = json.loads(path.read_text())
        return data if data.get("identity") == identity else None

    def save(self, name: str, identity: str, data: dict[str, Any]) -> None:
        path = self.path(name)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text(json.dumps({"identity": identity, **data}))
        staging.replace(path)
