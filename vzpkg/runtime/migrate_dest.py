"""Where a migration goes: the one thing that differs between another VZ root on this machine and a node over ssh.

A Destination knows how to start the receiving end (`vzctl [--root R] migrate-receive VEID`, migrate_agent.py)
and how rsync names a path there; everything else (the phases, the journal, the protocol) is the same for both:

    LocalRoot("/srv/vz2")                      vzctl --root /srv/vz2 migrate-receive VEID     rsync SRC /srv/vz2/...
    SSH("ssh://root@node:2222/srv/vz")         ssh -p 2222 root@node 'vzctl --root /srv/vz …'  rsync -e 'ssh …' SRC root@node:/srv/vz/...

The remote vzctl is $VZ_REMOTE_VZCTL or --remote-vzctl (shell words, e.g. "env VZ_BRIDGE=br1 /opt/vzpkg/bin/vzctl"),
by default the path of the local one. ssh options: $VZ_SSH_OPTS first (ssh takes the first value of an option),
then BatchMode (no password prompt), a connect timeout and keep-alives, so an unreachable node fails in seconds.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vzpkg.errors import MigrationError, MigrationRemoteError, MigrationUnreachableError, UsageError

SSH_DEFAULTS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
                "-o", "ServerAliveCountMax=3")
# One ssh connection per migration: the receiving vzctl's ssh is the master, and the rsyncs (two of them while an
# online migration's VE is frozen) open sessions over it instead of connections of their own (a key exchange
# and a login each). Root's own directory for the sockets; ssh removes a master's socket when it exits.
CONTROL_DIR = "/run/vzpkg-ssh"


def local_vzctl() -> str:
    """The command that runs this vzctl: its script's path, else this Python with -m (the API, tests)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "vzctl" and os.path.isfile(argv0):
        return shlex.quote(os.path.abspath(argv0))
    return shlex.join([sys.executable, "-m", "vzpkg.cli.vzctl"])


@dataclass(frozen=True)
class LocalRoot:
    root: str
    vzctl: str = field(default_factory=local_vzctl)

    @property
    def spec(self) -> str:
        return self.root

    def describe(self) -> str:
        return self.root

    def command(self, args: list[str]) -> list[str]:
        return [*shlex.split(self.vzctl), "--root", self.root, *args]

    def rsync_path(self, path: str) -> str:
        return path

    def rsync_shell(self) -> list[str]:
        return []

    def failure(self, returncode: int, stderr: str) -> Exception:
        return _vzctl_failure(self, returncode, stderr)


@dataclass(frozen=True)
class SSH:
    host: str
    user: str | None = None
    port: int | None = None
    root: str | None = None
    vzctl: str = field(default_factory=local_vzctl)
    opts: tuple[str, ...] = ()
    control: str | None = None  # ssh's ControlPath: the connection shared by one migration's ssh commands

    @property
    def spec(self) -> str:
        who = f"{self.user}@" if self.user else ""
        return f"ssh://{who}{self.host}{f':{self.port}' if self.port else ''}{self.root or ''}"

    def describe(self) -> str:
        return self.spec

    def _ssh(self) -> list[str]:
        shared = ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.control}", "-o", "ControlPersist=no"]
        return ["ssh", *self.opts, *SSH_DEFAULTS, *(shared if self.control else []),
                *(["-p", str(self.port)] if self.port else [])]

    def shared(self) -> SSH:
        """This destination with one connection for all its ssh commands (this process's own socket), or as it
        is when the socket directory is not root's own."""
        import dataclasses
        import stat

        try:
            os.makedirs(CONTROL_DIR, mode=0o700, exist_ok=True)
            st = os.lstat(CONTROL_DIR)
        except OSError:
            return self
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return self  # someone else's: no socket of ours goes there
        # %C: a hash of the host, port and user (short enough for a socket's path)
        return dataclasses.replace(self, control=f"{CONTROL_DIR}/{os.getpid()}-%C")

    def _target(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def command(self, args: list[str]) -> list[str]:
        # ssh hands the remote shell one string: the configured vzctl (shell words) and our arguments, quoted
        remote = " ".join([self.vzctl, *(["--root", shlex.quote(self.root)] if self.root else []),
                           *map(shlex.quote, args)])
        return [*self._ssh(), "--", self._target(), remote]

    def rsync_path(self, path: str) -> str:
        return f"{self._target()}:{path}"

    def rsync_shell(self) -> list[str]:
        return ["-e", shlex.join(self._ssh())]

    def failure(self, returncode: int, stderr: str) -> Exception:
        if returncode == 255:  # ssh's own failure: resolve, connect, host key, authentication
            line = _last_line(stderr) or "ssh failed"
            return MigrationUnreachableError(f"migrate: cannot reach {self.spec} over ssh ({line}): check the host, "
                                             "port, user and key (VZ_SSH_OPTS, e.g. '-i KEY')")
        return _vzctl_failure(self, returncode, stderr)


Destination = LocalRoot | SSH


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _vzctl_failure(dest: Destination, returncode: int, stderr: str) -> Exception:
    line = _last_line(stderr)
    if returncode in (126, 127) or "No module named" in line:
        return MigrationRemoteError(f"migrate: {dest.describe()} has no working vzctl ({dest.vzctl!r}: "
                                    f"{line or f'exit {returncode}'}): install vzpkg there, or name its vzctl "
                                    "with --remote-vzctl or VZ_REMOTE_VZCTL")
    return MigrationError(f"migrate: the receiving vzctl on {dest.describe()} failed: {line or f'exit {returncode}'}")


def parse(dest: str, *, vzctl: str | None = None, ssh_opts: str | None = None) -> Destination:
    """DEST of `vzctl migrate`: ssh://[user@]host[:port][/vzroot], else a VZ root on this machine."""
    vzctl = vzctl or os.environ.get("VZ_REMOTE_VZCTL") or local_vzctl()
    if not dest.startswith("ssh://"):
        from .layout import usable_root

        return LocalRoot(str(usable_root(Path(dest).absolute())), vzctl)
    rest = dest[len("ssh://"):]
    hostpart, slash, path = rest.partition("/")
    user, at, hostport = hostpart.rpartition("@")
    host, port = hostport, None
    if hostport.startswith("["):  # [v6 address]:port
        host, _, tail = hostport[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else None
    elif hostport.count(":") == 1:
        host, port = hostport.split(":")
    bad = "ssh://[user@]host[:port][/vzroot]"
    if not host or host.startswith("-") or any(c.isspace() for c in host) or (at and not user):
        raise UsageError(f"migrate: {dest!r}: expected {bad}")
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise UsageError(f"migrate: {dest!r}: the port must be 1..65535 ({bad})")
    root = "/" + path if slash and path else None
    if root is not None and any(c in root for c in ",:\n"):
        raise UsageError(f"migrate: {dest!r}: a VZ root's path must not contain ',', ':' or a newline")
    opts = tuple(shlex.split(ssh_opts if ssh_opts is not None else os.environ.get("VZ_SSH_OPTS", "")))
    return SSH(host, user or None, int(port) if port else None, root, vzctl, opts)


def to_record(dest: Destination) -> dict:
    """What the journal keeps to reach DEST again (recovery in another vzctl)."""
    return {"spec": dest.spec, "vzctl": dest.vzctl, "ssh_opts": shlex.join(dest.opts) if isinstance(dest, SSH) else None}


def from_record(rec: dict) -> Destination:
    return parse(rec["spec"], vzctl=rec.get("vzctl"), ssh_opts=rec.get("ssh_opts") or "")
