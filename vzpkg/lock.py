"""Per-template locks: concurrent runs on one template are serialized."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LockTimeoutError
from .flock import open_lockfile, take


@contextmanager
def locked(path: Path, *, timeout: float, what: str, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on PATH; wait up to TIMEOUT seconds, then raise LockTimeoutError.

    The descriptor is close-on-exec, so child processes never keep a lock alive after vzpkg dies.
    """
    fd = open_lockfile(path, mode=0o644)
    try:
        deadline = time.monotonic() + timeout
        announced = False
        while not take(fd, wait=False):
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            if time.monotonic() >= deadline:
                raise LockTimeoutError(
                    f"{what} is locked by another vzpkg run (pid {holder}); waited {timeout:g} s "
                    f"(raise it with --timeout, or wait for that run to finish)"
                )
            if not announced and on_wait:
                on_wait(f"waiting for {what}: locked by pid {holder}")
                announced = True
            time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
