"""KNN-SSD bundles: anchors in prompt-embedding space, each labelled with a domain whose searched
draft configuration (skip set, draft vocabulary, int8, threshold, maximum draft) drafts for the
prompts nearest to it.

A version-2 bundle is a directory::

    bundle.json            format, version, revision, model fingerprint, domains, mixed, history, settings
    anchors/<domain>.npy   the domain's anchor vectors (k-means centroids of its prompts), one per row
    profiles/<domain>.json the domain's draft configuration (an ssd profile: usable with ``ssd`` too)
    profiles/mixed.json    the fallback configuration; its vocabulary covers every domain's

Every domain owns its files and its fallback radius, so a domain is added (``build-knn --add``)
or removed without touching the others' files; the manifest records each file's SHA-256 (checked
on load: an edited or half-written file is refused), the bundle's revision (one more per add or
remove) and what each revision did. Version-1 bundles (one ``anchors.npz``, one radius) still load.

A prompt is embedded as the mean of the target's final hidden states over the prompt (what the
engine's prefill computes anyway), L2-normalised so that distance reflects direction rather than
a magnitude that shrinks with prompt length. Its nearest anchor picks the domain; a prompt
farther from that anchor than the domain's radius is unlike all its calibration data and gets
the mixed configuration.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdecode.artifacts.profile import SkipProfile, load_profile
from specdecode.errors import InvalidSettingError
from specdecode.models.loading import LoadedModel

BUNDLE_FORMAT = "specdecode-knn-bundle"
BUNDLE_VERSION = 2
READABLE_VERSIONS = (1, 2)
MIXED = "mixed"
MANIFEST, ANCHORS = "bundle.json", "anchors.npz"


def pool(hidden: torch.Tensor) -> np.ndarray:
    """One prompt's embedding: mean of its final hidden states ``[tokens, hidden]``, unit length."""
    vector = hidden.detach().to("cpu", torch.float64).mean(dim=0).numpy()
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else vector


def nearest(anchors: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each vector's nearest anchor by Euclidean distance: ``(distances [vectors], indices [vectors])``.

    ``anchors`` is ``[anchors, hidden]``, ``vectors`` ``[vectors, hidden]``; ties go to the first
    anchor. Both routing and the builder's fallback radius measure with this one function.
    """
    anchors = np.asarray(anchors)
    vectors = np.asarray(vectors, dtype=anchors.dtype).reshape(-1, anchors.shape[1])
    distances = np.array([np.linalg.norm(anchors - row, axis=1) for row in vectors]).reshape(len(vectors), -1)
    indices = distances.argmin(axis=1)  # [vectors, anchors] -> [vectors]
    return distances[np.arange(len(vectors)), indices], indices


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
    """Anchors with their domains, one draft configuration per domain and the mixed fallback."""

    anchors: np.ndarray  # [anchors, hidden], unit rows
    labels: list[str]  # domain of each anchor
    profiles: dict[str, SkipProfile]
    mixed: SkipProfile
    radius: float | dict[str, float]  # one for every domain (version 1), or per domain
    fingerprint: str
    model_name: str
    settings: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Path] = field(default_factory=dict)  # profile files, when loaded from disk
    revision: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)
    domains: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-domain build metadata

    def __post_init__(self) -> None:
        self.validate()

    @property
    def categories(self) -> list[str]:
        return list(self.profiles)

    @property
    def radii(self) -> dict[str, float]:
        if isinstance(self.radius, dict):
            return dict(self.radius)
        return {name: self.radius for name in self.profiles}

    def anchors_of(self, category: str) -> np.ndarray:
        return self.anchors[[i for i, label in enumerate(self.labels) if label == category]]

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
        unanchored = sorted(set(self.profiles) - set(self.labels))
        if unanchored:
            raise InvalidSettingError(f"bundle domains {', '.join(unanchored)} have no anchors")
        if isinstance(self.radius, dict):
            missing = sorted(set(self.profiles) - set(self.radius))
            if missing:
                raise InvalidSettingError(f"bundle domains {', '.join(missing)} have no fallback radius")
        for name, radius in self.radii.items():
            if not (isinstance(radius, float) and np.isfinite(radius) and radius > 0):
                raise InvalidSettingError(f"bundle radius of {name!r} must be a positive number, got {radius!r}")
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

    def route(self, vector: np.ndarray | None) -> Route:
        """The configuration for an embedded prompt (``None``: a one-token prompt, nothing to embed)."""
        if vector is None:
            return Route(MIXED, None, True, MIXED)
        distances, indices = nearest(self.anchors, vector)
        distance, category = float(distances[0]), self.labels[int(indices[0])]
        fallback = distance > self.radii[category]
        return Route(category, distance, fallback, MIXED if fallback else category)

    def profile(self, route: Route) -> SkipProfile:
        return self.mixed if route.profile == MIXED else self.profiles[route.profile]

    # --- adding and removing domains -------------------------------------------------------------

    def with_domain(self, name: str, anchors: np.ndarray, radius: float, profile: SkipProfile,
                    mixed: SkipProfile | None = None, info: dict[str, Any] | None = None) -> ProfileBundle:
        """A new revision with domain ``name`` added (or replaced); other domains are kept as they are.
        ``mixed``: the fallback configuration to use from now on (default: unchanged)."""
        if name == MIXED:
            raise InvalidSettingError(f"domain name {MIXED!r} is reserved for the fallback configuration")
        anchors = np.asarray(anchors, dtype=self.anchors.dtype)
        keep = [i for i, label in enumerate(self.labels) if label != name]
        replaced = len(keep) != len(self.labels)
        profiles = {c: p for c, p in self.profiles.items() if c != name}
        profiles[name] = profile
        return ProfileBundle(
            np.concatenate([self.anchors[keep], anchors]), [self.labels[i] for i in keep] + [name] * len(anchors),
            profiles, mixed or self.mixed, {**self.radii, name: float(radius)}, self.fingerprint, self.model_name,
            dict(self.settings), {}, self.revision + 1,
            [*self.history, {"revision": self.revision + 1, "action": "replace" if replaced else "add", "domain": name,
                             "time": _now(), "mixed_updated": mixed is not None}],
            {**{c: i for c, i in self.domains.items() if c != name}, name: dict(info or {})})

    def without_domain(self, name: str) -> ProfileBundle:
        """A new revision without domain ``name`` (the mixed configuration stays as it is)."""
        if name not in self.profiles:
            raise InvalidSettingError(f"bundle has no domain {name!r} (domains: {', '.join(self.categories)})")
        if len(self.profiles) == 1:
            raise InvalidSettingError(f"cannot remove {name!r}: it is the bundle's only domain")
        keep = [i for i, label in enumerate(self.labels) if label != name]
        return ProfileBundle(
            self.anchors[keep], [self.labels[i] for i in keep], {c: p for c, p in self.profiles.items() if c != name},
            self.mixed, {c: r for c, r in self.radii.items() if c != name}, self.fingerprint, self.model_name,
            dict(self.settings), {}, self.revision + 1,
            [*self.history, {"revision": self.revision + 1, "action": "remove", "domain": name, "time": _now()}],
            {c: i for c, i in self.domains.items() if c != name})

    # --- files -----------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the version-2 bundle directory. Files whose bytes are unchanged are not rewritten,
        files of removed domains are deleted, and the manifest comes last: it is what makes the
        directory a bundle (a crash before it leaves the previous revision readable)."""
        directory = Path(directory)
        entries: dict[str, dict[str, Any]] = {}
        for name in self.categories:
            anchor_file, profile_file = f"anchors/{name}.npy", f"profiles/{name}.json"
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(self.anchors_of(name)), allow_pickle=False)
            entries[name] = {
                "anchors": anchor_file, "profile": profile_file, "radius": self.radii[name],
                "sha256": {"anchors": _write_if_changed(directory / anchor_file, buffer.getvalue()),
                           "profile": _write_if_changed(directory / profile_file,
                                                        self.profiles[name].to_text().encode())},
                **self.domains.get(name, {}),
            }
        mixed_file = f"profiles/{MIXED}.json"
        mixed = {"profile": mixed_file, "sha256": _write_if_changed(directory / mixed_file, self.mixed.to_text().encode())}
        previous = directory / MANIFEST
        if previous.exists():  # files of domains this revision no longer has
            try:
                old = json.loads(previous.read_text())
                for name, entry in (old.get("domains") or {}).items():
                    if name not in entries:
                        for key in ("anchors", "profile"):
                            (directory / str(entry[key])).unlink(missing_ok=True)
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass
        manifest = {
            "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "revision": self.revision,
            "model": {"name": self.model_name, "fingerprint": self.fingerprint},
            "domains": entries, "mixed": mixed, "settings": self.settings, "history": self.history,
        }
        staging = directory / f".{MANIFEST}.tmp"
        staging.write_text(json.dumps(manifest, indent=2) + "\n")
        staging.replace(directory / MANIFEST)
        return directory


def _now() -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_if_changed(path: Path, data: bytes) -> str:
    """Write ``data`` atomically unless the file already holds exactly it; its SHA-256."""
    if not (path.exists() and path.read_bytes() == data):
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_bytes(data)
        staging.replace(path)
    return _sha256(data)


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
    if data.get("version") not in READABLE_VERSIONS:
        raise InvalidSettingError(f"{source} has bundle version {data.get('version')!r}; this specdecode reads "
                                  f"versions {', '.join(map(str, READABLE_VERSIONS))}")
    try:
        bundle = _read_v1(directory, data) if data["version"] == 1 else _read_v2(directory, data)
    except InvalidSettingError as exc:
        raise InvalidSettingError(f"{source} is invalid: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, OSError, zipfile.BadZipFile) as exc:
        raise InvalidSettingError(f"{source} is corrupt or incomplete ({type(exc).__name__}: {exc})") from None
    if target is not None:
        bundle.check_model(target, source)
    return bundle


def _read_v1(directory: Path, data: dict[str, Any]) -> ProfileBundle:
    with np.load(directory / str(data["anchors"]), allow_pickle=False) as arrays:
        anchors = np.array(arrays["anchors"])
    sources = {str(name): directory / str(file) for name, file in [*data["profiles"].items(), (MIXED, data["mixed"])]}
    profiles = {name: load_profile(file) for name, file in sources.items()}
    mixed = profiles.pop(MIXED)
    return ProfileBundle(
        anchors=anchors, labels=[str(label) for label in data["labels"]], profiles=profiles, mixed=mixed,
        radius=float(data["radius"]), fingerprint=str(data["model"]["fingerprint"]),
        model_name=str(data["model"]["name"]), settings=dict(data.get("settings") or {}), sources=sources,
        revision=0,
    )


def _checked(directory: Path, file: str, digest: str) -> Path:
    path = directory / file
    if _sha256(path.read_bytes()) != digest:
        raise InvalidSettingError(f"{file} does not match its SHA-256 in {MANIFEST} (edited or partly written)")
    return path


def _read_v2(directory: Path, data: dict[str, Any]) -> ProfileBundle:
    rows, labels, profiles, radii, sources, info = [], [], {}, {}, {}, {}
    for name, entry in data["domains"].items():
        name = str(name)
        with open(_checked(directory, str(entry["anchors"]), entry["sha256"]["anchors"]), "rb") as handle:
            block = np.load(handle, allow_pickle=False)
        if block.ndim != 2:
            raise InvalidSettingError(f"anchors of {name!r} must be a 2-D array, got shape {block.shape}")
        rows.append(block)
        labels += [name] * len(block)
        sources[name] = _checked(directory, str(entry["profile"]), entry["sha256"]["profile"])
        profiles[name] = load_profile(sources[name])
        radii[name] = float(entry["radius"])
        info[name] = {k: v for k, v in entry.items() if k not in ("anchors", "profile", "radius", "sha256")}
    if not rows:
        raise InvalidSettingError("bundle has no domains")
    sources[MIXED] = _checked(directory, str(data["mixed"]["profile"]), data["mixed"]["sha256"])
    return ProfileBundle(
        anchors=np.concatenate(rows), labels=labels, profiles=profiles, mixed=load_profile(sources[MIXED]),
        radius=radii, fingerprint=str(data["model"]["fingerprint"]), model_name=str(data["model"]["name"]),
        settings=dict(data.get("settings") or {}), sources=sources, revision=int(data["revision"]),
        history=list(data.get("history") or []), domains=info,
    )


_LOADED: dict[tuple[str, int, int], ProfileBundle] = {}


def load_bundle_cached(path: str | os.PathLike[str]) -> ProfileBundle:
    """Bundles are read once per manifest version: a method is built for every request."""
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
