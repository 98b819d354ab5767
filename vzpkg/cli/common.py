"""What every vzpkg command shares: error reporting with exit codes, output helpers, the progress printer."""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..errors import VzError

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(prog: str) -> Callable[[F], F]:
    """Turn VzError into `prog: error: message` and its exit code; Ctrl-C into exit 130."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except VzError as e:
                click.echo(f"{prog}: error: {e.message}", err=True)
                sys.exit(e.exit_code)
            except KeyboardInterrupt:
                click.echo(f"{prog}: interrupted; nothing was published", err=True)
                sys.exit(130)

        return inner  # type: ignore[return-value]

    return wrap


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def human_size(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


class PrintingReporter:
    """One line per build step with its duration; a progress bar while packing (on a terminal)."""

    def __init__(self, quiet: bool, verbose: bool, prefix: str = "") -> None:
        self.quiet = quiet
        self.is_verbose = verbose
        self.prefix = prefix
        self.tty = sys.stderr.isatty()
        self._last_draw = 0.0
        self._drawn = False

    def step(self, name: str, seconds: float, detail: str = "") -> None:
        if not self.quiet:
            extra = f"  {detail}" if detail else ""
            click.echo(f"{self.prefix}{name:<20} {seconds:7.2f} s{extra}", err=True)

    def note(self, message: str) -> None:
        if not self.quiet:
            click.echo(f"{self.prefix}{message}", err=True)

    def verbose(self, message: str) -> None:
        if self.is_verbose:
            click.echo(f"{self.prefix}{message}", err=True)

    def shows_progress(self) -> bool:
        return not self.quiet and self.tty

    def progress(self, done: int, total: int) -> None:
        if not self.shows_progress() or total <= 0:
            return
        now = time.monotonic()
        if now - self._last_draw < 0.1:
            return
        self._last_draw = now
        frac = min(done / total, 1.0)
        width = 30
        bar = "#" * int(frac * width)
        sys.stderr.write(f"\r{self.prefix}packing [{bar:<{width}}] {frac * 100:3.0f}%")
        sys.stderr.flush()
        self._drawn = True

    def progress_end(self) -> None:
        if self._drawn:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()
            self._drawn = False
