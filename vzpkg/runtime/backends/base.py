"""What every storage backend is: the Backend interface, the Limits it enforces, the Usage it reports."""

from __future__ import annotations

import os
from pathlib import Path

from ..layout import Layout


class Limits:
    """Disk limits in bytes and inodes; None = unlimited. soft is reported (OpenVZ's barrier); hard is enforced."""

    __slots__ = ("space_soft", "space_hard", "inodes_soft", "inodes_hard")

    def __init__(self, space: tuple[int | None, int | None] = (None, None),
                 inodes: tuple[int | None, int | None] = (None, None)) -> None:
        self.space_soft, self.space_hard = space
        self.inodes_soft, self.inodes_hard = inodes

    @classmethod
    def of(cls, conf) -> Limits:
        """From a VEConfig, or the validated values of the config cache (confcache._ConfView)."""
        if hasattr(conf, "diskspace"):
            return cls(conf.diskspace, conf.diskinodes)
        from ..conf import _parse_count, parse_barrier_limit, parse_size

        space, inodes = conf.get("DISKSPACE"), conf.get("DISKINODES")
        return cls(parse_barrier_limit(space, parse_size) if space else (None, None),
                   parse_barrier_limit(inodes, _parse_count) if inodes else (None, None))

    @property
    def any(self) -> bool:
        return self.space_hard is not None or self.inodes_hard is not None


class Usage:
    """What the kernel reports: 1K blocks and inodes used and available in all (None: not known)."""

    __slots__ = ("blocks_used", "blocks_total", "inodes_used", "inodes_total")

    def __init__(self, blocks_used: int | None, blocks_total: int | None, inodes_used: int | None,
                 inodes_total: int | None) -> None:
        self.blocks_used, self.blocks_total = blocks_used, blocks_total
        self.inodes_used, self.inodes_total = inodes_used, inodes_total

    @classmethod
    def from_statvfs(cls, path: Path | str) -> Usage:
        st = os.statvfs(path)
        kb = st.f_frsize // 1024
        return cls((st.f_blocks - st.f_bfree) * kb, st.f_blocks * kb, st.f_files - st.f_ffree, st.f_files)


class Backend:
    """The interface; overlay.py, image.py, btrfs.py and projquota.py implement it."""

    kind = ""
    space_limits = False  # does it enforce DISKSPACE / DISKINODES?
    inode_limits = False

    def check(self, layout: Layout, limits: Limits) -> None:
        """Refuse (before anything is made) what this backend cannot do on this host."""

    def prepare(self, layout: Layout, veid: str, tmp: Path, template: Path, id_shift: int, *, idmapped: bool,
                limits: Limits) -> None:
        """Fill TMP, the private area a create builds under a temporary name (renamed to private/<id> after)."""
        raise NotImplementedError

    def mount(self, layout: Layout, veid: str, template: Path, id_shift: int, idmap_shift: int | None,
              limits: Limits | None = None) -> Path:
        """Mount the VE's root at root/<id> (idempotent), its LIMITS enforced; return it."""
        raise NotImplementedError

    def unmount(self, layout: Layout, veid: str) -> None:
        """Undo mount (and whatever it attached: loop devices); a no-op when nothing is mounted."""
        from .. import storage

        storage.umount_root(layout, veid)

    def resize(self, layout: Layout, veid: str, old: Limits, new: Limits, *, running: bool) -> bool:
        """Apply NEW limits or raise DiskLimitError; False: they take effect at the next start."""
        return False

    def usage(self, layout: Layout, veid: str) -> Usage | None:
        return None

    def destroy(self, layout: Layout, veid: str) -> None:
        from .. import storage

        self.unmount(layout, veid)
        storage.remove_private(layout, veid)

    def recover(self, layout: Layout, veid: str) -> list[tuple[Path, int]]:
        """Finish or undo what a killed create/resize/destroy left (the caller holds the VE's lock)."""
        return []
