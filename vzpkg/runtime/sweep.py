"""`vzpkg clean --ves`: the whole-root pass over what interrupted runs left (the per-VE part is leftovers.py).

It sits above the verbs (it destroys dead API owners' VEs and takes each VE's lock), so that leftovers.py, which
the VE lock itself runs, stays below them."""

from __future__ import annotations

import os
from pathlib import Path

from . import owners, storage, ve
from .layout import Layout, valid_veid
from .leftovers import (
    TMP_PREFIX,
    _conf_tmp_veid,
    _listdir,
    _tmp_pid,
    dead_dump_tmps,
    dead_private_tmps,
    pid_alive,
    remove_tree,
)


def sweep(layout: Layout) -> list[tuple[Path, int]]:
    """`vzpkg clean --ves`: every leftover of interrupted runs in the VZ root; VEs in use are left alone."""
    removed: list[tuple[Path, int]] = owners.sweep(layout)  # VEs of API owners (test runs) that were killed
    veids = {n[:-5] for n in _listdir(layout.lock_dir) if n.endswith(".lock") and valid_veid(n[:-5])}
    veids |= {v for n in _listdir(layout.conf_dir) if (v := _conf_tmp_veid(n))}
    veids |= {n for n in _listdir(layout.mount_dir) if valid_veid(n) and not layout.conf(n).exists()}
    routed = {n[:-7] for n in _listdir(layout.run_dir) if n.endswith(".routes") and valid_veid(n[:-7])}
    for veid in sorted(veids | routed):
        had_lock_file = os.path.exists(layout.lock(veid))
        lock = ve.VELock(layout, veid, wait=False)
        try:
            with lock:
                removed.extend(lock.recovered)
                routes = layout.run_dir / f"{veid}.routes"
                if routes.exists() and ve.running_init(layout, veid) is None:
                    from . import net  # a VE that died (or a host route its vzctl was killed before removing)

                    net.remove_veth(layout.real_root(), veid)
                    removed.append((routes, 0))
                if not ve.exists(layout, veid):
                    p = layout.ve_root(veid)
                    if os.path.isdir(p) and not storage.is_mounted(p) and not _listdir(p):
                        os.rmdir(p)
                        removed.append((p, 0))
                    if had_lock_file:
                        removed.append((layout.lock(veid), 0))  # VELock removes it on the way out
        except BlockingIOError:
            continue  # a command runs on this VE right now: it recovers what it finds itself
    for p in dead_private_tmps(layout) + dead_dump_tmps(layout):
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
