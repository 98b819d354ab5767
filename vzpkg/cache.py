"""The cache store: where caches live, their manifests, atomic publish, removal and verification.

    <cache_dir>/<name>.tar.zst    the packed root filesystem
    <cache_dir>/<name>.json       its manifest (see build.py for the fields)
    <cache_dir>/.tmp-<name>-*     work in progress of a build (removed by the next run if left behind)
    <cache_dir>/.locks/<name>.lock
    <cache_dir>/.packages/        downloaded packages, shared by builds
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .archive import iter_members, sha256_file
from .errors import CacheNotFoundError, VerifyError

ARCHIVE_SUFFIX = ".tar.zst"
MANIFEST_SUFFIX = ".json"
TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_dir(path.parent)


@dataclass
class CacheStore:
    root: Path

    def archive_path(self, name: str) -> Path:
        return self.root / f"{name}{ARCHIVE_SUFFIX}"

    def manifest_path(self, name: str) -> Path:
        return self.root / f"{name}{MANIFEST_SUFFIX}"

    def exists(self, name: str) -> bool:
        return self.archive_path(name).is_file()

    def read_manifest(self, name: str) -> dict[str, Any]:
        path = self.manifest_path(name)
        if not self.exists(name):
            raise CacheNotFoundError(f"no cache for template {name!r} in {self.root}: run 'vzpkg create-cache {name}'")
        try:
            return json.loads(path.read_text())
        except FileNotFoundError as e:
            raise VerifyError(f"cache {name!r} has no manifest {path}: rebuild it with 'vzpkg create-cache --force {name}'") from e
        except json.JSONDecodeError as e:
            raise VerifyError(f"manifest {path} is not valid JSON ({e}): rebuild with 'vzpkg create-cache --force {name}'") from e

    def manifest_or_none(self, name: str) -> dict[str, Any] | None:
        try:
            return self.read_manifest(name)
        except (CacheNotFoundError, VerifyError):
            return None

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name[: -len(ARCHIVE_SUFFIX)]
            for p in self.root.iterdir()
            if p.name.endswith(ARCHIVE_SUFFIX) and not p.name.startswith(".")
        )

    def temp_path(self, name: str, what: str) -> Path:
        """A work path beside the cache (same filesystem, so publishing is a rename)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / f"{TMP_PREFIX}{name}-{what}-{os.getpid()}"

    def leftovers(self, name: str) -> list[Path]:
        if not self.root.is_dir():
            return []
        prefix = f"{TMP_PREFIX}{name}-"
        return [p for p in self.root.iterdir() if p.name.startswith(prefix)]

    def publish(self, name: str, archive_tmp: Path, manifest: dict[str, Any]) -> None:
        """Atomically replace the cache: the archive is renamed into place, then its manifest."""
        os.rename(archive_tmp, self.archive_path(name))
        fsync_dir(self.root)
        write_json_atomic(self.manifest_path(name), manifest)

    def remove(self, name: str) -> None:
        if not self.exists(name) and not self.manifest_path(name).exists():
            raise CacheNotFoundError(f"no cache for template {name!r} in {self.root}")
        for path in (self.archive_path(name), self.manifest_path(name)):
            path.unlink(missing_ok=True)
        fsync_dir(self.root)

    def verify(self, name: str) -> dict[str, Any]:
        """Recompute the sha256 and read the whole archive; raise VerifyError on any mismatch."""
        import zstandard

        manifest = self.read_manifest(name)
        path = self.archive_path(name)
        problems = []
        size = path.stat().st_size
        if manifest.get("packed_size") not in (None, size):
            problems.append(f"size {size} != manifest {manifest['packed_size']}")
        digest = sha256_file(path)
        if digest != manifest.get("sha256"):
            problems.append(f"sha256 {digest[:16]}... != manifest {str(manifest.get('sha256'))[:16]}...")
        members = 0
        try:
            for _member in iter_members(path):
                members += 1
        except (tarfile.TarError, OSError, zstandard.ZstdError) as e:
            problems.append(f"archive unreadable: {e}")
        if problems:
            raise VerifyError(f"cache {name!r} ({path}) does not match its manifest: {'; '.join(problems)}")
        return {"name": name, "sha256": digest, "members": members, "ok": True}

    def clean_leftovers(self, name: str) -> list[Path]:
        """Remove work in progress of an earlier, interrupted run (call with the template's lock held)."""
        from .chroot import remove_work_dir

        removed = []
        for path in self.leftovers(name):
            if path.is_dir() and not path.is_symlink():
                remove_work_dir(path)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        return removed
