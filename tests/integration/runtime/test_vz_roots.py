"""Host-wide names and host users: two VZ roots with the same VEID are two VEs; a VZ root's areas are root's."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from .conftest import cgroup_dirs, cgroup_name

pytestmark = pytest.mark.root


@pytest.fixture
def bridge():
    name = f"vzr{os.getpid() % 100000}"
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def _add_ip(rt, veid, addr, bridge):
    conf = rt.root / "conf" / f"{veid}.conf"
    conf.write_text(conf.read_text() + f'IP_ADDRESS="{addr}"\nBRIDGE="{bridge}"\n')


def test_same_veid_in_two_vz_roots(rt, open_rt, bridge):
    """Both run at once; stopping (and starting, and destroying) one leaves the other running with its cgroups
    and its network."""
    veid = rt.new_id()
    a = rt.create(veid=veid, start=False)
    b = open_rt.create(veid=veid, start=False)
    _add_ip(rt, a, "10.199.79.2/24", bridge)
    _add_ip(open_rt, b, "10.199.79.3/24", bridge)
    rt.vzctl("start", a)
    open_rt.vzctl("start", b)
    assert cgroup_name(rt.root, veid) != cgroup_name(open_rt.root, veid)
    assert rt.cgroup_dirs(veid) and open_rt.cgroup_dirs(veid)
    assert not cgroup_dirs(veid), "no cgroup is named by the VEID alone"
    pid_b = open_rt.init_pid(b)
    assert rt.init_pid(a) != pid_b

    rt.vzctl("stop", a)
    assert open_rt.vzctl("status", b).stdout.split()[-1] == "running"
    assert open_rt.init_pid(b) == pid_b and open_rt.cgroup_dirs(veid)
    assert "10.199.79.3/24" in open_rt.vzctl("exec", b, "ip", "-o", "addr", "show", "eth0").stdout
    rt.vzctl("start", a)
    rt.vzctl("restart", a)
    assert open_rt.init_pid(b) == pid_b
    assert open_rt.vzctl("exec", b, "true").returncode == 0
    bc = open_rt.vzctl("status", b, "--beancounters").stdout
    assert "memory" in bc and bc.splitlines()[0].endswith("running")
    rt.vzctl("destroy", a, "--force")
    assert open_rt.vzctl("status", b).stdout.split()[-1] == "running"
    assert "10.199.79.3/24" in open_rt.vzctl("exec", b, "ip", "-o", "addr", "show", "eth0").stdout
    open_rt.vzctl("stop", b)
    assert not open_rt.cgroup_dirs(veid)


AREAS = ("template", "private", "root", "conf", "dump", "run", "lock")


def _as(uid: int, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd],
                          capture_output=True, text=True, timeout=30)


def test_vz_root_areas_are_roots_only(open_rt):
    """Other host users — nobody, uid 100000 (the template's owner) and the VE's own range — can neither stat nor
    execute anything under template/, private/ or root/<id>; the VEs (overlay and copy) still work."""
    rt = open_rt
    overlay = rt.create("--layout", "overlay")
    copy = rt.create("--layout", "copy")
    for area in AREAS:
        st = os.stat(rt.root / area)
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, 0), area
    sha = next(p for p in os.listdir(rt.root / "template") if not p.startswith("."))
    tdir = rt.root / "template" / sha
    assert os.stat(tdir / "etc/passwd").st_uid == 100000
    targets = [tdir / "etc/passwd", tdir / "usr/bin/passwd", rt.private(overlay) / "upper",
               rt.private(copy) / "root/etc/passwd", rt.ve_root(overlay) / "etc/passwd",
               rt.ve_root(copy) / "etc/passwd", rt.root / "conf" / f"{overlay}.conf"]
    assert all(os.path.exists(t) for t in targets)
    assert _as(65534, "stat", str(rt.root)).returncode == 0, "the VZ root itself is reachable: the test means it"
    for uid in (65534, 100000, rt.id_shift(overlay), rt.id_shift(copy)):
        for t in targets:
            p = _as(uid, "stat", str(t))
            assert p.returncode != 0 and "Permission denied" in p.stderr, (uid, t, p.stdout)
        for exe in (tdir / "usr/bin/id", rt.ve_root(overlay) / "usr/bin/id"):
            # through sh: setpriv itself keeps root's capabilities until its exec, so it could reach the path
            p = _as(uid, "/bin/sh", "-c", 'exec "$0"', str(exe))
            assert p.returncode == 126 and "Permission denied" in p.stderr, (uid, exe, p.stdout)
    # the VEs are unaffected: exec, a write (overlay copy-up, copy layout), enter-like namespace joins
    for veid in (overlay, copy):
        rt.sh(veid, "echo x > /etc/written && id -u", check=True)
    assert (rt.private(overlay) / "upper/etc/written").stat().st_uid == rt.id_shift(overlay)
    # found wider (an admin's chmod): fixed at the next start
    for area in AREAS:
        os.chmod(rt.root / area, 0o755)
    rt.vzctl("restart", overlay)
    assert all(stat.S_IMODE(os.stat(rt.root / area).st_mode) == 0o700 for area in AREAS)
    assert rt.vzctl("exec", overlay, "cat", "/etc/written").stdout == "x\n"
