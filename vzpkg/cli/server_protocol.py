"""The resident vzctl server's wire protocol (vzpkg/cli/server.py serves it, client/vzctl.c speaks it): the request
and reading one as it arrives, and who may have a command served.

Protocol (one connection per command; integers little-endian u32; each answer 5 bytes, a letter and a u32):
  server -> client  b"R" + 0: the server takes the command (the client waits ACCEPT_TIMEOUT for it, and runs the
                    command itself without it: a stopped or hung server); or b"S" + 0: not served (not root or
                    root with less than the server has, the server is draining or its code changed): the client
                    runs the command itself. Only after R does the client pass its descriptors: a server that
                    never reads them would hold them (a reader of the client's output would wait for its end).
  client -> server  u32 length, then `length` bytes: b"VZC2", umask, ignored signals (u64: bit N-1 set when
                    signal N is ignored, which the command then inherits, as from a shell's `&`), blocked
                    signals (u64, the client's signal mask, which the command inherits too), argc, envc,
                    argc + envc NUL-terminated strings; with the first bytes, SCM_RIGHTS carrying stdin, stdout,
                    stderr and the working directory (an O_PATH descriptor).
  server -> client  b"P" + pid: the command runs as pid (the client forwards its signals to it);
  client -> server  b"A": the client has the pid and forwards its signals: now the command starts;
  command -> client b"X" + wait status (as waitpid(2) gives it), from the command's process as it ends, or from
                    the server if that process was killed. The command starts only once P is sent: a client
                    that does not get P (the server died, or the client gave up) can run the command itself.
A client that goes away before its command ends takes it along (SIGKILL), as a killed vzctl would. The client
talks only to a server running as root (SO_PEERCRED), whatever $VZCTL_SERVER_SOCKET names.
"""

from __future__ import annotations

import array
import os
import signal
import socket
import struct
import time
from typing import NamedTuple

MAGIC = b"VZC2"  # (VZC1: descriptors sent before the server took the command)
# signal.valid_signals() and signal.pthread_sigmask() make an enum of each signal they return: ~0.2 ms a call,
# more than the rest of the server's work for a command. _signal's pthread_sigmask deals in plain numbers.
ALL_SIGNALS = frozenset(int(s) for s in signal.valid_signals())
CATCHABLE = ALL_SIGNALS - {signal.SIGKILL, signal.SIGSTOP}
MAX_REQUEST = 4 << 20  # argv + environment; Linux's own limit for both is smaller
PASSED_FDS = 4  # stdin, stdout, stderr, working directory
FDS_SPACE = socket.CMSG_SPACE(PASSED_FDS * 4)
WORKER_FDS_SPACE = socket.CMSG_SPACE((PASSED_FDS + 1) * 4)  # and the client's connection
REQUEST_TIMEOUT = 5.0  # a request not complete by then is dropped (its client runs the command itself)


class Request(NamedTuple):
    umask: int
    ignored: list[int]  # signals the client ignores
    blocked: list[int]  # signals the client blocks (its signal mask)
    argv: list[str]
    env: dict[str, str]


def decode_request(data: bytes) -> Request:
    """A request's body (after its length); ValueError when it is malformed."""
    if len(data) < 32 or data[:4] != MAGIC:
        raise ValueError("not a vzctl request")
    umask, ignored, blocked, argc, envc = struct.unpack_from("<IQQII", data, 4)
    strings = data[32:].split(b"\0")
    if strings[-1] != b"" or len(strings) - 1 != argc + envc or umask > 0o777:
        raise ValueError("malformed vzctl request")
    argv = [os.fsdecode(s) for s in strings[:argc]]
    env = {}
    for item in strings[argc:argc + envc]:
        key, eq, value = item.partition(b"=")
        if eq and key:
            env[os.fsdecode(key)] = os.fsdecode(value)
    return Request(umask, [n for n in range(1, 65) if ignored >> (n - 1) & 1 and n in CATCHABLE],
                   [n for n in range(1, 65) if blocked >> (n - 1) & 1 and n in CATCHABLE], argv, env)


class Pending:
    """A connection whose request is still arriving. It is read as it arrives, from the loop, so that a client
    that connects and then sends slowly or not at all (stopped, hung) holds up no other command."""

    def __init__(self, conn: socket.socket, peer: int) -> None:
        self.conn = conn
        self.peer = peer  # the client's pid (SO_PEERCRED): its limits and scheduling are the command's
        self.able = False  # it may have its command run here (Server._able), judged while the request arrives
        self.data = bytearray()
        self.fds: list[int] = []
        self.deadline = time.monotonic() + REQUEST_TIMEOUT

    def receive(self) -> Request | None:
        """Take what has arrived: the request once it is complete, None while more is to come. EOFError: the
        client closed without a word (a probe: vzctl server start checks that the socket answers); ValueError:
        a malformed request. The descriptors it passed stay in self.fds (close() closes them)."""
        while True:
            want = 4 - len(self.data)
            if want <= 0:
                (length,) = struct.unpack_from("<I", self.data)
                if length > MAX_REQUEST:
                    raise ValueError("request too large")
                want = 4 + length - len(self.data)
                if want == 0:
                    if len(self.fds) != PASSED_FDS:
                        raise ValueError("a request must pass 4 descriptors")
                    return decode_request(bytes(self.data[4:]))
            try:
                chunk, ancdata, flags, _ = self.conn.recvmsg(min(want, 1 << 20), FDS_SPACE, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return None
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                    self.fds.extend(fds)
            if flags & socket.MSG_CTRUNC or len(self.fds) > PASSED_FDS:
                raise ValueError("a request must pass 4 descriptors")
            if not chunk:
                if not self.data and not self.fds:
                    raise EOFError
                raise ValueError("truncated request")
            self.data += chunk

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.conn.close()



_NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "user", "cgroup", "time", "pid_for_children", "time_for_children")
_STATUS_FIELDS = ("CapPrm", "CapEff", "CapBnd", "NoNewPrivs", "Seccomp")


class Context(NamedTuple):
    """What a process can do beyond being uid 0."""

    places: tuple  # (device, inode) of each of its namespaces and of its root directory
    caps: tuple[int, int, int]  # permitted, effective, bounding
    confined: tuple[int, int]  # no_new_privs, seccomp mode


def context_of(pid: int | str) -> Context:
    """PID's context; OSError when it is gone."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.split(":", 1)[0] in _STATUS_FIELDS)
    places = []
    for name in (*(f"ns/{ns}" for ns in _NAMESPACES), "root"):
        try:
            st = os.stat(f"/proc/{pid}/{name}")
            places.append((st.st_dev, st.st_ino))
        except FileNotFoundError:  # a namespace type this kernel does not have (or PID went away: no match)
            places.append(None)
    return Context(tuple(places), tuple(int(fields[k], 16) for k in _STATUS_FIELDS[:3]),  # type: ignore[arg-type]
                    tuple(int(fields[k]) for k in _STATUS_FIELDS[3:]))  # type: ignore[arg-type]


def as_able(client: Context, server: Context) -> bool:
    """Whether the client may have its command run by the server: it could do all the server can (the same
    namespaces and root directory, every capability, no more confinement). A root that was given less (a
    sandboxed service, `unshare -m`, a dropped bounding set, a seccomp filter, another root directory) runs
    its command itself, with what it has, as without a server."""
    return (client.places == server.places and all(s & ~c == 0 for c, s in zip(client.caps, server.caps, strict=True))
            and all(c <= s for c, s in zip(client.confined, server.confined, strict=True)))

