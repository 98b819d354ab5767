"""The Python API's captured exec (VE.exec without the exec server): a command run in a VE from a forked,
non-dumpable helper, its stdout and stderr captured; the caller's own namespaces and cgroups never change.
vzctl exec and enter (a terminal, signals forwarded) are attach.py's."""

from __future__ import annotations

import os
import signal

from vzpkg.errors import VEError, VENotFoundError, VEOutOfMemoryError, VEStateError

from . import ns, state
from .attach import (  # noqa: F401
    _enter_namespaces,
    _fork_in_ve,
    _numproc_message,
    _oom_message,
    _OomWatch,
    cgroup_targets,
    join_cgroups,
)
from .layout import Layout, check_veid
from .spawn import VE_ENV, _harden, exec_or_exit
from .state import live_init as running_init


class Captured:
    """What run_captured returns: the command's status (as os.waitstatus_to_exitcode: -N if killed by signal N),
    its output, and whether it ran past its timeout (then it was killed)."""

    __slots__ = ("returncode", "stdout", "stderr", "timed_out")

    def __init__(self, returncode: int, stdout: bytes, stderr: bytes, timed_out: bool) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out


PR_SET_DUMPABLE = 4


def run_captured(layout: Layout, veid: str, argv: list[str], *, input: bytes | None = None,
                 timeout: float | None = None, env: dict[str, str] | None = None) -> Captured:
    """Run ARGV inside the running VE with INPUT as its stdin (else /dev/null) and its stdout and stderr captured,
    without changing the calling process (for the Python API: the caller may be a long-lived, multi-threaded
    test runner).

        caller ── fork ──► helper: no longer dumpable; joins the VE's cgroups and namespaces
                                   fork ──► command (in the VE's pid namespace): seccomp, exec ARGV
                 ◄── "P<pid>", "S<status>" ── (waits for it)

    The helper is a copy of the caller's memory inside the VE's user namespace: non-dumpable, so the VE's root
    cannot ptrace it or read it through /proc. A command that outlives TIMEOUT (seconds) is killed with SIGKILL
    and timed_out is set; what it wrote until then is kept."""
    import select
    import time

    veid = check_veid(veid)
    if not argv:
        raise VEError("exec: no command given")
    rec = running_init(layout, veid)
    if rec is None:
        if not layout.conf(veid).exists():
            raise VENotFoundError(f"VE {veid} does not exist")
        raise VEStateError(f"VE {veid} is not running: start it with 'vzctl start {veid}'")
    environ = dict(VE_ENV)
    if env:
        environ.update(env)
    argv = [str(a) for a in argv]
    fds: list[tuple[int, int]] = []
    pipes: list[int] = []
    watch = None
    forked = False
    helper = 0
    try:
        dirs, memdir = cgroup_targets(rec.pid, cached_mounts=True)
        watch = _OomWatch(memdir)
        in_r, in_w = os.pipe2(os.O_CLOEXEC) if input is not None else (os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), -1)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        st_r, st_w = os.pipe2(os.O_CLOEXEC)
        pipes += [fd for fd in (in_r, in_w, out_r, out_w, err_r, err_w, st_r, st_w) if fd >= 0]
        # the VE's exec server, if this process started it (execserver.py): no cgroup join, one fork
        from . import execserver

        key = execserver.key(layout, veid)
        srv = execserver.lookup(key, rec.pid, rec.starttime)
        if srv is not None and execserver.request(srv, argv, environ, [in_r, out_w, err_w, st_w]):
            forked = True
        else:
            if srv is not None:
                execserver.stop_server(key)  # gone (killed, or the VE restarted by someone else)
            fds.extend(ns.open_namespaces(rec.pid, rec.privileged))
            if not state.record_alive(rec):
                raise VEStateError(f"VE {veid} stopped while entering it")
            helper = os.fork()
            if helper == 0:
                _captured_helper(veid, argv, environ, rec.privileged, fds, dirs, (in_r, out_w, err_w), st_w)
            forked = True
    finally:
        for fd, _ in fds:
            os.close(fd)
        if not forked:
            for fd in pipes:
                os.close(fd)
            if watch is not None:
                watch.close()
    for fd in (in_r, out_w, err_w, st_w):
        os.close(fd)
        pipes.remove(fd)
    deadline = None if timeout is None else time.monotonic() + max(float(timeout), 0.0)
    out: dict[int, list[bytes]] = {out_r: [], err_r: [], st_r: []}
    pending = memoryview(input or b"")
    timed_out = False
    cmd_pid = 0
    try:
        if in_w >= 0:
            if pending:
                os.set_blocking(in_w, False)
            else:
                os.close(in_w)
                pipes.remove(in_w)
                in_w = -1
        p = select.poll()
        for fd in out:
            p.register(fd, select.POLLIN)
        if in_w >= 0:
            p.register(in_w, select.POLLOUT)
        open_fds = set(out) | ({in_w} if in_w >= 0 else set())
        while open_fds:
            wait_ms = None
            if deadline is not None:
                wait_ms = max(int((deadline - time.monotonic()) * 1000), 0)
            ready = p.poll(wait_ms)
            if not ready and deadline is not None and time.monotonic() >= deadline:
                if not timed_out:
                    timed_out = True
                    cmd_pid = cmd_pid or _cmd_pid(out[st_r])
                    if cmd_pid:
                        _kill(cmd_pid)
                    deadline = time.monotonic() + 0.2  # what is still in the pipes
                    continue
                break  # its children keep the pipes open: stop reading
            for fd, ev in ready:
                if fd == in_w:
                    try:
                        n = os.write(in_w, pending[:65536])
                        pending = pending[n:]
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        p.unregister(in_w)
                        open_fds.discard(in_w)
                        os.close(in_w)
                        pipes.remove(in_w)
                        in_w = -1
                    continue
                data = os.read(fd, 65536) if ev & (select.POLLIN | select.POLLHUP | select.POLLERR) else b""
                if data:
                    out[fd].append(data)
                else:
                    p.unregister(fd)
                    open_fds.discard(fd)
    finally:
        if timed_out or open_fds:
            cmd_pid = cmd_pid or _cmd_pid(out[st_r])
            if cmd_pid and timed_out:
                _kill(cmd_pid)
        for fd in pipes:
            os.close(fd)
        hstatus = os.waitpid(helper, 0)[1] if helper else 0
        watch_kills, watch_ram = watch.oom_kills(), watch.ram()
        watch.close()
    status_text = b"".join(out[st_r]).decode(errors="replace")
    code = None
    error = None
    for line in status_text.splitlines():
        if line.startswith("S") and line[1:].lstrip("-").isdigit():
            code = os.waitstatus_to_exitcode(int(line[1:]))
        elif line.startswith("E"):
            error = line[1:]
    if code is None:
        if error is not None:
            msg = error.partition(":")[2]
            raise VEError(_numproc_message(veid, repr(" ".join(argv))) if msg == "numproc" else msg)
        if not helper:
            execserver.stop_server(key)
            if not _cmd_pid(out[st_r]):
                # the server died before it started the command (killed): the helper runs it
                return run_captured(layout, veid, argv, input=input, timeout=timeout, env=env)
            raise VEError(f"VE {veid}: the exec server went away while running {' '.join(argv)!r} (the VE stopped?)")
        raise VEError(f"VE {veid}: the exec helper died ({os.waitstatus_to_exitcode(hstatus)})")
    if code == -signal.SIGKILL and not timed_out and watch_kills > watch.before:
        raise VEOutOfMemoryError(_oom_message(veid, argv, watch_ram, direct=True))
    return Captured(code, b"".join(out[out_r]), b"".join(out[err_r]), timed_out)


def _cmd_pid(status_chunks: list[bytes]) -> int:
    for line in b"".join(status_chunks).split(b"\n"):
        if line.startswith(b"P") and line[1:].isdigit():
            return int(line[1:])
    return 0


def _kill(pid: int) -> None:
    """SIGKILL the command and its process group (what it started and did not move elsewhere)."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _close_except(keep: set[int]) -> None:
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def _captured_helper(veid: str, argv: list[str], environ: dict[str, str], privileged: bool,
                     ns_fds: list[tuple[int, int]], dirs: list[tuple[str, bool]], stdio: tuple[int, int, int],
                     st_w: int) -> None:
    """The helper process of run_captured (never returns)."""
    try:
        ns.prctl(PR_SET_DUMPABLE, 0)
        ns.set_pdeathsig(signal.SIGKILL)  # the caller died: so does the helper (the command runs on)
        for i, fd in enumerate(stdio):
            os.dup2(fd, i)
        # what other threads of the caller have open (their commands' pipes, lock files): not kept alive here
        _close_except({0, 1, 2, st_w, *(fd for fd, _ in ns_fds)})
        join_cgroups(dirs)
        for fd, flag in ns_fds:
            ns.setns(fd, flag)
            if flag == ns.CLONE_NEWUSER:
                ns.setresid(0, 0)
        try:
            pid = os.fork()
        except BlockingIOError:
            os.write(st_w, b"E:numproc\n")
            os._exit(1)
        if pid == 0:
            try:
                # a session (and so a group) of its own inside the VE: a timeout kills what it started too, and what it
                # leaves running (`sh -c 'srv &'`) is in no session led from outside the VE, which CRIU cannot dump
                os.setsid()
                os.closerange(3, 1 << 20)
                _harden(privileged)
                exec_or_exit(argv, environ)
            except BaseException as e:  # the set-up before the exec failed
                os.write(2, f"vzctl exec: {argv[0]}: {e}\n".encode())
                os._exit(126)
        os.write(st_w, f"P{pid}\n".encode())
        for i in (0, 1, 2):
            os.close(i)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        os.write(st_w, f"S{status}\n".encode())
        os._exit(0)
    except BaseException as e:
        try:
            msg = str(e).replace("\n", " ") or type(e).__name__
            os.write(st_w, f"E:{msg}\n".encode())
        finally:
            os._exit(1)
