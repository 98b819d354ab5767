"""Opening a path below a directory descriptor without following any symlink on the way: openat2 with
RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV, or, on kernels without openat2
(before 5.6, or hidden by a seccomp filter), one O_NOFOLLOW component at a time. extract.py creates every
member of an archive in the directory this opens."""

from __future__ import annotations

import ctypes
import errno
import os
import stat

# openat2(2): 437 on every architecture (it came after the syscall tables were unified)
_SYS_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV

DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_openat2_works = True  # cleared at the first ENOSYS (kernels before 5.6, or a seccomp filter that hides it)


def open_beneath(dirfd: int, path: str, flags: int) -> int:
    """Open PATH (relative, normalised) below DIRFD without following a symlink at any step."""
    global _openat2_works
    if _openat2_works:
        from ..runtime.ns import libc

        how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE)
        fd = libc().syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), os.fsencode(path),
                            ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err), path)
        _openat2_works = False
    return _walk_nofollow(dirfd, path, flags)


def _walk_nofollow(dirfd: int, path: str, flags: int) -> int:
    """The fallback: one component at a time, each opened with O_NOFOLLOW relative to the previous one."""
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise OSError(errno.EINVAL, "not a normalised relative path", path)
    cur = dirfd
    try:
        for part in parts[:-1]:
            nxt = os.open(part, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=cur)
            if cur != dirfd:
                os.close(cur)
            cur = nxt
            if not stat.S_ISDIR(os.fstat(cur).st_mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
    finally:
        if cur != dirfd:
            os.close(cur)
    if flags & os.O_DIRECTORY and not stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    return fd
