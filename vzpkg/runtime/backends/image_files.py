"""The image backend's files: how large a VE's image is (image_size, fs_size), the prepared images it is copied
from (made once per size and inode count by mkfs, under a lock; removed by `vzpkg clean --templates` when no VE
and no sample needs them) and the sparse copy itself."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

from vzpkg.errors import DiskLimitError, MissingToolError, StorageError, UsageError

from ..layout import Layout
from .base import Limits

TYPE_CHECKING = False  # as in cli/plain.py: the process layer is imported only where a command runs
if TYPE_CHECKING:
    from vzpkg import process

BLOCK = 4096
MIN_SIZE = 16 << 20  # ext4 with a journal needs a few MB of its own
HEADROOM_MIN = 64 << 20
GROW_ROOM = 256 << 30  # an image's file system without an inode limit is at least this large (see fs_size)
BIG_FS = 16 << 30  # from here mkfs would pick a journal of 128 MB to 1 GB, all of it written over time: 64 MB
SPARE_INODES = 16  # inodes kept out of the VE's reach (image.py's SPARE): mkfs -N adds them to the limit


def _run(argv: list[str], what: str) -> process.Result:
    from vzpkg import process  # (its import pulls in subprocess: not on the start path)

    try:
        proc = process.run(argv, capture=True, text=True, check=False, error=MissingToolError, pdeathsig=signal.SIGKILL)
    except MissingToolError:
        raise MissingToolError(f"{argv[0]} is not installed: install e2fsprogs and util-linux") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise StorageError(f"{what} failed: {lines[-1] if lines else f'exit status {proc.returncode}'}")
    return proc


def image_size(limits: Limits) -> int:
    if limits.space_hard is None:
        raise UsageError("the image layout needs a space limit (its image's size): give --diskspace SOFT[:HARD]")
    size = -(-limits.space_hard // BLOCK) * BLOCK
    if size < MIN_SIZE:
        raise DiskLimitError(f"--diskspace {limits.space_hard >> 10}K: an image needs at least {MIN_SIZE >> 20}M "
                             "(ext4's journal and metadata)")
    return size


def fs_size(hard: int, inodes: int | None = None) -> int:
    """The file system's size for a hard limit. The image is sparse (unused space costs the host nothing) and the
    limit is ext4's reservation, so the file system is made large: a limit raised on a running VE up to its size
    takes effect at once, without resize2fs, whose online form (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE that
    root lacks on some hosts (this kind of machine's bounding set). Without an inode limit: at least GROW_ROOM
    (its metadata costs ~1 MB per VE, see prepared_image); with one, twice the limit, since every block group
    holds at least 16 inodes and the inode count must stay near the limit."""
    tables = (inodes + SPARE_INODES) * 256 if inodes else hard // 64
    size = max(2 * hard, hard + HEADROOM_MIN) + tables
    if not inodes:
        size = max(size, GROW_ROOM)  # one prepared image serves every limit up to ~126G
    return -(-size // BLOCK) * BLOCK


def prepared_image(layout: Layout, size: int, inodes: int | None) -> Path:
    """template/.images/ext4-<size>-<inodes>.img, made by mkfs once (under a lock: concurrent creates)."""
    from vzpkg.flock import lock_file

    d = layout.template_dir / ".images"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = d / f"ext4-{size}-{inodes or 'd'}.img"
    if path.exists():
        return path
    fd = lock_file(d / ".lock")
    try:
        if path.exists():
            return path
        from ..state import pid_alive

        for stale in d.glob(".tmp-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)):
                stale.unlink(missing_ok=True)
        tmp = d / f".tmp-{path.name}-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.truncate(size)
        # meta_bg instead of resize_inode: no reserved GDT blocks (4 MB written per 256G image, copied per VE);
        # growing online past the file system then converts to meta_bg as needed, offline resize2fs is unaffected
        argv = ["mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-m", "0", "-O", "meta_bg,^resize_inode",
                "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"]
        if size >= BIG_FS:
            argv += ["-J", "size=64"]
        if inodes is not None:
            argv += ["-N", str(inodes + SPARE_INODES)]
        try:
            _run([*argv, str(tmp)], f"mkfs.ext4 of {tmp}")
            os.rename(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path
    finally:
        os.close(fd)


FICLONE = 0x40049409


def _copy_sparse(source: Path, dest: Path) -> bool:
    """`cp --sparse=always --reflink=auto SOURCE DEST` in-process (the cp process was ~5 ms of a create): a clone
    (FICLONE) where the file system can, else the data extents (SEEK_DATA/SEEK_HOLE) with copy_file_range, the
    holes left holes. False (DEST possibly half-written: the caller removes it) where a call is not supported
    here: then cp does it."""
    import fcntl

    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(src)
        dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, st.st_mode & 0o777)
        try:
            try:
                fcntl.ioctl(dst, FICLONE, src)
                return True
            except OSError:
                pass
            os.ftruncate(dst, st.st_size)
            pos = 0
            while pos < st.st_size:
                try:
                    data = os.lseek(src, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:  # only a hole from here on
                        break
                    raise
                end = os.lseek(src, data, os.SEEK_HOLE)
                while data < end:
                    n = os.copy_file_range(src, dst, end - data, data, data)
                    if n <= 0:
                        return False
                    data += n
                pos = end
            return True
        except OSError:
            return False
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _prepared_key(limits: Limits) -> str | None:
    """The prepared image's file name a create with LIMITS copies (None: not an image-able limit)."""
    try:
        size = fs_size(image_size(limits), limits.inodes_hard)
    except (UsageError, DiskLimitError):
        return None
    return f"ext4-{size}-{limits.inodes_hard or 'd'}.img"


def remove_unused_prepared(layout: Layout) -> list[tuple[Path, int]]:
    """`vzpkg clean --templates`: prepared images that no create would copy: none of the VEs' current limits
    (a re-create, a clone) and none of the sample configs' names them. (path, bytes on disk) of each removed."""
    from vzpkg.flock import lock_file

    from ..conf import SAMPLES_DIR, VEConfig
    from ..confcache import load_conf

    d = layout.template_dir / ".images"
    if not d.is_dir():
        return []
    wanted = set()
    for veid in layout.veids():
        try:
            wanted.add(_prepared_key(Limits.of(load_conf(layout, veid))))
        except Exception:  # a damaged config: keep what it might need, it is only a few MB
            return []
    for sample in SAMPLES_DIR.glob("*.conf"):
        try:
            wanted.add(_prepared_key(Limits.of(VEConfig.load(sample))))
        except Exception:
            continue
    removed = []
    fd = lock_file(d / ".lock")  # not while a create makes one
    try:
        from ..state import pid_alive

        for path in sorted(d.iterdir()):
            name = path.name
            pid = name.rsplit("-", 1)[-1]
            stale = name.startswith(".tmp-") and pid.isdigit() and not pid_alive(int(pid))
            if stale or (name.startswith("ext4-") and name.endswith(".img") and name not in wanted):
                size = path.stat().st_blocks * 512
                path.unlink(missing_ok=True)
                removed.append((path, size))
    finally:
        os.close(fd)
    return removed
