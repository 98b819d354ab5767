"""What interrupted vzctl runs leave behind, found and finished or removed.

Each VE's lock file (lock/<id>.lock, flock'ed by every vzctl operation on the VE) doubles as a one-line
journal: an operation that can be cut off half-way (create, destroy, set --save) writes its name into it
while holding the lock, and empties it when done; a Python-level failure undoes its own work and empties it
too. So a non-empty lock file seen by the next holder means the previous one was killed (SIGKILL, power
loss): `recover` (run by ve.VELock for every operation, and by `vzpkg clean --ves`) then

    create    no config yet: the private area (and root/<id>) it made is removed; config saved: nothing to undo
    destroy   the destroy is finished (ve.py does that part: stop, then the files below)
    start     the VE is stopped and everything it held removed (ve.py: processes, cgroups, mount, veth, routes)
    save      a temporary config file conf/.<id>.conf.XXXXXXXX.tmp is removed

    chkpnt    (a checkpoint cut off) only the temporaries below
    restore   (a restore cut off) the cgroups and root mount it set up, if the VE does not run (ve.py)
    migrate   the migration is finished or undone (migrate_journal.py); receive: its destination side

and always removes the VE's dead temporary directories (private/.tmp-<id>-<pid>, .tmp-<id>-destroy-<pid>,
.tmp-<id>-migrate-<pid>) and CRIU's (dump/.<id>.tmp-<pid> ..., see dead_dump_tmps; CRIU's action scripts and
pid files in run/ are swept by `vzpkg clean --ves`).
`sweep.py` is the whole-root pass of `vzpkg clean --ves`: the VEs of dead API owners (owners.py), every VE's
journal, dead temporary directories and files of any VE, the host routes (run/<id>.routes) of VEs that are not
running, lock files of VEs that do not exist, empty mount points of VEs that do not exist, and interrupted
template unpacks (template/.tmp-*).
"""

from __future__ import annotations

import os
from pathlib import Path

from .layout import Layout, valid_veid
from .state import pid_alive  # noqa: F401  (re-exported)
from .storage import kill_writers, remove_tree  # noqa: F401  (re-exported)

TMP_PREFIX = ".tmp-"


def read_intent(fd: int) -> str:
    try:
        return os.pread(fd, 256, 0).decode(errors="replace").split("\n", 1)[0].strip()
    except OSError:
        return ""


def write_intent(fd: int, what: str) -> None:
    data = f"{what} {os.getpid()}\n".encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def clear_intent(fd: int) -> None:
    os.ftruncate(fd, 0)


def _tmp_pid(name: str) -> int | None:
    """The pid at the end of a temporary name (.tmp-...-<pid>, .<file>.<pid>), or None."""
    for sep in ("-", "."):
        tail = name.rsplit(sep, 1)[-1]
        if tail.isascii() and tail.isdigit() and tail != name:
            return int(tail)
    return None








def _is_conf_tmp(name: str, veid: str) -> bool:
    # VEConfig.save's tempfile.mkstemp(prefix=".<id>.conf.", suffix=".tmp"): 8 random characters between
    prefix = f".{veid}.conf."
    return name.startswith(prefix) and name.endswith(".tmp") and len(name) == len(prefix) + 8 + 4


def _conf_tmp_veid(name: str) -> str | None:
    if not (name.startswith(".") and name.endswith(".tmp") and len(name) > 1 + 6 + 8 + 4):
        return None
    veid = name[1:-(6 + 8 + 4)]
    return veid if name[-(6 + 8 + 4):-(8 + 4)] == ".conf." and valid_veid(veid) else None


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def dead_private_tmps(layout: Layout, veid: str | None = None) -> list[Path]:
    """private/.tmp-<id>-<pid> and .tmp-<id>-destroy-<pid> of dead processes (of VEID, or of any VE)."""
    out = []
    for name in _listdir(layout.private_dir):
        if not name.startswith(TMP_PREFIX):
            continue
        if veid is not None and not (name.startswith(f"{TMP_PREFIX}{veid}-")):
            continue
        pid = _tmp_pid(name)
        if pid is not None and not pid_alive(pid):
            out.append(layout.private_dir / name)
    return out


def _criu_uses(path: Path) -> bool:
    """Whether a live process names PATH on its command line (a CRIU that outlived its vzctl writes there)."""
    needle = os.fsencode(str(path))
    for pid in _listdir(Path("/proc")):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if needle in f.read():
                        return True
            except OSError:
                continue
    return False


def dead_dump_tmps(layout: Layout, veid: str | None = None) -> list[Path]:
    """CRIU temporaries in dump/ of vzctl runs that died (of VEID, or of any VE): a chkpnt's images being written
    (.<id>.tmp-<pid>), the images it replaced (.<id>.old-<pid>), a clone's checkpoint (.clone-<src>-<dst>-<pid>)
    — unless a CRIU still running writes there."""
    area = layout.root / "dump"
    out = []
    for name in _listdir(area):
        if not name.startswith("."):
            continue
        if veid is not None and not (name.startswith((f".{veid}.tmp-", f".{veid}.old-")) or (
                name.startswith((".clone-", "..clone-")) and f"-{veid}-" in name)):  # (the clone's SRC or DST)
            continue
        pid = _tmp_pid(name)
        if pid is not None and not pid_alive(pid) and not _criu_uses(area / name):
            out.append(area / name)
    return out


def recover_files(layout: Layout, veid: str, intent: str) -> list[tuple[Path, int]]:
    """The file-level part of recovery (the caller holds the VE's lock and has stopped a half-destroyed VE)."""
    removed: list[tuple[Path, int]] = []
    op = intent.split()[0] if intent else ""
    conf_missing = not layout.conf(veid).exists()
    if op == "destroy" and not conf_missing:
        layout.conf(veid).unlink()
        conf_missing = True
        removed.append((layout.conf(veid), 0))
    from .backends import recover_all

    removed += recover_all(layout, veid, gone=op in ("create", "destroy") and conf_missing)
    if op in ("create", "destroy") and conf_missing:
        from . import storage

        for p in (layout.private(veid), layout.run_dir / f"{veid}.conf-cache"):
            if os.path.lexists(p):
                removed.append((p, remove_tree(p)))
        if not storage.is_mounted(layout.ve_root(veid)):
            for p in (layout.ve_root(veid), layout.dump(veid)):
                if os.path.lexists(p):
                    removed.append((p, remove_tree(p)))
    for p in dead_private_tmps(layout, veid) + dead_dump_tmps(layout, veid):
        removed.append((p, remove_tree(p)))
    for name in _listdir(layout.run_dir):  # CRIU's action scripts and pid files of the VE's dead runs
        if name.startswith(f".{veid}.criu-") and (pid := _tmp_pid(name.removesuffix(".sh"))) is not None \
                and not pid_alive(pid):
            p = layout.run_dir / name
            removed.append((p, remove_tree(p)))
    for name in _listdir(layout.conf_dir):
        if _is_conf_tmp(name, veid):
            p = layout.conf_dir / name
            removed.append((p, remove_tree(p)))
    return removed
