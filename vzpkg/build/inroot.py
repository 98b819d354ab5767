"""Writing into a root being built without ever leaving it: paths are resolved as if ROOT were `/`.

The root was made by packages (and, in update-cache, unpacked from a cache a post-cache script shaped), so any
directory in it may be a symlink: Debian's `/bin -> usr/bin`, but also an `etc -> /etc` that a plain
`open(root / "etc/foo", "w")` would follow onto the host. Every path is opened with openat2(RESOLVE_IN_ROOT):
the kernel resolves `..` and absolute symlinks against the root's directory fd, so `/bin/x` lands in the root's
`usr/bin/x` and `etc -> /etc` lands in the root's own `etc`. The final component is never followed: a file or
symlink is created under a temporary name and renamed over whatever is there, so a symlink already in the root
at that name is replaced, not written through.

Kernels without openat2 (older than 5.6) get a walk that refuses any symlink on the way instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import stat
from pathlib import Path, PurePosixPath

from ..errors import BuildError

_SYS_OPENAT2 = 437  # the same number on every architecture (added after the syscall tables were unified)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_TMP_SUFFIX = ".vzpkg-new"


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_have_openat2: bool | None = None


def _openat2(dirfd: int, path: str, flags: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(_SYS_OPENAT2, ctypes.c_int(dirfd), os.fsencode(path), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def _open_nofollow_walk(dirfd: int, path: str, flags: int) -> int:
    """Fallback without openat2: one component at a time, refusing symlinks (ELOOP) and `..`."""
    fd = os.dup(dirfd)
    parts = [p for p in path.split("/") if p not in ("", ".")]
    try:
        for i, part in enumerate(parts):
            if part == "..":
                raise OSError(errno.EXDEV, "'..' in a path inside the root", path)
            last = i == len(parts) - 1
            try:
                nfd = os.open(part, (flags if last else os.O_PATH | os.O_DIRECTORY) | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=fd)
            except NotADirectoryError:
                if stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode):
                    raise OSError(errno.ELOOP, "a symlink", path) from None
                raise
            os.close(fd)
            fd = nfd
        if not parts:
            nfd = os.open(".", flags | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_in_root(root_fd: int, path: str, flags: int) -> int:
    """open PATH (relative to the root) with every symlink resolved inside the root."""
    global _have_openat2
    if _have_openat2 is not False:
        try:
            fd = _openat2(root_fd, path or ".", flags)
            _have_openat2 = True
            return fd
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EPERM) or _have_openat2:
                raise
            _have_openat2 = False  # no openat2 (or a seccomp filter refusing it)
    return _open_nofollow_walk(root_fd, path, flags)


class RootWriter:
    """Creates directories, files and symlinks below ROOT, resolving every path inside it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> RootWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fail(self, rel: PurePosixPath, e: OSError, what: str) -> BuildError:
        reason = e.strerror or str(e)
        if e.errno == errno.ELOOP:
            reason = "a symlink in the root is in the way (not followed)"
        return BuildError(f"cannot {what} {self.root}/{rel}: {reason}")

    def make_dirs(self, rel: PurePosixPath, mode: int = 0o755) -> int:
        """The directory REL, made where missing (new ones with MODE); returns an O_PATH fd of it."""
        fd = os.dup(self.fd)
        try:
            for i, part in enumerate(rel.parts):
                sub = "/".join(rel.parts[: i + 1])
                try:
                    nfd = open_in_root(self.fd, sub, os.O_PATH | os.O_DIRECTORY)
                except FileNotFoundError:
                    try:
                        os.mkdir(part, mode, dir_fd=fd)
                        os.chmod(part, mode, dir_fd=fd)  # mkdir applies the umask; PART is the directory just made
                        nfd = open_in_root(self.fd, sub, os.O_PATH | os.O_DIRECTORY)
                    except OSError as e:
                        raise self._fail(PurePosixPath(sub), e, "create directory") from e
                except OSError as e:
                    raise self._fail(PurePosixPath(sub), e, "create directory") from e
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _replace(self, parent: int, name: str, rel: PurePosixPath) -> None:
        """Rename the temporary entry over NAME: never through it, whatever is there now."""
        try:
            os.rename(name + _TMP_SUFFIX, name, src_dir_fd=parent, dst_dir_fd=parent)
        except OSError as e:
            os.unlink(name + _TMP_SUFFIX, dir_fd=parent)
            if e.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise BuildError(f"cannot write {self.root}/{rel}: a directory is there in the root") from e
            raise self._fail(rel, e, "write") from e

    def _fresh_tmp(self, parent: int, name: str) -> None:
        try:
            os.unlink(name + _TMP_SUFFIX, dir_fd=parent)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            shutil.rmtree(name + _TMP_SUFFIX, dir_fd=parent)

    def write_file(self, rel: PurePosixPath, src_fd: int | None, data: bytes | None, mode: int,
                   times_ns: tuple[int, int] | None) -> None:
        """Create REL from the open file SRC_FD (or DATA), with MODE and (atime, mtime) TIMES_NS."""
        parent = self.make_dirs(rel.parent)
        try:
            self._fresh_tmp(parent, rel.name)
            out = os.open(rel.name + _TMP_SUFFIX, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o600, dir_fd=parent)
            try:
                if src_fd is not None:
                    while chunk := os.read(src_fd, 1 << 20):
                        os.write(out, chunk)
                elif data:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(out, view):]
                os.fchmod(out, mode)
                if times_ns is not None:
                    os.utime(out, ns=times_ns)
            finally:
                os.close(out)
            self._replace(parent, rel.name, rel)
        except OSError as e:
            raise self._fail(rel, e, "write") from e
        finally:
            os.close(parent)

    def symlink(self, rel: PurePosixPath, target: str, times_ns: tuple[int, int] | None) -> None:
        """Create the symlink REL -> TARGET (TARGET is stored as it is; it is never resolved here)."""
        parent = self.make_dirs(rel.parent)
        try:
            self._fresh_tmp(parent, rel.name)
            os.symlink(target, rel.name + _TMP_SUFFIX, dir_fd=parent)
            if times_ns is not None:
                os.utime(rel.name + _TMP_SUFFIX, ns=times_ns, dir_fd=parent, follow_symlinks=False)
            self._replace(parent, rel.name, rel)
        except OSError as e:
            raise self._fail(rel, e, "create symlink") from e
        finally:
            os.close(parent)


def inside(root: Path, path: Path) -> bool:
    """Whether PATH, resolved on the host (every symlink followed), is ROOT or below it.

    For code that works on the root with ordinary host paths (mounts, globs, small writes): a symlink the root
    holds, like an absolute `var/log -> /var/log`, would take such a path out of the root onto the host."""
    real_root = os.path.realpath(root).rstrip("/") + "/"
    return (os.path.realpath(path).rstrip("/") + "/").startswith(real_root)


def require_inside(root: Path, path: Path, what: str) -> None:
    """Raise BuildError unless PATH resolves inside ROOT (see inside())."""
    if not inside(root, path):
        raise BuildError(f"refusing to {what} {path}: a symlink in the root leads out of it (to "
                         f"{os.path.realpath(path)}); a root's symlinks are never followed onto the host")


def remove_matches(root: Path, pattern: str, keep: tuple[str, ...] = ()) -> None:
    """Remove what PATTERN matches below ROOT (files named in KEEP stay); never through a symlink of the root
    that leads out of it."""
    for path in root.glob(pattern):
        if not inside(root, path.parent):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.name not in keep:
            path.unlink(missing_ok=True)
