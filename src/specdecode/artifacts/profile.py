"""Skip profiles: a searched self-draft saved as versioned JSON, validated on load.

A profile pins everything that defines an ``ssd`` draft (skip sets, stop threshold, maximum
draft length, draft head) to the model it was searched on, by ``LoadedModel.fingerprint``: a
skip set tuned on one model means nothing on another, so a foreign profile is refused. It also
keeps how it was found (search metadata) and what it measured, so reports can cite it.

The reduced-vocabulary ids are stored most frequent first; ``draft_vocab=N`` at run time keeps
the first N of them.

Versions: 1 (skip sets and draft settings) and 2, which adds an optional ``domain`` block — which
domain a full draft configuration (skip set, vocabulary, int8, threshold, maximum draft) was
searched for and where its vocabulary came from. Both are read; version 2 is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from specdecode.errors import InvalidSettingError
from specdecode.models.frequent_vocab import validate_token_ids
from specdecode.models.layer_skip import SkipSet
from specdecode.models.loading import LoadedModel


@dataclass(frozen=True)
class SelfDraftSettings:
    """Everything that defines a self-draft; what a skip profile stores."""

    skip: SkipSet = SkipSet()
    threshold: float = 0.8
    max_draft: int = 12
    vocab_ids: tuple[int, ...] | None = None  # reduced-vocabulary head; None = full head
    int8: bool = False  # int8 weights for the draft's kept sub-layers and its head

    def validate(self, layers: int, vocab_size: int | None = None) -> None:
        """Refuse out-of-range values; ``vocab_size`` None skips the upper bound on vocabulary ids."""
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not (
            0 < self.threshold <= 1
        ):
            raise InvalidSettingError(f"ssd threshold must be in (0, 1], got {self.threshold!r}")
        if isinstance(self.max_draft, bool) or not isinstance(self.max_draft, int) or self.max_draft < 1:
            raise InvalidSettingError(f"ssd max_draft must be an integer >= 1, got {self.max_draft!r}")
        if not isinstance(self.int8, bool):
            raise InvalidSettingError(f"ssd int8 must be True or False, got {self.int8!r}")
        self.skip.check(layers)
        if self.vocab_ids is not None:
            if any(isinstance(t, bool) or not isinstance(t, int) for t in self.vocab_ids):
                raise InvalidSettingError("draft vocabulary must be a list of integer token ids")
            ids = torch.tensor(self.vocab_ids, dtype=torch.long)
            upper = vocab_size if vocab_size is not None else int(ids.max()) + 1 if len(ids) else 1
            validate_token_ids(ids, upper, "draft vocabulary")


PROFILE_FORMAT = "specdecode-ssd-profile"
PROFILE_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass
class SkipProfile:
    """A self-draft searched for one model (and usually one domain of prompts)."""

    settings: SelfDraftSettings
    fingerprint: str
    model_name: str
    layers: int
    search: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)
    domain: dict[str, Any] = field(default_factory=dict)  # version 2: name, vocabulary source, ...

    def check_model(self, target: LoadedModel, source: str = "profile") -> None:
        """Refuse to draft for a model other than the one the profile was searched on."""
        if self.fingerprint != target.fingerprint:
            raise InvalidSettingError(
                f"{source} was searched on model {self.model_name!r} (fingerprint {self.fingerprint}), "
                f"not on {target.name!r} (fingerprint {target.fingerprint})"
            )

    def with_vocab_size(self, size: int) -> SkipProfile:
        """The profile with its draft head cut to the ``size`` most frequent ids (0: full head)."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidSettingError(f"draft_vocab must be a size >= 0 or a list of token ids, got {size!r}")
        if size == 0:
            return replace(self, settings=replace(self.settings, vocab_ids=None))
        ranked = self.settings.vocab_ids
        if ranked is None:
            raise InvalidSettingError("draft_vocab=N needs a profile with a ranked draft vocabulary (search with --draft-vocab)")
        if size > len(ranked):
            raise InvalidSettingError(f"draft_vocab={size} exceeds the {len(ranked)} ranked ids in the profile")
        return replace(self, settings=replace(self.settings, vocab_ids=ranked[:size]))

    def to_dict(self) -> dict[str, Any]:
        s = self.settings
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "model": {"name": self.model_name, "fingerprint": self.fingerprint, "layers": self.layers},
            "skip": {"attention": list(s.skip.attention), "mlp": list(s.skip.mlp)},
            "draft": {"threshold": s.threshold, "max_draft": s.max_draft, "int8": s.int8,
                      "vocab_ids": list(s.vocab_ids) if s.vocab_ids is not None else None},
            "domain": self.domain,
            "search": self.search,
            "measured": self.measured,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "profile") -> SkipProfile:
        """Parse and validate; every problem is one line naming ``source`` and the bad field."""
        def fail(problem: str) -> InvalidSettingError:
            return InvalidSettingError(f"{source} is not a valid ssd profile: {problem}")

        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise fail(f"expected a JSON object with format {PROFILE_FORMAT!r}")
        if data.get("version") not in READABLE_VERSIONS:
            raise InvalidSettingError(
                f"{source} has ssd profile version {data.get('version')!r}; this specdecode reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        try:
            model, skip, draft = data["model"], data["skip"], data["draft"]
            layers = model["layers"]
            if not isinstance(layers, int) or layers < 1:
                raise InvalidSettingError(f"model.layers must be a positive integer, got {layers!r}")
            vocab = draft.get("vocab_ids")
            settings = SelfDraftSettings(
                skip=SkipSet.of(skip["attention"], skip["mlp"]),
                threshold=draft["threshold"],
                max_draft=draft["max_draft"],
                vocab_ids=tuple(vocab) if vocab is not None else None,
                int8=draft.get("int8", False),
            )
            settings.validate(layers)
            profile = cls(settings=settings, fingerprint=str(model["fingerprint"]), model_name=str(model["name"]),
                          layers=layers, search=dict(data.get("search") or {}),
                          measured=dict(data.get("measured") or {}), domain=dict(data.get("domain") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, InvalidSettingError):
                raise fail(str(exc)) from None
            raise fail(f"missing or malformed field ({type(exc).__name__}: {exc})") from None
        return profile

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (a crash never leaves half a profile); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text(self.to_text())
        staging.replace(path)
        return path

    def to_text(self) -> str:
        """The file's text: deterministic, so an unchanged profile saves byte-identical."""
        data = self.to_dict()
        vocab = data["draft"]["vocab_ids"]
        if vocab is not None:
            data["draft"]["vocab_ids"] = "@VOCAB@"  # keep tens of thousands of ids on one line
        text = json.dumps(data, indent=2)
        if vocab is not None:
            text = text.replace('"@VOCAB@"', json.dumps(vocab, separators=(",", ":")))
        return text + "\n"


def load_profile(path: str | os.PathLike[str], target: LoadedModel | None = None) -> SkipProfile:
    """Read a profile; with ``target`` given, also refuse one searched on another model."""
    source = f"profile {str(path)!r}"
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise InvalidSettingError(f"{source} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidSettingError(f"cannot read {source}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidSettingError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    profile = SkipProfile.from_dict(data, source)
    if target is not None:
        profile.check_model(target, source)
    return profile


_LOADED: dict[tuple[str, int, int], SkipProfile] = {}


def _load_cached(path: str | os.PathLike[str]) -> SkipProfile:
    """Profiles are read once per file version: a decoder builds its method for every request."""
    resolved = Path(path).expanduser().resolve()
    try:
        stat = resolved.stat()
    except OSError:
        return load_profile(path)  # raises the one-line "not found" / "cannot read" error
    key = (str(resolved), stat.st_mtime_ns, stat.st_size)
    if key not in _LOADED:
        _LOADED[key] = load_profile(path)
    return _LOADED[key]


def self_draft_settings(
    target: LoadedModel,
    profile: SkipProfile | str | os.PathLike[str] | None = None,
    skip_attention: list[int] | None = None,
    skip_mlp: list[int] | None = None,
    threshold: float | None = None,
    max_draft: int | None = None,
    draft_vocab: int | list[int] | None = None,
    int8: bool | None = None,
) -> SelfDraftSettings:
    """The ``ssd`` method's options resolved into one draft: explicit options override the profile.

    ``draft_vocab``: a list of token ids, or N to keep the profile's N most frequent ids (0 = the
    full-vocabulary head).
    """
    base = SelfDraftSettings()
    if profile is not None:
        loaded = profile if isinstance(profile, SkipProfile) else _load_cached(profile)
        loaded.check_model(target, f"profile {str(profile)!r}" if not isinstance(profile, SkipProfile) else "profile")
        if isinstance(draft_vocab, int) and not isinstance(draft_vocab, bool):
            loaded = loaded.with_vocab_size(draft_vocab)
            draft_vocab = None
        base = loaded.settings
    elif isinstance(draft_vocab, int) and not isinstance(draft_vocab, bool):
        if draft_vocab != 0:
            raise InvalidSettingError("draft_vocab=N needs a profile with a ranked draft vocabulary; "
                                      "without one pass a list of token ids")
        draft_vocab = None
    if draft_vocab is not None and not isinstance(draft_vocab, (list, tuple)):
        raise InvalidSettingError(f"draft_vocab must be a size or a list of token ids, got {draft_vocab!r}")
    skip = base.skip
    if skip_attention is not None or skip_mlp is not None:
        skip = SkipSet.of(skip.attention if skip_attention is None else skip_attention,
                          skip.mlp if skip_mlp is None else skip_mlp)
    return SelfDraftSettings(
        skip=skip,
        threshold=base.threshold if threshold is None else threshold,
        max_draft=base.max_draft if max_draft is None else max_draft,
        vocab_ids=tuple(draft_vocab) if draft_vocab is not None else base.vocab_ids,
        int8=base.int8 if int8 is None else int8,
    )
