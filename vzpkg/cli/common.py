"""What every vzpkg command shares: error reporting with exit codes, output helpers, the progress printer."""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from ..errors import NotWritableError, VzError
from ..interrupt import terminate_like_interrupt
from ..space import disk_full_error, is_full
from .plain import exit_stdout_closed, stdout_closed

F = TypeVar("F", bound=Callable[..., Any])


def os_error(e: OSError) -> VzError | None:
    """The one-line error for an OSError that escaped: a full filesystem or one vzpkg may not write to."""
    if is_full(e):
        return disk_full_error(e, e.filename)
    if e.errno == errno.EROFS and e.filename:
        return NotWritableError(f"cannot write {e.filename} (read-only filesystem): the directory must be "
                                f"writable; remount it read-write or use another one (--cache-dir)")
    if e.errno == errno.EACCES and e.filename:
        return NotWritableError(f"cannot access {e.filename} (permission denied): fix its permissions or use "
                                f"another directory (--cache-dir)")
    return None


def _unexpected(prog: str, e: Exception) -> NoReturn:
    """An error no handler knows (a bug, or an OSError nobody expected): one line and exit 1, the traceback only
    with VZPKG_DEBUG=1."""
    if os.environ.get("VZPKG_DEBUG"):
        raise e
    if isinstance(e, OSError) and e.strerror:
        what = e.strerror + (f": {e.filename}" if e.filename else "")
    else:
        what = f"internal error: {type(e).__name__}: {e}"
    click.echo(f"{prog}: error: {what} (rerun with VZPKG_DEBUG=1 for details)", err=True)
    sys.exit(VzError.exit_code)


def handle_errors(prog: str) -> Callable[[F], F]:
    """Turn VzError into `prog: error: message` and its exit code; Ctrl-C and SIGTERM into exit 130; a full
    or read-only filesystem into its one line."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            terminate_like_interrupt()
            try:
                result = fn(*args, **kwargs)
                sys.stdout.flush()  # here, not at exit: a closed output is then an exception handled below
                return result
            except VzError as e:
                click.echo(f"{prog}: error: {e.message}", err=True)
                sys.exit(e.exit_code)
            except KeyboardInterrupt:
                click.echo(f"{prog}: interrupted; nothing was published", err=True)
                sys.exit(130)
            except OSError as e:
                if stdout_closed(e):  # `vzpkg list | head -1`: quiet, as other tools
                    exit_stdout_closed()
                known = os_error(e)
                if known is None:
                    _unexpected(prog, e)
                click.echo(f"{prog}: error: {known.message}", err=True)
                sys.exit(known.exit_code)
            except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
                raise
            except Exception as e:  # a bug: still one line, never a traceback
                _unexpected(prog, e)

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
