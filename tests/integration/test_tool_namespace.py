"""Build tools die with vzpkg, even processes that changed their credentials (apt's _apt download methods,
whose parent-death signal the kernel clears), and the mounts they made go with them.

The mechanism (run_tool's pid + mount namespace) is tested with a tool that mounts a tmpfs and starts a
grandchild under another uid; the real case (apt-get under mmdebstrap in a create-cache) is test_create_cache's
slow test below.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vzpkg.build.chroot import mounts_below

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")]
PROJECT = Path(__file__).resolve().parents[2]


def processes_in(path: Path) -> list[tuple[int, str]]:
    """(pid, command) of every process whose root or cwd is at or below PATH."""
    real = os.path.realpath(path).rstrip("/") + "/"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        for link in ("root", "cwd"):
            try:
                target = os.readlink(f"/proc/{entry}/{link}").rstrip("/") + "/"
                comm = Path(f"/proc/{entry}/comm").read_text().strip()
            except OSError:
                continue
            if target.startswith(real):
                found.append((int(entry), comm))
                break
    return found


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sigkilled_vzpkg_takes_its_tool_and_mounts_along(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "m").mkdir(parents=True)
    # The tool: mounts a tmpfs below the work dir, starts a grandchild as nobody (credentials change: no
    # parent-death signal for it), and waits.
    script = (f"mount -t tmpfs vzpkg-tool-test {work}/m && cd {work} && "
              f"setpriv --reuid=65534 --regid=65534 --clear-groups sleep 300 & "
              f"cd {work} && touch {work}/ready && sleep 300")
    driver = (f"import os\nfrom vzpkg.build.chroot import run_tool\n"
              f"run_tool(['sh', '-c', {script!r}], env=dict(os.environ))\n")
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=PROJECT)
    try:
        wait_until(lambda: (work / "ready").exists() and len(processes_in(work)) >= 2, 10, "the tool to start")
        users = {os.stat(f"/proc/{pid}").st_uid for pid, _ in processes_in(work)}
        assert 65534 in users, "the grandchild did not change its credentials"
        assert mounts_below(work / "m") == [], "the tool's mount leaked into vzpkg's mount namespace"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        wait_until(lambda: processes_in(work) == [], 3, f"the tool's processes to die: {processes_in(work)}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert mounts_below(work) == []


def test_build_mounts_exist_only_in_the_tools_namespace(tmp_path: Path) -> None:
    """Inside `build_mounts`, a tool sees /proc (of its own pid namespace), /sys and /dev in the root; vzpkg's
    mount namespace never has them, so nothing is left to unmount whatever happens to vzpkg."""
    from vzpkg.build.chroot import build_mounts, run_tool

    root = tmp_path / "root"
    root.mkdir()
    lines: list[str] = []
    with build_mounts(root):
        rc = run_tool(["sh", "-c", f"awk '{{print $5}}' /proc/self/mountinfo | grep '^{root}/'; "
                                   f"ls {root}/proc | grep -c '^[0-9]'"],
                      env=dict(os.environ), on_line=lambda raw: lines.append(raw.decode().strip())).returncode
        assert mounts_below(root) == []
    assert rc == 0, lines
    assert {f"{root}/proc", f"{root}/sys", f"{root}/dev"} <= set(lines), lines
    assert int(lines[-1]) <= 3, "the root's /proc shows processes outside the tool's pid namespace"
    assert mounts_below(root) == []
