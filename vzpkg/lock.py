"""Per-template locks: concurrent runs on one template are serialized."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LockTimeoutError


@contextmanager
def locked(path: Path, *, timeout: float, what: str, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on PATH; wait up to TIMEOUT seconds, then raise LockTimeoutError.

    The descriptor is close-on-exec, so child processes never keep a lock alive after vzpkg dies.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                if time.monotonic() >= deadline:
                    raise LockTimeoutError(
                        f"{what} is locked by another vzpkg run (pid {holder}); waited {timeout:g} s "
                        f"(raise it with --timeout, or wait for that run to finish)"
                    ) from None
                if not announced and on_wait:
                    on_wait(f"waiting for {what}: locked by pid {holder}")
                    announced = True
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
