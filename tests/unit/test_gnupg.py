"""Stopping the gpg-agents a build's keyrings started (issue 8, item 5), with real gpg-agent daemons."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from vzpkg.pkgmgr import gnupg

pytestmark = pytest.mark.skipif(shutil.which("gpg-agent") is None, reason="needs gpg-agent (apt-get install gpg-agent)")


def _start_agent(home: Path) -> None:
    home.mkdir(mode=0o700, parents=True)
    # the daemon keeps inherited pipes open: no capture (it would wait for it to exit)
    subprocess.run(["gpg-agent", "--homedir", str(home), "--daemon"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=30)


@pytest.fixture
def short_tmp():
    """A short temporary directory: without /run/user (a host with no login manager) gpg-agent puts its sockets
    in the home, and a socket path must fit in 108 bytes (pytest's tmp_path is too deep for that)."""
    path = Path(tempfile.mkdtemp(prefix="vzg", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_agents_homed_below_a_path_are_stopped_and_no_others(short_tmp: Path) -> None:
    tmp_path = short_tmp
    build = tmp_path / "build/root/var/cache/dnf/repo-1234/pubring"
    other = tmp_path / "other/pubring"
    _start_agent(build)
    _start_agent(other)
    try:
        [ours] = gnupg.agents_below(tmp_path / "build/root")
        [theirs] = gnupg.agents_below(tmp_path / "other")
        assert gnupg.stop_agents_below(tmp_path / "build/root") == 1
        assert gnupg.agents_below(tmp_path / "build") == []
        assert not Path(f"/proc/{ours}").exists() or gnupg._agent_home(str(ours)) is None
        assert gnupg.agents_below(tmp_path / "other") == [theirs]  # another home: left alone
    finally:
        gnupg.stop_agents_below(tmp_path)
    assert gnupg.agents_below(tmp_path) == []


def test_private_run_user_hides_the_hosts(tmp_path: Path) -> None:
    if not Path("/run/user").is_dir() or shutil.which("unshare") is None:
        pytest.skip("needs /run/user and unshare")
    marker = tmp_path / "seen.txt"
    probe = Path("/run/user/vzpkg-test-probe")  # made inside; must not appear on the host
    assert not probe.exists()
    try:
        proc = subprocess.run(gnupg.with_private_run_user(["sh", "-c", f"ls -A /run/user > {marker}; mkdir {probe}"]),
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
            pytest.skip("needs CAP_SYS_ADMIN for a mount namespace")
        assert proc.returncode == 0, proc.stderr
        assert marker.read_text() == ""   # an empty /run/user of its own
        assert not probe.exists()         # and what is made there stays there
    finally:
        if probe.is_dir():
            probe.rmdir()
