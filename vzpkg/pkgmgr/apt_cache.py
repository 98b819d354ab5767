"""The package download cache of apt builds: .debs and index files moved in and out of a root being built.

Hard links where the root shares the cache's filesystem, copies where it does not (a root on a tmpfs), so a
rebuild neither downloads packages again nor index files that did not change (apt revalidates them). Used by
update-cache directly and, as `python -m vzpkg.pkgmgr.apt_cache in|out CACHE ROOT`, by mmdebstrap's hooks
(mmdebstrap creates the root itself, so only its hooks run at the right moments).

A cache is an optimisation: a file that cannot be placed is skipped, never an error.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from pathlib import Path

ARCHIVES = "var/cache/apt/archives"
LISTS = "var/lib/apt/lists"
TMP_PREFIX = ".tmp-"
STALE_AFTER = 300.0  # seconds without a write: the run that made a partial copy is gone


def _place(src: Path, dest: Path) -> None:
    """Put SRC at DEST (replacing it) as a hard link, or a copy across filesystems."""
    tmp = dest.with_name(f"{TMP_PREFIX}{dest.name}.{os.getpid()}")
    try:
        if dest.exists() and os.path.samefile(src, dest):
            return
        try:
            os.link(src, tmp)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            shutil.copy2(src, tmp)
        os.rename(tmp, dest)
    except OSError:
        tmp.unlink(missing_ok=True)  # a copy cut short (a full disk) is not left behind


def _is_work_file(path: Path) -> bool:
    return path.name.startswith(TMP_PREFIX)


def remove_stale_work_files(cache: Path, min_age: float = STALE_AFTER) -> list[Path]:
    """Partial copies left in CACHE by a run that was killed (`.tmp-*`, and `.tmp-.tmp-*` copied from a root).

    The package cache is shared by every template's builds, so only files untouched for MIN_AGE seconds go: a
    copy in progress is written to all the time."""
    removed = []
    now = time.time()
    for directory in (cache, cache / "lists"):
        if not directory.is_dir():
            continue
        for p in directory.iterdir():
            try:
                if _is_work_file(p) and p.is_file() and now - p.lstat().st_mtime >= min_age:
                    p.unlink()
                    removed.append(p)
            except OSError:
                pass
    return removed


def _files(directory: Path) -> list[Path]:
    """The files worth caching: not apt's lock, not anyone's partial copies."""
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.is_file() and p.name != "lock" and not _is_work_file(p)]


def sync_in(cache: Path, root: Path) -> None:
    """Before apt runs in ROOT: the cached packages and index files."""
    archives, lists = root / ARCHIVES, root / LISTS
    remove_stale_work_files(cache)
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    for deb in (p for p in cache.glob("*.deb") if not _is_work_file(p)):
        _place(deb, archives / deb.name)
    for index in _files(cache / "lists"):
        _place(index, lists / index.name)


def sync_out(cache: Path, root: Path) -> None:
    """After apt ran in ROOT: new packages join the cache; the cached index files become ROOT's exactly."""
    cache_lists = cache / "lists"
    cache_lists.mkdir(parents=True, exist_ok=True)
    for deb in (p for p in (root / ARCHIVES).glob("*.deb") if not _is_work_file(p)):
        if not (cache / deb.name).exists():  # one name and version, one content: nothing to replace
            _place(deb, cache / deb.name)
    current = {p.name: p for p in _files(root / LISTS)}
    for stale in _files(cache_lists):
        if stale.name not in current:
            stale.unlink(missing_ok=True)
    for index in current.values():
        _place(index, cache_lists / index.name)


def hook_command(direction: str, cache: Path) -> str:
    """The shell command an mmdebstrap hook runs ($1 is the root) to sync in or out."""
    import shlex

    package_parent = Path(__file__).resolve().parents[2]
    return (f"PYTHONPATH={shlex.quote(str(package_parent))} "
            f"{shlex.join([sys.executable, '-m', __name__, direction, str(cache)])} \"$1\"")


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("in", "out"):
        print("usage: python -m vzpkg.pkgmgr.apt_cache in|out CACHE ROOT", file=sys.stderr)
        return 2
    direction, cache, root = argv[0], Path(argv[1]), Path(argv[2])
    (sync_in if direction == "in" else sync_out)(cache, root)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
