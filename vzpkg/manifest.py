"""A cache's manifest (<cache_dir>/<name>.json): the one reader and writer, and its typed shape.

`vzctl create` reads a manifest on its hot path, so this module imports only the standard library (and
vzpkg.safeio, which does too). The JSON format is unchanged from the dict vzpkg always wrote: `Manifest` keeps
every key it does not model in `extra`, and `to_dict()` writes back exactly the keys it read, so an old
manifest loads and saves unchanged.

    read_data(path)  -> dict         the one reader: a regular file, at most MANIFEST_MAX, a JSON object
    problem(data)    -> str | None   a field of the wrong type (what makes it unusable)
    load(path)       -> Manifest     both, then the typed shape
    save(path, m)                    the format vzpkg writes (indented, sorted keys, fsynced)
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .safeio import MANIFEST_MAX, NotRegularFileError, read_small_text


class ManifestReadError(Exception):
    """A manifest that cannot be read as a JSON object. KIND says why; the callers word the message, since a
    build and a VE start say different things about it (and exit differently).

    kind: missing | not-regular | invalid | unreadable | not-object | bad-field"""

    def __init__(self, path: Path, kind: str, cause: BaseException | None = None, detail: str = "") -> None:
        super().__init__(f"{path}: {kind}" + (f" ({detail})" if detail else ""))
        self.path = path
        self.kind = kind
        self.cause = cause
        self.detail = detail


def read_data(path: Path) -> dict[str, Any]:
    """The manifest at PATH as a dict; ManifestReadError (with the original exception as `cause`) otherwise."""
    try:
        data = json.loads(read_small_text(path, MANIFEST_MAX))
    except FileNotFoundError as e:
        raise ManifestReadError(path, "missing", e) from e
    except NotRegularFileError as e:
        raise ManifestReadError(path, "not-regular", e, e.strerror or "") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestReadError(path, "invalid", e, str(e)) from e
    except OSError as e:
        raise ManifestReadError(path, "unreadable", e, e.strerror or str(e)) from e
    if not isinstance(data, dict):
        raise ManifestReadError(path, "not-object", detail=type(data).__name__)
    return data


# The fields vzpkg reads back from a manifest, with the JSON type each must have (a hand-edited or crafted
# manifest with another type made `vzpkg info`/`status` fail with an internal error).
# Scalars may be null (an older vzpkg wrote some as null; the readers cope); containers may not.
_TYPES: dict[str, type | tuple[type, ...]] = {
    "sha256": str, **dict.fromkeys(("name", "archive", "created", "init", "architecture", "distribution",
                                    "release", "template_digest"), (str, type(None))),
    **dict.fromkeys(("packed_size", "unpacked_size", "package_count"), (int, type(None))),
    "durations": dict, "mirrors": dict, "packages": list, "repositories": list, "template_packages": list,
}


def problem(data: dict[str, Any]) -> str | None:
    """What makes the manifest DATA unusable (a field of the wrong type), or None."""
    for key, kind in _TYPES.items():
        if key in data and not isinstance(data[key], kind):
            want = kind.__name__ if isinstance(kind, type) else kind[0].__name__
            return f'"{key}" is {type(data[key]).__name__}, not {want}'
    for i, pkg in enumerate(data.get("packages", [])):
        if not (isinstance(pkg, dict) and isinstance(pkg.get("name"), str)):
            return f'"packages"[{i}] is not an object with a "name" string'
    for i, repo in enumerate(data.get("repositories", [])):
        if not isinstance(repo, dict):
            return f'"repositories"[{i}] is not an object'
    if not all(isinstance(v, (int, float)) for v in data.get("durations", {}).values()):
        return '"durations" has a value that is not a number'
    return None


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


def write_json(path: Path, data: Any) -> None:
    """DATA as vzpkg writes manifests (indented, sorted keys, a final newline), fsynced."""
    with path.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def save(path: Path, manifest: Manifest | dict[str, Any]) -> None:
    """Write MANIFEST to PATH in place (the cache store publishes through a fresh directory and a rename)."""
    write_json(path, manifest.to_dict() if isinstance(manifest, Manifest) else manifest)
