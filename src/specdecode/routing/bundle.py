"""KNN-SSD profile bundles: anchors in prompt-embedding space, each labelled with a category whose
searched skip profile drafts for the prompts nearest to it.

A bundle is a directory::

    bundle.json          format, version, model fingerprint, categories, anchor labels, radius, settings
    anchors.npz          the anchor vectors (k-means centroids), one row per label
    profiles/<cat>.json  one ssd skip profile per category (plain profiles: usable with ``ssd`` too)
    profiles/mixed.json  the fallback profile, searched on prompts of every category

A prompt is embedded as the mean of the target's final hidden states over the prompt (what the
engine's prefill computes anyway), L2-normalised so that distance reflects direction rather than
a magnitude that shrinks with prompt length. Its nearest anchor picks the profile; a prompt
farther than ``radius`` from every anchor is unlike all calibration data and gets the mixed one.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from specdecode.errors import InvalidSettingError
from specdecode.models.loading import LoadedModel
from specdecode.search.profile import SkipProfile, load_profile

BUNDLE_FORMAT = "specdecode-knn-bundle"
BUNDLE_VERSION = 1
MIXED = "mixed"
MANIFEST, ANCHORS = "bundle.json", "anchors.npz"


def pool(hidden: torch.Tensor) -> np.ndarray:
    """One prompt's embedding: mean of its final hidden states ``[tokens, hidden]``, unit length."""
    vector = hidden.detach().to("cpu", torch.float64).mean(dim=0).numpy()
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else vector


@dataclass(frozen=True)
class Route:
    """Which profile one request drafts with, and why."""

    category: str  # the nearest anchor's category
    distance: float | None  # to that anchor (None: nothing was embedded)
    fallback: bool  # beyond the radius (or nothing to embed): the mixed profile drafts
    profile: str  # the category whose profile drafts (``mixed`` on fallback)

    def to_dict(self) -> dict[str, Any]:
        return {"category": self.category, "distance": self.distance, "fallback": self.fallback,
                "profile": self.profile}


@dataclass
class ProfileBundle:
    """Anchors with their categories, one skip profile per category and the mixed fallback."""

    anchors: np.ndarray  # [anchors, hidden], unit rows
    labels: list[str]  # category of each anchor
    profiles: dict[str, SkipProfile]
    mixed: SkipProfile
    radius: float
    fingerprint: str
    model_name: str
    settings: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Path] = field(default_factory=dict)  # profile files, when loaded from disk

    def __post_init__(self) -> None:
        self.validate()

    @property
    def categories(self) -> list[str]:
        return list(self.profiles)

    def validate(self) -> None:
        anchors = self.anchors
        if anchors.ndim != 2 or anchors.shape[0] != len(self.labels) or anchors.shape[0] == 0:
            raise InvalidSettingError(f"bundle has {len(self.labels)} anchor labels but anchors of shape "
                                      f"{tuple(anchors.shape)}")
        if not np.isfinite(anchors).all():
            raise InvalidSettingError("bundle anchors contain non-finite values")
        unknown = sorted(set(self.labels) - set(self.profiles))
        if unknown:
            raise InvalidSettingError(f"bundle anchors labelled {', '.join(unknown)} have no profile")
        if not (isinstance(self.radius, float) and np.isfinite(self.radius) and self.radius > 0):
            raise InvalidSettingError(f"bundle radius must be a positive number, got {self.radius!r}")
        for name, profile in [*self.profiles.items(), (MIXED, self.mixed)]:
            if profile.fingerprint != self.fingerprint:
                raise InvalidSettingError(f"bundle profile {name!r} was searched on model {profile.model_name!r}, "
                                          f"not on the bundle's model {self.model_name!r}")

    def check_model(self, target: LoadedModel, source: str = "bundle") -> None:
        """Refuse a bundle built on another model: its anchors and skip sets mean nothing there."""
        if self.fingerprint != target.fingerprint:
            raise InvalidSettingError(
                f"{source} was built on model {self.model_name!r} (fingerprint {self.fingerprint}), "
                f"not on {target.name!r} (fingerprint {target.fingerprint})"
            )

    @cached_property
    def index(self) -> NearestNeighbors:
        return NearestNeighbors(n_neighbors=1).fit(self.anchors)

    def route(self, vector: np.ndarray | None) -> Route:
        """The profile for an embedded prompt (``None``: a one-token prompt, nothing to embed)."""
        if vector is None:
            return Route(MIXED, None, True, MIXED)
        distances, indices = self.index.kneighbors(np.asarray(vector, dtype=self.anchors.dtype).reshape(1, -1))
        distance, category = float(distances[0, 0]), self.labels[int(indices[0, 0])]
        fallback = distance > self.radius
        return Route(category, distance, fallback, MIXED if fallback else category)

    def profile(self, route: Route) -> SkipProfile:
        return self.mixed if route.profile == MIXED else self.profiles[route.profile]

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the bundle directory (profiles first, the manifest last: it is what makes it a bundle)."""
        directory = Path(directory)
        (directory / "profiles").mkdir(parents=True, exist_ok=True)
        files = {}
        for name, profile in [*self.profiles.items(), (MIXED, self.mixed)]:
            files[name] = f"profiles/{name}.json"
            profile.save(directory / files[name])
        staging = directory / f".{ANCHORS}.tmp.npz"
        np.savez(staging, anchors=self.anchors)
        staging.replace(directory / ANCHORS)
        manifest = {
            "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
            "model": {"name": self.model_name, "fingerprint": self.fingerprint},
            "categories": self.categories, "labels": self.labels, "radius": self.radius,
            "anchors": ANCHORS, "profiles": {name: files[name] for name in self.profiles}, "mixed": files[MIXED],
            "settings": self.settings,
        }
        staging = directory / f".{MANIFEST}.tmp"
        staging.write_text(json.dumps(manifest, indent=2) + "\n")
        staging.replace(directory / MANIFEST)
        return directory


def load_bundle(path: str | os.PathLike[str], target: LoadedModel | None = None) -> ProfileBundle:
    """Read a bundle directory (or its ``bundle.json``); with ``target``, refuse another model's bundle."""
    path = Path(path)
    directory = path.parent if path.name == MANIFEST else path
    source = f"bundle {str(path)!r}"
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise InvalidSettingError(f"{source} not found (expected a directory with {MANIFEST})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidSettingError(f"cannot read {source}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise InvalidSettingError(f"{source} is not a KNN-SSD bundle (expected format {BUNDLE_FORMAT!r})")
    if data.get("version") != BUNDLE_VERSION:
        raise InvalidSettingError(f"{source} has bundle version {data.get('version')!r}; this specdecode reads "
                                  f"version {BUNDLE_VERSION}")
    try:
        with np.load(directory / str(data["anchors"]), allow_pickle=False) as arrays:
            anchors = np.array(arrays["anchors"])
        sources = {str(name): directory / str(file) for name, file in [*data["profiles"].items(), (MIXED, data["mixed"])]}
        profiles = {name: load_profile(file) for name, file in sources.items()}
        mixed = profiles.pop(MIXED)
        bundle = ProfileBundle(
            anchors=anchors, labels=[str(label) for label in data["labels"]], profiles=profiles, mixed=mixed,
            radius=float(data["radius"]), fingerprint=str(data["model"]["fingerprint"]),
            model_name=str(data["model"]["name"]), settings=dict(data.get("settings") or {}), sources=sources,
        )
    except InvalidSettingError as exc:
        raise InvalidSettingError(f"{source} is invalid: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, OSError, zipfile.BadZipFile) as exc:
        raise InvalidSettingError(f"{source} is corrupt or incomplete ({type(exc).__name__}: {exc})") from None
    if target is not None:
        bundle.check_model(target, source)
    return bundle


_LOADED: dict[tuple[str, int, int], ProfileBundle] = {}


def load_bundle_cached(path: str | os.PathLike[str]) -> ProfileBundle:
    """Bundles are read (and indexed) once per manifest version: a method is built for every request."""
    resolved = Path(path).expanduser().resolve()
    manifest = resolved if resolved.name == MANIFEST else resolved / MANIFEST
    try:
        stat = manifest.stat()
    except OSError:
        return load_bundle(path)  # raises the one-line "not found" error
    key = (str(manifest), stat.st_mtime_ns, stat.st_size)
    if key not in _LOADED:
        _LOADED[key] = load_bundle(path)
    return _LOADED[key]
