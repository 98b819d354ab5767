"""Owners of throw-away VEs: a process (a test run, an xdist worker, a script using vzpkg.api) that creates VEs
with allocated ids, and whose VEs go when it goes — even when it is killed with SIGKILL.

    lock/owners/<token>     flock'ed (exclusive) by the owning process for as long as it lives
    dump/<token>-*          its checkpoints (the pytest plugin's warm images), removed with its VEs

An owner's VEs are named `<token>-<n>` (n = 1, 2, ...: from a counter of the process, so threads get distinct
ids without asking anyone; a VE of that name that exists already is skipped). The token is 8 random hex digits
after an `o`, and the file is made under a temporary name, locked, then linked into place with O_EXCL
semantics (link fails if it exists): a sweeper never sees an owner file that is not yet locked, and two
processes never share a token.

`sweep` (the pytest plugin at the start of every session, the first VE an owner creates, and `vzpkg clean
--ves`) takes each owner file's lock without waiting: held means its owner lives (another test run, another
worker: left alone); free means it died, and its VEs (running or not, half-created or half-destroyed: the VE
lock's journal finishes those) are destroyed, then the file removed.
"""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path

from vzpkg.flock import take

from .layout import Layout, valid_veid

OWNERS_DIR = "owners"


def owners_dir(layout: Layout) -> Path:
    return layout.lock_dir / OWNERS_DIR


class Owner:
    """This process's claim on a VZ root; `next_id()` gives VE ids no other owner uses."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.pid = os.getpid()
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        d = owners_dir(layout)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        while True:
            token = "o" + os.urandom(4).hex()
            tmp = d / f".{token}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                take(fd)
                os.write(fd, f"{os.getpid()}\n".encode())
                try:
                    os.link(tmp, d / token)
                except FileExistsError:
                    os.close(fd)
                    continue
            finally:
                tmp.unlink(missing_ok=True)
            break
        self.token = token
        self.fd = fd

    def next_id(self) -> str:
        with self._lock:
            return f"{self.token}-{next(self._counter)}"

    def owns(self, veid: str) -> bool:
        return veid.startswith(f"{self.token}-")

    def release(self) -> None:
        """Remove the owner file (its VEs should be gone: a sweep would destroy any left once the lock is free)."""
        if self.fd >= 0 and os.getpid() == self.pid:
            (owners_dir(self.layout) / self.token).unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = -1


def _ves_of(layout: Layout, token: str) -> list[str]:
    """Every VE (or leftover of one) named <token>-*: configs, private areas, lock files, mount points."""
    prefix = f"{token}-"
    found: set[str] = set()
    for d, suffix in ((layout.conf_dir, ".conf"), (layout.lock_dir, ".lock"), (layout.private_dir, ""),
                      (layout.mount_dir, "")):
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            continue
        for name in names:
            if name.startswith(prefix) and name.endswith(suffix):
                veid = name[: len(name) - len(suffix)] if suffix else name
                if valid_veid(veid):
                    found.add(veid)
    return sorted(found)


def _remove_checkpoints(layout: Layout, token: str) -> list[tuple[Path, int]]:
    """The owner's checkpoints (the pytest plugin's warm images dump/<token>-warm<n>, and a dump it was making:
    dump/.<token>-...tmp-<pid>)."""
    import shutil

    gone = []
    d = layout.root / "dump"
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return gone
    for name in names:
        if name.startswith((f"{token}-", f".{token}-")):
            shutil.rmtree(d / name, ignore_errors=True)
            gone.append((d / name, 0))
    return gone


def _remove_dead_tmp(path: Path) -> None:
    """.<token>.<pid>.tmp of an owner killed while making its file."""
    from .leftovers import pid_alive

    pid = path.name.rsplit(".", 2)[-2] if path.name.count(".") >= 3 else ""
    if pid.isdigit() and not pid_alive(int(pid)):
        path.unlink(missing_ok=True)


def sweep(layout: Layout) -> list[tuple[Path, int]]:
    """Destroy the VEs of owners that died (their lock is free); leave live owners alone. Returns what was removed
    ([(path, 0)]: the VE's config path for each VE, and the owner files)."""
    from vzpkg.errors import VzError

    from . import ve

    removed: list[tuple[Path, int]] = []
    d = owners_dir(layout)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return removed
    for token in names:
        if token.startswith("."):
            _remove_dead_tmp(d / token)
            continue
        path = d / token
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            if not take(fd, wait=False):
                continue  # its owner lives
            if not os.path.exists(path) or os.stat(path).st_ino != os.fstat(fd).st_ino:
                continue  # removed (or replaced) while we opened it
            for veid in _ves_of(layout, token):
                try:
                    ve.destroy(layout, veid, force=True)
                    removed.append((layout.conf(veid), 0))
                except VzError:
                    pass  # gone already, or its leftovers were just recovered by the VE lock
            removed += _remove_checkpoints(layout, token)
            path.unlink(missing_ok=True)
            removed.append((path, 0))
        finally:
            os.close(fd)
    return removed
