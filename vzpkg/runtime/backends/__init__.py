"""Storage backends: where a VE's private area lives and how its disk limits are enforced.

    overlay    private/<id>/upper + work on the VZ root's file system; no disk limits (today's layout)
    copy       private/<id>/root, a cp -a of the template; no disk limits
    image      private/<id>/root.img, a sparse ext4 image loop-mounted at private/<id>/fs; the overlay's upper and
               work dirs live in it, the template stays the shared lower layer. Size = hard space limit, its
               inode count = inode limit (see image.py)
    btrfs      a snapshot of the template's read-only subvolume in the VZ root's btrfs pool; qgroup exclusive
               limit = hard space limit; no inode limits (see btrfs.py)
    projquota  ext4/XFS project quotas; needs kernel quota support this host lacks: refused (see projquota.py)

One small interface (Backend): prepare (inside the temporary private area a create builds), mount, unmount,
resize, usage, destroy, recover. A VE's backend is its config's LAYOUT; `create` picks it from --layout, the
sample's LAYOUT, or the VZ root's default (storage.conf, see choose()).
"""

from __future__ import annotations

import os
from pathlib import Path

from vzpkg.errors import UsageError

from ..layout import Layout

KINDS = ("overlay", "copy", "image", "btrfs", "projquota")
AUTO = "auto"


from .base import Backend, Limits, Usage  # noqa: E402,F401  (re-exported: the backends' interface)


def get(kind: str | None) -> Backend:
    kind = kind or "overlay"
    if kind in ("overlay", "copy"):
        from .overlay import CopyBackend, OverlayBackend

        return OverlayBackend() if kind == "overlay" else CopyBackend()
    if kind == "image":
        from .image import ImageBackend

        return ImageBackend()
    if kind == "btrfs":
        from .btrfs import BtrfsBackend

        return BtrfsBackend()
    if kind == "projquota":
        from .projquota import ProjQuotaBackend

        return ProjQuotaBackend()
    raise UsageError(f"unknown layout {kind!r}: use one of {', '.join(KINDS)} (or auto)")


# ---------------------------------------------------------------------------------------------------------
# the VZ root's storage settings: <root>/storage.conf, KEY="value" lines (DEFAULT_LAYOUT)


def storage_conf_path(layout: Layout) -> Path:
    return layout.root / "storage.conf"


def read_storage_conf(layout: Layout) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        text = storage_conf_path(layout).read_text()
    except (OSError, UnicodeDecodeError):
        return out
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            out[key.strip()] = value.strip().strip('"')
    return out


def write_storage_conf(layout: Layout, values: dict[str, str]) -> None:
    data = read_storage_conf(layout)
    data.update(values)
    path = storage_conf_path(layout)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text("".join(f'{k}="{v}"\n' for k, v in data.items()))
    os.rename(tmp, path)


def default_layout(layout: Layout) -> str:
    value = read_storage_conf(layout).get("DEFAULT_LAYOUT") or AUTO
    return value if value in KINDS or value == AUTO else AUTO


def choose(layout: Layout, requested: str | None, limits: Limits) -> str:
    """The backend of a new VE: REQUESTED (--layout, or the sample's LAYOUT), else the VZ root's DEFAULT_LAYOUT;
    "auto" means btrfs when the VZ root has a btrfs pool and the VE has only a space limit, image when it has
    any disk limit, overlay when it has none."""
    kind = requested or default_layout(layout)
    if kind != AUTO:
        if kind not in KINDS:
            raise UsageError(f"unknown layout {kind!r}: use one of {', '.join(KINDS)} or auto")
        return kind
    if not limits.any:
        return "overlay"
    from . import btrfs

    if limits.inodes_hard is None and btrfs.pool_available(layout):
        return "btrfs"
    return "image"


def backend_of(conf) -> Backend:
    return get(conf.get("LAYOUT") or "overlay")


# ---------------------------------------------------------------------------------------------------------
# what every backend may have left, found without the VE's config (stop's clean-up, crash recovery)


def unmount_all(layout: Layout, veid: str) -> None:
    """The VE's root, and its image's file system if one is mounted (so the loop device is detached)."""
    from .. import storage

    storage.umount_root(layout, veid)
    # only an image VE has private/<id>/fs: stop of every other VE need not import the image backend (and with
    # it the process layer), ~7 ms of `vzctl stop` and `destroy`
    if os.path.isdir(layout.private(veid) / "fs"):
        from .image import unmount_fs

        unmount_fs(layout, veid)


def destroy_all(layout: Layout, veid: str) -> None:
    """Remove the VE's storage of any backend: mounts, loop devices, btrfs subvolume and qgroup, private area."""
    from .. import storage

    unmount_all(layout, veid)
    # the image and btrfs modules (and the process layer they load) only where there can be something of theirs:
    # a loop device attached at all, a btrfs pool in this VZ root; ~7 ms of every other `vzctl destroy`
    if any(os.path.exists(f"/sys/block/{d}/loop/backing_file") for d in os.listdir("/sys/block")
           if d.startswith("loop")):
        from . import image

        image.recover_leftovers(layout, veid)
    if (layout.root / "btrfs").is_dir():
        from . import btrfs

        btrfs.remove_subvolume(layout, veid)
    storage.remove_private(layout, veid)


def recover_all(layout: Layout, veid: str, *, gone: bool) -> list[tuple[Path, int]]:
    """Leftovers of a killed create/resize/destroy. GONE: the VE has no config (its create or destroy was cut
    off): its mounts, loop devices and subvolume go too, before leftovers.py removes its private area."""
    from . import btrfs, image

    removed: list[tuple[Path, int]] = []
    if gone:
        unmount_all(layout, veid)
    removed += image.recover_leftovers(layout, veid)
    if gone:
        removed += btrfs.remove_subvolume(layout, veid)
    return removed


# ---------------------------------------------------------------------------------------------------------
# vzctl set and status


DISK_KEYS = frozenset({"DISKSPACE", "DISKINODES"})


def apply_disk_limits(layout: Layout, veid: str, conf, changes: dict[str, str], *, running: bool, save: bool,
                      lock) -> frozenset[str]:
    """`vzctl set --diskspace/--diskinodes --save`: resize the VE's storage now (grow at once, also while it
    runs; shrink offline), before the config is saved, so a refusal changes nothing. Returns the keys applied
    at once (empty when the backend enforces no disk limits, or without --save: the config and the storage
    must not disagree). CONF already holds the new values."""
    if changes.get("QUOTAUGIDLIMIT") not in (None, "", "0"):
        from .projquota import check_quotaugidlimit

        check_quotaugidlimit(int(changes["QUOTAUGIDLIMIT"]))
    keys = DISK_KEYS & set(changes)
    if not keys or not save:
        return frozenset()
    backend = backend_of(conf)
    if not backend.space_limits:
        return frozenset()
    from ..confcache import load_conf

    old = Limits.of(load_conf(layout, veid))
    new = Limits.of(conf)
    lock.begin("resize")  # a SIGKILL from here on: the next command on the VE finishes or undoes it
    try:
        now = backend.resize(layout, veid, old, new, running=running)
    finally:
        lock.done()
    return frozenset(keys) if now else frozenset()


def quota_report(layout: Layout, veid: str, conf) -> dict:
    """`vzctl status --quota`: used, soft and hard limits in 1K blocks and inodes (None = unlimited/unknown),
    from the kernel (statfs of the image, the btrfs qgroup); enforced says whether the backend enforces them."""
    backend = backend_of(conf)
    limits = Limits.of(conf)
    usage = backend.usage(layout, veid)

    def kb(n: int | None) -> int | None:
        return None if n is None else -(-n // 1024)

    return {
        "layout": backend.kind,
        "diskspace": {"used": usage.blocks_used if usage else None, "soft": kb(limits.space_soft),
                      "hard": kb(limits.space_hard), "size": usage.blocks_total if usage else None,
                      "enforced": backend.space_limits},
        "diskinodes": {"used": usage.inodes_used if usage else None, "soft": limits.inodes_soft,
                       "hard": limits.inodes_hard, "size": usage.inodes_total if usage else None,
                       "enforced": backend.inode_limits},
    }
