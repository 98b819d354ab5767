"""GnuPG daemons that a package manager starts while it checks signatures: none may outlive the build.

dnf with `repo_gpgcheck` (librepo through gpgme) imports the repository keys into a keyring it keeps in its cache
directory and starts a `gpg-agent --homedir KEYRING --daemon` for it, which librepo never stops: it runs on, as
root with parent pid 1, long after vzpkg has exited. dnf and librepo also use throwaway GnuPG homes, and for each
home gnupg makes a socket directory `/run/user/0/gnupg/d.<hash of the home's path>` (where /run/user/0 exists)
that nobody removes. So dnf runs with an empty tmpfs of its own on /run/user (a mount namespace per run: those
directories vanish with it), and after the run every gpg-agent whose home lies in the build's root is stopped.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

_PRIVATE_RUN_USER = ('if [ -d /run/user ]; then '
                     'mount -t tmpfs -o mode=0755,size=1M,nosuid,nodev vzpkg-run-user /run/user || exit 125; fi; '
                     'exec "$@"')


def with_private_run_user(cmd: Sequence[str]) -> list[str]:
    """CMD run in a mount namespace of its own with an empty /run/user (mounts made before it are seen)."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _PRIVATE_RUN_USER, "sh", *cmd]


def _agent_home(pid: str) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    if os.path.basename(argv[0]) != b"gpg-agent":
        return None
    for i, arg in enumerate(argv[:-1]):
        if arg == b"--homedir":
            return os.fsdecode(argv[i + 1])
    return None


def agents_below(path: Path) -> list[int]:
    """gpg-agent processes whose --homedir is at or below PATH (as the path string they were started with)."""
    prefixes = tuple({p.rstrip("/") + "/" for p in (str(path), os.path.abspath(path), os.path.realpath(path))})
    return [int(pid) for pid in filter(str.isdigit, os.listdir("/proc"))
            if (home := _agent_home(pid)) is not None and (home.rstrip("/") + "/").startswith(prefixes)]


def _alive(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if _agent_home(str(p)) is not None]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def stop_agents_below(path: Path, grace: float = 5.0) -> int:
    """Stop every gpg-agent whose home is below PATH; returns how many there were.

    SIGTERM is gpg-agent's own way to shut down (gpgconf --kill cannot reach it: its socket is in the
    private /run/user of the run that started it); SIGKILL follows when it does not go within GRACE seconds."""
    pids = agents_below(path)
    alive = pids
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        alive = _alive(alive, grace)
    return len(pids)
