"""Checkpoints of a resumable Bayesian search: what was searched (a signature), every evaluation so
far and the optimiser's state, in one JSON file replaced atomically after each evaluation, so an
interrupted search resumes exactly where it stopped and refuses a checkpoint of another search."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

from bayes_opt import BayesianOptimization
from sklearn.exceptions import ConvergenceWarning

from specdecode.errors import InvalidSettingError

VERSION = 1


def save_search(path: Path, fmt: str, signature: dict[str, Any], history: list[dict[str, Any]],
                optimizer: BayesianOptimization | None, **extra: Any) -> None:
    """Write a checkpoint in format ``fmt`` (one name per kind of search); ``extra`` keys ride along.
    Without an ``optimizer`` the history is the whole state (the search re-registers it)."""
    state = None
    if optimizer is not None:
        with tempfile.TemporaryDirectory() as scratch:
            state_file = Path(scratch) / "optimizer.json"
            optimizer.save_state(state_file)
            state = json.loads(state_file.read_text())
    data = {"format": fmt, "version": VERSION, "search": signature, **extra,
            "history": history, "optimizer": state}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(data))
    staging.replace(path)


def load_search(path: Path, fmt: str, kind: str, signature: dict[str, Any],
                optimizer: BayesianOptimization | None) -> dict[str, Any]:
    """Restore ``optimizer`` from a checkpoint of format ``fmt`` (a ``kind`` search, for messages)
    of the same search; return it (``history`` and any extra keys). Another file, version or search
    is refused with one line."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidSettingError(f"cannot resume from checkpoint {str(path)!r}: {exc}") from None
    if (not isinstance(data, dict) or data.get("format") != fmt
            or data.get("version") != VERSION):
        raise InvalidSettingError(f"{str(path)!r} is not a version-{VERSION} {kind} checkpoint")
    if data.get("search") != json.loads(json.dumps(signature)):
        raise InvalidSettingError(
            f"checkpoint {str(path)!r} belongs to a different search (model, data, objective or space, seed or "
            "starts differ); delete it or choose another checkpoint path")
    if optimizer is None:
        return data
    with tempfile.TemporaryDirectory() as scratch:
        state_file = Path(scratch) / "optimizer.json"
        state_file.write_text(json.dumps(data["optimizer"]))
        with warnings.catch_warnings():  # refitting the GP on few points: length scales at their bounds
            warnings.simplefilter("ignore", ConvergenceWarning)
            optimizer.load_state(state_file)
    return data
