"""Where the resident vzctl server listens, and starting, stopping and asking about it (`vzctl server ...`).
The server itself is vzpkg/cli/server.py, run as its own process (`python -m vzpkg.cli.server run`)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path

from vzpkg.errors import VEError

PACKAGE = Path(__file__).resolve().parent.parent  # the vzpkg package directory
RUN_DIR = Path("/run/vzpkg")
SOCKET_ENV = "VZCTL_SERVER_SOCKET"  # another socket than this installation's (tests; several servers)


def default_socket() -> Path:
    """This installation's socket: one per package directory, so that two checkouts never serve each other's
    commands (the client is built with the same path: `python -m vzpkg.cli.server print-socket`)."""
    digest = hashlib.sha256(os.fsencode(PACKAGE)).hexdigest()[:12]
    return RUN_DIR / f"vzctl-{digest}.sock"


def socket_path() -> Path:
    return Path(os.environ.get(SOCKET_ENV) or default_socket())


def lock_path(sock: Path) -> Path:
    return sock.with_suffix(".lock")


def pid_path(sock: Path) -> Path:
    return sock.with_suffix(".pid")


def prepare_run_dir(sock: Path) -> None:
    """The socket's directory: root's own, 0700, not a symlink (a directory anyone could plant a socket in
    would let them answer root's vzctl commands); and every directory above it root's, writable by others
    only with the sticky bit (/tmp), with no symlink on the way: else their owner could swap the socket's
    directory for a symlink after this check, and have the server create, remove and write its socket, lock
    and pid files wherever they like."""
    parent = Path(os.path.abspath(sock.parent))
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(parent)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise VEError(f"vzctl server: {parent} must be a directory owned by root and writable by root only "
                      "(remove it or choose another socket with $VZCTL_SERVER_SOCKET)")
    for up in parent.parents:
        st = os.lstat(up)
        if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid()
                or st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            raise VEError(f"vzctl server: {up}, above the socket's directory, must be a directory (not a symlink) "
                          "owned by root, writable by others only with the sticky bit (choose another socket "
                          "with $VZCTL_SERVER_SOCKET)")


def server_pid(sock: Path) -> int | None:
    """The pid of the server holding SOCK's lock, or None when none runs."""
    try:
        lock = os.open(lock_path(sock), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it
    except BlockingIOError:
        try:
            return int(pid_path(sock).read_text())
        except (OSError, ValueError):
            return -1  # starting: the lock is taken, the pid file not written yet
    finally:
        os.close(lock)


def _answers(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(os.fspath(sock))
            return True
        except OSError:
            return False


def server_argv(sock: Path, idle_timeout: float | None = None) -> list[str]:
    # -I: neither the working directory (`python -m` puts it first on sys.path: a json.py or a vzpkg/ there
    # would run as root) nor PYTHON* variables decide which code the server runs
    args = [sys.executable, "-I", "-m", "vzpkg.cli.server", "run", "--socket", os.path.abspath(sock)]
    return args + ["--idle-timeout", str(idle_timeout)] if idle_timeout else args


def exec_server(sock: Path, idle_timeout: float | None = None) -> None:
    """Become the server (`vzctl server run`: the foreground form, for a service manager)."""
    sys.stdout.flush()
    sys.stderr.flush()
    args = server_argv(sock, idle_timeout)
    os.execv(args[0], args)


def start(sock: Path, idle_timeout: float | None = None, log: Path | None = None) -> tuple[int, bool]:
    """Start a server in the background unless one runs; (pid, started now)."""
    pid = server_pid(sock)
    if pid and pid > 0:
        return pid, False
    prepare_run_dir(sock)
    log = log or sock.with_suffix(".log")
    from vzpkg.process import start_daemon

    start_daemon(server_argv(sock, idle_timeout), log, error=VEError, what="vzctl server")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pid = server_pid(sock)
        if pid and pid > 0 and _answers(sock):
            return pid, True
        time.sleep(0.02)
    raise VEError(f"vzctl server did not start within 10 s; its log: {log}")


def stop(sock: Path, timeout: float = 30) -> int | None:
    """Stop the server of SOCK (it finishes the commands it runs first); its pid, or None if none ran."""
    pid = server_pid(sock)
    if not pid or pid < 0:
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while server_pid(sock):
        if time.monotonic() > deadline:
            raise VEError(f"vzctl server (pid {pid}) did not stop within {timeout:.0f} s: commands still run "
                          f"(kill -9 {pid} stops it at once; those commands are then killed too)")
        time.sleep(0.02)
    return pid


def status(sock: Path) -> dict:
    pid = server_pid(sock)
    return {"running": bool(pid and pid > 0), "pid": pid if pid and pid > 0 else None, "socket": os.fspath(sock),
            "package": os.fspath(PACKAGE)}
