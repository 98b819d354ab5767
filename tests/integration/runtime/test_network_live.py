"""Live address changes and the host's routes to its VEs.

No test traffic may leave the machine: the host's default route leads off it, so the host sends to a VE's
address only after `ip route get ADDR` has named the test's bridge (see _route_dev); VE-to-VE traffic stays on
the bridge. Servers inside VEs are perl (perl-base is Essential in Debian: the debian-12 template has it; it
has no nc or python3)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from vzpkg.runtime import net
from vzpkg.runtime.layout import Layout

from .conftest import PROJECT

pytestmark = pytest.mark.root

PORT = 7777
# answers each connection with the address it was reached on, so a test knows which address answered
SERVER = ("perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(Listen => 8, LocalAddr => \"0.0.0.0\", "
          f"LocalPort => {PORT}, ReuseAddr => 1) or die; "
          "while ($c = $s->accept) {{ print $c \"hello \" . $c->sockhost . \"\\n\"; close $c }}' "
          "</dev/null >/dev/null 2>&1 &")


@pytest.fixture
def bridge():
    name = f"vzl{os.getpid() % 100000}"
    assert not os.path.exists(f"/sys/class/net/{name}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def _with_ip(rt, bridge: str, addr: str, start: bool = True) -> str:
    veid = rt.create(start=False)
    conf = rt.root / "conf" / f"{veid}.conf"
    conf.write_text(conf.read_text() + f'IP_ADDRESS="{addr}"\nBRIDGE="{bridge}"\n')
    if start:
        rt.vzctl("start", veid)
    return veid


def _route_dev(addr: str) -> str | None:
    """The interface the host would send ADDR's traffic out of (nothing is sent)."""
    out = subprocess.run(["ip", "-j", "route", "get", addr], capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0].get("dev")


def _host_routes(addr: str) -> str:
    return subprocess.run(["ip", "route", "show", "exact", f"{addr}/32"], capture_output=True, text=True,
                          check=True).stdout.strip()


def _running_addresses(rt) -> dict[str, list[str]]:
    """Every running VE of the test VZ root with the addresses on its eth0 (read from its network namespace)."""
    found = {}
    for veid in Layout(rt.root).veids():
        if rt.vzctl("status", veid).stdout.split()[4] == "running":
            found[veid] = [str(a.ip) for a in net.live_addresses(rt.init_pid(veid)) or []]
    return found


def assert_every_running_ve_routed(rt, bridge: str) -> int:
    """`ip route get` names the bridge for every address of every running VE; returns how many were checked."""
    n = 0
    for veid, addrs in _running_addresses(rt).items():
        for addr in addrs:
            assert _route_dev(addr) == bridge, (veid, addr, _route_dev(addr))
            n += 1
    return n


def _from_host(addr: str, bridge: str) -> str:
    # the guard of every host-to-VE connection: without the route, this traffic would leave the machine
    assert _route_dev(addr) == bridge, f"{addr} is not routed through {bridge}: refusing to send"
    with socket.create_connection((addr, PORT), timeout=5) as s:
        return s.makefile().readline().strip()


def _from_ve(rt, veid: str, addr: str, wait: str = "3") -> str:
    p = rt.vzctl("exec", veid, "timeout", wait, "bash", "-c", f"exec 3<>/dev/tcp/{addr}/{PORT} && head -1 <&3",
                 check=False, timeout=20)
    return p.stdout.strip()


def _start_server(rt, veid: str) -> None:
    rt.vzctl("exec", veid, "/bin/sh", "-c", SERVER)
    for _ in range(50):
        if f":{PORT:04X} " in rt.vzctl("exec", veid, "cat", "/proc/net/tcp").stdout:
            return
        time.sleep(0.1)
    raise AssertionError("the server in the VE did not start listening")


def test_live_ipadd_ipdel(rt, bridge):
    """--ipadd adds to a running VE's addresses and --ipdel removes one, at once: the server inside answers on
    the new address (from another VE and from the host) and no longer on the removed one; the host's route
    follows each change; without --save the config is untouched, with it the config gets the same edit."""
    a = _with_ip(rt, bridge, "10.199.79.2/24")
    b = _with_ip(rt, bridge, "10.199.79.9/24")
    conf = rt.root / "conf" / f"{a}.conf"
    before = conf.read_text()
    _start_server(rt, a)
    assert _from_ve(rt, b, "10.199.79.2") == "hello 10.199.79.2"
    assert _from_host("10.199.79.2", bridge) == "hello 10.199.79.2"

    p = rt.vzctl("set", a, "--ipadd", "10.199.79.3/24")
    assert "applied" in p.stdout and conf.read_text() == before
    assert _from_ve(rt, b, "10.199.79.3") == "hello 10.199.79.3"
    assert _from_host("10.199.79.3", bridge) == "hello 10.199.79.3"
    assert _from_ve(rt, b, "10.199.79.2") == "hello 10.199.79.2"  # additive: the first one stays
    assert assert_every_running_ve_routed(rt, bridge) == 3

    rt.vzctl("set", a, "--ipdel", "10.199.79.2")
    assert [str(x) for x in net.live_addresses(rt.init_pid(a))] == ["10.199.79.3/24"]
    assert _from_ve(rt, b, "10.199.79.2", "1.5") == ""  # nobody answers for it on the bridge any more
    assert _host_routes("10.199.79.2") == ""  # (so the host must not try it: it would leave the machine)
    assert _from_host("10.199.79.3", bridge) == "hello 10.199.79.3"
    assert conf.read_text() == before

    # --save edits the config the same way (its list, not the live one) and applies to the live list
    rt.vzctl("set", a, "--ipadd", "10.199.79.4", "--save")
    assert 'IP_ADDRESS="10.199.79.2/24 10.199.79.4"' in conf.read_text()
    assert _from_ve(rt, b, "10.199.79.4") == "hello 10.199.79.4"
    assert assert_every_running_ve_routed(rt, bridge) == 3

    p = rt.vzctl("set", a, "--ipdel", "10.199.79.77", check=False)
    assert p.returncode == 2 and p.stderr.startswith("vzctl: error: --ipdel 10.199.79.77: ")
    assert len(p.stderr.splitlines()) == 1

    rt.vzctl("set", a, "--ipdel", "all", "--save")
    assert 'IP_ADDRESS=""' in conf.read_text()
    assert net.live_addresses(rt.init_pid(a)) == []
    for gone in ("10.199.79.3", "10.199.79.4"):
        assert _host_routes(gone) == "" and _from_ve(rt, b, gone, "1.5") == ""
    assert not os.path.exists(net.routes_file(os.path.realpath(rt.root), a))
    assert assert_every_running_ve_routed(rt, bridge) == 1  # b's


def test_route_before_use_and_gone_after_stop_and_destroy(rt, bridge):
    """A new bridge gets its documented defaults (a bridge, STP off, up, no IPv4 address); the host has a route
    through it for each address of a running VE; stop removes the veth's host end and the routes, and so does
    destroy of a running VE (nothing left: interface, route, routes file; the bridge stays for other VEs)."""
    assert not os.path.exists(f"/sys/class/net/{bridge}")
    a = _with_ip(rt, bridge, "10.199.80.2/24 10.199.80.12")
    assert os.path.isdir(f"/sys/class/net/{bridge}/bridge")
    assert open(f"/sys/class/net/{bridge}/bridge/stp_state").read().strip() == "0"
    flags = int(open(f"/sys/class/net/{bridge}/flags").read(), 16)
    assert flags & 1  # IFF_UP
    addrs = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", bridge], capture_output=True, text=True)
    assert addrs.stdout.strip() == ""
    assert "proto 199" in _host_routes("10.199.80.2") and assert_every_running_ve_routed(rt, bridge) == 2
    host_if = net.host_ifname(os.path.realpath(rt.root), a)
    routes = net.routes_file(os.path.realpath(rt.root), a)
    assert os.path.exists(routes)

    rt.vzctl("stop", a)
    assert not os.path.exists(f"/sys/class/net/{host_if}") and not os.path.exists(routes)
    assert _host_routes("10.199.80.2") == "" and _host_routes("10.199.80.12") == ""

    rt.vzctl("start", a)
    assert assert_every_running_ve_routed(rt, bridge) == 2
    rt.vzctl("destroy", a, "--force")
    assert not os.path.exists(f"/sys/class/net/{host_if}") and not os.path.exists(routes)
    assert _host_routes("10.199.80.2") == "" and _host_routes("10.199.80.12") == ""
    assert os.path.isdir(f"/sys/class/net/{bridge}/bridge")


def test_address_in_use_refused(rt, bridge):
    """A second VE with an address a running VE holds, or an address of the host itself, is refused (exit 34,
    one line) with nothing of it set up; the first VE keeps its route."""
    a = _with_ip(rt, bridge, "10.199.81.2/24")
    b = _with_ip(rt, bridge, "10.199.81.2/24", start=False)
    p = rt.vzctl("start", b, check=False)
    assert p.returncode == 34, (p.returncode, p.stderr)
    assert p.stderr.startswith("vzctl: error: ") and "10.199.81.2" in p.stderr and len(p.stderr.splitlines()) == 1
    assert rt.vzctl("status", b).stdout.split()[4] == "down" and not rt.cgroup_dirs(b)
    assert not os.path.exists(f"/sys/class/net/{net.host_ifname(os.path.realpath(rt.root), b)}")
    assert _route_dev("10.199.81.2") == bridge and "proto 199" in _host_routes("10.199.81.2")
    # an address of the host itself: its local route wins over the /32, so the host could never reach the VE
    p = rt.vzctl("set", a, "--ipadd", "127.0.0.1", check=False)
    assert p.returncode == 34 and "127.0.0.1" in p.stderr, p.stderr
    assert "proto 199" not in _host_routes("127.0.0.1")
    assert [str(x.ip) for x in net.live_addresses(rt.init_pid(a))] == ["10.199.81.2"]
    assert assert_every_running_ve_routed(rt, bridge) == 1


def _kill_start_when_routed(rt, veid: str) -> None:
    """Run `vzctl start VEID` and SIGKILL it as soon as its routes file appears (the host route is about to be
    added, the VE's address not yet set)."""
    routes = net.routes_file(os.path.realpath(rt.root), veid)
    proc = subprocess.Popen([sys.executable, "-m", "vzpkg.cli.vzctl", "start", veid], env=rt.env, cwd=PROJECT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(routes) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        assert os.path.exists(routes), "start ended before it set up a route"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


def _nothing_left(rt, veid: str, addr: str) -> None:
    real = os.path.realpath(rt.root)
    assert not os.path.exists(f"/sys/class/net/{net.host_ifname(real, veid)}")
    assert not os.path.exists(net.routes_file(real, veid))
    assert _host_routes(addr) == ""
    assert not rt.cgroup_dirs(veid)


@pytest.mark.parametrize("next_command", ["start", "destroy", "clean"])
def test_sigkill_mid_start(rt, bridge, next_command):
    """vzctl killed in the middle of a start's network set-up: the next command on the VE (start, destroy) or
    `vzpkg clean --ves` stops what was started and removes its veth and routes; a new start then works."""
    a = _with_ip(rt, bridge, "10.199.82.2/24", start=False)
    _kill_start_when_routed(rt, a)
    if next_command == "start":
        rt.vzctl("start", a)
        assert assert_every_running_ve_routed(rt, bridge) == 1
        assert _host_routes("10.199.82.2").count("\n") == 0  # one route, not two
        _start_server(rt, a)
        assert _from_host("10.199.82.2", bridge) == "hello 10.199.82.2"
        rt.vzctl("destroy", a, "--force")
    elif next_command == "destroy":
        rt.vzctl("destroy", a, "--force")
    else:
        p = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzpkg", "clean", "--ves", "--root", str(rt.root),
                            "--cache-dir", str(rt.cache_dir)], env=rt.env, cwd=PROJECT, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert rt.vzctl("status", a).stdout.split()[4] == "down"
    _nothing_left(rt, a, "10.199.82.2")


def test_hostname_and_resolver_at_once(ve):
    """--hostname rewrites /etc/hostname and the VE's hostname; --searchdomain alone rewrites the search line and
    keeps the VE's nameserver lines (and --nameserver keeps the search line)."""
    def cat(path: str) -> str:
        return ve.exec(["cat", path], check=True).stdout

    ve.exec("printf 'nameserver 10.199.0.53\\noptions ndots:2\\n' > /etc/resolv.conf", check=True)
    ve.set(hostname="web1.example.test")
    assert cat("/etc/hostname") == "web1.example.test\n"
    assert ve.exec(["hostname"], check=True).stdout.strip() == "web1.example.test"
    ve.set(searchdomain="example.test")
    assert cat("/etc/resolv.conf") == "nameserver 10.199.0.53\noptions ndots:2\nsearch example.test\n"
    ve.set(nameserver="10.199.0.54", save=True)
    assert cat("/etc/resolv.conf") == "nameserver 10.199.0.54\noptions ndots:2\nsearch example.test\n"
    # a restart writes the same from the saved config
    ve.stop()
    ve.start()
    assert "nameserver 10.199.0.54\n" in cat("/etc/resolv.conf")


def test_routes_of_a_ve_that_died(rt, bridge):
    """A VE whose init died without vzctl (killed from outside): its veth went with its network namespace but
    the host routes stay (routes on the bridge outlive it); `vzpkg clean --ves` removes them, and so would its
    next start (which then sets them up afresh)."""
    a = _with_ip(rt, bridge, "10.199.83.2/24")
    b = _with_ip(rt, bridge, "10.199.83.3/24")
    os.kill(rt.init_pid(a), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while rt.vzctl("status", a).stdout.split()[4] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "proto 199" in _host_routes("10.199.83.2")  # the leak this guards against
    p = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzpkg", "clean", "--ves", "--root", str(rt.root),
                        "--cache-dir", str(rt.cache_dir)], env=rt.env, cwd=PROJECT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert _host_routes("10.199.83.2") == ""
    assert not os.path.exists(net.routes_file(os.path.realpath(rt.root), a))
    assert "proto 199" in _host_routes("10.199.83.3")  # the running VE keeps its route
    assert assert_every_running_ve_routed(rt, bridge) == 1
    rt.vzctl("start", a)
    assert assert_every_running_ve_routed(rt, bridge) == 2
    assert b in _running_addresses(rt)


def test_ipadd_ipdel_on_a_stopped_ve_edit_the_config(rt):
    """On a stopped VE --ipadd/--ipdel edit IP_ADDRESS with --save and are refused without it (exit 2: nothing
    would change), as is --ipdel of an address the config does not have."""
    veid = rt.create(start=False)
    conf = rt.root / "conf" / f"{veid}.conf"
    rt.vzctl("set", veid, "--ipadd", "10.199.84.2/24", "--save")
    rt.vzctl("set", veid, "--ipadd", "10.199.84.3 fd00:199::84", "--save")
    assert 'IP_ADDRESS="10.199.84.2/24 10.199.84.3 fd00:199::84"' in conf.read_text()
    rt.vzctl("set", veid, "--ipdel", "10.199.84.3", "--save")
    assert 'IP_ADDRESS="10.199.84.2/24 fd00:199::84"' in conf.read_text()
    before = conf.read_text()
    for args in (["--ipdel", "10.199.84.9", "--save"], ["--ipadd", "10.199.84.5"], ["--ipdel", "all"]):
        p = rt.vzctl("set", veid, *args, check=False)
        assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, (args, p.stderr)
    p = rt.vzctl("set", veid, "--ipdel", "all 10.199.84.2", "--save", check=False)
    assert p.returncode == 13 and "'all' stands alone" in p.stderr
    assert conf.read_text() == before
