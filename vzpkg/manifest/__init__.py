"""A cache's manifest (<cache_dir>/<name>.json): the one reader and writer; the typed shape is in .model.

    read_data(path)  -> dict         the one reader (the cache store and the runtime): a regular file, at most
                                     MANIFEST_MAX, a JSON object
    problem(data)    -> str | None   a field of the wrong type (what makes it unusable)
    write_json(path, data)           the format vzpkg writes (indented, sorted keys, fsynced)
    model.Manifest, model.load(path), model.save(path, m)     the typed shape (dataclasses)

This module imports only json, os and vzpkg.safeio: `vzctl create` reads a manifest on its hot path, where
dataclasses (inspect, ast: ~20 ms of imports, measured with -X importtime) is not otherwise loaded. The typed
model lives in vzpkg.manifest.model for the build side, which has dataclasses loaded anyway.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..safeio import MANIFEST_MAX, NotRegularFileError, read_small_text

TYPE_CHECKING = False  # not from typing: importing it costs ~1.7 ms of `vzctl create` (type checkers know the name)
if TYPE_CHECKING:
    from typing import Any


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


def write_json(path: Path, data: Any) -> None:
    """DATA as vzpkg writes manifests (indented, sorted keys, a final newline), fsynced."""
    with path.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
