"""stop undoes everything; crashes of vzctl leave VEs that status/stop/destroy handle; many VEs at once."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from .conftest import PROJECT, VZCTL, mounts_below

pytestmark = pytest.mark.root


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, starttime) of PID, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return fields[0], fields[19]


def processes_in_pidns(ns_link: str) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.readlink(f"/proc/{name}/ns/pid") == ns_link:
                    st = open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()[0]
                    if st != "Z":
                        out.append(int(name))
            except OSError:
                pass
    return out


def assert_nothing_left(rt, veid, pidns: str | None = None):
    assert rt.cgroup_dirs(veid) == []
    assert mounts_below(rt.ve_root(veid)) == []
    assert not (rt.root / "run" / f"{veid}.state").exists()
    if pidns:
        assert processes_in_pidns(pidns) == []


def test_stop_leaves_nothing(rt):
    veid = rt.create()
    pid = rt.init_pid(veid)
    pidns = os.readlink(f"/proc/{pid}/ns/pid")
    # an orphaned daemon, a mount made inside, a process that ignores SIGTERM
    rt.sh(veid, "sleep 1000 >/dev/null 2>&1 & mount -t tmpfs x /mnt; (trap '' TERM; sleep 1001) >/dev/null 2>&1 &",
          check=True)
    assert len(processes_in_pidns(pidns)) >= 3
    t0 = time.monotonic()
    rt.vzctl("stop", veid, "--timeout", "1")
    assert time.monotonic() - t0 < 5
    assert_nothing_left(rt, veid, pidns)
    assert rt.vzctl("status", veid).stdout.strip() == f"VEID {veid} exist unmounted down"


def test_stop_fast(rt):
    veid = rt.create()
    pidns = os.readlink(f"/proc/{rt.init_pid(veid)}/ns/pid")
    rt.vzctl("stop", veid, "--fast")
    assert_nothing_left(rt, veid, pidns)


def test_init_killed_from_outside(rt):
    """The VE's init dies behind vzctl's back: status says down, stop cleans up, start works again."""
    veid = rt.create()
    pid = rt.init_pid(veid)
    started = _stat(pid)[1]
    os.kill(pid, signal.SIGKILL)
    # SIGKILL is only queued: init dies when it next runs, after its namespace's other processes (a fixed 0.1 s
    # can be too short on a loaded machine). Wait for that, then status must say down at once.
    deadline = time.monotonic() + 10
    while (st := _stat(pid)) is not None and st[0] not in ("Z", "X") and st[1] == started:
        assert time.monotonic() < deadline, "the VE's init survived SIGKILL"
        time.sleep(0.01)
    assert rt.vzctl("status", veid).stdout.strip().endswith("down")
    rt.vzctl("stop", veid)
    assert_nothing_left(rt, veid)
    rt.vzctl("start", veid)
    assert rt.vzctl("exec", veid, "true").returncode == 0


def test_stale_record_with_recycled_pid(rt):
    """A record naming a live process that is not the VE's init (pid reuse) is not believed."""
    veid = rt.create(start=False)
    state = rt.root / "run" / f"{veid}.state"
    state.parent.mkdir(exist_ok=True)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        state.write_text(f"pid={sleeper.pid}\nstarttime=1\nprivileged=no\n")
        assert rt.vzctl("status", veid).stdout.strip().endswith("down")
        rt.vzctl("stop", veid)
        assert sleeper.poll() is None, "stop must not kill a stranger"
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("delay_ms", [0, 10, 20, 35, 50, 80, 150])
def test_sigkill_vzctl_during_start(rt, delay_ms):
    veid = rt.create(start=False)
    proc = subprocess.Popen([*VZCTL, "start", veid], env=rt.env, cwd=PROJECT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(delay_ms / 1000)
    proc.kill()
    proc.wait()
    time.sleep(0.05)
    st = rt.vzctl("status", veid)
    words = st.stdout.split()
    assert words[:3] == ["VEID", veid, "exist"] and words[4] in ("running", "down"), st.stdout
    if words[4] == "running":
        assert rt.vzctl("exec", veid, "true").returncode == 0
    rt.vzctl("stop", veid)
    assert_nothing_left(rt, veid)
    # it starts normally afterwards
    rt.vzctl("start", veid)
    assert rt.vzctl("exec", veid, "true").returncode == 0
    rt.vzctl("destroy", veid, "--force")
    assert_nothing_left(rt, veid)
    assert not rt.private(veid).exists()


@pytest.mark.slow
def test_fifty_ves(rt):
    ids = [rt.create(start=False) for _ in range(50)]
    for veid in ids:
        rt.vzctl("start", veid)
    pids = {rt.init_pid(v) for v in ids}
    assert len(pids) == 50
    for veid in ids:
        assert rt.vzctl("exec", veid, "hostname").stdout.strip() == veid
    for veid in ids:
        rt.vzctl("stop", veid)
    for veid in ids:
        assert_nothing_left(rt, veid)
