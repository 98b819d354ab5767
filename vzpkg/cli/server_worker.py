"""A resident vzctl server's worker (vzpkg/cli/server.py): the process, forked ahead of a command, that takes on
its client's descriptors, environment, limits and cgroups and becomes the client's `vzctl ARGS`."""

from __future__ import annotations

import _signal
import array
import os
import re
import signal
import socket
import struct
import sys

from vzpkg.cli.server_protocol import PASSED_FDS, WORKER_FDS_SPACE, Request, decode_request


def _reopen_stdio() -> None:
    """sys.stdin/stdout/stderr over fds 0-2 (now the client's), buffered as Python buffers them at start-up:
    line by line on a terminal, in blocks otherwise; standard error always line by line. The server's own
    objects already write to fds 0-2, unused and buffered for a file: kept where that is right (~0.1 ms each)."""
    enc = sys.stdout.encoding if sys.stdout else "utf-8"
    if sys.stdin is None or sys.stdin.fileno() != 0:
        sys.stdin = sys.__stdin__ = open(0, encoding=enc, closefd=False)  # noqa: SIM115
    if sys.stdout is None or sys.stdout.fileno() != 1 or sys.stdout.line_buffering != os.isatty(1):
        sys.stdout = sys.__stdout__ = open(1, "w", encoding=enc, closefd=False,  # noqa: SIM115
                                           buffering=1 if os.isatty(1) else -1)
    if sys.stderr is None or sys.stderr.fileno() != 2 or not sys.stderr.line_buffering:
        sys.stderr = sys.__stderr__ = open(2, "w", encoding=enc, errors="backslashreplace",  # noqa: SIM115
                                           closefd=False, buffering=1)


def run_worker(channel: int) -> None:
    """A forked child waiting for a command (forked ahead of it, so that no command waits for a fork): the
    server's descriptors closed, vzctl's signal handlers in place (every signal is still blocked), a session of
    its own like a command started from a shell. Then it takes one command from CHANNEL and becomes it; it ends
    without one when the server closes CHANNEL. Never returns."""
    try:
        os.closerange(3, channel)
        os.closerange(channel + 1, os.sysconf("SC_OPEN_MAX"))
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setsid()
        _name("vzctl-idle")  # (ps tells the waiting worker from the commands)
        with socket.socket(fileno=channel) as ch:
            head, ancdata, _flags, _ = ch.recvmsg(12, WORKER_FDS_SPACE, socket.MSG_CMSG_CLOEXEC)
            fds = array.array("i")
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            if len(head) < 12 or len(fds) != PASSED_FDS + 1:
                os._exit(0)  # the server let it go (stopping, re-executing) or died
            while len(head) < 12:
                more = ch.recv(12 - len(head))
                if not more:
                    os._exit(0)
                head += more
            peer, length, _ = struct.unpack("<III", head)
            body = bytearray()
            while len(body) < length:
                chunk = ch.recv(min(length - len(body), 1 << 20))
                if not chunk:
                    os._exit(0)
                body += chunk
            _name("vzctl")
            _run_command(decode_request(bytes(body)), list(fds[:PASSED_FDS]), peer, ch.detach(), fds[PASSED_FDS])
    finally:
        os._exit(1)


def _name(comm: str) -> None:
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(comm)
    except OSError:
        pass


def _run_command(request: Request, fds: list[int], peer: int, go: int, conn: int) -> None:
    """In a worker: become the client's (pid PEER) `vzctl ARGV`; once the server's go-ahead arrives on GO, run
    it and exit with its status. Never returns. The status goes to the client (CONN) from here, before this
    process exits (its exit and the server's reaping are then off the client's path); b"x" on GO then tells the
    server so. Killed before that, the server tells the client the status its wait gives."""
    code = 1
    failed: BaseException | None = None
    try:
        for sig in request.ignored:  # as a Python vzctl started by the client would have found them
            signal.signal(sig, signal.SIG_IGN)
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target, inheritable=True)
        os.fchdir(fds[3])
        low, high = sorted((go, conn))  # everything but the server's channel and the client's connection
        os.closerange(3, low)
        os.closerange(low + 1, high)
        os.closerange(high + 1, os.sysconf("SC_OPEN_MAX"))
        _take_on(peer)
        os.umask(request.umask)
        # the client's environment; only what differs is set (each setting is a putenv)
        for key in [k for k in os.environ if k not in request.env]:
            del os.environ[key]
        for key, value in request.env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        sys.argv = ["vzctl", *request.argv]
        _reopen_stdio()
    except BaseException as e:  # said once the command is this process's for sure (after the go-ahead)
        failed = e
    try:
        if os.read(go, 1) != b"g":
            os._exit(0)  # no go-ahead: the client runs the command itself (or is gone)
        if failed is not None:
            raise failed
        from vzpkg.cli.vzctl import main

        try:
            # last (every signal is blocked until now, see Server._spawn_worker in server.py): as the client's own vzctl has it
            _signal.pthread_sigmask(signal.SIG_SETMASK, request.blocked)
        except KeyboardInterrupt:  # ^C before vzctl began: it dies of it, as a Python vzctl would
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        main(request.argv)  # exits through SystemExit with the command's status
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # the set-up failed: one line, as vzctl would say it
        try:
            os.write(2, f"vzctl: error: {e}\n".encode())
        except OSError:
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        try:
            os.write(conn, b"X" + struct.pack("<I", (code & 0xFF) << 8))
            os.write(go, b"x")
        except OSError:
            pass
        os._exit(code & 0xFF)



def _rlimits() -> tuple[int, ...]:
    import resource

    return tuple(getattr(resource, n) for n in dir(resource) if n.startswith("RLIMIT_"))


_RLIMITS = _rlimits()


def _cgroups(pid: int | str) -> dict[str, str]:
    """PID's cgroup in each hierarchy, by the hierarchy's controllers ("cpu,cpuacct", "name=systemd", "" for
    cgroup2)."""
    with open(f"/proc/{pid}/cgroup") as f:
        return {ctrls: path for _, ctrls, path in (line.rstrip("\n").split(":", 2) for line in f)}


def _join_cgroups(peer: int) -> None:
    """In the command's process: the client's cgroups, where they are not the server's (a service's memory or
    pids limit holds for the vzctl command it runs, as without a server)."""
    mine = _cgroups("self")
    moves = {ctrls: path for ctrls, path in _cgroups(peer).items() if mine.get(ctrls) != path}
    if not moves:
        return
    with open("/proc/self/mountinfo") as f:
        mounts = f.read().splitlines()
    for line in mounts:
        pre, _, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3 or fields[3] != "/" or tail[0] not in ("cgroup", "cgroup2"):
            continue
        opts = set(tail[2].split(","))
        for ctrls in [c for c in moves if (c == "") == (tail[0] == "cgroup2") and set(c.split(",")) - {""} <= opts]:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # (octal escapes)
            with open(os.path.join(point, moves.pop(ctrls).lstrip("/"), "cgroup.procs"), "w") as procs:
                procs.write(str(os.getpid()))


def _take_on(peer: int) -> None:
    """In the command's process: the client's cgroups, resource limits, CPU affinity, nice value and OOM score
    adjustment (`ulimit -n 64; vzctl ...`, `taskset`, `nice`, a service's limits: as if the client had run the
    command itself). Only what differs from the worker's (every call here is on each command's path)."""
    import resource

    _join_cgroups(peer)  # (first: joining a cpuset sets the affinity)
    for kind in _RLIMITS:
        theirs = resource.prlimit(peer, kind)
        if theirs != resource.getrlimit(kind):
            resource.prlimit(0, kind, theirs)
    affinity = os.sched_getaffinity(peer)
    if affinity != os.sched_getaffinity(0):
        os.sched_setaffinity(0, affinity)
    nice = os.getpriority(os.PRIO_PROCESS, peer)
    if nice != os.getpriority(os.PRIO_PROCESS, 0):
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    with open(f"/proc/{peer}/oom_score_adj") as f:
        adj = f.read()
    with open("/proc/self/oom_score_adj", "r+") as f:
        if f.read() != adj:
            f.seek(0)
            f.write(adj)

