"""Out of space: which filesystem is full, how much was needed, and the one error that says so.

ENOSPC (and EDQUOT) can come from any write: packing, saving a stage, unpacking into the build root, the metadata
cache, a manifest. Write sites that would leave a partial file (pack, publish, the manifest, the package cache)
remove it and raise DiskFullError naming the mount point; the CLI turns any ENOSPC that escapes elsewhere into
the same one line (work directories are removed by the `finally` blocks that always run).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from .errors import DiskFullError

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in FULL_ERRNOS


def mount_point(path: str | os.PathLike[str]) -> str:
    """The mount point of the filesystem PATH is on (PATH need not exist: its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    real = os.path.realpath(p)
    best = "/"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].replace("\\040", " ")
                if (real == mp or real.startswith(mp.rstrip("/") + "/")) and len(mp) > len(best):
                    best = mp
    except OSError:
        pass
    return best


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def disk_full_error(exc: OSError | None, path: str | os.PathLike[str] | None, needed: int | None = None) -> DiskFullError:
    """DiskFullError for a failed write to PATH (or the exception's file name): filesystem, free, needed."""
    where = path
    if exc is not None:
        # symlink(2) reports its target as the file name; the link (filename2) is where the write was.
        for name in (exc.filename2, exc.filename):
            if isinstance(name, str) and os.path.isabs(name):
                where = name
                break
    quota = exc is not None and exc.errno == errno.EDQUOT
    what = "disk quota exceeded" if quota else "no space left"
    if where is None:
        return DiskFullError(f"{what} on a filesystem vzpkg writes to: free some space and run the command again")
    mp = mount_point(where)
    details = []
    try:
        details.append(f"{_mb(shutil.disk_usage(mp).free)} free")
    except OSError:
        pass
    if needed:
        details.append(f"{_mb(needed)} needed")
    extra = f" ({', '.join(details)})" if details else ""
    return DiskFullError(f"{what} on the filesystem at {mp}{extra} while writing {where}: "
                         f"free space there (vzpkg clean) or point vzpkg at a larger one, then run the command again")
