"""VE networking.

Every VE has its own network namespace with the loopback up (done by ioctl in the VE's pid 1, see
ns.bring_up_loopback). A VE with IP_ADDRESS also gets a veth pair: ``eth0`` inside, holding its addresses and
an on-link default route, and a host end (``vz`` + 12 hex digits of a hash of the VZ root's real path and the
VEID: interface names are host-wide and at most 15 characters, and the same VEID may run in two VZ roots; its
alias, ``ip -d link show``, reads ``vzpkg <VZ root> <VEID>``) enslaved to a bridge (``BRIDGE`` in the VE config,
else $VZ_BRIDGE, else ``vzbr0``), created if missing (STP off, up) and left without an address.

The host reaches its VEs through a host route per VE address — ``ADDR/32`` (``/128``) ``dev BRIDGE proto 199``,
as OpenVZ's venet had — added before the address is set in the VE and removed after it is taken away: without
it, the host's default route would carry traffic for a VE's address off the machine. Every route is written
ahead into run/<VEID>.routes, so that stop, destroy, the next start and `vzpkg clean --ves` remove exactly the
routes the VE had even after a SIGKILL. A route for the address that already exists and is not this VE's
(another VE, the host's own) is refused (AddressInUseError). Nothing is routed or NATed to the outside.

The pair disappears with the VE's network namespace when the VE stops. This path spawns ``ip`` (iproute2) and
``nsenter`` (util-linux), so it costs a few milliseconds, paid only by VEs that have IP_ADDRESS.
"""

from __future__ import annotations

import os
import re

from vzpkg.errors import AddressInUseError, ConfigError, VEError

DEFAULT_BRIDGE = "vzbr0"
ROUTE_PROTO = "199"  # marks vzpkg's host routes (unassigned in iproute2's rt_protos): an admin's route is never ours
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def host_ifname(root: str, veid: str) -> str:
    """The host end's name for VE VEID of the VZ root ROOT (a real path): vz + 12 hex digits (14 characters)."""
    import zlib  # not hashlib: stop runs this, and hashlib costs ms to import

    key = f"{root}\0{veid}".encode()
    return f"vz{zlib.crc32(key):08x}{zlib.adler32(key) & 0xFFFF:04x}"


def host_alias(root: str, veid: str) -> str:
    return f"vzpkg {root} {veid}"[:250]


def routes_file(root: str, veid: str) -> str:
    """run/<VEID>.routes of the VZ root ROOT: the host routes the VE holds, one `BRIDGE ADDRESS` a line."""
    return os.path.join(root, "run", f"{veid}.routes")


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


def _ip(*args: str, netns_pid: int | None = None, check: bool = True, stdin: str | None = None):
    from .. import process

    cmd = ["ip", *args]
    if netns_pid is not None:
        cmd = ["nsenter", f"--net=/proc/{netns_pid}/ns/net", "--", *cmd]
    proc = process.run(cmd, capture=True, text=True, check=False, input=stdin, error=VEError,
                       what=f"network setup: {cmd[0]}")
    if check and proc.returncode != 0:
        raise VEError(f"network setup failed: {' '.join(cmd)}: {proc.stderr.strip()}")
    return proc


def ensure_bridge(bridge: str) -> None:
    """The bridge, created on first use with these defaults: STP off (a VE's port forwards at once), up, no
    address (the host reaches VEs through its per-address routes); an existing bridge is used as it is."""
    if os.path.isdir(f"/sys/class/net/{bridge}") and not os.path.isdir(f"/sys/class/net/{bridge}/bridge"):
        # BRIDGE="eth0" (or any host interface that is no bridge): it would be set up, then fail to take the VE
        raise ConfigError(f'BRIDGE="{bridge}": host interface {bridge} exists and is not a bridge: name a bridge '
                          "(created if missing), or leave BRIDGE out for the default")
    if not os.path.isdir(f"/sys/class/net/{bridge}"):
        proc = _ip("link", "add", bridge, "type", "bridge", "stp_state", "0", check=False)
        if proc.returncode != 0 and not os.path.isdir(f"/sys/class/net/{bridge}"):
            raise VEError(f"cannot create bridge {bridge}: {proc.stderr.strip()}")
    try:
        with open(f"/sys/class/net/{bridge}/flags") as f:
            if int(f.read(), 16) & 1:  # IFF_UP already: no `ip` (a process on every start and restore)
                return
    except (OSError, ValueError):
        pass
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


def _host_prefix(a) -> str:
    """The host route's destination for the VE address A (an ip_interface): the address alone."""
    return f"{a.ip}/{a.max_prefixlen}"


# ---------------------------------------------------------------------------------------------------------
# host routes


def _read_routes(root: str, veid: str) -> list[tuple[str, str]]:
    try:
        with open(routes_file(root, veid)) as f:
            return [tuple(line.split()[:2]) for line in f if len(line.split()) >= 2]  # type: ignore[misc]
    except FileNotFoundError:
        return []


def _write_routes(root: str, veid: str, routes: list[tuple[str, str]]) -> None:
    path = routes_file(root, veid)
    if not routes:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}")  # (swept when dead)
    with open(tmp, "w") as f:
        # no fsync: routes do not outlive the host's kernel, and a SIGKILL leaves the page cache intact
        f.write("".join(f"{b} {p}\n" for b, p in routes))
    os.rename(tmp, path)


def _route_cmd(verb: str, prefix: str, bridge: str) -> list[str]:
    # (no -4/-6: `ip -batch` lines take no options, and ip tells the family from the prefix)
    return ["route", verb, prefix, "dev", bridge, "proto", ROUTE_PROTO]


def add_routes(root: str, veid: str, bridge: str, addrs: list) -> None:
    """Give the host a route to each of ADDRS through BRIDGE, and check that the host now sends traffic for it
    there (a local address of the host, or a policy rule, would win over the route)."""
    added: list[str] = []
    try:
        for a in addrs:
            _add_route(root, veid, bridge, a)
            added.append(_host_prefix(a))
    except BaseException:
        remove_routes(root, veid, set(added))  # all or nothing: an address left unrouted is never set
        raise


def _add_route(root: str, veid: str, bridge: str, a) -> None:
    import json

    held = _read_routes(root, veid)
    prefix = _host_prefix(a)
    entry = (bridge, prefix)
    if entry in held:  # ours already (a live change cut off half-way): take it again from scratch
        _ip(*_route_cmd("del", prefix, bridge), check=False)
    else:
        held.append(entry)
        _write_routes(root, veid, held)  # ahead of the route: whoever cleans up finds it
    proc = _ip(*_route_cmd("add", prefix, bridge), check=False)
    if proc.returncode != 0:
        held.remove(entry)
        _write_routes(root, veid, held)
        if "File exists" in proc.stderr:
            shown = " ".join(_ip("route", "show", "exact", prefix, check=False).stdout.split())
            raise AddressInUseError(f"IP address {a.ip}: the host already has a route for it ({shown}): another "
                                    "VE or the host uses it; pick another address, or if it is a VE's leftover, "
                                    "run 'vzpkg clean --ves' or 'ip route del " + prefix + "'")
        raise VEError(f"network setup failed: ip {' '.join(_route_cmd('add', prefix, bridge))}: "
                      f"{proc.stderr.strip()}")
    got = json.loads(_ip("-j", "route", "get", str(a.ip)).stdout or "[{}]")
    dev = got[0].get("dev") if got else None
    if dev != bridge or got[0].get("type", "unicast") != "unicast":
        _ip(*_route_cmd("del", prefix, bridge), check=False)
        held.remove(entry)
        _write_routes(root, veid, held)
        raise AddressInUseError(f"IP address {a.ip}: the host sends its traffic to {dev or 'nowhere'} "
                                f"({got[0].get('type', 'unicast')}), not to bridge {bridge}, even with a route: "
                                "it is an address of the host itself or a policy rule routes it; pick another")


def remove_routes(root: str, veid: str, prefixes: set[str] | None = None) -> None:
    """Remove the VE's host routes (those for PREFIXES only, if given): only routes vzpkg made (proto 199)."""
    held = _read_routes(root, veid)
    gone = [(b, p) for b, p in held if prefixes is None or p in prefixes]
    if not gone:
        return
    # one `ip` for all of them; -force goes on past a route already gone (a VE whose bridge was deleted)
    _ip("-force", "-batch", "-", check=False, stdin="".join(" ".join(_route_cmd("del", p, b)) + "\n" for b, p in gone))
    _write_routes(root, veid, [r for r in held if r not in gone])


# ---------------------------------------------------------------------------------------------------------
# the veth pair and the VE's addresses


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
    _promote_secondaries(pid)
    add_routes(root, veid, bridge, addrs)  # before the VE's address is usable
    for a in addrs:
        _ip("addr", "add", str(a), "dev", "eth0", netns_pid=pid)
    _ip("link", "set", "eth0", "up", netns_pid=pid)
    _default_routes(addrs, pid)
    return host


def _promote_secondaries(pid: int) -> None:
    """net.ipv4.conf.eth0.promote_secondaries=1 in the VE: else deleting an address (--ipdel) makes the kernel
    delete every other address of its subnet on eth0 too. A net sysctl is that of the writer's network
    namespace: a forked child joins the VE's and writes it (cheaper than spawning a tool)."""
    from . import ns

    child = os.fork()
    if child == 0:
        try:
            ns.setns(os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC), ns.CLONE_NEWNET)
            with open("/proc/sys/net/ipv4/conf/eth0/promote_secondaries", "w") as f:
                f.write("1")
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(child, 0)
    if status != 0:
        raise VEError("network setup failed: could not set promote_secondaries on the VE's eth0")


def _default_routes(addrs: list, pid: int) -> None:
    if any(a.version == 4 for a in addrs):
        _ip("route", "replace", "default", "dev", "eth0", netns_pid=pid)
    if any(a.version == 6 for a in addrs):
        _ip("-6", "route", "replace", "default", "dev", "eth0", netns_pid=pid, check=False)


def live_addresses(pid: int) -> list | None:
    """The global addresses of the running VE's eth0 (ip_interface objects), or None if it has no eth0."""
    import ipaddress
    import json

    proc = _ip("-j", "addr", "show", "dev", "eth0", netns_pid=pid, check=False)
    if proc.returncode != 0:
        return None
    live = []
    for link in json.loads(proc.stdout or "[]"):
        for info in link.get("addr_info", []):
            if info.get("scope") == "global":
                live.append(ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}"))
    return live


def apply_addresses(root: str, veid: str, pid: int, addresses: str, bridge: str) -> None:
    """Make the running VE's addresses exactly ADDRESSES (vzctl set --ipadd/--ipdel on a running VE): create eth0
    if the VE started without one, else add what is new and delete what is gone (global addresses of eth0).
    An address is usable only while the host's route to it exists: routes come before addresses and go after."""
    addrs = _interfaces(addresses)
    live = live_addresses(pid)
    if live is None:  # no eth0 yet
        if addrs:
            setup_veth(root, veid, pid, addresses, bridge)
        return
    want = set(addrs)  # an address without /prefix is a host address (/32, /128), as `ip addr add` makes it
    if set(live) - want:
        _promote_secondaries(pid)  # (again: the VE may have been started by a vzpkg that did not set it)
    for a in sorted(set(live) - want, key=str):
        _ip("addr", "del", str(a), "dev", "eth0", netns_pid=pid)
    kept = {_host_prefix(a) for a in want}
    remove_routes(root, veid, {_host_prefix(a) for a in live} - kept)
    new = sorted(want - set(live), key=str)
    routed = {p for _, p in _read_routes(root, veid)}
    ensure_bridge(bridge)
    # (a kept address without a route: the VE was started by a vzpkg that made none)
    add_routes(root, veid, bridge, [a for a in sorted(want, key=str) if _host_prefix(a) not in routed])
    for a in new:
        _ip("addr", "add", str(a), "dev", "eth0", netns_pid=pid)
    if want:
        _default_routes(list(want), pid)


def remove_veth(root: str, veid: str) -> None:
    """Remove the VE's host routes, and the host end if it is still there (it goes away with the VE's
    namespace normally)."""
    if os.path.exists(routes_file(root, veid)):
        remove_routes(root, veid)
    host = host_ifname(root, veid)
    if os.path.isdir(f"/sys/class/net/{host}") and _alias_of(host) in (host_alias(root, veid), ""):
        _ip("link", "del", host, check=False)
