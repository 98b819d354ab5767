"""The image backend: a VE's private area is a sparse ext4 image, loop-mounted (OpenVZ's ploop idea).

    private/<id>/root.img          sparse ext4 image (at least 256G, see fs_size); its inode count is
                                   the inode limit (mkfs -N)
    private/<id>/fs/               where the image is mounted (loop, autoclear) while the VE is mounted
    private/<id>/fs/upper, work    the overlay's upper and work dirs; the template stays the shared lower layer
    private/<id>/resize.e2undo     an offline grow in progress (resize2fs -z): rolled back if it was cut off
    template/.images/<key>.img     prepared images, made once per (size, inodes) by mkfs and copied per VE with
                                   cp --sparse=always --reflink=auto (~1 MB of metadata for 256G)

The hard space limit: ext4 keeps "reserved clusters" (/sys/fs/ext4/<loop>/reserved_clusters) that nobody
without CAP_SYS_RESOURCE may allocate, and a VE never has it in the host's user namespace: the reservation is
set to everything above the limit at every mount, so writes past it fail with ENOSPC inside the VE and nothing
outside is touched. Raising or lowering the limit (down to what is used) is a new reservation, at once, also on
a running VE. Past the file system's size (256G, or twice the limit: fs_size) the image must grow: online with
resize2fs where root has CAP_SYS_RESOURCE (this kind of machine's bounding set lacks it), else offline at the
next start.

Crash safety: a create is journaled by the VE lock (leftovers.py removes the private area and detaches its
loop device); an offline grow by its e2undo file (undo_interrupted rolls it back); the reservation is set
again at every mount, so nothing else can be left half-done.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from vzpkg.errors import DiskLimitError, StorageError, VEError

from .. import storage
from ..layout import Layout
from .base import Backend, Limits, Transfer, Usage
from .image_files import (  # noqa: F401  (re-exported: the image's sizes and files are part of this backend)
    BLOCK,
    GROW_ROOM,
    SPARE_INODES,
    _copy_sparse,
    _prepared_key,
    _run,
    fs_size,
    image_size,
    prepared_image,
    remove_unused_prepared,
)

IMAGE = "root.img"
FS = "fs"
RESV_MIN = 256  # clusters ext4 keeps for itself (unwritten extent conversion, ...): never reserve fewer
# Inodes kept out of the VE's reach in fs/.spare: overlayfs needs a few free inodes to mount (its work dir and
# feature probes), so a VE that used every inode could never start again. Freed before the overlay is mounted,
# taken again after; mkfs -N adds them to the limit, and usage does not count them.
SPARE = ".spare"
MOUNT_OPTS = "noinit_itable"  # the images are sparse: never-written inode tables read as zeros already


def superblock(image: Path) -> dict[str, int]:
    """The counters of an unmounted image's ext4 superblock (read directly: 1 KB at offset 1024)."""
    with open(image, "rb") as f:
        f.seek(1024)
        sb = f.read(1024)
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
        raise StorageError(f"{image} is not an ext4 image: the VE's private area is damaged")
    incompat = struct.unpack_from("<I", sb, 0x60)[0]
    wide = incompat & 0x80  # INCOMPAT_64BIT: the high halves are valid
    lo = struct.unpack_from("<III", sb, 0)  # inodes, blocks lo, reserved lo
    blocks = lo[1] | ((struct.unpack_from("<I", sb, 0x150)[0] << 32) if wide else 0)
    free = struct.unpack_from("<I", sb, 0x0C)[0] | ((struct.unpack_from("<I", sb, 0x158)[0] << 32) if wide else 0)
    return {"inodes": lo[0], "blocks": blocks, "free_blocks": free,
            "free_inodes": struct.unpack_from("<I", sb, 0x10)[0], "block_size": 1024 << struct.unpack_from("<I", sb, 24)[0],
            "overhead": struct.unpack_from("<I", sb, 0x248)[0]}


def loops_backed_by(prefix: Path) -> list[str]:
    """/dev/loopN whose backing file is at or below PREFIX (deleted backing files too)."""
    out = []
    want = os.fsencode(prefix)
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return out
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file", "rb") as f:
                backing = f.read().rstrip(b"\n")
        except OSError:
            continue
        backing = backing.removesuffix(b" (deleted)")
        if backing == want or backing.startswith(want + b"/") or backing.startswith(want + b"."):
            out.append(f"/dev/{name}")
    return out


def _loop_of_mount(fs: Path) -> str | None:
    """The device mounted at FS (from /proc/self/mountinfo)."""
    want = storage._mountinfo_escape(fs)
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            pre, _, post = line.partition(b" - ")
            fields = pre.split(b" ")
            if len(fields) > 4 and fields[4] == want:
                parts = post.split(b" ")
                return os.fsdecode(parts[1]) if len(parts) > 1 else None
    return None


def _sysfs_reserved(dev: str) -> Path:
    return Path("/sys/fs/ext4") / dev.rsplit("/", 1)[-1] / "reserved_clusters"


def enforce(fs: Path, hard: int) -> bool:
    """Make HARD bytes the most the mounted file system at FS gives anyone without CAP_SYS_RESOURCE: the
    rest is ext4's reserved clusters (sysfs, changeable while mounted). False when the file system is too
    small for HARD (it must grow first)."""
    dev = _loop_of_mount(fs)
    if dev is None:
        raise StorageError(f"{fs} is not mounted: cannot set the VE's space limit")
    st = os.statvfs(fs)
    resv = st.f_blocks - -(-hard // st.f_frsize) if hard else RESV_MIN
    if resv < RESV_MIN:
        return False
    try:
        _sysfs_reserved(dev).write_text(f"{resv}\n")
    except OSError as e:
        raise StorageError(f"cannot set the space limit of {fs} ({_sysfs_reserved(dev)}: {e.strerror})") from None
    return True


def fs_bytes(sb: dict[str, int]) -> int:
    """What an unmounted image's file system offers (blocks less ext4's own overhead), from its superblock."""
    return (sb["blocks"] - sb["overhead"]) * sb["block_size"]


def used_bytes(image: Path, fs: Path) -> int:
    if storage.is_mounted(fs):
        st = os.statvfs(fs)
        return (st.f_blocks - st.f_bfree) * st.f_frsize
    sb = superblock(image)
    return fs_bytes(sb) - sb["free_blocks"] * sb["block_size"]


class ImageBackend(Backend):
    kind = "image"
    space_limits = True
    inode_limits = True

    def check(self, layout: Layout, limits: Limits) -> None:
        image_size(limits)

    def prepare(self, layout: Layout, veid: str, tmp: Path, template: Path, id_shift: int, *, idmapped: bool,
                limits: Limits) -> None:
        size = fs_size(image_size(limits), limits.inodes_hard)
        for attempt in (1, 2):
            source = prepared_image(layout, size, limits.inodes_hard)
            try:
                # a clone on btrfs/xfs; elsewhere only the few MB of metadata are copied
                if not _copy_sparse(source, tmp / IMAGE):
                    (tmp / IMAGE).unlink(missing_ok=True)
                    _run(["cp", "--sparse=always", "--reflink=auto", str(source), str(tmp / IMAGE)],
                         f"copying {source}")
                break
            except (StorageError, OSError):
                (tmp / IMAGE).unlink(missing_ok=True)
                if attempt == 2 or source.exists():
                    raise  # (else `vzpkg clean --templates` removed it just now: make it again)
        (tmp / FS).mkdir(mode=0o700)  # upper/ and work/ are made in the image at its first mount

    # -- mounting ---------------------------------------------------------------------------------------

    def mount_fs(self, layout: Layout, veid: str, id_shift: int, limits: Limits) -> Path:
        private = layout.private(veid)
        image, fs = private / IMAGE, private / FS
        if not image.is_file():
            raise StorageError(f"VE {veid}: its image {image} is missing: the private area is damaged")
        hard = image_size(limits)
        fs.mkdir(mode=0o700, exist_ok=True)
        if not storage.is_mounted(fs):
            undo_interrupted(private)
            if fs_bytes(superblock(image)) < hard + RESV_MIN * BLOCK:
                grow_offline(private, fs_size(hard, limits.inodes_hard))  # raised past it while it ran
            from .. import loop

            loop.mount(image, fs, "ext4", MOUNT_OPTS)  # autoclear, direct I/O (see loop.py)
            try:
                from .. import ns

                ns.mount(None, fs, None, ns.MS_PRIVATE)
            except OSError:
                pass
        try:
            enforce(fs, 0)  # everything free until the overlay is mounted (take_spares sets the limit)
            _free_spares(fs)
            upper = fs / "upper"
            if not upper.is_dir():
                upper.mkdir(mode=0o755)
                os.chown(upper, id_shift, id_shift)
            (fs / "work").mkdir(mode=0o700, exist_ok=True)
        except BaseException:
            unmount_fs(layout, veid)
            raise
        return fs

    def take_spares(self, veid: str, fs: Path, hard: int) -> None:
        _take_spares(fs)
        if not enforce(fs, hard):
            raise StorageError(f"VE {veid}: its image's file system is smaller than its limit: stop it and "
                               "start it again (the image grows then)")

    def mount(self, layout: Layout, veid: str, template: Path, id_shift: int, idmap_shift: int | None,
              limits: Limits | None = None) -> Path:
        target = layout.ve_root(veid)
        if storage.is_mounted(target):
            return target
        limits = limits or Limits()
        fs = self.mount_fs(layout, veid, id_shift, limits)
        try:
            root = storage.mount_root(layout, veid, template, "overlay", idmap_shift, layers=fs)
            self.take_spares(veid, fs, image_size(limits))
            return root
        except BaseException:
            storage.umount_root(layout, veid)
            unmount_fs(layout, veid)
            raise

    def unmount(self, layout: Layout, veid: str) -> None:
        storage.umount_root(layout, veid)
        unmount_fs(layout, veid)

    # -- limits and usage -------------------------------------------------------------------------------

    def resize(self, layout: Layout, veid: str, old: Limits, new: Limits, *, running: bool) -> bool:
        private = layout.private(veid)
        image, fs = private / IMAGE, private / FS
        if new.inodes_hard != old.inodes_hard:
            count = self._inode_count(image, fs)
            if new.inodes_hard != count:
                raise DiskLimitError(
                    f"VE {veid}: the inode count of its ext4 image is fixed when the image is made ({count} "
                    "inodes): recreate the VE for another --diskinodes, or use the btrfs layout (no inode limit)")
        hard = image_size(new)
        used = used_bytes(image, fs)
        if used > hard:
            raise DiskLimitError(f"VE {veid}: {used >> 10}K is used, more than --diskspace {hard >> 10}K: free "
                                 "space inside the VE first, or choose a larger limit")
        if storage.is_mounted(fs):
            if enforce(fs, hard):
                return True  # within the file system: a new reservation, at once
            if grow_online(image, fs, fs_size(hard, new.inodes_hard)) and enforce(fs, hard):
                return True
            return False  # the file system grows at the next start (offline)
        if fs_bytes(superblock(image)) < hard + RESV_MIN * BLOCK:
            grow_offline(private, fs_size(hard, new.inodes_hard))
        return True

    def _inode_count(self, image: Path, fs: Path) -> int:
        if storage.is_mounted(fs):
            return os.statvfs(fs).f_files - SPARE_INODES
        return superblock(image)["inodes"] - SPARE_INODES

    def usage(self, layout: Layout, veid: str) -> Usage | None:
        private = layout.private(veid)
        fs = private / FS
        spares = _spares(fs) if storage.is_mounted(fs) else 0
        if storage.is_mounted(fs):
            st = os.statvfs(fs)
            kb = st.f_frsize // 1024
            used = st.f_blocks - st.f_bfree
            return Usage(used * kb, (used + st.f_bavail) * kb, st.f_files - st.f_ffree - spares,
                         st.f_files - SPARE_INODES)
        try:
            sb = superblock(private / IMAGE)
        except OSError:
            return None
        # (stopped: the spares were taken again at the last mount and are counted as free here)
        return Usage((fs_bytes(sb) - sb["free_blocks"] * sb["block_size"]) // 1024, None,
                     max(sb["inodes"] - sb["free_inodes"] - SPARE_INODES, 0), sb["inodes"] - SPARE_INODES)

    # -- removal and recovery ---------------------------------------------------------------------------

    def destroy(self, layout: Layout, veid: str) -> None:
        self.unmount(layout, veid)
        recover_leftovers(layout, veid)
        storage.remove_private(layout, veid)

    def recover(self, layout: Layout, veid: str) -> list[tuple[Path, int]]:
        return recover_leftovers(layout, veid)

    # -- checkpoints, clones, migration -----------------------------------------------------------------

    def snapshot_lines(self, layout: Layout, veid: str, dest: Path, final: Path | None = None) -> list[str]:
        """A sparse copy (a reflink where the file system has them) of the image file. A mounted image is
        frozen (FIFREEZE) for the copy: its journal is flushed and nothing is written to the file meanwhile, so
        the copy is a clean file system. Only a mount point is frozen: a directory would freeze the host's."""
        import shlex

        q = shlex.quote
        private = layout.private(veid)
        image, fs = q(str(private / IMAGE)), q(str(private / FS))
        copy = f"cp --sparse=always --reflink=auto {image} {q(str(dest / IMAGE))}"
        if not storage.is_mounted(private / FS):
            return [copy]
        # thawed on every way out of the script that a shell can see (a failed copy, a signal)
        return [f"F={fs}",
                """if mountpoint -q "$F" && fsfreeze -f "$F"; then trap 'fsfreeze -u "$F"' EXIT HUP INT TERM; fi""",
                copy, 'fsfreeze -u "$F" 2>/dev/null || true', "trap - EXIT HUP INT TERM"]

    def install_snapshot(self, layout: Layout, veid: str, fs: Path, tmp: Path, limits: Limits, *,
                         move: bool = False) -> None:
        """The snapshot's image is the new VE's (its size and inode count are the source's, which are its
        limits too: the config carries them; the reservation is set at every mount)."""
        from vzpkg.errors import CheckpointNotFoundError

        src = fs / IMAGE
        if not src.is_file():
            raise CheckpointNotFoundError(f"the checkpoint's image {src} is missing")
        try:
            if not move:
                raise OSError
            os.rename(src, tmp / IMAGE)
        except OSError:
            _run(["cp", "--sparse=always", "--reflink=auto", str(src), str(tmp / IMAGE)], f"copying {src}")
        (tmp / FS).mkdir(mode=0o700)

    def migrate_items(self, layout: Layout, veid: str, *, final: bool) -> list[Transfer]:
        """The image once, after the VE stopped (a copy of a mounted image would be inconsistent; a sparse copy
        reads only what is allocated, so there is little to gain from a first pass)."""
        if not final:
            return []
        private = layout.private(veid)
        if storage.is_mounted(private / FS):
            raise StorageError(f"VE {veid}: its image is still mounted at {private / FS}: cannot copy it")
        return [Transfer(IMAGE, private / IMAGE, file=True)]

    def receive_prepare(self, layout: Layout, veid: str, staged: Path, template: Path, limits: Limits) -> dict:
        image_size(limits)
        return {IMAGE: str(staged / IMAGE)}

    def receive_install(self, layout: Layout, veid: str, staged: Path, limits: Limits) -> None:
        image = staged / IMAGE
        if not image.is_file():
            raise StorageError(f"VE {veid}: its image did not arrive in {staged}")
        superblock(image)  # (an ext4 image, whole: its superblock reads)
        (staged / FS).mkdir(mode=0o700, exist_ok=True)  # the limit is set from the config at every mount


def _spares(fs: Path) -> int:
    try:
        return len(os.listdir(fs / SPARE)) + 1
    except OSError:
        return 0


def _free_spares(fs: Path) -> None:
    d = fs / SPARE
    if d.is_dir():
        for name in os.listdir(d):
            os.unlink(d / name)
        d.rmdir()


def _take_spares(fs: Path) -> None:
    """fs/.spare and SPARE_INODES - 1 empty files in it (as many as there are free inodes)."""
    d = fs / SPARE
    try:
        d.mkdir(mode=0o700, exist_ok=True)
        for i in range(SPARE_INODES - 1):
            os.close(os.open(d / str(i), os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError:
        pass


UNDO = "resize.e2undo"


def grow_offline(private: Path, size: int) -> None:
    """Grow the unmounted image to SIZE with resize2fs, journaled by an e2undo file: a resize killed half-way
    is rolled back by the next mount or recovery (undo_interrupted), and done again when needed."""
    image = private / IMAGE
    undo = private / UNDO
    undo.unlink(missing_ok=True)
    if image.stat().st_size < size:
        os.truncate(image, size)
    _run(["resize2fs", "-z", str(undo), str(image), f"{size // 1024}K"], f"growing {image}")
    undo.unlink(missing_ok=True)


def undo_interrupted(private: Path) -> list[tuple[Path, int]]:
    """A grow cut off half-way: replay its undo file; if it was cut off before the undo file had a header (so
    nothing, or nothing e2undo can name, was written), let e2fsck repair what resize2fs began."""
    undo = private / UNDO
    if not undo.exists():
        return []
    from vzpkg import process
    image = private / IMAGE
    if process.run(["e2undo", str(undo), str(image)], capture=True, check=False, error=VEError).returncode != 0:
        fsck = process.run(["e2fsck", "-f", "-y", str(image)], capture=True, text=True, check=False, error=VEError)
        if fsck.returncode >= 4:
            raise StorageError(f"the image {image} was damaged by an interrupted resize and e2fsck cannot repair "
                               f"it (exit {fsck.returncode}): check it with 'e2fsck -f {image}'")
    undo.unlink()
    return [(undo, 0)]


def grow_online(image: Path, fs: Path, size: int) -> bool:
    """Grow the mounted image (ext4's resize ioctl needs CAP_SYS_RESOURCE: False where root lacks it)."""
    from vzpkg import process

    dev = _loop_of_mount(fs)
    if dev is None:
        return False
    if image.stat().st_size < size:
        os.truncate(image, size)
    from .. import loop

    if not loop.set_capacity(dev):
        return False
    return process.run(["resize2fs", dev, f"{size // 1024}K"], capture=True, check=False, error=VEError).returncode == 0


def unmount_fs(layout: Layout, veid: str) -> None:
    """Unmount the image (its loop device, set up with autoclear, goes with it)."""
    fs = layout.private(veid) / FS
    from .. import ns

    while storage.is_mounted(fs):
        try:
            ns.umount(fs)
        except OSError:
            ns.umount(fs, ns.MNT_DETACH)


def recover_leftovers(layout: Layout, veid: str) -> list[tuple[Path, int]]:
    """Loop devices still backed by the VE's image (or a dead create's) and not mounted."""
    from .. import loop

    removed: list[tuple[Path, int]] = []
    private = layout.private(veid)
    mounted = set()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            post = line.partition(b" - ")[2].split(b" ")
            if len(post) > 1:
                mounted.add(os.fsdecode(post[1]))
    for prefix in (private, layout.private_dir / f".tmp-{veid}-"):
        for dev in loops_backed_by(prefix) if prefix == private else _loops_with_prefix(prefix):
            if dev not in mounted:
                if loop.detach(dev):
                    removed.append((Path(dev), 0))
    return removed


def _loops_with_prefix(prefix: Path) -> list[str]:
    """Loop devices backed by files below directories whose name starts with PREFIX's name."""
    out = []
    for dev in loops_backed_by(prefix.parent):
        name = dev.rsplit("/", 1)[-1]
        try:
            with open(f"/sys/block/{name}/loop/backing_file", "rb") as f:
                backing = os.fsdecode(f.read().rstrip(b"\n"))
        except OSError:
            continue
        if backing.startswith(str(prefix)):
            out.append(dev)
    return out
