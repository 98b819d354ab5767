"""VE networking.

Every VE has its own network namespace with the loopback up (done by ioctl in the VE's pid 1, see
ns.bring_up_loopback). A VE with IP_ADDRESS also gets a veth pair: ``eth0`` inside, holding its addresses and
an on-link default route, and a host end (``vz`` + 12 hex digits of a hash of the VZ root's real path and the
VEID: interface names are host-wide and at most 15 characters, and the same VEID may run in two VZ roots; its
alias, ``ip -d link show``, reads ``vzpkg <VZ root> <VEID>``) enslaved to a bridge (``BRIDGE`` in the VE config, else $VZ_BRIDGE, else ``vzbr0``), created if missing and
left without an address: VEs on one bridge reach each other; the host reaches them once it gives the bridge an
address (``ip addr add 10.199.0.1/24 dev vzbr0``); nothing is routed or NATed to the outside by vzpkg.

The pair disappears with the VE's network namespace when the VE stops. This path spawns ``ip`` (iproute2) and
``nsenter`` (util-linux), so it costs a few milliseconds, paid only by VEs that have IP_ADDRESS.
"""

from __future__ import annotations

import os
import re

from vzpkg.errors import ConfigError, VEError

DEFAULT_BRIDGE = "vzbr0"
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def host_ifname(root: str, veid: str) -> str:
    """The host end's name for VE VEID of the VZ root ROOT (a real path): vz + 12 hex digits (14 characters)."""
    import zlib  # not hashlib: stop runs this, and hashlib costs ms to import

    key = f"{root}\0{veid}".encode()
    return f"vz{zlib.crc32(key):08x}{zlib.adler32(key) & 0xFFFF:04x}"


def host_alias(root: str, veid: str) -> str:
    return f"vzpkg {root} {veid}"[:250]


def _alias_of(ifname: str) -> str | None:
    try:
        with open(f"/sys/class/net/{ifname}/ifalias") as f:
            return f.read().strip()
    except OSError:
        return None


def bridge_name(conf_value: str | None) -> str:
    name = conf_value or os.environ.get("VZ_BRIDGE") or DEFAULT_BRIDGE
    if not _IFNAME.match(name):
        raise ConfigError(f'BRIDGE="{name}": must be an interface name of at most 15 letters, digits, "_.-"')
    return name


def _ip(*args: str, netns_pid: int | None = None, check: bool = True):
    from .. import process

    cmd = ["ip", *args]
    if netns_pid is not None:
        cmd = ["nsenter", f"--net=/proc/{netns_pid}/ns/net", "--", *cmd]
    proc = process.run(cmd, capture=True, text=True, check=False, error=VEError, what=f"network setup: {cmd[0]}")
    if check and proc.returncode != 0:
        raise VEError(f"network setup failed: {' '.join(cmd)}: {proc.stderr.strip()}")
    return proc


def ensure_bridge(bridge: str) -> None:
    if os.path.isdir(f"/sys/class/net/{bridge}") and not os.path.isdir(f"/sys/class/net/{bridge}/bridge"):
        # BRIDGE="eth0" (or any host interface that is no bridge): it would be set up, then fail to take the VE
        raise ConfigError(f'BRIDGE="{bridge}": host interface {bridge} exists and is not a bridge: name a bridge '
                          "(created if missing), or leave BRIDGE out for the default")
    if not os.path.isdir(f"/sys/class/net/{bridge}"):
        proc = _ip("link", "add", bridge, "type", "bridge", check=False)
        if proc.returncode != 0 and not os.path.isdir(f"/sys/class/net/{bridge}"):
            raise VEError(f"cannot create bridge {bridge}: {proc.stderr.strip()}")
    _ip("link", "set", bridge, "up")


def _interfaces(addresses: str) -> list:
    import ipaddress

    addrs = []
    for item in addresses.split():
        try:
            addrs.append(ipaddress.ip_interface(item))
        except ValueError:
            raise ConfigError(f'IP_ADDRESS="{addresses}": {item!r} is not an IP address') from None
    return addrs


def _default_routes(addrs: list, pid: int) -> None:
    if any(a.version == 4 for a in addrs):
        _ip("route", "replace", "default", "dev", "eth0", netns_pid=pid)
    if any(a.version == 6 for a in addrs):
        _ip("-6", "route", "replace", "default", "dev", "eth0", netns_pid=pid, check=False)


def setup_veth(root: str, veid: str, pid: int, addresses: str, bridge: str) -> str:
    """Give the VE whose init is PID an eth0 with ADDRESSES (space-separated, optional /prefix)."""
    addrs = _interfaces(addresses)
    ensure_bridge(bridge)
    host = host_ifname(root, veid)
    if os.path.isdir(f"/sys/class/net/{host}"):
        if _alias_of(host) not in (host_alias(root, veid), ""):
            raise VEError(f"host interface {host} exists and is not VE {veid}'s ({_alias_of(host)}): remove it")
        _ip("link", "del", host, check=False)  # left over from a VE that died uncleanly
    _ip("link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", str(pid))
    _ip("link", "set", host, "alias", host_alias(root, veid), check=False)
    _ip("link", "set", host, "master", bridge, "up")
    for a in addrs:
        _ip("addr", "add", str(a), "dev", "eth0", netns_pid=pid)
    _ip("link", "set", "eth0", "up", netns_pid=pid)
    _default_routes(addrs, pid)
    return host


def apply_addresses(root: str, veid: str, pid: int, addresses: str, bridge: str) -> None:
    """Make the running VE's addresses ADDRESSES (vzctl set --ipadd on a running VE): create eth0 if the VE
    started without one, else add what is new and delete what is gone (global addresses of eth0 only)."""
    import ipaddress
    import json

    addrs = _interfaces(addresses)
    proc = _ip("-j", "addr", "show", "dev", "eth0", netns_pid=pid, check=False)
    if proc.returncode != 0:  # no eth0 yet
        if addrs:
            setup_veth(root, veid, pid, addresses, bridge)
        return
    live = set()
    for link in json.loads(proc.stdout or "[]"):
        for info in link.get("addr_info", []):
            if info.get("scope") == "global":
                live.add(ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}"))
    want = set(addrs)  # an address without /prefix is a host address (/32, /128), as `ip addr add` makes it
    for a in sorted(live - want, key=str):
        _ip("addr", "del", str(a), "dev", "eth0", netns_pid=pid)
    for a in sorted(want - live, key=str):
        _ip("addr", "add", str(a), "dev", "eth0", netns_pid=pid)
    if want:
        _default_routes(list(want), pid)


def remove_veth(root: str, veid: str) -> None:
    """Remove the host end if it is still there (it goes away with the VE's namespace normally)."""
    host = host_ifname(root, veid)
    if os.path.isdir(f"/sys/class/net/{host}") and _alias_of(host) in (host_alias(root, veid), ""):
        _ip("link", "del", host, check=False)
