"""Every external command vzpkg runs goes through here (the model is mkosi's run.py).

What each command gets:
- a process group (and session) of its own, so an interrupt or a timeout stops the whole group, not just the
  direct child (a bootstrapper killed alone leaves dpkg writing into a root being removed), and the error goes
  on only once no member runs any more (SIGTERM, a grace of 10 s, SIGKILL);
- a parent-death signal (PR_SET_PDEATHSIG), so a SIGKILLed vzpkg leaves no tool running;
- no inherited file descriptors (close_fds) and stdin from /dev/null unless INPUT is given;
- its output kept: captured (capture=True), or read line by line into a log / the terminal / a callback with the
  last lines kept (a bounded tail);
- on failure (check=True), the caller's error class (a VzError subclass: BuildError, ScriptError, VEError, ...)
  with one line naming the command, its exit status and the last lines of its output. A command that cannot be
  started at all (missing, not executable) is the same error class, "cannot run ...".

`run` is for commands that run to their end; `spawn` is for the streaming pipelines (tar into zstandard, zstandard
into tar) whose pipes vzpkg reads or writes itself.

Exceptions (tests/unit/test_process.py fails on any subprocess use outside this module, and there is none):
- The runtime's hot path uses os.fork (+ exec), not subprocess, on purpose: runtime/spawn.py (the VE's init) and
  runtime/attach.py (vzctl exec/enter) fork and exec; runtime/live.py and store/extract.py fork a Python child
  that does the work itself (no command). Between fork and exec the child joins namespaces and cgroups, drops
  capabilities or pivots its root, which subprocess cannot do, and vzctl start/exec must not pay for importing
  it. They keep their own error handling (VEError and its subclasses, UnsafeArchiveError).
- The runtime's short host commands (ip/nsenter in runtime/net.py, cp and rm in runtime/storage.py and
  runtime/leftovers.py, gcc in runtime/init.py) do go through `run`; they import this module lazily, and this
  module imports nothing beyond subprocess's own dependencies at import time.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager

from .errors import BuildError, VzError

# Annotations only: the runtime (vzctl start sets up its network through here) does not pay for importing typing,
# dataclasses or shlex.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence
    from typing import IO, Any

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT
TimeoutExpired = subprocess.TimeoutExpired

TAIL_LINES = 3          # lines of output quoted in an error message
TAIL_KEPT = 50          # lines kept while a command runs (for callers that classify the end of the output)
_LINE_MAX = 240         # characters of one quoted line
_COMMAND_MAX = 160      # characters of the command quoted in a message
_STOP_GRACE = 10.0      # seconds between SIGTERM and SIGKILL when vzpkg is interrupted
_PR_SET_PDEATHSIG = 1
_libc: Any = None


def _load_libc() -> None:
    # loaded in the parent: a preexec_fn must not import (the child of a threaded parent may deadlock)
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _preexec(pdeathsig: int | None, then: Callable[[], None] | None) -> Callable[[], None] | None:
    if pdeathsig is None and then is None:
        return None
    _load_libc()

    def child() -> None:
        if pdeathsig is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, pdeathsig, 0, 0, 0)
        if then is not None:
            then()

    return child


class Result:
    """How a command ended: its status, its captured output (capture=True) and the last lines it printed."""

    __slots__ = ("cmd", "returncode", "stdout", "stderr", "tail")

    def __init__(self, cmd: list[str], returncode: int, stdout: Any = None, stderr: Any = None,
                 tail: list[str] | None = None) -> None:
        self.cmd = cmd
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.tail = tail if tail is not None else []

    def __repr__(self) -> str:
        return f"Result(cmd={self.cmd!r}, returncode={self.returncode})"


def describe(cmd: Sequence[str]) -> str:
    """CMD as a shell would read it, shortened for a one-line message."""
    import shlex

    text = shlex.join(str(c) for c in cmd)
    return text if len(text) <= _COMMAND_MAX else text[:_COMMAND_MAX - 3] + "..."


def status_text(returncode: int) -> str:
    return f"exit status {returncode}" if returncode >= 0 else f"killed by signal {-returncode}"


def _tail_of(text: str | bytes | None, n: int = TAIL_KEPT) -> list[str]:
    if text is None:
        return []
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return [ln.strip() for ln in text.splitlines() if ln.strip()][-n:]


def failure_message(what: str, returncode: int, tail: Sequence[str], hint: str = "") -> str:
    """One line: WHAT failed (exit status N): the last lines of its output[; HINT]."""
    quoted = " | ".join(ln if len(ln) <= _LINE_MAX else ln[:_LINE_MAX - 3] + "..."
                        for ln in [t.strip() for t in tail if t.strip()][-TAIL_LINES:])
    return f"{what} failed ({status_text(returncode)})" + (f": {quoted}" if quoted else "") + (f"; {hint}" if hint else "")


def _group_running(pgid: int) -> bool:
    """Whether a process of group PGID still runs. A zombie does not: it has stopped and only waits for whoever
    inherited it (init, for a command's orphaned background child) to reap it, which vzpkg cannot hurry."""
    try:
        os.killpg(pgid, 0)  # fails only when the group is empty, zombies included
    except ProcessLookupError:
        return False
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    state, _ppid, group = f.read().rsplit(b")", 1)[1].split()[:3]
            except (OSError, ValueError):  # gone meanwhile
                continue
            if int(group) == pgid and state not in (b"Z", b"X"):
                return True
    return False


def _await_group(pgid: int, deadline: float) -> bool:
    """Wait until no process of group PGID runs any more, or DEADLINE (time.monotonic()) passes.

    A signal is only queued when kill() returns: a signalled process dies when it next runs, which on a loaded
    machine can be a while after its group leader was reaped. Returning before then would let the caller remove
    a directory the command's children are still writing into."""
    pause = 0.001
    while _group_running(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    return True


def stop_group(proc: subprocess.Popen, grace: float = _STOP_GRACE) -> None:
    """SIGTERM the process group of PROC, then SIGKILL what is left after GRACE seconds; return once the leader is
    reaped and no other member runs (after GRACE more seconds at most, should one survive SIGKILL in the kernel)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            if sig == signal.SIGTERM:
                os.killpg(proc.pid, signal.SIGCONT)  # a stopped member acts on SIGTERM only once it runs again
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        # the leader may be gone while members of its group still run
        if _await_group(proc.pid, deadline):
            return


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    error: type[VzError] = BuildError,
    what: str | None = None,
    hint: str = "",
    input: bytes | str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    capture: bool = False,
    text: bool = False,
    log: IO[bytes] | None = None,
    echo: IO[bytes] | None = None,
    on_line: Callable[[bytes], None] | None = None,
    quiet: bool = True,
    pdeathsig: int | None = signal.SIGTERM,
    preexec: Callable[[], None] | None = None,
) -> Result:
    """Run CMD to its end in a process group of its own; raise ERROR (naming WHAT, default the command) when it
    cannot be started, exits non-zero (with CHECK) or runs past TIMEOUT seconds (its whole group is killed).

    Output: with CAPTURE, stdout and stderr are returned (text with TEXT) and the error quotes stderr's last lines
    (stdout's when stderr is empty). Otherwise stdout and stderr are read together line by line, each line written to
    LOG and ECHO (binary streams) and handed to ON_LINE, and the last lines kept in Result.tail; with quiet=False and
    none of these, the command writes to vzpkg's own stdout/stderr.
    """
    argv = [os.fspath(c) for c in cmd]
    label = what or describe(argv)
    streaming = not capture and (log is not None or echo is not None or on_line is not None or quiet)
    if capture:
        stdout, stderr = PIPE, PIPE
    elif streaming:
        stdout, stderr = PIPE, STDOUT
    else:
        stdout = stderr = None
    stdin = PIPE if input is not None else DEVNULL
    try:
        proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env, cwd=cwd,
                                close_fds=True, start_new_session=True, text=text and capture,
                                preexec_fn=_preexec(pdeathsig, preexec))
    except OSError as e:  # missing, not executable, a directory, ...
        raise error(f"{label}: cannot run {argv[0]}: {e.strerror}") from e

    timer = None
    timed_out = threading.Event()
    if timeout is not None:
        def expire() -> None:
            timed_out.set()
            _kill_group(proc)

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
    out = err = None
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_KEPT)
    try:
        if capture:
            out, err = proc.communicate(input)
            tail.extend(_tail_of(err) or _tail_of(out))
        else:
            if proc.stdout is not None:
                for raw in proc.stdout:
                    if log is not None:
                        log.write(raw)
                    if echo is not None:
                        echo.write(raw)
                        echo.flush()
                    if on_line is not None:
                        on_line(raw)
                    line = raw.decode(errors="replace").strip()
                    if line:
                        tail.append(line)
                proc.stdout.close()
            proc.wait()
    except BaseException:
        stop_group(proc)
        raise
    finally:
        if timer is not None:
            timer.cancel()
    # Whatever the leader left in its group (a daemon it started) must not outlive the command on a timeout.
    if timed_out.is_set():
        _kill_group(proc)
        _await_group(proc.pid, time.monotonic() + _STOP_GRACE)
        raise error(f"{label} did not finish within {timeout:g} s and was killed"
                    + (f": {' | '.join(list(tail)[-TAIL_LINES:])}" if tail else ""))
    result = Result(argv, proc.returncode, out, err, list(tail))
    if check and proc.returncode != 0:
        raise error(failure_message(label, proc.returncode, result.tail, hint))
    return result


@contextmanager
def spawn(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    error: type[VzError] = BuildError,
    what: str | None = None,
    stdin: int | IO[Any] | None = DEVNULL,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    pdeathsig: int | None = signal.SIGTERM,
    preexec: Callable[[], None] | None = None,
) -> Iterator[subprocess.Popen]:
    """A running CMD (process group and parent-death signal as for `run`) whose pipes the caller reads or writes.

    The block owns the process: leaving it early (an error, an interrupt) kills the whole group and reaps it; the
    block itself checks proc.wait() and raises what fits."""
    argv = [os.fspath(c) for c in cmd]
    try:
        proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env, cwd=cwd, close_fds=True,
                                start_new_session=True, preexec_fn=_preexec(pdeathsig, preexec))
    except OSError as e:
        raise error(f"{what or describe(argv)}: cannot run {argv[0]}: {e.strerror}") from e
    try:
        yield proc
    finally:
        if proc.poll() is None:
            _kill_group(proc)
            proc.wait()
            _await_group(proc.pid, time.monotonic() + _STOP_GRACE)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass


def start_daemon(cmd: Sequence[str | os.PathLike[str]], log: str | os.PathLike[str], *,
                 error: type[VzError] = VzError, what: str | None = None) -> int:
    """Start CMD to outlive us (a resident server): a session of its own, no parent-death signal, stdin from
    /dev/null, stdout and stderr appended to LOG. Returns its pid; the caller checks that it came up (a
    short-lived caller such as `vzctl server start` exits at once and leaves it to init)."""
    argv = [os.fspath(c) for c in cmd]
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        return subprocess.Popen(argv, stdin=DEVNULL, stdout=fd, stderr=fd, close_fds=True,
                                start_new_session=True).pid
    except OSError as e:
        raise error(f"{what or describe(argv)}: cannot run {argv[0]}: {e.strerror}") from e
    finally:
        os.close(fd)
