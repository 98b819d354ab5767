"""The resident vzctl server: vzctl commands without an interpreter start each (issue 13).

A `vzctl` command costs ~7 ms of Python start-up and ~15 ms of imports before it does any work, more than LXC
takes for a whole `lxc-copy` or `lxc-stop`. This server imports vzctl once and, for each command a client hands
it, forks a child that runs exactly what `vzctl ARGS` would run — with the client's standard input, output and
error, working directory, environment and umask (passed over a Unix socket, the descriptors as SCM_RIGHTS) —
and reports the child's wait status back. The client is `client/vzctl.c`, installed by `make setup` as
`.venv/bin/vzctl`; it runs the Python vzctl itself when no server answers, so the server is an accelerator and
never a requirement. Started with `vzctl server start` (or `run` under a service manager), stopped with
`vzctl server stop`.

The protocol: vzpkg/cli/server_protocol.py; the command's process: vzpkg/cli/server_worker.py.

Only root's commands are served (SO_PEERCRED), and only a root that has all the server has (namespaces, root
directory, capabilities, no seccomp or no_new_privs the server lacks): vzctl needs root, and any other caller
gets what vzctl itself gives it from the fallback. The command takes on the client's resource limits, CPU
affinity, nice value and OOM score adjustment. When the installed code changes (any module's mtime), the server
stops taking commands, waits for those running, and re-executes itself, so it never runs code older than what
is installed.
"""

from __future__ import annotations

import _signal
import array
import fcntl
import os
import selectors
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import NamedTuple

from vzpkg.cli.server_control import PACKAGE, default_socket, lock_path, pid_path, prepare_run_dir, socket_path
from vzpkg.cli.server_protocol import (
    ALL_SIGNALS,
    REQUEST_TIMEOUT,
    Pending,
    as_able,
    context_of,
)
from vzpkg.cli.server_worker import run_worker
from vzpkg.errors import UsageError, VEError

# What commands import, imported once here: the whole runtime (each command imports its part lazily, on purpose:
# that keeps a plain `vzctl` quick; here the imports are paid once) and the modules they load on first use.
PRELOAD_PACKAGES = ("vzpkg.runtime", "vzpkg.runtime.backends", "vzpkg.runtime.cgroups")
PRELOAD = ("argparse", "json", "atexit", "encodings.unicode_escape", "vzpkg.cli.vzctl", "vzpkg.cli.vzctl_more",
           "vzpkg.cli.plain", "vzpkg.config", "vzpkg.space", "vzpkg.safeio", "vzpkg.manifest", "vzpkg.process")


def _code_stamp(package: Path = PACKAGE) -> tuple[tuple[str, int], ...]:
    """Every module file of the package with its mtime: a change (an edit, a new or removed file, a reinstall)
    is a different stamp. Not the directories' mtimes: Python creating a __pycache__ (a command importing a
    module for the first time) is no change of the code."""
    stamp = []
    for top, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        stamp.extend((f"{top}/{f}", os.stat(f"{top}/{f}").st_mtime_ns) for f in sorted(files) if f.endswith(".py"))
    return tuple(stamp)


class _Stamp:
    """The code stamp, re-read at most every CHECK_EVERY seconds (a walk of the package is ~1 ms)."""

    CHECK_EVERY = 0.5

    def __init__(self) -> None:
        self.value = _code_stamp()
        self.checked = time.monotonic()

    def changed(self) -> bool:
        now = time.monotonic()
        if now - self.checked < self.CHECK_EVERY:
            return False
        self.checked = now
        try:
            return _code_stamp() != self.value
        except OSError:  # a file went away half-way through the walk: a change
            return True



class _Idle(NamedTuple):
    pid: int
    pidfd: int
    channel: socket.socket  # the go-ahead goes here: the client's request and descriptors


class Server:
    """One listening socket, a worker per command (forked ahead), one thread: the loop waits on the socket, each request as it
    arrives, each client's connection (its hang-up) and each command's pidfd (its exit)."""

    def __init__(self, sock_path: Path, listener: socket.socket, idle_timeout: float | None = None,
                 stamp: _Stamp | None = None) -> None:
        self.path = sock_path
        self.listener = listener
        self.idle_timeout = idle_timeout
        self.selector = selectors.DefaultSelector()
        self.pending: dict[int, Pending] = {}  # connection's fd -> its request, still arriving
        # pid -> [connection, pidfd, the worker's channel, whether it waits for its go-ahead]
        self.running: dict[int, list] = {}
        self.idle: _Idle | None = None  # the worker the next command goes to
        self.stamp = stamp or _Stamp()
        self.context = context_of("self")
        self.draining = False  # the code changed: serve nothing more, re-execute once the running ones end
        self.stopping = False
        self.served = 0
        self.last_active = time.monotonic()

    def serve(self) -> str:
        """Serve until stopped ("stop") or until the code changed and nothing runs ("reexec")."""
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, ("accept", None))
        self._spawn_worker()
        try:
            while True:
                if self.stopping and not self.running:  # (first: a stop asked for while draining stops it)
                    return "stop"
                if self.draining and not self.running:
                    return "reexec"
                timeout = 1.0 if self.idle_timeout is None else max(0.1, min(1.0, self.idle_timeout))
                if self.pending:
                    timeout = min(timeout, max(0.0, min(p.deadline for p in self.pending.values())
                                               - time.monotonic()) + 0.01)
                for key, _ in self.selector.select(timeout):
                    kind, ident = key.data
                    try:
                        if kind == "accept":
                            self._accept()
                        elif kind == "request":
                            self._request(ident)
                        elif kind == "exit":
                            self._reap(ident)
                        elif kind == "idle-exit":
                            self._retire_idle()
                        elif kind == "hangup":
                            self._hangup(ident)
                    except Exception as e:  # a bug: logged; the server goes on serving the other commands
                        import traceback

                        _log(f"internal error ({kind}): {type(e).__name__}: {e}\n{traceback.format_exc()}")
                self._housekeeping()
        finally:
            for fd in list(self.pending):  # their clients read end-of-file and run their commands themselves
                self._drop(fd)
            self._retire_idle()

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if not (self.running or self.pending or self.draining or self.stopping) and self.stamp.changed():
            self.draining = True  # (looked at between commands, so that a command rarely pays for the walk)
        for fd, p in list(self.pending.items()):
            if now >= p.deadline:
                _log(f"request refused: not complete within {REQUEST_TIMEOUT:.0f} s (client pid {p.peer})")
                self._drop(fd)
        if self.idle_timeout and not self.running and now - self.last_active > self.idle_timeout:
            self.stopping = True

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self.last_active = time.monotonic()
        try:
            peer, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid == 0 and not (self.draining or self.stopping) and self.stamp.changed():
                self.draining = True  # serve nothing more; re-executed once the running commands end
            if uid != 0 or self.draining or self.stopping:
                conn.sendall(b"S" + struct.pack("<I", 0))
                conn.close()
                return
            conn.sendall(b"R" + struct.pack("<I", 0))
        except OSError:  # the client is gone already
            conn.close()
            return
        conn.setblocking(False)
        pending = self.pending[conn.fileno()] = Pending(conn, peer)
        # judged while the client sends its request (a root with less than the server gets S instead of P, and
        # the descriptors it passed are closed unused)
        pending.able = self._able(peer)
        self.selector.register(conn, selectors.EVENT_READ, ("request", conn.fileno()))

    def _able(self, peer: int) -> bool:
        try:
            return as_able(context_of(peer), self.context)
        except (OSError, KeyError, ValueError):  # gone, or a /proc this code does not understand: not served
            return False

    def _drop(self, fd: int) -> None:
        p = self.pending.pop(fd)
        self.selector.unregister(p.conn)
        p.close()

    def _request(self, fd: int) -> None:
        p = self.pending[fd]
        try:
            request = p.receive()
        except EOFError:
            self._drop(fd)
            return
        except (OSError, ValueError) as e:
            _log(f"request refused: {e} (client pid {p.peer})")
            self._drop(fd)
            return
        if request is None:
            return
        del self.pending[fd]
        self.selector.unregister(p.conn)
        conn, fds = p.conn, p.fds
        if self.draining or self.stopping or not p.able:  # its client runs the command itself
            try:
                conn.sendall(b"S" + struct.pack("<I", 0))
            except OSError:
                pass
            p.close()
            return
        # The worker gets the request and prepares (the client's descriptors, limits, environment) while its
        # pid goes to the client; it runs the command only at the go-ahead, which follows the pid: a server that
        # dies in between leaves nothing running, so that the client, which then runs the command itself, does
        # not run it a second time.
        worker = self._take_worker()
        body = bytes(p.data[4:])
        try:
            worker.channel.sendmsg([struct.pack("<III", p.peer, len(body), 0) + body[:1 << 16]],
                                   [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [*fds, conn.fileno()]))])
            if len(body) > 1 << 16:
                worker.channel.sendall(body[1 << 16:])
            sent = True
        except OSError:  # (it was killed meanwhile: its exit is reported to the client as any other)
            sent = False
        for fd in fds:
            os.close(fd)
        try:
            conn.sendall(b"P" + struct.pack("<I", worker.pid))
        except OSError:  # the client is gone already (or gave up waiting): the worker ends without the go-ahead
            self.idle = worker
            self._retire_idle()
            conn.close()
            self._spawn_worker()
            return
        pid, pidfd = worker.pid, worker.pidfd
        self.selector.modify(pidfd, selectors.EVENT_READ, ("exit", pid))
        self.served += 1
        # the go-ahead waits for the client's b"A": it has the pid and forwards its signals (a ^C or SIGTERM that
        # came before then reaches the command before it runs anything, as it reaches a starting Python vzctl)
        self.running[pid] = [conn, pidfd, worker.channel, sent]
        self.selector.register(conn, selectors.EVENT_READ, ("hangup", pid))
        self._spawn_worker()  # the next command's, while this one runs

    def _spawn_worker(self) -> _Idle:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # The worker starts with every signal blocked, until it has the command's handlers and the client's
        # mask: a signal the client forwards at once (^C, a SIGTERM) must not run the server's handlers there.
        mask = _signal.pthread_sigmask(signal.SIG_BLOCK, ALL_SIGNALS)
        pid = os.fork()
        if pid == 0:
            try:  # whatever happens, this process never returns into the server's loop
                run_worker(theirs.detach())
            finally:
                os._exit(1)
        _signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        theirs.close()
        pidfd = os.pidfd_open(pid)
        self.idle = _Idle(pid, pidfd, ours)
        self.selector.register(pidfd, selectors.EVENT_READ, ("idle-exit", pid))
        return self.idle

    def _take_worker(self) -> _Idle:
        """The idle worker, taken (a new one if it died, or if there is none yet)."""
        worker, self.idle = self.idle, None
        if worker is not None:
            import select

            if select.select([worker.pidfd], [], [], 0)[0]:  # (killed while it waited)
                self.idle = worker
                self._retire_idle()
                worker = None
        if worker is None:
            worker = self._spawn_worker()
            self.idle = None
        return worker

    def _retire_idle(self) -> None:
        """End the idle worker (the server stops or re-executes, or it died): it ends when its channel closes."""
        worker, self.idle = self.idle, None
        if worker is None:
            return
        worker.channel.close()
        self.selector.unregister(worker.pidfd)
        _kill(worker.pid)  # (idle: nothing of a command to lose; and a stopped one would not see its channel end)
        os.close(worker.pidfd)
        os.waitpid(worker.pid, 0)

    def _reap(self, pid: int) -> None:
        conn, pidfd, channel, _ = self.running.pop(pid)
        self.selector.unregister(pidfd)
        if conn.fileno() in self.selector.get_map():  # (not if _hangup took it off already)
            self.selector.unregister(conn)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        try:
            told = channel.recv(1, socket.MSG_DONTWAIT) == b"x"  # the worker sent its status itself
        except OSError:
            told = False
        channel.close()
        if not told:
            try:
                conn.sendall(b"X" + struct.pack("<I", status & 0xFFFFFFFF))
            except OSError:
                pass
        conn.close()
        self.last_active = time.monotonic()

    def _hangup(self, pid: int) -> None:
        """The client's connection is readable: it went away (it sends nothing after its request; anything it
        does send is read and dropped, or the connection would stay readable and the loop spin)."""
        if pid not in self.running:  # its exit, reported in the same turn of the loop, was handled first
            return
        entry = self.running[pid]
        conn = entry[0]
        try:
            data = conn.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            if entry[3]:  # the client's b"A": the command may start
                entry[3] = False
                try:
                    entry[2].send(b"g")
                except OSError:  # (killed meanwhile: its exit is reported as any other)
                    pass
            return
        self.selector.unregister(conn)
        _kill(pid)  # then its pidfd reports the exit and _reap collects it


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _log(text: str) -> None:
    try:
        print(f"vzctl server[{os.getpid()}] {time.strftime('%Y-%m-%d %H:%M:%S')}: {text}", file=sys.stderr,
              flush=True)
    except (OSError, ValueError):
        pass


def _preload() -> None:
    import importlib
    import pkgutil

    # A module that fails to import (an edit half-way, a checkout in progress) is one a command would fail to
    # import too: it fails there, with its error. The server stays up, and re-executes at the next change.
    def load(name: str) -> object | None:
        try:
            return importlib.import_module(name)
        except Exception as e:
            _log(f"not preloaded: {name}: {type(e).__name__}: {e}")
            return None

    for name in PRELOAD:
        load(name)
    for package in PRELOAD_PACKAGES:
        module = load(package)
        for info in pkgutil.iter_modules(getattr(module, "__path__", []), package + "."):
            load(info.name)


def run(sock: Path, idle_timeout: float | None = None, listen_fd: int | None = None,
        lock_fd: int | None = None) -> int:
    """Serve on SOCK in the foreground until SIGTERM/SIGINT (or IDLE_TIMEOUT seconds without a command).
    LISTEN_FD and LOCK_FD: the socket and the held lock of the server this one re-executes."""
    sock = Path(os.path.abspath(sock))
    os.chdir("/")  # a daemon: it keeps no directory busy (each command gets its client's)
    prepare_run_dir(sock)
    import resource

    # two descriptors per running command: the default soft limit (1024) would be reached by ~500 at once.
    # Each command takes on its client's limits (_take_on).
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if listen_fd is None or lock_fd is None:
        lock = os.open(lock_path(sock), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VEError(f"vzctl server: another server serves {sock} (see vzctl server status)") from None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.unlink()  # a socket a killed server left (we hold the lock: nobody serves it)
        except FileNotFoundError:
            pass
        old = os.umask(0o077)
        try:
            listener.bind(os.fspath(sock))
        finally:
            os.umask(old)
        listener.listen(128)
    else:  # re-executed after a code change: the lock is still held (the same open file), the socket stays open
        lock = lock_fd
        listener = socket.socket(fileno=listen_fd)
        os.set_inheritable(listen_fd, False)
        os.set_inheritable(lock_fd, False)
    Path(pid_path(sock)).write_text(f"{os.getpid()}\n")
    stamp = _Stamp()  # before the imports: a change while they run is a change
    _preload()
    import gc

    # what is loaded now is never collected: keeps the garbage collector of each forked command from walking
    # (and so copying, page by page) every object of the server
    gc.collect()
    gc.freeze()

    def _stop(_signum: int, _frame: object) -> None:
        server.stopping = True

    server = Server(sock, listener, idle_timeout, stamp)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _log(f"serving {sock}" + (" (re-executed: the code changed)" if listen_fd is not None else ""))
    outcome = server.serve()
    if outcome == "reexec":
        _log("the installed code changed: re-executing")
        os.set_inheritable(listener.fileno(), True)
        os.set_inheritable(lock, True)
        args = [sys.executable, *(["-I"] if sys.flags.isolated else []), "-m", "vzpkg.cli.server", "run",
                "--socket", os.fspath(sock),
                "--listen-fd", str(listener.fileno()), "--lock-fd", str(lock)]
        if idle_timeout:
            args += ["--idle-timeout", str(idle_timeout)]
        os.execv(sys.executable, args)
    for path in (sock, pid_path(sock)):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    _log(f"stopped after {server.served} commands")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vzpkg.cli.server", description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=("run", "print-socket"))
    ap.add_argument("--socket", type=Path, default=None)
    ap.add_argument("--idle-timeout", type=float, default=None)
    ap.add_argument("--listen-fd", type=int, default=None)
    ap.add_argument("--lock-fd", type=int, default=None)
    args = ap.parse_args(argv)
    if args.action == "print-socket":
        print(default_socket())
        return 0
    try:
        return run(args.socket or socket_path(), args.idle_timeout, args.listen_fd, args.lock_fd)
    except (VEError, UsageError) as e:
        print(f"vzctl: error: {e.message}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
