"""Reading small files that a user or another program may have replaced by something else."""

from __future__ import annotations

import os
import stat

# A cache manifest lists packages and checksums: a few hundred KB; far more is not a manifest.
MANIFEST_MAX = 64 << 20
# A VE config is a few dozen lines; a hand-edited one may carry long values, never megabytes of them.
CONF_MAX = 16 << 20


class NotRegularFileError(OSError):
    """The path is a FIFO, a device, a socket or a directory: reading it could block forever or never end."""


def read_small_text(path: str | os.PathLike[str], limit: int) -> str:
    """The text of the regular file PATH (see read_small_bytes). UnicodeDecodeError as from read_text()."""
    return read_small_bytes(path, limit).decode("utf-8")


def read_small_bytes(path: str | os.PathLike[str], limit: int) -> bytes:
    """The content of the regular file PATH (symlinks followed), at most LIMIT bytes.

    Opened non-blocking so that a FIFO put in its place does not hang the command in open(2); anything but a
    regular file, or a file over LIMIT, raises NotRegularFileError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(0, "not a regular file", os.fspath(path))
        if st.st_size > limit:
            raise NotRegularFileError(0, f"larger than {limit} bytes", os.fspath(path))
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise NotRegularFileError(0, f"larger than {limit} bytes", os.fspath(path))
    return data
