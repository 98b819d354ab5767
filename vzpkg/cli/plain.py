"""The error handling of the runtime's front ends (vzctl, vzlist), which stay off click for start-up time."""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not from typing: importing it costs ~1.7 ms of every vzctl run (type checkers know the name)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

SIGPIPE_STATUS = 141  # 128 + SIGPIPE: what the shell reports for a tool its closed pipe killed (`yes | head -1`)


def stdout_closed(e: BaseException) -> bool:
    """E is a write to our standard output after its reader went away (`vzlist | head -1`), not a broken pipe
    to some child of ours: the pipe on fd 1 reports an error once it has no reader left."""
    if not isinstance(e, BrokenPipeError):
        return False
    try:
        import select  # (a builtin module in Debian's Python: importable inside a VE's mount namespace too)

        poll = select.poll()
        poll.register(1, 0)  # POLLERR and POLLHUP are always reported
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0))
    except (ImportError, OSError, ValueError):
        return True  # cannot tell: a broken pipe that reached the entry point is most likely the output's


def _drop_stdout() -> None:
    """Point fd 1 at /dev/null: what is still buffered goes nowhere at the interpreter's last flush."""
    import os

    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.close(fd)
    except OSError:
        pass


def exit_stdout_closed() -> NoReturn:
    """Exit as Unix tools do when the reader of their output goes away: silently, status 141. Python ignores
    SIGPIPE (so that a write fails with EPIPE instead of killing the process half-way); the exception has
    unwound every clean-up by now. Standard output is pointed at /dev/null first so that the interpreter's
    last flush of what is still buffered does not fail again ("Exception ignored ... BrokenPipeError")."""
    _drop_stdout()
    sys.exit(SIGPIPE_STATUS)


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
        if sys.stdout is not None:  # (None: started with fd 1 closed, `>&-`; print() wrote nothing)
            sys.stdout.flush()  # here, not at exit: a closed output is then an exception handled below
    except VzError as e:
        print(f"{prog}: error: {e.message}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        code = 130
    except OSError as e:
        if stdout_closed(e):
            exit_stdout_closed()
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
    if sys.stdout is not None:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):  # said above (a full disk, `> /dev/full`): not again at exit
            _drop_stdout()
    sys.exit(code)


def say(args, text: str) -> None:
    """Print TEXT unless the command was given -q/--quiet (vzctl's confirmations)."""
    if not getattr(args, "quiet", False):
        print(text, flush=True)
