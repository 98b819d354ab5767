"""vzlist's rows: one dict per VE, read from its config, its init record, its cgroups and its private area."""

from __future__ import annotations

import os

from vzpkg.errors import VEError, VENotFoundError

from . import storage
from .layout import Layout, check_veid
from .state import cgroup_driver as _cgroups
from .state import live_init as running_init


def list_ves(layout: Layout, veids: list[str] | None = None, *, disk: bool = True, quota: bool = False
             ) -> list[dict]:
    """One dict per VE for vzlist: veid, status, hostname, ip, numproc, memory (bytes used), disk (bytes
    in its private area), ostemplate, layout, init_pid; with QUOTA diskspace (1K blocks used) and diskinodes
    (inodes used) from its storage backend (the kernel's figures for image and btrfs; a walk for overlay)."""
    from .conf import VEConfig

    cg = None
    rows = []
    for veid in veids or layout.veids():
        veid = check_veid(veid)
        if veids and not layout.conf(veid).exists():
            # asked for by name: an unknown VE is an error, as in vzctl (not an empty, successful list)
            raise VENotFoundError(f"VE {veid} does not exist (no {layout.conf(veid)})")
        try:
            conf = VEConfig.load(layout.conf(veid), strict=False)
        except Exception:
            conf = None
        if conf is None and not layout.conf(veid).exists():
            continue
        rec = running_init(layout, veid)
        row: dict = {
            "veid": veid,
            "status": "running" if rec else ("mounted" if storage.is_mounted(layout.ve_root(veid)) else
                                             "suspended" if (layout.run_dir / f"{veid}.suspended").exists()
                                             else "stopped"),
            "hostname": conf.get("HOSTNAME") if conf else None,
            "ip": conf.get("IP_ADDRESS") if conf else None,
            "ostemplate": conf.get("OSTEMPLATE") if conf else None,
            "layout": (conf.get("LAYOUT") or "overlay") if conf else None,
            "init_pid": rec.pid if rec else None,
            "numproc": None,
            "memory": None,
            "disk": None,
        }
        if rec is not None:
            try:
                cg = cg or _cgroups()
                counters = cg.counters(layout.cgroup_name(veid))
                row["numproc"] = (counters.get("numproc") or {}).get("held")
                row["memory"] = (counters.get("memory") or {}).get("held")
            except VEError:
                pass
        if disk:
            row["disk"] = storage.disk_usage(layout.private(veid))
        if quota and conf is not None:
            from .backends import backend_of

            try:
                usage = backend_of(conf).usage(layout, veid)
            except VEError:
                usage = None
            row["diskspace"] = usage.blocks_used if usage else None
            row["diskinodes"] = usage.inodes_used if usage else None
        rows.append(row)
    return rows


def status(layout: Layout, veid: str, *, beancounters: bool = False, quota: bool = False) -> dict:
    veid = check_veid(veid)
    exists = layout.conf(veid).exists()
    mounted = storage.is_mounted(layout.ve_root(veid))
    rec = running_init(layout, veid)
    out: dict = {
        "veid": veid,
        "exist": exists,
        "mounted": mounted,
        "running": rec is not None,
        "init_pid": rec.pid if rec else None,
        "suspended": rec is None and os.path.exists(layout.run_dir / f"{veid}.suspended"),
        "layout": _layout_of(layout, veid) if exists else None,
    }
    if quota and exists:
        from .backends import quota_report
        from .confcache import load_conf

        out["quota"] = quota_report(layout, veid, load_conf(layout, veid))
    if beancounters:
        try:
            cg = _cgroups()
            name = layout.cgroup_name(veid)
            out["beancounters"] = cg.counters(name) if cg.exists(name) else {}
        except VEError:
            out["beancounters"] = {}
    return out


def _layout_of(layout: Layout, veid: str) -> str | None:
    """LAYOUT from the config without parsing it all (status is cheap)."""
    from vzpkg.safeio import CONF_MAX, read_small_text

    try:
        text = read_small_text(layout.conf(veid), CONF_MAX)
    except (OSError, UnicodeDecodeError):
        return None
    kind = "overlay"
    for line in text.splitlines():
        if line.startswith("LAYOUT="):
            kind = line[7:].strip().strip('"')
    return kind


def status_line(st: dict) -> str:
    words = ["exist" if st["exist"] else "deleted", "mounted" if st["mounted"] else "unmounted",
             "running" if st["running"] else "down"] + (["suspended"] if st.get("suspended") else [])
    return f"VEID {st['veid']} {' '.join(words)}"
