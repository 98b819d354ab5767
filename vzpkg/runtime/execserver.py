"""An exec server per VE for the Python API: commands forked by a process that is already inside the VE.

Each `vzctl exec` (and the API's helper path, attach.run_captured) moves itself into the VE's cgroups by writing
cgroup.procs; on cgroup v1 the first such write waits for an RCU grace period (cgroup_threadgroup_rwsem: 7-14 ms
on this machine), most of an exec. A process forked by a process that is in the cgroups is born there, and a
second migration right after another one does not wait again. So `ve.start(exec_server=True)` (what the API
does) forks one more process from the caller before the VE's first one; on cgroup v1 it moves itself into the
VE's cgroups (a single thread writing "0" to `tasks`: no grace period at all, spawn.join_self), on v2 start moves
it right after the VE's first process (spawn._spawn's also_attach, ~0.1 ms):

    caller ── fork ──► exec server: not dumpable, every fd but its socket closed, waits
    start: cgroups, mounts, fork the VE's first process, attach it, attach the server, ... init runs
    start's end (join), or else the first request: the server joins the VE's user (setresid 0), mnt, uts, ipc, net, cgroup namespaces and its
                   pid namespace for its children (from /proc/<init>/ns/*); its own pid stays the host's, so
                   the VE's processes cannot see it
    caller ── SOCK_SEQPACKET: (init pid, argv, env) + fds stdin, stdout, stderr, status ──► server ── fork, exec
             ◄── on the status fd: "P<host pid>", then "S<wait status>" (or "E:<message>") ──

The server exits when the caller's end of the socket closes (the caller exited, or stop_server) or when the VE
stops (it is in the VE's cgroups: stop kills it with everything else). While it runs it is one of the VE's
NUMPROC processes, and what it writes of the caller's memory it copied is charged to the VE's memory cgroup.
A checkpoint of the VE must stop it first (stop_server): it is in the VE's cgroups, not in its pid namespace.
Callers fall back to attach.run_captured's helper when there is no server or it is gone.
"""

from __future__ import annotations

import marshal
import os
import select
import signal
import socket
import threading

from . import ns

PR_SET_DUMPABLE = 4


class Server:
    """The caller's side: the server's pid and our end of its socket; after register, the init it serves."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock
        self.init: tuple[int, int] = (0, 0)  # (pid, start time) of the VE's init
        self.joined = False  # in the VE's cgroups from its start (fork_server's JOIN_FDS)

    def close(self, *, kill: bool = False) -> None:
        """Our end closed: the server exits (commands it started run on); reaped here, or later. KILL: SIGKILL it
        and wait until it is gone (before a stop: the VE's cgroups are then left with the VE's processes only,
        which die with its init, and stop has nothing to freeze and kill)."""
        self.sock.close()
        if kill:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            _reap(0)
        else:
            _reap(self.pid)


_servers: dict[tuple[str, str], Server] = {}
_unreaped: list[int] = []
_lock = threading.Lock()


def _reap(pid: int) -> None:
    with _lock:
        pids = [pid, *_unreaped] if pid else list(_unreaped)
        _unreaped.clear()
    for p in pids:
        try:
            done, _ = os.waitpid(p, os.WNOHANG)
        except ChildProcessError:
            continue
        if not done:
            with _lock:
                _unreaped.append(p)


def key(layout, veid: str) -> tuple[str, str]:
    """Servers are per VZ root and VE."""
    return (layout.real_root(), veid)


def register(k: tuple[str, str], srv: Server, rec) -> None:
    srv.init = (rec.pid, rec.starttime)
    with _lock:
        old = _servers.pop(k, None)
        _servers[k] = srv
    if old is not None:
        old.close()


def lookup(k: tuple[str, str], init_pid: int, starttime: int) -> Server | None:
    """The server of the VE whose init is (INIT_PID, STARTTIME); one of an earlier run of the VE is dropped."""
    with _lock:
        srv = _servers.get(k)
        if srv is None:
            return None
        if srv.init != (init_pid, starttime):
            del _servers[k]
        else:
            return srv
    srv.close()
    return None


def stop_server(k: tuple[str, str], *, kill: bool = False) -> None:
    """The VE's server (if this process has one) exits (KILL: is killed, and waited for); commands it started
    run on."""
    with _lock:
        srv = _servers.pop(k, None)
    if srv is not None:
        srv.close(kill=kill)
    else:
        _reap(0)


def request(srv: Server, argv: list[str], env: dict[str, str], fds: list[int]) -> bool:
    """Ask the server to run ARGV with FDS (stdin, stdout, stderr, status); False if it is gone."""
    try:
        socket.send_fds(srv.sock, [marshal.dumps((srv.init[0], argv, env))], fds)
        return True
    except OSError:
        return False


def join(srv: Server) -> None:
    """Let the server join the VE's namespaces now, in parallel with what the caller does next (the first
    request would otherwise wait for it)."""
    try:
        srv.sock.send(marshal.dumps((srv.init[0], [], {})))
    except OSError:
        pass


def fork_server(privileged: bool, join_fds: list[tuple[str, int]] | None = None) -> Server:
    """Fork the server (it waits for its first request). JOIN_FDS (spawn.open_join_fds, cgroup v1; closed here):
    it moves itself into the VE's cgroups at once; without them start attaches it (spawn._spawn's also_attach)."""
    from . import spawn  # imported here: the server does no import after joining the VE
    from .spawn import join_self

    join_fds = join_fds or []
    try:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            pid = os.fork()
        except BaseException:
            mine.close()
            theirs.close()
            raise
        if pid == 0:
            try:
                join_self(join_fds)
                _serve(theirs.fileno(), privileged, spawn)
            finally:
                os._exit(1)
    finally:
        for _, fd in join_fds:
            os.close(fd)
    theirs.close()
    srv = Server(pid, mine)
    srv.joined = bool(join_fds)
    return srv


# ---------------------------------------------------------------------------------------------------------
# the server (once in the VE, no imports: the host's module files are out of sight there)


def _serve(sock_fd: int, privileged: bool, spawn) -> None:
    ns.prctl(PR_SET_DUMPABLE, 0)  # a copy of the caller's memory: the VE's root may not read it
    os.setsid()  # the caller's terminal signals are not for it
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    # what the caller (and its other threads) had open is not kept alive here: commands' pipes, lock files
    os.closerange(0, sock_fd)
    os.closerange(sock_fd + 1, 1 << 20)
    sock = socket.socket(fileno=sock_fd)
    p = select.poll()
    p.register(sock_fd, select.POLLIN)
    children: dict[int, tuple[int, int]] = {}  # pidfd -> (pid, status fd)
    joined = 0
    while True:
        try:
            ready = p.poll()
        except InterruptedError:
            continue
        for fd, _ in ready:
            if fd != sock_fd:
                pid, status_fd = children.pop(fd)
                p.unregister(fd)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                _write(status_fd, f"S{status}\n")
                os.close(status_fd)
                continue
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 4)
            if not msg:
                os._exit(0)  # the caller is gone, or let go of us
            if not fds and not joined:  # join(): into the VE now, while the caller goes on
                try:
                    joined = marshal.loads(msg)[0]
                    _join(joined, privileged)
                except BaseException:
                    os._exit(1)  # (the caller falls back to its helper)
                continue
            if len(fds) != 4:
                for x in fds:
                    os.close(x)
                continue
            try:
                init_pid, argv, env = marshal.loads(msg)
                if joined != init_pid:
                    if joined:
                        raise OSError("this exec server belongs to an earlier run of the VE")
                    _join(init_pid, privileged)
                    joined = init_pid
                pid = os.fork()
            except BlockingIOError:
                _fail(fds, "numproc")  # (the caller says it in vzctl's words)
                continue
            except BaseException as e:
                _fail(fds, str(e).replace("\n", " ") or type(e).__name__)
                continue
            if pid == 0:
                _exec(argv, env, fds, privileged, spawn)
            for x in fds[:3]:
                os.close(x)
            _write(fds[3], f"P{pid}\n")
            pidfd = os.pidfd_open(pid)
            children[pidfd] = (pid, fds[3])
            p.register(pidfd, select.POLLIN)


def _join(init_pid: int, privileged: bool) -> None:
    """Into the VE's namespaces (all but pid; pid for the children), as attach._enter_namespaces."""
    fds = ns.open_namespaces(init_pid, privileged)
    try:
        for fd, flag in fds:
            ns.setns(fd, flag)
            if flag == ns.CLONE_NEWUSER:
                ns.setresid(0, 0)
    finally:
        for fd, _ in fds:
            os.close(fd)


def _exec(argv: list[str], env: dict[str, str], fds: list[int], privileged: bool, spawn) -> None:
    """In the forked child: its own session, the caller's stdio, hardened, then spawn.exec_or_exit (SPAWN: the
    module, imported before the server joined the VE)."""
    try:
        # a session (and so a group) of its own inside the VE: a timeout kills what it started too, and what it
        # leaves running (`sh -c 'srv &'`) is in no session led from outside the VE, which CRIU cannot dump
        os.setsid()
        for i in range(3):
            os.dup2(fds[i], i)
        os.closerange(3, 1 << 20)
        spawn._harden(privileged)
    except BaseException as e:
        os.write(2, f"vzctl exec: {argv[0]}: {e}\n".encode())
        os._exit(126)
    spawn.exec_or_exit(argv, env)


def _write(fd: int, text: str) -> None:
    try:
        os.write(fd, text.encode())
    except OSError:
        pass


def _fail(fds: list[int], message: str) -> None:
    _write(fds[3], f"E:{message}\n")
    for x in fds:
        os.close(x)
