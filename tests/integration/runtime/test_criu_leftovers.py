"""What a vzctl killed during chkpnt, clone --live or restore leaves of CRIU's work is found and removed by the next
command on the VE and by `vzpkg clean --ves`; and a clone gets its own /etc/hostname.

To stop vzctl at a known point while CRIU "runs", VZ_CRIU names a stand-in that reports the real CRIU's version
and then just waits: vzctl is killed while it waits, then the stand-in too (a real CRIU outlives its vzctl and
ends on its own)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vzpkg.runtime import criu

from .conftest import PROJECT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

COUNTER = "sh -c 'i=0; while :; do i=$((i+1)); echo $i > /root/count; sleep 0.1; done' >/dev/null 2>&1 </dev/null &"


@pytest.fixture(scope="module")
def real_criu():
    try:
        return criu.find()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no CRIU >= 4.2 ({e}): run make criu")


@pytest.fixture
def stuck_criu(tmp_path, real_criu) -> Path:
    fake = tmp_path / "criu-stuck"
    fake.write_text(f'#!/bin/sh\n[ "$1" = --version ] && exec {real_criu} --version\nsleep 30\nexit 1\n')
    fake.chmod(0o755)
    return fake


def _kill_midway(rt, stuck: Path, args: list[str], mark) -> None:
    """Run `vzctl ARGS` with the stand-in CRIU; once MARK() holds, SIGKILL vzctl, then the stand-in."""
    env = {**rt.env, "VZ_CRIU": str(stuck)}
    proc = subprocess.Popen([sys.executable, "-m", "vzpkg.cli.vzctl", *args], env=env, cwd=PROJECT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    needle = os.fsencode(str(stuck))
    while time.monotonic() < deadline:
        running = [int(p) for p in os.listdir("/proc") if p.isdigit() and _cmdline_has(p, needle)]
        if mark() and any(pid != proc.pid for pid in running):
            break
        assert proc.poll() is None, f"vzctl {args} ended early"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit() and _cmdline_has(p, needle)]:
        try:
            os.killpg(pid, signal.SIGKILL)  # (CRIU runs in a session of its own: the stand-in and its sleep)
        except ProcessLookupError:
            pass


def _cmdline_has(pid: str, needle: bytes) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _dump_tmps(rt) -> list[str]:
    d = rt.root / "dump"
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".") and p.name != ".logs") if d.is_dir() else []


def _clean(rt) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vzpkg.cli.vzpkg", "clean", "--ves", "--root", str(rt.root),
                           "--cache-dir", str(rt.cache_dir)], env=rt.env, capture_output=True, text=True,
                          cwd=PROJECT, timeout=120)


def test_killed_chkpnt_leaves_a_dump_dir_the_next_command_removes(rt, stuck_criu):
    veid = rt.create("--layout", "overlay")
    _kill_midway(rt, stuck_criu, ["chkpnt", veid], lambda: any(n.startswith(f".{veid}.tmp-") for n in _dump_tmps(rt)))
    assert [n for n in _dump_tmps(rt) if n.startswith(f".{veid}.tmp-")]
    assert rt.vzctl("status", veid).stdout.strip().endswith("running")  # CRIU never touched it
    rt.vzctl("set", veid, "--cpuunits", "1000")  # any command on the VE
    assert not [n for n in _dump_tmps(rt) if f"{veid}" in n]


def test_killed_live_clone_leaves_dirs_that_clean_ves_removes(rt, stuck_criu):
    src, dst = rt.create("--layout", "overlay"), rt.new_id()
    _kill_midway(rt, stuck_criu, ["clone", src, dst, "--live"],
                 lambda: any(n.startswith(f"..clone-{src}-{dst}-") for n in _dump_tmps(rt)))
    assert [n for n in _dump_tmps(rt) if f"clone-{src}-{dst}-" in n]
    p = _clean(rt)
    assert p.returncode == 0, p.stderr
    assert not [n for n in _dump_tmps(rt) if f"clone-{src}-{dst}-" in n]
    assert rt.vzctl("status", src).stdout.strip().endswith("running")
    assert "deleted" in rt.vzctl("status", dst).stdout


@pytest.mark.parametrize("finder", ["next command", "clean --ves"])
def test_killed_restore_is_undone_and_the_ve_stays_restorable(rt, stuck_criu, finder):
    veid = rt.create("--layout", "overlay")
    rt.sh(veid, COUNTER, check=True)
    rt.vzctl("chkpnt", veid)
    run = rt.root / "run"
    _kill_midway(rt, stuck_criu, ["restore", veid],
                 lambda: any(n.startswith(f".{veid}.criu-restore-") for n in os.listdir(run)))
    assert rt.cgroup_dirs(veid) and [n for n in os.listdir(run) if n.startswith(f".{veid}.criu-")]
    if finder == "clean --ves":
        p = _clean(rt)
        assert p.returncode == 0, p.stderr
    else:
        rt.vzctl("set", veid, "--cpuunits", "1000", "--save")
    assert not rt.cgroup_dirs(veid) and not [n for n in os.listdir(run) if n.startswith(f".{veid}.criu-")]
    assert rt.vzctl("status", veid).stdout.split()[-1] == "suspended"
    rt.vzctl("restore", veid)
    n = int(rt.sh(veid, "cat /root/count", check=True).stdout.strip() or 0)
    deadline = time.monotonic() + 20
    while int(rt.sh(veid, "cat /root/count").stdout.strip() or 0) <= n:
        assert time.monotonic() < deadline, "the counter does not go on"
        time.sleep(0.1)


def test_clones_get_their_own_etc_hostname(rt, real_criu):
    """Live or not, the clone's /etc/hostname is its own (--hostname, else its VEID) and the source's stays; a
    symlink planted at /etc/hostname is replaced, not followed."""
    src = rt.create("--layout", "overlay", "--hostname", "orig")
    rt.sh(src, "echo orig > /root/target; ln -sf /root/target /etc/hostname", check=True)
    live, cold = rt.new_id(), rt.new_id()
    rt.created += [live, cold]
    rt.vzctl("clone", src, live, "--live", "--hostname", "twin")
    assert rt.sh(live, "hostname", check=True).stdout.strip() == "twin"
    assert rt.sh(live, "test ! -L /etc/hostname && cat /etc/hostname", check=True).stdout.strip() == "twin"
    assert rt.sh(live, "cat /root/target", check=True).stdout.strip() == "orig"
    rt.vzctl("clone", src, cold)
    rt.vzctl("start", cold)
    assert rt.sh(cold, "test ! -L /etc/hostname && cat /etc/hostname", check=True).stdout.strip() == cold
    assert rt.sh(src, "cat /etc/hostname", check=True).stdout.strip() == "orig"
