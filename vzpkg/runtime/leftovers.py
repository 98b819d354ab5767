"""What interrupted vzctl runs leave behind, found and finished or removed.

Each VE's lock file (lock/<id>.lock, flock'ed by every vzctl operation on the VE) doubles as a one-line
journal: an operation that can be cut off half-way (create, destroy, set --save) writes its name into it
while holding the lock, and empties it when done; a Python-level failure undoes its own work and empties it
too. So a non-empty lock file seen by the next holder means the previous one was killed (SIGKILL, power
loss): `recover` (run by ve.VELock for every operation, and by `vzpkg clean --ves`) then

    create    no config yet: the private area (and root/<id>) it made is removed; config saved: nothing to undo
    destroy   the destroy is finished (ve.py does that part: stop, then the files below)
    save      a temporary config file conf/.<id>.conf.XXXXXXXX.tmp is removed

and always removes the VE's dead temporary directories (private/.tmp-<id>-<pid>, .tmp-<id>-destroy-<pid>).
`sweep` is the whole-root pass of `vzpkg clean --ves`: every VE's journal, dead temporary directories and files
of any VE, lock files of VEs that do not exist, empty mount points of VEs that do not exist, and interrupted
template unpacks (template/.tmp-*).
"""

from __future__ import annotations

import os
from pathlib import Path

from .layout import Layout, valid_veid

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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_pid(name: str) -> int | None:
    """The pid at the end of a temporary name (.tmp-...-<pid>, .<file>.<pid>), or None."""
    for sep in ("-", "."):
        tail = name.rsplit(sep, 1)[-1]
        if tail.isascii() and tail.isdigit() and tail != name:
            return int(tail)
    return None


def kill_writers(path: Path, timeout: float = 5.0) -> None:
    """SIGKILL every process whose cwd, root, an open file or an argument lies under PATH; wait until they are gone.

    A killed vzctl's children live on: the `cp -a` of a copy-layout create keeps filling its temporary
    directory, and would refill what we remove."""
    import signal
    import time

    prefix = os.fsencode(path)
    me = os.getpid()
    victims = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        links = [f"/proc/{name}/cwd", f"/proc/{name}/root"]
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            links += [f"/proc/{name}/fd/{fd}" for fd in os.listdir(f"/proc/{name}/fd")]
        except OSError:
            continue
        if any(a == prefix or a.startswith(prefix + b"/") for a in args):  # cp -a TEMPLATE PATH/root
            victims.append(int(name))
            continue
        for link in links:
            try:
                target = os.readlink(os.fsencode(link))
            except OSError:
                continue
            if target == prefix or target.startswith(prefix + b"/"):
                victims.append(int(name))
                break
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while victims and time.monotonic() < deadline:
        victims = [p for p in victims if _running(p)]
        time.sleep(0.01)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def remove_tree(path: Path) -> int:
    """Remove PATH (a directory tree or a file) without following symlinks or crossing mounts; return bytes freed.
    Processes still working in it (children of a killed vzctl) are killed first."""
    from .storage import disk_usage

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if os.path.isdir(path) and not os.path.islink(path):
        kill_writers(path)
        from .storage import detach_below

        detach_below(path)  # e.g. the template a killed copy-layout create had attached at .tmp-<id>-*/lower
    if not os.path.isdir(path) or os.path.islink(path):
        os.unlink(path)
        return st.st_blocks * 512
    size = disk_usage(path)
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        # overlay work dirs can hold a d--------- 'work' dir that rmtree cannot enter
        import subprocess

        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], capture_output=True)
    return size


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
    for p in dead_private_tmps(layout, veid):
        removed.append((p, remove_tree(p)))
    for name in _listdir(layout.conf_dir):
        if _is_conf_tmp(name, veid):
            p = layout.conf_dir / name
            removed.append((p, remove_tree(p)))
    return removed


def sweep(layout: Layout) -> list[tuple[Path, int]]:
    """`vzpkg clean --ves`: every leftover of interrupted runs in the VZ root; VEs in use are left alone."""
    from . import storage, ve

    removed: list[tuple[Path, int]] = []
    veids = {n[:-5] for n in _listdir(layout.lock_dir) if n.endswith(".lock") and valid_veid(n[:-5])}
    veids |= {v for n in _listdir(layout.conf_dir) if (v := _conf_tmp_veid(n))}
    veids |= {n for n in _listdir(layout.mount_dir) if valid_veid(n) and not layout.conf(n).exists()}
    for veid in sorted(veids):
        had_lock_file = os.path.exists(layout.lock(veid))
        lock = ve.VELock(layout, veid, wait=False)
        try:
            with lock:
                removed.extend(lock.recovered)
                if not ve.exists(layout, veid):
                    p = layout.ve_root(veid)
                    if os.path.isdir(p) and not storage.is_mounted(p) and not _listdir(p):
                        os.rmdir(p)
                        removed.append((p, 0))
                    if had_lock_file:
                        removed.append((layout.lock(veid), 0))  # VELock removes it on the way out
        except BlockingIOError:
            continue  # a command runs on this VE right now: it recovers what it finds itself
    for p in dead_private_tmps(layout):
        removed.append((p, remove_tree(p)))
    for name in _listdir(layout.run_dir):
        pid = _tmp_pid(name) if name.startswith(".") else None
        if pid is not None and not pid_alive(pid):
            p = layout.run_dir / name
            removed.append((p, remove_tree(p)))
    if layout.template_dir.is_dir():
        # creates hold the area's lock (shared) while they unpack: with it held exclusively, every .tmp-* there
        # is the leftover of an unpack that was killed
        with storage.templates_lock(layout, exclusive=True):
            for name in _listdir(layout.template_dir):
                if name.startswith(TMP_PREFIX):
                    p = layout.template_dir / name
                    removed.append((p, remove_tree(p)))
    return removed
