"""IP_ADDRESS: a veth pair on a bridge; VEs on one bridge reach each other and nothing else."""

from __future__ import annotations

import os
import subprocess

import pytest

from vzpkg.runtime import net

pytestmark = pytest.mark.root


@pytest.fixture
def bridge():
    name = f"vzt{os.getpid() % 100000}"
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def _with_ip(rt, bridge, addr):
    veid = rt.create(start=False)
    conf = rt.root / "conf" / f"{veid}.conf"
    conf.write_text(conf.read_text() + f'IP_ADDRESS="{addr}"\nBRIDGE="{bridge}"\n')
    rt.vzctl("start", veid)
    return veid


def test_veth_on_bridge(rt, bridge):
    a = _with_ip(rt, bridge, "10.199.77.2/24")
    b = _with_ip(rt, bridge, "10.199.77.3/24")
    addrs = rt.vzctl("exec", a, "ip", "-o", "addr", "show", "eth0").stdout
    assert "10.199.77.2/24" in addrs
    # A reaches B: B's kernel answers a closed port with a reset ("refused"), not "no route"/timeout
    p = rt.vzctl("exec", a, "bash", "-c", "(exec 3<>/dev/tcp/10.199.77.3/9) 2>&1", check=False, timeout=20)
    assert "refused" in p.stdout, p.stdout
    # the host end is on the bridge; the VE sees only lo and eth0
    host_if = net.host_ifname(os.path.realpath(rt.root), a)
    assert os.path.realpath(f"/sys/class/net/{host_if}/master").endswith(bridge)
    assert open(f"/sys/class/net/{host_if}/ifalias").read().strip() == f"vzpkg {os.path.realpath(rt.root)} {a}"
    links = rt.vzctl("exec", b, "ip", "-o", "link").stdout
    assert len(links.strip().splitlines()) == 2
    # stop removes the pair
    rt.vzctl("stop", a)
    assert not os.path.exists(f"/sys/class/net/{host_if}")
    p = rt.vzctl("exec", b, "timeout", "2", "bash", "-c", "(exec 3<>/dev/tcp/10.199.77.2/9) 2>&1", check=False,
                 timeout=20)
    assert "refused" not in p.stdout


def test_bad_ip_refused(rt, bridge):
    veid = rt.create(start=False)
    p = rt.vzctl("set", veid, "--ipadd", "10.1.2.300", "--save", check=False)
    assert p.returncode == 13 and "IP_ADDRESS" in p.stderr


def test_set_ipadd_on_a_running_ve_applies_at_once(rt, bridge):
    """A VE started without an address gets eth0 on the bridge at `set --ipadd`; `--ipdel all --ipadd` replaces
    the address; without --save the config is unchanged."""
    veid = rt.create(start=False)
    conf = rt.root / "conf" / f"{veid}.conf"
    conf.write_text(conf.read_text() + f'BRIDGE="{bridge}"\n')
    rt.vzctl("start", veid)
    before = conf.read_text()
    p = rt.vzctl("set", veid, "--ipadd", "10.199.78.2/24")
    assert "applied" in p.stdout
    addrs = rt.vzctl("exec", veid, "ip", "-o", "addr", "show", "eth0").stdout
    assert "10.199.78.2/24" in addrs
    host_if = net.host_ifname(os.path.realpath(rt.root), veid)
    assert os.path.realpath(f"/sys/class/net/{host_if}/master").endswith(bridge)
    rt.vzctl("set", veid, "--ipdel", "all", "--ipadd", "10.199.78.3/24 fd00:199::3")
    addrs = rt.vzctl("exec", veid, "ip", "-o", "addr", "show", "eth0").stdout
    assert "10.199.78.3/24" in addrs and "fd00:199::3/128" in addrs and "10.199.78.2/" not in addrs
    assert "default dev eth0" in rt.vzctl("exec", veid, "ip", "route").stdout
    assert conf.read_text() == before
    # reachable from a second VE on the bridge
    other = _with_ip(rt, bridge, "10.199.78.4/24")
    p = rt.vzctl("exec", other, "bash", "-c", "(exec 3<>/dev/tcp/10.199.78.3/9) 2>&1", check=False, timeout=20)
    assert "refused" in p.stdout, p.stdout


def test_set_nameserver_on_a_running_ve_writes_inside_it_only(rt, tmp_path):
    """`set --nameserver` rewrites the running VE's resolv.conf through the VE's own mount namespace: a symlink
    the VE planted towards a host path is replaced, never followed to the host file."""
    veid = rt.create()
    victim = tmp_path / "host-file"
    victim.write_text("host\n")
    rt.vzctl("exec", veid, "ln", "-sf", str(victim), "/etc/resolv.conf")
    p = rt.vzctl("set", veid, "--nameserver", "10.199.0.53 fd00::53")
    assert "applied" in p.stdout
    assert victim.read_text() == "host\n"
    out = rt.sh(veid, "test -L /etc/resolv.conf && echo link; cat /etc/resolv.conf", check=True).stdout
    assert out == "nameserver 10.199.0.53\nnameserver fd00::53\n"
    assert os.stat(rt.upper(veid) / "etc/resolv.conf").st_uid == rt.id_shift(veid)  # as the VE's root


def test_set_of_what_applies_only_at_start(rt):
    """Keys read only at start: refused on a running VE without --save (exit 2, one line), saved with a note with
    it; on a stopped VE, set without --save is refused (it would change nothing)."""
    veid = rt.create("--layout", "overlay")  # (an image VE's DISKSPACE applies at once: see test_storage.py)
    conf = rt.root / "conf" / f"{veid}.conf"
    before = conf.read_text()
    p = rt.vzctl("set", veid, "--diskspace", "5G", check=False)
    assert p.returncode == 2 and "DISKSPACE" in p.stderr and "--save" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and conf.read_text() == before
    p = rt.vzctl("set", veid, "--diskspace", "5G", "--ram", "300M", "--save")
    assert "DISKSPACE takes effect at the next start" in p.stdout and 'DISKSPACE="5G"' in conf.read_text()
    rt.vzctl("stop", veid)
    p = rt.vzctl("set", veid, "--ram", "400M", check=False)
    assert p.returncode == 2 and "not running" in p.stderr and 'RAM="300M"' in conf.read_text()


def test_bridge_that_is_not_a_bridge(rt):
    """BRIDGE naming a host interface that is no bridge (a clumsy BRIDGE="eth0"): start refuses it (exit 13)
    before touching it — the interface, down here, stays down — and leaves nothing of the VE set up."""
    name = f"vzd{os.getpid() % 100000}"
    # a veth pair (no dummy module on every kernel): a host interface, down, that is not a bridge
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"], check=True,
                   capture_output=True)
    try:
        veid = rt.create(start=False)
        conf = rt.root / "conf" / f"{veid}.conf"
        conf.write_text(conf.read_text() + f'IP_ADDRESS="10.199.78.2/24"\nBRIDGE="{name}"\n')
        p = rt.vzctl("start", veid, check=False)
        assert p.returncode == 13, (p.returncode, p.stderr)
        assert p.stderr == (f'vzctl: error: BRIDGE="{name}": host interface {name} exists and is not a bridge: '
                            "name a bridge (created if missing), or leave BRIDGE out for the default\n")
        flags = subprocess.run(["ip", "-o", "link", "show", name], capture_output=True, text=True).stdout
        assert ",UP" not in flags and "<UP" not in flags, flags
        assert rt.vzctl("status", veid).stdout.split()[4] == "down"
        assert not rt.cgroup_dirs(veid)
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)
