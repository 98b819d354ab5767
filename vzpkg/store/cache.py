"""The cache store: where caches live, their manifests, atomic publish, removal and verification.

    <cache_dir>/<name>.tar.zst -> .published/<name>/current/<name>.tar.zst   (symlinks, made once)
    <cache_dir>/<name>.json    -> .published/<name>/current/<name>.json
    <cache_dir>/.published/<name>/current -> <id>     the one name a publish switches, with rename(2)
    <cache_dir>/.published/<name>/<id>/               an archive and its manifest, written and fsynced together
    <cache_dir>/.tmp-<name>-*     work in progress of a build (removed by the next run if left behind)
    <cache_dir>/.locks/<name>.lock
    <cache_dir>/.packages/        downloaded packages, shared by builds

Publishing puts the new archive and its manifest into a fresh directory, fsyncs both, then renames a symlink
over `current`: at every instant <name>.tar.zst and <name>.json resolve to one consistent pair, the old or the
new, whatever kills vzpkg or fills the disk. Plain open() of the two names (runtime/storage.py) follows the
symlinks. A pair published by an older vzpkg as two regular files is adopted (hard links) at the next publish.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CacheNotFoundError, NotWritableError, VerifyError
from ..manifest import ManifestReadError, read_data, write_json
from ..manifest import problem as manifest_problem
from ..manifest.model import Manifest
from ..space import disk_full_error, is_full

ARCHIVE_SUFFIX = ".tar.zst"
MANIFEST_SUFFIX = ".json"
TMP_PREFIX = ".tmp-"
PUBLISHED_DIR = ".published"
CURRENT = "current"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        write_json(tmp, data)
        os.rename(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and is_full(e):
            raise disk_full_error(e, path) from e
        raise
    fsync_dir(path.parent)


def _symlink_atomic(target: str, link: Path) -> None:
    """Point LINK at TARGET with one rename(2): readers see the old link or the new one, never none."""
    tmp = link.with_name(f"{TMP_PREFIX}{link.name}-link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    try:
        os.rename(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(directory: Path, what: str = "cache directory") -> None:
    """Raise NotWritableError when DIRECTORY (or the parent it would be made in) cannot be written."""
    p = directory
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        ro = bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    except OSError:
        ro = False
    if ro or not os.access(p, os.W_OK):
        reason = "is on a read-only filesystem" if ro else "is not writable"
        raise NotWritableError(f"{what} {directory} {reason}: remount it read-write, fix its permissions, "
                               f"or use another one (--cache-dir / $VZPKG_CACHE_DIR)")


@dataclass
class CacheStore:
    root: Path

    def archive_path(self, name: str) -> Path:
        return self.root / f"{name}{ARCHIVE_SUFFIX}"

    def manifest_path(self, name: str) -> Path:
        return self.root / f"{name}{MANIFEST_SUFFIX}"

    def published_dir(self, name: str) -> Path:
        return self.root / PUBLISHED_DIR / name

    def exists(self, name: str) -> bool:
        return self.archive_path(name).is_file()

    def read_manifest(self, name: str) -> dict[str, Any]:
        path = self.manifest_path(name)
        if not self.exists(name):
            raise CacheNotFoundError(f"no cache for template {name!r} in {self.root}: run 'vzpkg create-cache {name}'")
        rebuild = f"rebuild it with 'vzpkg create-cache --force {name}'"
        try:
            data = read_data(path)
        except ManifestReadError as e:
            cause = e.cause
            if e.kind == "missing":
                raise VerifyError(f"cache {name!r} has no manifest {path}: {rebuild}") from cause
            if e.kind == "not-regular":
                raise VerifyError(f"manifest {path} is {e.detail}: {rebuild}") from cause
            if e.kind == "invalid":
                raise VerifyError(f"manifest {path} is not valid JSON ({e.detail}): {rebuild}") from cause
            if e.kind == "unreadable":
                raise VerifyError(f"manifest {path} cannot be read ({e.detail}): {rebuild}") from cause
            raise VerifyError(f"manifest {path} is not a JSON object (it is {e.detail}): {rebuild}") from e
        problem = manifest_problem(data)
        if problem:
            raise VerifyError(f"manifest {path}: {problem}: {rebuild}")
        return data

    def load_manifest(self, name: str) -> Manifest:
        """The manifest of NAME, typed (the errors of read_manifest)."""
        return Manifest.from_dict(self.read_manifest(name))

    def manifest_or_none(self, name: str) -> dict[str, Any] | None:
        """The manifest, or None when there is no cache (a broken manifest is still an error)."""
        try:
            return self.read_manifest(name)
        except CacheNotFoundError:
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
        """Work of interrupted runs on NAME: work dirs and archives, manifest temporaries, published pairs that
        are not current (a publish killed before or after its switch)."""
        found: list[Path] = []
        if self.root.is_dir():
            # Exactly NAME's: `.tmp-debian-12-x86_64-devel-build-1` is not a leftover of debian-12-x86_64.
            pattern = re.compile(rf"^{re.escape(TMP_PREFIX + name)}(?:-[a-z]+-\d+|\.json\.\d+|"
                                 rf"{re.escape(ARCHIVE_SUFFIX)}-link-\d+|{re.escape(MANIFEST_SUFFIX)}-link-\d+)$")
            found += [p for p in self.root.iterdir() if pattern.match(p.name)]
        pdir = self.published_dir(name)
        if pdir.is_dir():
            current = self._current_id(name)
            found += [p for p in pdir.iterdir() if p.name not in (CURRENT, current)]
        return found

    def _current_id(self, name: str) -> str | None:
        """The generation `current` names: a plain name in .published/NAME/ (publish writes nothing else). A link
        edited to point elsewhere ("/srv", "../..") is no generation: publish would rmtree it as the previous one."""
        try:
            ident = os.readlink(self.published_dir(name) / CURRENT)
        except OSError:
            return None
        return ident if ident not in ("", ".", "..") and "/" not in ident else None

    def _adopt_regular_files(self, name: str) -> None:
        """A pair of regular files (an older vzpkg, or copied by hand) becomes a published pair: hard links
        into its own directory, then each name becomes a symlink to the very same file: consistent throughout."""
        regular = [p for p in (self.archive_path(name), self.manifest_path(name)) if p.is_file() and not p.is_symlink()]
        if not regular:
            return
        pdir = self.published_dir(name)
        ident = f"adopted-{time.time_ns()}-{os.getpid()}"
        gen = pdir / ident
        gen.mkdir(parents=True)
        try:
            for p in regular:
                os.link(p, gen / p.name)
                with open(gen / p.name, "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(gen)
            _symlink_atomic(ident, pdir / CURRENT)
        except BaseException:
            if self._current_id(name) != ident:
                shutil.rmtree(gen, ignore_errors=True)
            raise
        fsync_dir(pdir)
        for p in (self.manifest_path(name), self.archive_path(name)):
            if p in regular:
                _symlink_atomic(f"{PUBLISHED_DIR}/{name}/{CURRENT}/{p.name}", p)
        fsync_dir(self.root)

    def publish(self, name: str, archive_tmp: Path, manifest: dict[str, Any]) -> None:
        """Atomically replace the cache NAME by ARCHIVE_TMP (on the cache's filesystem) and MANIFEST.

        The pair goes into a directory of its own; one rename of the `current` symlink makes it the cache.
        Killed or out of space at any step, NAME is the old pair or the new one; what is left over is removed by
        the next run on NAME (`clean_leftovers`). The previously current pair is removed once replaced."""
        pdir = self.published_dir(name)
        try:
            pdir.mkdir(parents=True, exist_ok=True)
            self._adopt_regular_files(name)
            previous = self._current_id(name)
            ident = f"{str(manifest.get('sha256', 'x'))[:16]}-{time.time_ns()}-{os.getpid()}"
            gen = pdir / ident
            gen.mkdir()
        except OSError as e:
            if is_full(e):
                raise disk_full_error(e, pdir) from e
            raise
        try:
            os.rename(archive_tmp, gen / self.archive_path(name).name)
            write_json(gen / self.manifest_path(name).name, manifest)
            fsync_dir(gen)
            _symlink_atomic(ident, pdir / CURRENT)  # the switch: from here on NAME is the new pair
        except BaseException as e:
            if self._current_id(name) != ident:
                shutil.rmtree(gen, ignore_errors=True)
            if isinstance(e, OSError) and is_full(e):
                raise disk_full_error(e, gen) from e
            raise
        fsync_dir(pdir)
        # Made once: the manifest's name first, so the archive's name never resolves without a manifest.
        for p in (self.manifest_path(name), self.archive_path(name)):
            target = f"{PUBLISHED_DIR}/{name}/{CURRENT}/{p.name}"
            if not (p.is_symlink() and os.readlink(p) == target):
                _symlink_atomic(target, p)
        fsync_dir(self.root)
        if previous and previous != ident:
            shutil.rmtree(pdir / previous, ignore_errors=True)

    def remove(self, name: str) -> None:
        if not self.exists(name) and not self.manifest_path(name).exists():
            raise CacheNotFoundError(f"no cache for template {name!r} in {self.root}")
        for path in (self.archive_path(name), self.manifest_path(name)):
            path.unlink(missing_ok=True)
        fsync_dir(self.root)
        shutil.rmtree(self.published_dir(name), ignore_errors=True)
        try:
            (self.root / PUBLISHED_DIR).rmdir()
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.ENOENT, errno.EEXIST):
                raise

    def verify(self, name: str) -> dict[str, Any]:
        """Recompute the sha256 and read the whole archive; raise VerifyError on any mismatch."""
        import tarfile

        import zstandard

        from .archive import iter_members, sha256_file

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

    def matches_manifest(self, name: str) -> bool:
        """Whether the current archive's sha256 is the one its manifest records (a quick check, no unpacking)."""
        from .archive import sha256_file

        try:
            return sha256_file(self.archive_path(name)) == self.read_manifest(name).get("sha256")
        except (OSError, CacheNotFoundError, VerifyError):
            return False

    def clean_leftovers(self, name: str) -> list[Path]:
        """Remove work in progress of an earlier, interrupted run (call with the template's lock held)."""
        from ..build.chroot import remove_work_dir

        removed = []
        for path in self.leftovers(name):
            if path.is_dir() and not path.is_symlink():
                remove_work_dir(path)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        return removed
