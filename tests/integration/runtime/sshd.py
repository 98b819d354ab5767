"""An sshd of the test's own on 127.0.0.1 (the private prefix `make sshd` fills), for ssh migrations.

Everything is in a temp dir: host key, the client's key, authorized_keys, known_hosts, the config, the pid file.
sshd insists on a privilege separation user `sshd` and an empty root-owned /run/sshd, which a host without the
openssh-server package lacks: it runs in a mount namespace of its own where /etc/passwd is a bind mount of a copy
with that user added and /run a fresh tmpfs. Commands it runs for a login go back to the test's mount namespace
(ForceCommand + nsenter), so what they mount is seen by the test as on any other node. Nothing of the host's
ssh set-up (/etc/ssh, ~/.ssh, services) is read or written.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
from pathlib import Path

PREFIX = Path(os.environ.get("VZ_TEST_SSHD_PREFIX", "/opt/vzpkg/sshd"))


def available() -> str | None:
    """None if the private sshd is there, else why not."""
    if not os.access(PREFIX / "sbin" / "sshd", os.X_OK):
        return f"no {PREFIX}/sbin/sshd: run 'make sshd'"
    for tool in ("ssh", "ssh-keygen", "rsync", "unshare", "nsenter"):
        if not any(os.access(Path(d) / tool, os.X_OK) for d in os.environ.get("PATH", "").split(":")):
            return f"no {tool} in PATH"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SSHServer:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.port = free_port()
        self.key = self.dir / "client_key"
        self.known_hosts = self.dir / "known_hosts"
        self.proc: subprocess.Popen | None = None

    def opts(self) -> str:
        """ssh options for VZ_SSH_OPTS: our key and known_hosts only, no user config, fail fast."""
        return (f"-F /dev/null -i {self.key} -o IdentitiesOnly=yes -o UserKnownHostsFile={self.known_hosts} "
                "-o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=5")

    def url(self, vzroot: Path) -> str:
        return f"ssh://root@127.0.0.1:{self.port}{vzroot}"

    def start(self) -> SSHServer:
        d = self.dir
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"vzpkg-test-{name}", "-f",
                            str(d / name)], check=True)
        (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
        host_pub = (d / "host_key.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        passwd = Path("/etc/passwd").read_text()
        if not any(line.startswith("sshd:") for line in passwd.splitlines()):
            passwd += "sshd:x:65534:65534:sshd privilege separation:/run/sshd:/usr/sbin/nologin\n"
        (d / "passwd").write_text(passwd)
        (d / "passwd").chmod(0o644)
        back = f"exec nsenter --mount=/proc/{os.getpid()}/ns/mnt -- /bin/sh -c \"$SSH_ORIGINAL_COMMAND\""
        conf = [f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {d / 'host_key'}",
                f"PidFile {d / 'sshd.pid'}", f"AuthorizedKeysFile {d / 'authorized_keys'}", "StrictModes no",
                "PermitRootLogin prohibit-password", "PasswordAuthentication no",
                "KbdInteractiveAuthentication no", "UsePAM no", "PrintMotd no", "PrintLastLog no",
                "LogLevel INFO", f"ForceCommand {back}"]
        # OpenSSH >= 9.8 (Debian 13) runs helper binaries from a compiled-in /usr/lib/openssh: point at ours
        for option, binary in (("SshdSessionPath", "sshd-session"), ("SshdAuthPath", "sshd-auth")):
            if (PREFIX / "usr/lib/openssh" / binary).exists():
                conf.append(f"{option} {PREFIX / 'usr/lib/openssh' / binary}")
        (d / "sshd_config").write_text("\n".join(conf) + "\n")
        inner = (f"mount --bind {shlex.quote(str(d / 'passwd'))} /etc/passwd && "
                 "mount -t tmpfs -o mode=0755 vzpkg-test-sshd /run && mkdir -m 0755 /run/sshd && "
                 f"exec {PREFIX}/sbin/sshd -D -e -f {shlex.quote(str(d / 'sshd_config'))}")
        self.log = open(d / "sshd.log", "wb")  # noqa: SIM115 (closed by stop)
        self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", inner],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(d / 'sshd.log').read_text()[-2000:]}")
            if self.ssh("true", check=False).returncode == 0:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"sshd did not answer: {(d / 'sshd.log').read_text()[-2000:]}")

    def logins(self) -> int:
        """How many ssh connections have logged in so far (sshd's "Accepted publickey" lines)."""
        self.log.flush()
        return (self.dir / "sshd.log").read_text(errors="replace").count("Accepted publickey")

    def ssh(self, command: str, *, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", *shlex.split(self.opts()), "-p", str(self.port), "root@127.0.0.1", command],
                              capture_output=True, text=True, check=check, timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.log.close()
