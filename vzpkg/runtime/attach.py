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
from .spawn import VE_ENV, _harden, exec_or_exit
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
    """Move the calling process into each of DIRS (from cgroup_targets). A single-threaded caller (vzctl, a
    forked helper) writes "0" to cgroup v1's `tasks`, which moves just the calling thread and so skips the RCU
    grace period that a write to cgroup.procs waits for (8-19 ms here; see V1Driver.self_join_files)."""
    me = str(os.getpid()).encode()
    single = len(os.listdir("/proc/self/task")) == 1
    for d, ours in dirs:
        try:
            fd = -1
            if single:
                try:
                    fd = os.open(f"{d}/tasks", os.O_WRONLY | os.O_CLOEXEC)
                    data = b"0"
                except FileNotFoundError:  # cgroup v2: no tasks file
                    pass
            if fd < 0:
                fd = os.open(f"{d}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
                data = me
            try:
                os.write(fd, data)
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
    fds = ns.open_namespaces(rec.pid, rec.privileged)
    try:
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


def _forward_signals(pid: int, *, group: bool = False) -> None:
    """Pass our interrupts on to PID, or to its whole process group when it leads one of its own (a shell's
    children get them too, as from a terminal: `vzctl exec VE 'sleep 60'` stops on Ctrl-C)."""
    def fwd(sig, _frame):
        try:
            os.kill(-pid if group else pid, sig)
        except ProcessLookupError:
            try:
                os.kill(pid, sig)  # (its setsid has not run yet)
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
    own_session = not os.isatty(0)
    pid = _fork_in_ve(veid, repr(' '.join(argv)))
    if pid == 0:
        try:
            os.closerange(3, 1 << 20)
            if own_session:
                # a session of its own inside the VE: what it leaves running (`vzctl exec VE 'srv &'`) must not
                # belong to a session whose leader is outside the VE, which CRIU cannot dump (vzctl chkpnt);
                # signals reach it through _forward_signals, not the terminal
                os.setsid()
            _harden(rec.privileged)
            exec_or_exit(argv, environ)
        except BaseException as e:  # the set-up before the exec failed
            os.write(2, f"vzctl exec: {argv[0]}: {e}\n".encode())
            os._exit(126)
    _forward_signals(pid, group=own_session)
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

