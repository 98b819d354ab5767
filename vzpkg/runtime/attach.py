"""Into a running VE: `vzctl exec` (a command with our stdin/stdout/stderr) and `vzctl enter` (a shell on a pty
of the VE's own devpts, relayed to our terminal).

Both join the VE's cgroups first (from /proc/<init>/cgroup, without the cgroups module), then its namespaces, then
fork the command with the VE's environment, seccomp filter and (privileged VE) capability bound. After the mount
namespace is joined the host's module files are out of sight: everything is imported before.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys

from vzpkg.errors import VEError, VENotFoundError, VEOutOfMemoryError, VEStateError

from . import ns, state
from .layout import Layout, check_veid
from .spawn import VE_ENV, _harden
from .state import live_init as running_init

_MOUNTS_CACHE: list[tuple[set[str], str]] | None = None


def _cgroup_mounts(cached: bool = False) -> list[tuple[set[str], str]]:
    """[(super options, mount point)] of every cgroup mount (v2 gets an empty set). CACHED: the list read by an
    earlier call of this process (a long-lived API user reads mountinfo once, not at every exec)."""
    global _MOUNTS_CACHE
    if cached and _MOUNTS_CACHE is not None:
        return _MOUNTS_CACHE
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            tail = post.split()
            if len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
                continue
            opts = set(tail[2].split(",")) if tail[0] == "cgroup" else set()
            mounts.append((opts, pre.split()[4]))
    _MOUNTS_CACHE = mounts
    return mounts


def cgroup_targets(pid: int, *, cached_mounts: bool = False) -> tuple[list[tuple[str, bool]], str | None]:
    """The cgroup directories PID is in, one per hierarchy ([(directory, is a VE cgroup)]), and its memory
    cgroup's directory (v1 memory hierarchy, or v2) or None. From /proc/PID/cgroup and mountinfo directly: no
    import of the cgroups module on the exec path."""
    mounts = None
    memory = None
    dirs: list[tuple[str, bool]] = []
    with open(f"/proc/{pid}/cgroup") as f:
        lines = f.read().splitlines()
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if path == "/":
            continue
        if mounts is None:
            mounts = _cgroup_mounts(cached_mounts)
        want = set(ctrls.split(",")) if ctrls else set()
        point = next((p for opts, p in mounts if (want <= opts if want else not opts)), None)
        if point is None and cached_mounts:
            mounts = _cgroup_mounts(False)  # mounted since the cache was made
            point = next((p for opts, p in mounts if (want <= opts if want else not opts)), None)
        if point is None:
            continue
        if "memory" in want or (not want and memory is None):
            memory = f"{point}{path}"
        dirs.append((f"{point}{path}", "/vzpkg/" in path))
    return dirs, memory


def join_cgroups(dirs: list[tuple[str, bool]]) -> None:
    """Move the calling process into each of DIRS (from cgroup_targets)."""
    me = str(os.getpid()).encode()
    for d, ours in dirs:
        try:
            fd = os.open(f"{d}/cgroup.procs", os.O_WRONLY)
            try:
                os.write(fd, me)
            finally:
                os.close(fd)
        except OSError as e:
            if ours:
                raise VEError(f"cannot join the VE's cgroup {d}: {e.strerror}") from None


def join_cgroups_of(pid: int) -> str | None:
    """Move ourselves into every cgroup PID is in (all hierarchies), so the VE's limits apply to us. Returns
    the directory of its memory cgroup (v1 memory hierarchy, or v2), or None."""
    dirs, memory = cgroup_targets(pid)
    join_cgroups(dirs)
    return memory


class _OomWatch:
    """The VE's memory cgroup counters, opened on the host before entering the VE's mount namespace (after it the
    cgroup file systems are out of sight): how many processes its OOM killer has killed, and its RAM limit."""

    def __init__(self, memdir: str | None) -> None:
        self.fds: dict[str, int] = {}
        for name in ("memory.oom_control", "memory.events", "memory.limit_in_bytes", "memory.max"):
            try:
                self.fds[name] = os.open(f"{memdir}/{name}", os.O_RDONLY | os.O_CLOEXEC)
            except (OSError, TypeError):
                pass
        self.before = self.oom_kills()

    def _read(self, name: str) -> str | None:
        fd = self.fds.get(name)
        if fd is None:
            return None
        try:
            return os.pread(fd, 4096, 0).decode()
        except OSError:
            return None

    def oom_kills(self) -> int:
        for name in ("memory.events", "memory.oom_control"):
            for line in (self._read(name) or "").splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and value.strip().isdigit():
                    return int(value)
        return 0

    def ram(self) -> int | None:
        text = (self._read("memory.max") or self._read("memory.limit_in_bytes") or "max").strip()
        return int(text) if text.isdigit() and int(text) < 1 << 62 else None

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _oom_message(veid: str, argv: list[str], ram: int | None, *, direct: bool) -> str:
    what = " ".join(argv)
    what = repr(what if len(what) <= 60 else what[:57] + "...")
    victim = what if direct else f"a process started by {what}"
    if ram is None:
        return (f"{victim} was killed by the out-of-memory killer: VE {veid} has no RAM limit and the host ran out "
                "of memory")
    # (no import here: this runs inside the VE's mount namespace, where the host's module files are out of sight)
    size = next((f"{ram >> k}{u}" for k, u in ((40, "T"), (30, "G"), (20, "M"), (10, "K")) if ram % (1 << k) == 0),
                str(ram))
    return (f"{victim} was killed by VE {veid}'s memory limit (RAM={size}): use less memory in the VE "
            f"(files in /dev/shm and /run count too) or raise it: 'vzctl set {veid} --ram SIZE --save'")


def _enter_namespaces(layout: Layout, veid: str, oom: list | None = None):
    """Join the running VE's cgroups and namespaces (all but pid take effect at once; pid for children)."""
    rec = running_init(layout, veid)
    if rec is None:
        if not layout.conf(veid).exists():
            raise VENotFoundError(f"VE {veid} does not exist")
        raise VEStateError(f"VE {veid} is not running: start it with 'vzctl start {veid}'")
    fds = []
    try:
        for name, flag in ns.NS_ORDER:
            if name == "user" and rec.privileged:
                continue
            fds.append((os.open(f"/proc/{rec.pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), flag))
        if not state.record_alive(rec):
            raise VEStateError(f"VE {veid} stopped while entering it")
        memdir = join_cgroups_of(rec.pid)
        if oom is not None:
            oom.append(_OomWatch(memdir))
        for fd, flag in fds:
            ns.setns(fd, flag)
            if flag == ns.CLONE_NEWUSER:
                ns.setresid(0, 0)
    finally:
        for fd, _ in fds:
            os.close(fd)
    return rec


def _forward_signals(pid: int) -> None:
    def fwd(sig, _frame):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(s, fwd)


def _fork_in_ve(veid: str, what: str) -> int:
    """os.fork() after joining the VE's cgroups: at its pids.max (NUMPROC) the fork fails with EAGAIN."""
    try:
        return os.fork()
    except BlockingIOError:
        raise VEError(_numproc_message(veid, what)) from None


def _numproc_message(veid: str, what: str) -> str:
    return (f"VE {veid} is at its process limit (NUMPROC): cannot start {what}; stop some of its processes or "
            f"raise it: vzctl set {veid} --numproc N [--save]")


def exec_in(layout: Layout, veid: str, argv: list[str], *, env: dict[str, str] | None = None) -> int:
    """Run ARGV inside the VE with our stdin/stdout/stderr; returns its exit status (128+N if killed by N)."""
    veid = check_veid(veid)
    if not argv:
        raise VEError("vzctl exec: no command given")
    watch: list[_OomWatch] = []
    rec = _enter_namespaces(layout, veid, watch)
    environ = dict(VE_ENV)
    if os.environ.get("TERM"):
        environ["TERM"] = os.environ["TERM"]
    if env:
        environ.update(env)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = _fork_in_ve(veid, repr(' '.join(argv)))
    if pid == 0:
        try:
            os.closerange(3, 1 << 20)
            if not os.isatty(0):
                # a session of its own inside the VE: what it leaves running (`vzctl exec VE 'srv &'`) must not
                # belong to a session whose leader is outside the VE, which CRIU cannot dump (vzctl chkpnt);
                # signals reach it through _forward_signals, not the terminal
                os.setsid()
            _harden(rec.privileged)
            os.execvpe(argv[0], argv, environ)
        except FileNotFoundError:
            os.write(2, f"vzctl exec: {argv[0]}: command not found\n".encode())
            os._exit(127)
        except BaseException as e:
            os.write(2, f"vzctl exec: {argv[0]}: {e}\n".encode())
            os._exit(126)
    _forward_signals(pid)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    if watch and code in (-signal.SIGKILL, 128 + signal.SIGKILL) and watch[0].oom_kills() > watch[0].before:
        # the OOM killer took the command (or, status 137 from a shell, a process it ran): say so instead of
        # a silent "Killed"
        if code < 0:
            raise VEOutOfMemoryError(_oom_message(veid, argv, watch[0].ram(), direct=True))
        print(f"vzctl: note: {_oom_message(veid, argv, watch[0].ram(), direct=False)}", file=sys.stderr)
    return 128 - code if code < 0 else code


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
            for name, flag in ns.NS_ORDER:
                if name == "user" and rec.privileged:
                    continue
                fds.append((os.open(f"/proc/{rec.pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), flag))
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
                os.setpgid(0, 0)  # a group of its own: a timeout kills what it started too
                os.closerange(3, 1 << 20)
                _harden(privileged)
                os.execvpe(argv[0], argv, environ)
            except FileNotFoundError:
                os.write(2, f"vzctl exec: {argv[0]}: command not found\n".encode())
                os._exit(127)
            except BaseException as e:
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


def enter(layout: Layout, veid: str, shell: list[str] | None = None) -> int:
    """An interactive shell in the VE on a pty of the VE's own devpts."""
    import select
    import termios
    import tty

    veid = check_veid(veid)
    rec = _enter_namespaces(layout, veid)
    # we are now in the VE's mount namespace: /dev/ptmx is its devpts
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    import ctypes

    libc = ns.libc()
    if libc.grantpt(master) != 0 or libc.unlockpt(master) != 0:
        raise VEError("cannot set up a pty in the VE")
    libc.ptsname.restype = ctypes.c_char_p
    slave_name = libc.ptsname(master).decode()
    if not shell:
        shell = ["/bin/bash", "-l"] if os.path.exists("/bin/bash") else ["/bin/sh", "-l"]
    stdin_tty = os.isatty(0)
    if stdin_tty:
        try:
            fcntl.ioctl(master, termios.TIOCSWINSZ, fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8))
        except OSError:
            pass
    pid = _fork_in_ve(veid, f"a shell ({' '.join(shell)})")
    if pid == 0:
        try:
            os.setsid()
            slave = os.open(slave_name, os.O_RDWR)
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            for i in (0, 1, 2):
                os.dup2(slave, i)
            os.closerange(3, 1 << 20)
            _harden(rec.privileged)
            env = dict(VE_ENV)
            env["TERM"] = os.environ.get("TERM", "linux")
            os.execve(shell[0], shell, env)
        except BaseException as e:
            os.write(2, f"vzctl enter: {e}\n".encode())
            os._exit(126)
    old = termios.tcgetattr(0) if stdin_tty else None
    if stdin_tty:
        tty.setraw(0)

    def winch(_s, _f):
        try:
            fcntl.ioctl(master, termios.TIOCSWINSZ, fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8))
        except OSError:
            pass

    signal.signal(signal.SIGWINCH, winch)
    try:
        fds = [master, 0]
        while True:
            try:
                ready, _, _ = select.select(fds, [], [])
            except InterruptedError:
                continue
            if master in ready:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    data = b""
                if not data:
                    break
                os.write(1, data)
            if 0 in ready:
                data = os.read(0, 65536)
                if not data:
                    fds.remove(0)
                    os.write(master, b"\x04")
                else:
                    os.write(master, data)
    finally:
        if old is not None:
            termios.tcsetattr(0, termios.TCSAFLUSH, old)
        os.close(master)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code

