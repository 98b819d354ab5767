"""vzctl migrate over ssh (ssh://root@127.0.0.1:PORT/<second VZ root>) with the real CRIU, rsync and an sshd the
test starts itself (sshd.py; `make sshd`): the destination is a second temp VZ root on this machine, reached only
through ssh and the receiving vzctl there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import test_storage
from .conftest import PROJECT, cgroup_dirs, cgroup_name, mounts_below
from .sshd import SSHServer, available, free_port

btrfs_root = test_storage.btrfs_root  # (the module-scoped fixture: a VZ root with a loop-backed btrfs pool)
brt = test_storage.brt  # (a runtime in it)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

# the counter's shell writes its pid (inside the VE) once, then its count every 0.1 s (the count lives in memory)
COUNTER = ("sh -c 'echo $$ > /root/pid; i=0; while :; do i=$((i+1)); echo $i > /root/count; sleep 0.1; done' "
           ">/dev/null 2>&1 </dev/null &")
REMOTE_VZCTL = f"env PYTHONPATH={PROJECT} {sys.executable} -m vzpkg.cli.vzctl"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    why = available()
    if why:
        pytest.skip(why)
    try:
        from vzpkg.runtime import criu

        criu.find()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no CRIU >= 4.2 ({e}): run make criu")
    server = SSHServer(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


@pytest.fixture
def node2(tmp_path):
    """The destination VZ root; whatever a test left there is destroyed afterwards."""
    root = tmp_path / "vz2"
    yield root
    from vzpkg.runtime import ve
    from vzpkg.runtime.layout import Layout

    if root.exists():
        for v in Layout(root).veids():
            ve.destroy(Layout(root), v, force=True)


def _vzctl(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vzpkg.cli.vzctl", *args], env=env, capture_output=True, text=True,
                          cwd=PROJECT, timeout=timeout)


def _env(rt, sshd, root: Path | None = None) -> dict:
    env = {**rt.env, "VZ_SSH_OPTS": sshd.opts(), "VZ_REMOTE_VZCTL": REMOTE_VZCTL}
    if root is not None:
        env["VZ_ROOT"] = str(root)
    return env


def _read(env: dict, veid: str, path: str) -> str:
    return _vzctl(env, "exec", veid, "/bin/sh", "-c", f"cat {path} 2>/dev/null").stdout.strip()


def _count(env: dict, veid: str) -> int:
    for _ in range(50):  # (the file is empty for a moment while the counter rewrites it)
        text = _read(env, veid, "/root/count")
        if text:
            return int(text)
        time.sleep(0.05)
    raise AssertionError(f"VE {veid}: no count")


def _wait(cond, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _criu_writing(dump: Path, veid: str) -> bool:
    """A CRIU (left running by the killed vzctl) still writes this VE's images."""
    needle = os.fsencode(f"{dump}/.{veid}.tmp-")
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _gone(root: Path, veid: str) -> list[str]:
    """What a VZ root still holds of VEID (config, private area, temporaries, images, journal, cgroups, mounts)."""
    left = [str(p) for p in (root / "conf" / f"{veid}.conf", root / "private" / veid, root / "dump" / veid,
                             root / "run" / f"{veid}.migrate", root / "run" / f"{veid}.suspended") if p.exists()]
    left += [str(p) for p in (root / "private").glob(f".tmp-{veid}-*")] if (root / "private").is_dir() else []
    left += [str(p) for p in cgroup_dirs(cgroup_name(root, veid))] + mounts_below(root / "root" / veid)
    return left


def _counter_goes_on(there: dict, veid: str, pid: str, before: int) -> None:
    """The migrated VE runs on the destination, its counter (started before) goes on, in the same process."""
    assert _vzctl(there, "status", veid).stdout.split()[2:5] == ["exist", "mounted", "running"]
    after = _count(there, veid)
    assert before <= after
    _wait(lambda: _count(there, veid) > after, what="the counter on the destination")
    assert _read(there, veid, "/root/pid") == pid


def test_ssh_migration_online_then_offline_back(rt, sshd, node2):
    """Online over ssh: the counter goes on there with the same pid inside the VE, its file is there, and nothing
    of the VE is left on the source; then offline back over ssh, and it runs on the source again."""
    veid = rt.create("--layout", "overlay")
    rt.sh(veid, COUNTER, check=True)
    rt.sh(veid, "echo kept > /root/file", check=True)
    here, there = _env(rt, sshd), _env(rt, sshd, node2)
    _wait(lambda: _read(here, veid, "/root/pid"), what="the counter's pid")
    pid, before = _read(here, veid, "/root/pid"), _count(here, veid)
    logins = sshd.logins()
    p = _vzctl(here, "migrate", veid, sshd.url(node2), "--online", "-t")
    assert p.returncode == 0, p.stderr
    assert "frozen" in p.stdout and "restore" in p.stdout
    # one connection: the receiving vzctl's ssh is the master, the rsyncs (template, files, images) sessions on it
    assert sshd.logins() - logins == 1
    print(p.stdout)  # (-t: each phase's time; -s shows it)
    _counter_goes_on(there, veid, pid, before)
    assert _vzctl(there, "exec", veid, "/bin/sh", "-c", f"kill -0 {pid}").returncode == 0  # the same process
    assert _read(there, veid, "/root/file") == "kept"
    assert _gone(rt.root, veid) == []
    assert "deleted" in rt.vzctl("status", veid).stdout
    # back, offline: stop there, copy, start here
    p = _vzctl(there, "migrate", veid, sshd.url(rt.root), "-t")
    assert p.returncode == 0, p.stderr
    assert "start" in p.stdout
    assert rt.vzctl("status", veid).stdout.strip().endswith("running")
    assert rt.sh(veid, "cat /root/file", check=True).stdout.strip() == "kept"
    assert _gone(node2, veid) == []


def test_ssh_migration_of_an_image_ve_keeps_counter_and_limit(rt, sshd, node2):
    """An image VE (100M hard limit) online over ssh: its image arrives sparse (rsync --sparse, installed by the
    destination's own backend: mounted there on its own loop device), the counter goes on with the same pid, a
    write past 100M fails there while 20M succeeds, and the source keeps nothing: no file, mount or loop device."""
    from .test_storage import _loops_below, _no_loops

    veid = rt.create("--layout", "image", "--diskspace", "100M:100M")
    rt.sh(veid, COUNTER, check=True)
    here, there = _env(rt, sshd), _env(rt, sshd, node2)
    _wait(lambda: _read(here, veid, "/root/pid"), what="the counter's pid")
    pid, before = _read(here, veid, "/root/pid"), _count(here, veid)
    p = _vzctl(here, "migrate", veid, sshd.url(node2), "--online", "-t")
    assert p.returncode == 0, p.stderr
    print(p.stdout)  # (-t: each phase's time; -s shows it)
    _counter_goes_on(there, veid, pid, before)
    image = node2 / "private" / veid / "root.img"
    st = image.stat()
    assert st.st_blocks * 512 < st.st_size // 2, (st.st_blocks * 512, st.st_size)  # holes stayed holes
    assert _loops_below(node2 / "private" / veid)
    big = _vzctl(there, "exec", veid, "/bin/sh", "-c", "dd if=/dev/zero of=/root/big bs=1M count=120 conv=fsync "
                 "2>&1; rm -f /root/big; sync")
    assert "No space left on device" in big.stdout, big.stdout
    ok = _vzctl(there, "exec", veid, "/bin/sh", "-c", "dd if=/dev/zero of=/root/ok bs=1M count=20 conv=fsync "
                "2>&1; rm -f /root/ok; sync")
    assert "20971520 bytes" in ok.stdout, ok.stdout
    assert _gone(rt.root, veid) == []
    _no_loops(rt.private(veid))
    rt.created.remove(veid)


def test_unreachable_or_incomplete_destination_fails_clearly(rt, sshd, node2):
    """Nobody listening: exit 66 in seconds, one line; a destination without vzctl: exit 65, one line; a VE
    id that exists there already: refused. The VE keeps running on the source each time, nothing is left."""
    veid = rt.create("--layout", "overlay")
    here = _env(rt, sshd)
    t0 = time.monotonic()
    p = _vzctl(here, "migrate", veid, f"ssh://root@127.0.0.1:{free_port()}{node2}", "--online")
    assert p.returncode == 66, p.stderr
    assert time.monotonic() - t0 < 15
    assert p.stderr.count("\n") == 1 and "cannot reach" in p.stderr and "Connection refused" in p.stderr, p.stderr
    p = _vzctl({**here, "VZ_REMOTE_VZCTL": "/nonexistent/vzctl"}, "migrate", veid, sshd.url(node2))
    assert p.returncode == 65, p.stderr
    assert p.stderr.count("\n") == 1 and "no working vzctl" in p.stderr, p.stderr
    there = _env(rt, sshd, node2)
    assert _vzctl(there, "create", veid, "--ostemplate", rt.template, "--layout", "overlay").returncode == 0
    p = _vzctl(here, "migrate", veid, sshd.url(node2), "--online")
    assert p.returncode == 32 and "already exists" in p.stderr, p.stderr
    _vzctl(there, "destroy", veid)
    p = _vzctl(here, "migrate", veid, sshd.url(rt.root))  # its own VZ root, over ssh: the receiving end says so
    assert p.returncode == 63 and p.stderr.count("\n") == 1 and "is locked by another vzctl" in p.stderr, p.stderr
    assert rt.vzctl("status", veid).stdout.strip().endswith("running")
    assert _gone(node2, veid) == []
    assert not (rt.root / "run" / f"{veid}.migrate").exists()


@pytest.mark.parametrize("point", ["copied", "dumped", "restoring", "committing", "committed"])
def test_ssh_migration_killed_midway(rt, sshd, node2, point):
    """SIGKILL of `vzctl migrate --online` after the copy (the dump begun), after the dump, while the
    destination restores, when it has restored (the commit being sent) and once the commit reached it: the VE runs on exactly one node afterwards — on the destination only if it got there,
    else restorable on the source (the next command there finishes or undoes the migration) — and the
    destination keeps nothing of it that its next command does not remove."""
    veid = rt.create("--layout", "overlay")
    rt.sh(veid, COUNTER, check=True)
    here, there = _env(rt, sshd), _env(rt, sshd, node2)
    journal = rt.root / "run" / f"{veid}.migrate"
    d1 = rt.root / "dump"

    def phase() -> str:
        try:
            return journal.read_text()
        except OSError:
            return ""

    seen = {
        "copied": lambda: d1.is_dir() and any(p.name.startswith(f".{veid}.tmp-") for p in d1.iterdir()),
        "dumped": lambda: '"frozen"' in phase(),
        "restoring": lambda: '"restoring"' in phase(),
        "committing": lambda: '"committing"' in phase(),
        # the destination emptied its journal: the commit reached it, the source has not destroyed the VE yet
        "committed": lambda: '"committing"' in phase() and _size(node2 / "lock" / f"{veid}.lock") == 0,
    }[point]
    proc = subprocess.Popen([sys.executable, "-m", "vzpkg.cli.vzctl", "migrate", veid, sshd.url(node2), "--online"],
                            env=here, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not seen() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, f"migrate ended before {point}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the destination's next command: waits for its receiving end and says where the VE is
    q = _vzctl(there, "migrate-receive", veid, "--query")
    assert q.returncode == 0, q.stderr
    where = q.stdout.strip()
    assert where in ("running", "absent"), where
    print(f"killed at {point}: the VE is {where} on the destination")
    # CRIU is not killed with vzctl (a dump stopped half-way would leave the VE frozen): let it end
    _wait(lambda: not _criu_writing(d1, veid), what="CRIU to end")
    st = rt.vzctl("status", veid).stdout
    if where == "running":
        assert "running" not in st.split()  # never on both
        # any command on the VE here finishes the migration: the VE is destroyed here (then it is not found)
        assert rt.vzctl("set", veid, "--cpuunits", "1000", check=False).returncode == 31
        assert _gone(rt.root, veid) == []
        rt.created.remove(veid)
        n = _count(there, veid)
        _wait(lambda: _count(there, veid) > n, what="the counter on the destination")
        return
    assert _gone(node2, veid) == []
    # the source's next command undoes the migration (and removes the dump's temporaries), then restores it
    rt.vzctl("restore" if "suspended" in st else "set", veid, *([] if "suspended" in st else ["--onboot", "no", "--save"]))
    assert not [p for p in d1.iterdir() if p.name.startswith(".") and p.name != ".logs"]
    assert rt.vzctl("status", veid).stdout.strip().endswith("running")
    assert not journal.exists()
    n = _count(here, veid)
    _wait(lambda: _count(here, veid) > n, what="the counter on the source")


def test_ssh_migration_lazy(rt, sshd, node2):
    """--online --lazy over ssh: a VE whose tasks may not open a userfaultfd is refused in one line (67) before
    anything moves and keeps running; a privileged VE's 50 MB process goes on there, restored post-copy (its
    memory paged in by the destination's lazy-pages daemon), and the migration returns (the daemon holds
    nothing of the ssh session)."""
    from vzpkg.runtime import criu

    from .test_checkpoint_layouts import PERL_MEM, _lazy_possible

    if not _lazy_possible(criu.find()):
        pytest.skip("criu check --feature uffd/uffd-noncoop fails here")
    here, there = _env(rt, sshd), _env(rt, sshd, node2)
    p = _vzctl(here, "migrate", rt.create("--layout", "overlay"), sshd.url(node2), "--lazy")
    assert p.returncode == 2 and "--lazy goes with --online" in p.stderr, p.stderr
    if Path("/proc/sys/vm/unprivileged_userfaultfd").read_text().strip() != "1":
        unpriv = rt.create("--layout", "overlay")
        rt.sh(unpriv, COUNTER, check=True)
        p = _vzctl(here, "migrate", unpriv, sshd.url(node2), "--online", "--lazy")
        assert p.returncode == 67 and p.stderr.count("\n") == 1 and "userfaultfd" in p.stderr, p.stderr
        assert rt.vzctl("status", unpriv).stdout.strip().endswith("running")
        assert _gone(node2, unpriv) == []
    priv = rt.create("--layout", "overlay", "--privileged")
    rt.sh(priv, PERL_MEM, check=True)

    def mem(env: dict) -> tuple[int, str]:
        text = _read(env, priv, "/root/mem").split()
        return (int(text[0]), text[1]) if len(text) == 2 else (0, "")

    _wait(lambda: mem(here)[0] > 0, what="the perl process")
    p = _vzctl(here, "migrate", priv, sshd.url(node2), "--online", "--lazy", timeout=180)
    assert p.returncode == 0, p.stderr
    n = mem(there)[0]
    _wait(lambda: (m := mem(there))[0] > n + 5 and m[1] == "MARKER", what="the perl process on the destination")
    logs = list((node2 / "dump" / ".logs").glob(f"{priv}-lazy-pages-*.log"))  # (post-copy there, not a copy)
    assert len(logs) == 1
    _wait(lambda: "UFFD transferred pages" in logs[0].read_text(errors="replace"), timeout=60,
          what="the lazy-pages daemon to copy every page")
    assert _gone(rt.root, priv) == []
    rt.created.remove(priv)


def test_ssh_migration_of_a_btrfs_ve(brt, sshd, node2):
    """A btrfs VE (100M) over ssh: to a root without a pool it is refused in one line (63, naming `storage init
    --btrfs`) before anything moves; with a pool there it arrives as a subvolume of that pool (a snapshot of its
    template subvolume, rsynced) with its own qgroup limited to 100M, the counter goes on, and the source keeps
    nothing (no subvolume, no qgroup)."""
    from types import SimpleNamespace

    from .test_checkpoint_layouts import _qgroup_limit
    from .test_storage import _qgroups

    veid = brt.create("--layout", "btrfs", "--diskspace", "100M:100M")
    brt.sh(veid, COUNTER, check=True)
    brt.sh(veid, "echo kept > /root/file", check=True)
    here, there = _env(brt, sshd), _env(brt, sshd, node2)
    p = _vzctl(here, "migrate", veid, sshd.url(node2), "--online")
    assert p.returncode == 63 and p.stderr.count("\n") == 1 and "storage init --btrfs" in p.stderr, p.stderr
    assert brt.vzctl("status", veid).stdout.strip().endswith("running")
    assert _gone(node2, veid) == []
    assert _vzctl(there, "storage", "init", "--btrfs", "1G").returncode == 0
    try:
        qgroup = _qgroup_limit(brt, veid)[0]
        _wait(lambda: _read(here, veid, "/root/pid"), what="the counter's pid")
        before = _count(here, veid)
        p = _vzctl(here, "migrate", veid, sshd.url(node2), "--online", "-t")
        assert p.returncode == 0, p.stderr
        after = _count(there, veid)
        assert before <= after
        _wait(lambda: _count(there, veid) > after, what="the counter on the destination")
        assert _read(there, veid, "/root/file") == "kept"
        assert _qgroup_limit(SimpleNamespace(root=node2), veid)[1] == 100 << 20
        assert not list((node2 / "btrfs" / "ves").glob(".tmp-*"))
        assert _gone(brt.root, veid) == []
        assert not (brt.root / "btrfs" / "ves" / veid).exists() and qgroup not in _qgroups(brt.root / "btrfs")
        brt.created.remove(veid)
    finally:
        from vzpkg.runtime import ve
        from vzpkg.runtime.layout import Layout

        for v in Layout(node2).veids():
            ve.destroy(Layout(node2), v, force=True)
        subprocess.run(["umount", str(node2 / "btrfs")], capture_output=True)
