"""The error handling of the runtime's front ends (vzctl, vzlist), which stay off click for start-up time."""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not from typing: importing it costs ~1.7 ms of every vzctl run (type checkers know the name)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn


def run_main(prog: str, run: Callable[[list[str]], int], argv: list[str] | None) -> NoReturn:
    """Run RUN(argv) and exit with its status; errors become `PROG: message` and their exit code."""
    import signal

    from vzpkg.errors import VEError, VzError

    def _interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM unwinds like Ctrl-C: clean-ups run, one line, exit 130 (commands that forward signals to a VE
    # install their own handlers).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except VzError as e:
        print(f"{prog}: error: {e.message}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        code = 130
    except OSError as e:
        try:
            from vzpkg.space import disk_full_error, is_full
        except ImportError:
            # `vzctl exec` and `enter` have joined the VE's mount namespace: imports look in the VE's file
            # system (not imported up front: ~2 ms of every vzctl run for a rare error)
            def is_full(_e: OSError) -> bool:
                return False

        if is_full(e):
            err = disk_full_error(e, e.filename)
            print(f"{prog}: error: {err.message}", file=sys.stderr)
            code = err.exit_code
        else:
            print(f"{prog}: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
            code = VEError.exit_code
    except Exception as e:  # a bug: still one line, never a traceback (VZPKG_DEBUG=1 shows it)
        import os

        if os.environ.get("VZPKG_DEBUG"):
            raise
        print(f"{prog}: error: internal error: {type(e).__name__}: {e} (rerun with VZPKG_DEBUG=1 for details)",
              file=sys.stderr)
        code = VzError.exit_code
    sys.exit(code)


def say(args, text: str) -> None:
    """Print TEXT unless the command was given -q/--quiet (vzctl's confirmations)."""
    if not getattr(args, "quiet", False):
        print(text, flush=True)
