"""The btrfs backend: a VE is a writable snapshot of its template's read-only subvolume; no overlay.

    <pool>/templates/<generation>  the template generation (template/<...>) copied once into a subvolume, then
                                   made read-only
    <pool>/ves/<id>                the VE: a snapshot of it (BTRFS_IOC_SNAP_CREATE_V2, a few ms for 200 MB)
    <pool>/spares/<generation>     a snapshot made ahead by a destroy, renamed into place by the next create
    root/<id>                      a bind mount of <pool>/ves/<id> (an idmapped one for a private id range:
                                   the snapshot keeps the shared generation's ids 100000.., seen as the VE's)

The pool is <root>/btrfs: a directory when the VZ root is on btrfs, else the mount point of <root>/btrfs.img, a
loop-backed btrfs made once by `vzctl storage init --btrfs SIZE` and mounted again by whatever needs it after a
host reboot (loop.py: autoclear, direct I/O; POOL_MOUNT_OPTS). Quotas are enabled on the pool (simple quotas
where the kernel has them: btrfs_ioctl.quota_enable); a VE's hard space limit is its subvolume's qgroup exclusive
limit (EDQUOT inside the VE, raisable and lowerable while it runs).
btrfs has no inode limits: they are refused. Create, limit changes and destroy are ioctls (btrfs_ioctl.py): no
`btrfs` process on those paths; a destroyed subvolume's qgroup is removed once the cleaner has dropped it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct
import time
from pathlib import Path

from vzpkg.errors import (
    DiskLimitError,
    LoopDevicesExhaustedError,
    MissingToolError,
    StorageError,
    StoragePoolError,
)

from .. import storage
from ..layout import Layout
from . import btrfs_ioctl
from .base import Backend, Limits, Transfer, Usage

TYPE_CHECKING = False  # as in cli/plain.py: the process layer is imported only where a command runs
if TYPE_CHECKING:
    from vzpkg import process

BTRFS_MAGIC = 0x9123683E
POOL = "btrfs"
POOL_IMAGE = "btrfs.img"
POOL_MIN = 256 << 20
# The loop-backed pool's mount options. Its loop device does direct I/O (loop.py): the VEs' data is cached once.
# nodatasum: no data checksums (metadata keeps its own). Measured here (1 GB dd in a snapshot with a qgroup
# limit): O_DIRECT writes 0.25x of the host's disk with checksums, ~0.9x without, since btrfs cannot write
# checksummed data directly; buffered writes unchanged (~0.35x: btrfs's own write path, with or without
# qgroups, CoW or nodatacow). Copy-on-write stays (snapshots and qgroup limits work as before, unlike
# nodatacow's in-place writes); the file system under the pool's image (and the image layout) checksums no
# data either. A VZ root that is itself btrfs keeps the host's options.
POOL_MOUNT_OPTS = "nodatasum"
QGROUP_WAIT = 30.0  # seconds a destroy waits for the cleaner at most (a few ms normally): then a stale qgroup


def fs_type(path: Path | str) -> int | None:
    """statfs(2)'s f_type (os.statvfs has none)."""
    buf = ctypes.create_string_buffer(256)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(os.fsencode(path), buf) != 0:
        return None
    return struct.unpack_from("l", buf.raw, 0)[0] & 0xFFFFFFFF


def _run(argv: list[str], what: str, *, check: bool = True) -> process.Result:
    from vzpkg import process  # (its import pulls in subprocess: not on the start path)

    try:
        proc = process.run(argv, capture=True, text=True, check=False, error=MissingToolError, pdeathsig=signal.SIGKILL)
    except MissingToolError:
        raise MissingToolError(f"{argv[0]} is not installed: install btrfs-progs") from None
    if check and proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise StorageError(f"{what} failed: {lines[-1] if lines else f'exit status {proc.returncode}'}")
    return proc


def pool_dir(layout: Layout) -> Path:
    return layout.root / POOL


def pool_available(layout: Layout) -> bool:
    """Is there a btrfs pool for this VZ root (without mounting anything)?"""
    return (layout.root / POOL_IMAGE).is_file() or fs_type(layout.root) == BTRFS_MAGIC


def ensure_pool(layout: Layout) -> Path:
    """The pool's directory, mounted if it is the loop-backed image (after a reboot), with quotas on."""
    pool = pool_dir(layout)
    image = layout.root / POOL_IMAGE
    if image.is_file():
        pool.mkdir(mode=0o700, exist_ok=True)
        if not storage.is_mounted(pool):
            from .. import loop

            try:
                loop.mount(image, pool, "btrfs", POOL_MOUNT_OPTS)
            except LoopDevicesExhaustedError:
                raise
            except StorageError as e:
                raise StoragePoolError(f"cannot mount the btrfs pool {image} at {pool}: {e}") from None
    elif fs_type(layout.root) == BTRFS_MAGIC:
        pool.mkdir(mode=0o700, exist_ok=True)
    else:
        raise StoragePoolError(f"the VZ root {layout.root} is not on btrfs and has no btrfs pool: run "
                               "'vzctl storage init --btrfs SIZE' once (or use --layout image)")
    for d in ("templates", "ves"):
        (pool / d).mkdir(mode=0o700, exist_ok=True)
    return pool


def rescan_if_inconsistent(pool: Path) -> None:
    """Deleting a subvolume whose blocks a snapshot still shares (a VE destroyed while a checkpoint of it keeps its
    read-only snapshot) can leave the pool's qgroup numbers marked inconsistent, and the kernel then enforces no
    qgroup limit — no VE's disk limit — until a rescan: run one, waiting for it (its cost grows with the pool's
    metadata: milliseconds for a few VEs)."""
    if btrfs_ioctl.qgroups_inconsistent(pool):
        _run(["btrfs", "quota", "rescan", "-w", str(pool)], f"rescanning the qgroups of {pool}")


def init_pool(layout: Layout, size: int) -> tuple[Path, bool]:
    """`vzctl storage init --btrfs SIZE`: make <root>/btrfs.img (sparse) and mount it at <root>/btrfs.
    Returns (pool directory, whether it was made now)."""
    layout.secure_areas()
    image = layout.root / POOL_IMAGE
    if image.exists() or fs_type(layout.root) == BTRFS_MAGIC:
        pool = ensure_pool(layout)
        if image.exists() and btrfs_ioctl.quota_mode(pool) is None:
            _enable_quotas(pool)  # an init killed between the rename and this (or quotas turned off since)
        return pool, False
    if size < POOL_MIN:
        raise DiskLimitError(f"--btrfs {size >> 20}M: a pool needs at least {POOL_MIN >> 20}M")
    tmp = layout.root / f".{POOL_IMAGE}.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.truncate(size)
        _run(["mkfs.btrfs", "-q", "-f", str(tmp)], f"mkfs.btrfs of {tmp}")
        os.rename(tmp, image)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    pool = ensure_pool(layout)
    _enable_quotas(pool)
    return pool, True


def _enable_quotas(pool: Path) -> None:
    try:
        btrfs_ioctl.quota_enable(pool)  # simple quotas where the kernel has them (see there)
    except OSError as e:
        raise StorageError(f"enabling quotas on {pool} failed: {e.strerror}") from None


def ve_subvolume(layout: Layout, veid: str) -> Path:
    return pool_dir(layout) / "ves" / veid


def template_subvolume(layout: Layout, template: Path) -> Path:
    """The template generation as a read-only subvolume, made once (under the generation's lock)."""
    from vzpkg.flock import lock_file

    pool = ensure_pool(layout)
    sub = pool / "templates" / template.name
    if sub.is_dir():
        return sub
    fd = lock_file(pool / "templates" / f".{template.name}.lock")
    try:
        if sub.is_dir():
            return sub
        tmp = pool / "templates" / f".tmp-{template.name}-{os.getpid()}"
        _delete_subvolume(tmp)
        _run(["btrfs", "subvolume", "create", str(tmp)], f"creating the subvolume {tmp}")
        try:
            # a reflink when the template area is on the same btrfs, a copy (once per generation) otherwise
            _run(["cp", "-a", "--reflink=auto", f"{template}/.", str(tmp)], f"copying {template} into {tmp}")
            os.chown(tmp, os.stat(template).st_uid, os.stat(template).st_gid)
            os.chmod(tmp, 0o755)
            _run(["btrfs", "property", "set", "-ts", str(tmp), "ro", "true"], f"making {tmp} read-only")
            os.rename(tmp, sub)
        except BaseException:
            _delete_subvolume(tmp)
            raise
        return sub
    finally:
        os.close(fd)


def _subvolume_id(path: Path) -> int | None:
    return btrfs_ioctl.subvolume_id(path)


def _delete_subvolume(path: Path, *, wait: bool = True) -> bool:
    """Delete the subvolume PATH and its qgroup (or a plain directory a failed create left there). WAIT=False (a
    checkpoint's snapshot, dropped after a live clone): no wait for the cleaner; the emptied qgroup goes with the
    next waited delete's clear-stale."""
    from vzpkg import process

    if not os.path.lexists(path):
        return False
    sid = _subvolume_id(path)
    if sid is None:  # not a subvolume (a directory a failed create left)
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        return True
    try:
        btrfs_ioctl.destroy(path)  # (read-only snapshots too: root may delete them)
    except OSError as e:
        raise StorageError(f"deleting the subvolume {path} failed: {e.strerror}") from None
    if not wait:
        return True
    if _destroy_qgroup(path.parent, sid):
        # simple quotas: the frees of the drop are counted at a commit; before it, a qgroup this subvolume was
        # the last to share (a destroyed VE's, when its checkpoint's snapshot goes) still looks charged
        btrfs_ioctl.commit(path.parent)
    rescan_if_inconsistent(path.parent)
    # and the qgroups of snapshots dropped without waiting whose cleaning has finished since
    process.run(["btrfs", "qgroup", "clear-stale", str(path.parent)], capture=True, check=False, error=StorageError)
    return True


def _destroy_qgroup(pool_path: Path, sid: int) -> bool:
    """The deleted subvolume's qgroup 0/SID. The kernel refuses (EBUSY) until its cleaner has dropped the
    subvolume's tree: BTRFS_IOC_SYNC commits and wakes the cleaner (a few ms for a VE), again every 50 ms in
    case it went back to sleep before reaching this subvolume (as `btrfs subvolume sync` waits, but bounded).
    With simple quotas the kernel removes an emptied qgroup itself when it drops the tree; one still charged
    for extents another subvolume shares (a checkpoint's snapshot of the VE) stays busy until those go: once
    the tree is dropped it is left (no subvolume, no limit on anything) for a later clear-stale. Returns whether
    the pool has simple quotas."""
    import fcntl
    import time

    simple = btrfs_ioctl.quota_mode(pool_path) == "squota"
    fd = os.open(pool_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + QGROUP_WAIT
        while True:
            try:
                fcntl.ioctl(fd, btrfs_ioctl.SYNC)
            except OSError:
                pass
            for _ in range(10):
                if btrfs_ioctl.qgroup_destroy(pool_path, sid) != errno.EBUSY:
                    return simple
                if simple and not _root_exists(pool_path, sid):
                    # dropped; the frees its drop queued are counted at the next commit: once more after it,
                    # then still busy = charged for extents another subvolume shares (see above)
                    btrfs_ioctl.commit(pool_path)
                    btrfs_ioctl.qgroup_destroy(pool_path, sid)
                    return simple
                time.sleep(0.005)
            if time.monotonic() > deadline:
                return simple  # a stale qgroup (harmless: no subvolume, no limit on anything)
    finally:
        os.close(fd)


def _root_exists(pool_path: Path, sid: int) -> bool:
    try:
        return btrfs_ioctl.root_item_exists(pool_path, sid)
    except OSError:
        return True  # cannot tell: wait as with full accounting


def remove_subvolume(layout: Layout, veid: str, *, refill: bool = True) -> list[tuple[Path, int]]:
    """The VE's subvolume and those of its killed creates, if there is a pool (no config needed). REFILL: when
    the VE's own subvolume went (a destroy), make the spares the next creates take (refill_spares)."""
    if not pool_available(layout):
        return []
    try:
        pool = ensure_pool(layout)
    except StorageError:
        return []
    removed = []
    from ..state import pid_alive

    destroyed = False
    for name in os.listdir(pool / "ves"):
        tail = name.rsplit("-", 1)[-1]
        dead_tmp = name.startswith(f".tmp-{veid}-") and tail.isdigit() and not pid_alive(int(tail))
        if name == veid or dead_tmp or name == migrating_name(veid):
            path = pool / "ves" / name
            storage.detach_below(path)
            if _delete_subvolume(path):
                removed.append((path, 0))
                destroyed = destroyed or name == veid
    removed += drop_orphans(layout, veid)
    if destroyed and refill:
        refill_spares(layout, pool)
    return removed


# Spares: <pool>/spares/<generation>, a writable snapshot of the template generation's subvolume made ahead of
# time. A create renames it into place (ves/.tmp-<id>-<pid>, then its limit, then ves/<id>) instead of
# snapshotting: the snapshot's transaction commit is most of a btrfs create. A destroy makes the next one, after
# its own work. Crash safety: the rename is atomic (a killed create's .tmp- subvolume is removed as before); a
# killed refill leaves spares/.tmp-<generation>-<pid>, removed by the next refill; a spare is nothing but an
# unused snapshot, removed with its generation's unpacked template (`vzpkg clean --templates`) at the next refill.
SPARES = "spares"


def _claim_spare(source: Path, dest: Path) -> bool:
    """Rename the spare of the template subvolume SOURCE to DEST; False if there is none (or another create
    took it first)."""
    try:
        os.rename(source.parent.parent / SPARES / source.name, dest)
        return True
    except OSError:
        return False


def refill_spares(layout: Layout, pool: Path) -> None:
    """One spare per template generation that is still unpacked (template/<generation>); leftovers of killed
    refills and spares of generations removed since are deleted. Failures only leave a create to snapshot."""
    from ..state import pid_alive

    spares = pool / SPARES
    try:
        generations = [n for n in os.listdir(pool / "templates") if not n.startswith(".")]
        spares.mkdir(mode=0o700, exist_ok=True)
        have = os.listdir(spares)
    except OSError:
        return
    for name in have:
        if name.startswith(".tmp-"):
            tail = name.rsplit("-", 1)[-1]
            stale = tail.isdigit() and not pid_alive(int(tail))
        else:
            stale = name not in generations or not (layout.template_dir / name).is_dir()
        if stale:
            try:
                _delete_subvolume(spares / name)
            except StorageError:
                pass
    for name in generations:
        if name in have or not (layout.template_dir / name).is_dir():
            continue
        tmp = spares / f".tmp-{name}-{os.getpid()}"
        try:
            btrfs_ioctl.snapshot(pool / "templates" / name, tmp)
        except OSError:
            continue
        try:
            os.rename(tmp, spares / name)
        except OSError:  # another destroy's refill was first
            try:
                _delete_subvolume(tmp)
            except StorageError:
                pass


def _set_limit(sub: Path, max_excl: int | None) -> None:
    """SUB's qgroup 0/<its id> gets the exclusive limit MAX_EXCL (None: none), at once, also while it is in use."""
    sid = _subvolume_id(sub)
    if sid is None:
        raise StorageError(f"{sub} is not a btrfs subvolume: the VE is damaged (destroy it)")
    if max_excl is not None:
        rescan_if_inconsistent(sub.parent)
    try:
        btrfs_ioctl.set_limit(sub, sid, max_excl)
    except OSError as e:
        hint = ": are quotas enabled on the pool? ('btrfs quota enable POOL')" if e.errno == errno.ENOTCONN else ""
        raise StorageError(f"setting the qgroup limit of {sub} failed: {e.strerror}{hint}") from None


def qgroup_usage(sub: Path) -> tuple[int, int | None] | None:
    """(exclusive bytes, max exclusive or None) of SUB's qgroup, synced first."""
    proc = _run(["btrfs", "qgroup", "show", "-f", "-e", "--raw", "--sync", str(sub)], f"reading the qgroup of {sub}",
                check=False)
    for line in proc.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0].startswith("0/") and fields[2].isdigit():
            limit = int(fields[3]) if fields[3].isdigit() else None
            return int(fields[2]), limit
    return None


class BtrfsBackend(Backend):
    kind = "btrfs"
    space_limits = True

    def check(self, layout: Layout, limits: Limits) -> None:
        if limits.inodes_hard is not None:
            raise DiskLimitError("btrfs has no inode limits: drop --diskinodes (or set it to unlimited), or use "
                                 "--layout image for an inode limit")
        if not pool_available(layout):
            ensure_pool(layout)  # raises StoragePoolError, naming `vzctl storage init --btrfs SIZE`

    def prepare(self, layout: Layout, veid: str, tmp: Path, template: Path, id_shift: int, *, idmapped: bool,
                limits: Limits) -> None:
        source = template_subvolume(layout, template)
        final = ve_subvolume(layout, veid)
        if os.path.lexists(final):
            # a killed create's (the VE has no config: the caller checked)
            remove_subvolume(layout, veid, refill=False)
        tmp_sub = final.with_name(f".tmp-{veid}-{os.getpid()}")
        if not _claim_spare(source, tmp_sub):
            try:
                btrfs_ioctl.snapshot(source, tmp_sub)
            except OSError as e:
                raise StorageError(f"snapshotting {source} failed: {e.strerror}") from None
        try:
            if limits.space_hard is not None:
                _set_limit(tmp_sub, limits.space_hard)
            os.rename(tmp_sub, final)
        except BaseException:
            _delete_subvolume(tmp_sub)
            raise

    def mount(self, layout: Layout, veid: str, template: Path, id_shift: int, idmap_shift: int | None,
              limits: Limits | None = None) -> Path:
        from .. import ns

        target = layout.ve_root(veid)
        if storage.is_mounted(target):
            return target
        ensure_pool(layout)
        sub = ve_subvolume(layout, veid)
        if not sub.is_dir():
            raise StorageError(f"VE {veid}: its subvolume {sub} is missing: the VE is damaged (destroy it)")
        if os.path.islink(target):
            os.unlink(target)
        target.mkdir(parents=True, exist_ok=True)
        if idmap_shift is None:
            ns.mount(sub, target, None, ns.MS_BIND)
        else:
            userns = ns.idmap_userns(storage.DEFAULT_ID_SHIFT, idmap_shift, storage.ID_RANGE)
            try:
                tree = ns.open_tree_idmapped(sub, userns, readonly=False)
            finally:
                os.close(userns)
            try:
                ns.move_mount_fd(tree, target)
            finally:
                os.close(tree)
        try:
            ns.mount(None, target, None, ns.MS_PRIVATE)
        except OSError:
            pass
        return target

    def resize(self, layout: Layout, veid: str, old: Limits, new: Limits, *, running: bool) -> None:
        if new.inodes_hard is not None:
            raise DiskLimitError(f"VE {veid}: btrfs has no inode limits: leave --diskinodes unlimited on the "
                                 "btrfs layout")
        ensure_pool(layout)
        sub = ve_subvolume(layout, veid)
        _set_limit(sub, new.space_hard)
        return True

    def usage(self, layout: Layout, veid: str) -> Usage | None:
        try:
            ensure_pool(layout)
        except StorageError:
            return None
        got = qgroup_usage(ve_subvolume(layout, veid))
        if got is None:
            return None
        used, limit = got
        return Usage(used // 1024, None if limit is None else limit // 1024, None, None)

    def destroy(self, layout: Layout, veid: str) -> None:
        self.unmount(layout, veid)
        remove_subvolume(layout, veid)
        storage.remove_private(layout, veid)

    # -- checkpoints, clones, migration -----------------------------------------------------------------

    def snapshot_lines(self, layout: Layout, veid: str, dest: Path, final: Path | None = None) -> list[str]:
        """A read-only snapshot of the VE's subvolume in the pool's snapshots/ (a snapshot cannot live outside
        its file system): DEST/SNAPSHOT_REF names it, SNAPSHOTS/<name>.owner names DEST (see drop_orphans)."""
        import shlex

        q = shlex.quote
        snaps = ensure_pool(layout) / SNAPSHOTS
        snaps.mkdir(mode=0o700, exist_ok=True)
        name = f"{veid}-{os.getpid()}-{time.time_ns()}"
        return [f"printf '%s\\n' {q(str(final or dest))} > {q(str(snaps / name))}.owner",
                f"btrfs subvolume snapshot -r {q(str(ve_subvolume(layout, veid)))} {q(str(snaps / name))} >/dev/null",
                f"printf '%s\\n' {q(name)} > {q(str(dest / SNAPSHOT_REF))}"]

    def install_snapshot(self, layout: Layout, veid: str, fs: Path, tmp: Path, limits: Limits, *,
                         move: bool = False) -> None:
        """A writable snapshot of the checkpoint's snapshot becomes the VE's subvolume (replacing the VE's own,
        for a rollback), with its own qgroup and the VE's limit. TMP (private/<id>) holds nothing."""
        snap = snapshot_of(layout, fs)
        final = ve_subvolume(layout, veid)
        new = final.with_name(f".tmp-{veid}-{os.getpid()}")
        _delete_subvolume(new)
        _run(["btrfs", "subvolume", "snapshot", str(snap), str(new)], f"snapshotting {snap}")
        try:
            if limits.space_hard is not None:
                _run(["btrfs", "qgroup", "limit", "-e", str(limits.space_hard), str(new)],
                     f"setting the qgroup limit of {new}")
            if os.path.lexists(final):
                old = final.with_name(f".tmp-{veid}-old-{os.getpid()}")
                storage.detach_below(final)
                os.rename(final, old)
                os.rename(new, final)
                _delete_subvolume(old)
            else:
                os.rename(new, final)
        except BaseException:
            _delete_subvolume(new)
            raise

    def drop_snapshot(self, layout: Layout, fs: Path) -> None:
        try:
            snap = snapshot_of(layout, fs)
        except StorageError:
            return
        _delete_subvolume(snap, wait=False)
        Path(f"{snap}.owner").unlink(missing_ok=True)

    def migrate_items(self, layout: Layout, veid: str, *, final: bool) -> list[Transfer]:
        return [Transfer("subvolume", ve_subvolume(layout, veid))]

    def receive_prepare(self, layout: Layout, veid: str, staged: Path, template: Path, limits: Limits) -> dict:
        """A snapshot of this root's template subvolume, to be made equal to the VE's subvolume (only what the VE
        changed is copied: the template's files match by size and time)."""
        target = ve_subvolume(layout, veid).with_name(migrating_name(veid))
        _delete_subvolume(target)  # (a killed migration's: the caller holds the VE's lock)
        there = template_subvolume(layout, template)
        _run(["btrfs", "subvolume", "snapshot", str(there), str(target)], f"snapshotting {there}")
        return {"subvolume": str(target)}

    def receive_install(self, layout: Layout, veid: str, staged: Path, limits: Limits) -> None:
        target = ve_subvolume(layout, veid).with_name(migrating_name(veid))
        if limits.space_hard is not None:
            _run(["btrfs", "qgroup", "limit", "-e", str(limits.space_hard), str(target)],
                 f"setting the qgroup limit of {target}")
        os.rename(target, ve_subvolume(layout, veid))


SNAPSHOTS = "snapshots"
SNAPSHOT_REF = "btrfs-snapshot"


def migrating_name(veid: str) -> str:
    return f".tmp-{veid}-migrate"


def snapshot_of(layout: Layout, fs: Path) -> Path:
    """The pool's snapshot a checkpoint's fs/ names."""
    from vzpkg.errors import CheckpointNotFoundError

    try:
        name = (fs / SNAPSHOT_REF).read_text().strip()
    except OSError:
        raise CheckpointNotFoundError(f"the checkpoint's file snapshot {fs / SNAPSHOT_REF} is missing") from None
    snap = ensure_pool(layout) / SNAPSHOTS / name
    if "/" in name or not name or not snap.is_dir():
        raise CheckpointNotFoundError(f"the checkpoint's btrfs snapshot {snap} is gone (it lives in the VZ root's "
                                      "pool): the checkpoint cannot be restored")
    return snap


def drop_orphans(layout: Layout, veid: str) -> list[tuple[Path, int]]:
    """Snapshots of VEID whose checkpoint is gone (its directory removed by hand): the .owner file names the
    checkpoint's fs/, which names the snapshot while it exists. (Called as VEID's storage is removed: the
    checkpoint in its own dump/<id>, which goes with it, counts as gone.)"""
    removed = []
    snaps = pool_dir(layout) / SNAPSHOTS
    try:
        names = os.listdir(snaps)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(f"{veid}-") or name.endswith(".owner"):
            continue
        owner = snaps / f"{name}.owner"
        try:
            fs = Path(owner.read_text().strip())
            alive = (fs / SNAPSHOT_REF).read_text().strip() == name and fs.parent != layout.dump(veid)
        except OSError:
            alive = False
        if not alive:
            _delete_subvolume(snaps / name)
            owner.unlink(missing_ok=True)
            removed.append((snaps / name, 0))
    return removed
