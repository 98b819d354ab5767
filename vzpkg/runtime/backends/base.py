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

    # -- checkpoints, clones, migration: the private area as a snapshot ---------------------------------
    # A snapshot is a directory (a checkpoint's fs/) made by snapshot_lines and turned into a VE's private area
    # by install_snapshot; checkpoint.py and migrate.py know nothing else of the layouts.

    def snapshot_lines(self, layout: Layout, veid: str, dest: Path, final: Path | None = None) -> list[str]:
        """Shell lines (sh, set -e) that copy the VE's private area cheaply into DEST, which exists. CRIU's
        post-dump action runs them while the VE's tasks are frozen (files and memory agree); a clone of a
        stopped VE runs them as they are. FINAL: where DEST will be once the checkpoint is in place."""
        import shlex

        q = shlex.quote
        src = self._payload(layout.private(veid))
        return [f"cp -a --reflink=auto {q(str(src))} {q(str(dest / src.name))}"]

    def _payload(self, private: Path) -> Path:
        return private / ("root" if self.kind == "copy" else "upper")

    def install_snapshot(self, layout: Layout, veid: str, fs: Path, tmp: Path, limits: Limits, *,
                         move: bool = False) -> None:
        """Fill TMP (VEID's private area being built; the caller renames it into place) from the snapshot FS,
        and put in place, with LIMITS, whatever of the VE lives outside it. MOVE: FS is used up (a live
        clone's), its files may be moved rather than copied."""
        from vzpkg.errors import CheckpointNotFoundError

        src = self._payload(fs)
        if not src.is_dir():
            raise CheckpointNotFoundError(f"the checkpoint's file snapshot {src} is missing")
        _run_copy(["cp", "-a", "--reflink=auto", str(src), str(tmp / src.name)],
                  f"copying the checkpoint's files {src}")
        if self.kind == "overlay":
            (tmp / "work").mkdir(mode=0o700)

    def drop_snapshot(self, layout: Layout, fs: Path) -> None:
        """Free what the snapshot FS holds outside itself (before FS is removed)."""

    # -- migration (migrate.py moves the files, with rsync, to a VZ root here or over ssh; migrate_agent.py is the
    # receiving end): the source's backend says what to send, the destination's where it goes and what to do
    # when it arrived. Nothing here knows the transport.

    def migrate_items(self, layout: Layout, veid: str, *, final: bool) -> list[Transfer]:
        """What of the VE's storage to send: called while the VE runs (a first pass, may be empty) and once more,
        FINAL, after it stopped or was dumped (its tasks gone, its image unmounted)."""
        src = self._payload(layout.private(veid))
        return [Transfer(src.name, src)]

    def receive_prepare(self, layout: Layout, veid: str, staged: Path, template: Path, limits: Limits) -> dict:
        """Destination: make ready where each of migrate_items' names goes; return {name: path}. STAGED becomes
        private/<id> (receive_install); what lives outside it goes to a place of its own. TEMPLATE is there."""
        dst = self._payload(staged)
        return {dst.name: str(dst)}

    def receive_install(self, layout: Layout, veid: str, staged: Path, limits: Limits) -> None:
        """Destination: everything arrived; complete STAGED (renamed to private/<id> by the caller) and put in
        place, with LIMITS, what lives outside it. (What a failed migration leaves: backends.destroy_all.)"""
        if self.kind == "overlay":
            (staged / "work").mkdir(exist_ok=True, mode=0o700)


class Transfer:
    """One thing a migration sends: NAME (the key of receive_prepare's answer), PATH on the source, FILE: one
    (sparse) file rather than a directory tree. (A plain class: typing's NamedTuple would cost every start of an
    image or btrfs VE the import of typing.)"""

    __slots__ = ("name", "path", "file")

    def __init__(self, name: str, path: Path, file: bool = False) -> None:
        self.name, self.path, self.file = name, path, file

    def __repr__(self) -> str:
        return f"Transfer({self.name!r}, {str(self.path)!r}, file={self.file})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Transfer) and (self.name, self.path, self.file) == (other.name, other.path, other.file)

    __hash__ = None  # type: ignore[assignment]


def _run_copy(argv: list[str], what: str) -> None:
    from vzpkg import process
    from vzpkg.errors import StorageError

    proc = process.run(argv, capture=True, text=True, check=False, error=StorageError, what=what)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise StorageError(f"{what} failed: {lines[-1] if lines else f'exit status {proc.returncode}'}")
