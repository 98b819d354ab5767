"""One small flock helper for every lock file of vzpkg and vzctl.

Users: the VE lock (runtime/ve.py VELock, also the VE's journal), the template area's locks
(runtime/storage.py), the id range allocation (runtime/idrange.py) and the cache side's template lock
(vzpkg/lock.py). Each keeps its own policy (waiting, timeouts, what the file holds); what they share is here:
descriptors are always close-on-exec (a child process never keeps a lock alive after its parent died), a
missing parent directory is created with the mode the caller asks for, and only os and fcntl are imported
(this is on vzctl's start path).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def open_lockfile(path: Path, *, mode: int = 0o600, dir_mode: int = 0o777, flags: int = os.O_RDWR) -> int:
    """Open (creating) PATH close-on-exec, and its parent directories if they are missing (mode DIR_MODE, less
    the umask); returns the descriptor. FLAGS: os.O_RDWR, or os.O_RDWR | os.O_TRUNC."""
    while True:
        try:
            return os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, mode)
        except FileNotFoundError:
            path.parent.mkdir(mode=dir_mode, parents=True, exist_ok=True)


def take(fd: int, *, shared: bool = False, wait: bool = True) -> bool:
    """flock FD shared or exclusive. Without WAIT, return False at once when another holder has it."""
    op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        if not wait:
            return False
    fcntl.flock(fd, op)
    return True


def lock_file(path: Path, *, shared: bool = False, mode: int = 0o600, dir_mode: int = 0o777,
              flags: int = os.O_RDWR) -> int:
    """open_lockfile + take (waiting as long as it takes); returns the descriptor, to close to let go."""
    fd = open_lockfile(path, mode=mode, dir_mode=dir_mode, flags=flags)
    try:
        take(fd, shared=shared)
    except BaseException:
        os.close(fd)
        raise
    return fd
