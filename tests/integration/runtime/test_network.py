"""IP_ADDRESS: a veth pair on a bridge; VEs on one bridge reach each other and nothing else."""

from __future__ import annotations

import os
import subprocess

import pytest

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
    host_if = f"veth{a}.0" if len(f"veth{a}.0") <= 15 else None
    if host_if:
        assert os.path.realpath(f"/sys/class/net/{host_if}/master").endswith(bridge)
    links = rt.vzctl("exec", b, "ip", "-o", "link").stdout
    assert len(links.strip().splitlines()) == 2
    # stop removes the pair
    rt.vzctl("stop", a)
    if host_if:
        assert not os.path.exists(f"/sys/class/net/{host_if}")
    p = rt.vzctl("exec", b, "timeout", "2", "bash", "-c", "(exec 3<>/dev/tcp/10.199.77.2/9) 2>&1", check=False,
                 timeout=20)
    assert "refused" not in p.stdout


def test_bad_ip_refused(rt, bridge):
    veid = rt.create(start=False)
    p = rt.vzctl("set", veid, "--ipadd", "10.1.2.300", "--save", check=False)
    assert p.returncode == 13 and "IP_ADDRESS" in p.stderr
