"""A cache's manifest as a typed shape: `Manifest` (and its `PackageEntry`s), load and save.

The JSON format is unchanged from the dict vzpkg always wrote: `Manifest` keeps every key it does not model in
`extra`, and `to_dict()` writes back exactly the keys it read, so an old manifest loads and saves unchanged.
Reading is vzpkg.manifest's (the package's __init__, free of dataclasses for `vzctl create`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import ManifestReadError, problem, read_data, write_json


def _split(cls: type, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """DATA's keys that are fields of CLS, and the others."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra", "absent"}
    return {k: v for k, v in data.items() if k in names}, {k: v for k, v in data.items() if k not in names}


@dataclass
class PackageEntry:
    """An installed package: apt records name, version, architecture; rpm adds epoch, release, arch, evr."""

    name: str
    version: str | None = None
    architecture: str | None = None
    epoch: int | None = None
    release: str | None = None
    arch: str | None = None
    evr: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PackageEntry:
        known, extra = _split(cls, data)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "extra" and getattr(self, f.name) is not None}
        return {**out, **self.extra}


@dataclass
class Manifest:
    """What create-cache and update-cache record about a cache (see build/pipeline.py for each key)."""

    name: str | None = None
    sha256: str | None = None
    archive: str | None = None
    created: str | None = None
    template_digest: str | None = None
    distribution: str | None = None
    release: str | None = None
    suite: str | None = None
    architecture: str | None = None
    package_manager: str | None = None
    bootstrapper: str | None = None
    init: str | None = None
    mirror: str | None = None
    mirrors: dict[str, str] = field(default_factory=dict)
    repositories: list[dict[str, Any]] = field(default_factory=list)
    packages: list[PackageEntry] = field(default_factory=list)
    template_packages: list[str] = field(default_factory=list)
    package_count: int | None = None
    vzpkg_version: str | None = None
    source_date_epoch: int | None = None
    durations: dict[str, float] = field(default_factory=dict)
    compression_level: int | None = None
    unpacked_size: int | None = None
    packed_size: int | None = None
    #: keys this model does not name (backend facts, update-cache's changes, ...), kept as they are
    extra: dict[str, Any] = field(default_factory=dict)
    #: modelled keys the source did not have: not written back (an older manifest stays as it was)
    absent: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """DATA (checked with `problem` first) as a Manifest."""
        known, extra = _split(cls, data)
        if "packages" in known:
            known["packages"] = [PackageEntry.from_dict(p) for p in known["packages"]]
        absent = frozenset(f.name for f in dataclasses.fields(cls) if f.name not in data) - {"extra", "absent"}
        return cls(**known, extra=extra, absent=absent)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "absent") or f.name in self.absent:
                continue
            value = getattr(self, f.name)
            out[f.name] = [p.to_dict() for p in value] if f.name == "packages" else value
        return {**out, **self.extra}

    def package_names(self) -> set[str]:
        return {p.name for p in self.packages}


def load(path: Path) -> Manifest:
    """The manifest at PATH; ManifestReadError (kind `bad-field` for a field of the wrong type) otherwise."""
    data = read_data(path)
    bad = problem(data)
    if bad:
        raise ManifestReadError(path, "bad-field", detail=bad)
    return Manifest.from_dict(data)


def save(path: Path, manifest: Manifest | dict[str, Any]) -> None:
    """Write MANIFEST to PATH in place (the cache store publishes through a fresh directory and a rename)."""
    write_json(path, manifest.to_dict() if isinstance(manifest, Manifest) else manifest)
