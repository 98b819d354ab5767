"""VE networking.

Every VE has its own network namespace with the loopback up (done by ioctl in the VE's pid 1, see
ns.bring_up_loopback). A VE with IP_ADDRESS also gets a veth pair: ``eth0`` inside, holding its addresses and
an on-link default route, and a host end (``veth<VEID>.0``, or ``vz<crc32>`` when that name would be too long)
enslaved to a bridge (``BRIDGE`` in the VE config, else $VZ_BRIDGE, else ``vzbr0``), created if missing and
left without an address: VEs on one bridge reach each other; the host reaches them once it gives the bridge an
address (``ip addr add 10.199.0.1/24 dev vzbr0``); nothing is routed or NATed to the outside by vzpkg.

The pair disappears with the VE's network namespace when the VE stops. This path spawns ``ip`` (iproute2) and
``nsenter`` (util-linux), so it costs a few milliseconds, paid only by VEs that have IP_ADDRESS.
"""

from __future__ import annotations

import os
import re
import zlib

from vzpkg.errors import ConfigError, VEError

DEFAULT_BRIDGE = "vzbr0"
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def host_ifname(veid: str) -> str:
    name = f"veth{veid}.0"
    return name if len(name) <= 15 else f"vz{zlib.crc32(veid.encode()):08x}"


def bridge_name(conf_value: str | None) -> str:
    name = conf_value or os.environ.get("VZ_BRIDGE") or DEFAULT_BRIDGE
    if not _IFNAME.match(name):
        raise ConfigError(f'BRIDGE="{name}": must be an interface name of at most 15 letters, digits, "_.-"')
    return name


def _ip(*args: str, netns_pid: int | None = None, check: bool = True):
    import subprocess

    cmd = ["ip", *args]
    if netns_pid is not None:
        cmd = ["nsenter", f"--net=/proc/{netns_pid}/ns/net", "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise VEError(f"network setup failed: {' '.join(cmd)}: {proc.stderr.strip()}")
    return proc


def ensure_bridge(bridge: str) -> None:
    if not os.path.isdir(f"/sys/class/net/{bridge}"):
        proc = _ip("link", "add", bridge, "type", "bridge", check=False)
        if proc.returncode != 0 and not os.path.isdir(f"/sys/class/net/{bridge}"):
            raise VEError(f"cannot create bridge {bridge}: {proc.stderr.strip()}")
    _ip("link", "set", bridge, "up")


def setup_veth(veid: str, pid: int, addresses: str, bridge: str) -> str:
    """Give the VE whose init is PID an eth0 with ADDRESSES (space-separated, optional /prefix)."""
    import ipaddress

    addrs = []
    for item in addresses.split():
        try:
            addrs.append(ipaddress.ip_interface(item))
        except ValueError:
            raise ConfigError(f'IP_ADDRESS="{addresses}": {item!r} is not an IP address') from None
    ensure_bridge(bridge)
    host = host_ifname(veid)
    if os.path.isdir(f"/sys/class/net/{host}"):  # left over from a VE that died uncleanly
        _ip("link", "del", host, check=False)
    _ip("link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", str(pid))
    _ip("link", "set", host, "master", bridge, "up")
    for a in addrs:
        _ip("addr", "add", str(a), "dev", "eth0", netns_pid=pid)
    _ip("link", "set", "eth0", "up", netns_pid=pid)
    if any(a.version == 4 for a in addrs):
        _ip("route", "add", "default", "dev", "eth0", netns_pid=pid)
    if any(a.version == 6 for a in addrs):
        _ip("-6", "route", "add", "default", "dev", "eth0", netns_pid=pid, check=False)
    return host


def remove_veth(veid: str) -> None:
    """Remove the host end if it is still there (it goes away with the VE's namespace normally)."""
    host = host_ifname(veid)
    if os.path.isdir(f"/sys/class/net/{host}"):
        _ip("link", "del", host, check=False)
