"""SIGTERM and SIGHUP as Ctrl-C: they raise KeyboardInterrupt, so every `finally` clean-up runs and the command
ends with one line and exit 130 (stdlib only: imported by the CLI before anything heavy)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def terminate_like_interrupt() -> None:
    """For the rest of the process (a CLI command)."""
    for sig in SIGNALS:
        signal.signal(sig, _raise)


@contextmanager
def signals_raise() -> Iterator[None]:
    """For the block (a library call such as a build or a pull); the previous handlers come back after it."""
    previous = {s: signal.signal(s, _raise) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
