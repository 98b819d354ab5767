"""`vzctl set`: validate changes, apply what can change in a running VE at once (cgroup limits, hostname, resolver,
addresses), save the config.

--ipadd adds to and --ipdel removes from two lists: the running VE's live addresses (applied at once, with the
host routes that follow them: net.apply_addresses) and, with --save, the config's IP_ADDRESS. /etc/hostname and
/etc/resolv.conf are written from a child that joins the VE's user, uts and mount namespaces, so a
symlink the VE planted resolves within the VE, never on the host.
"""

from __future__ import annotations

import os

from vzpkg.errors import VEError

from . import ns, state
from .confcache import _limits_from_conf, load_conf
from .layout import Layout, check_veid
from .limits import Limits
from .ve import VELock, _cgroups, _done, running_init

SETTABLE = ("RAM", "SWAP", "CPUUNITS", "CPULIMIT", "CPUS", "NUMPROC", "DISKSPACE", "DISKINODES", "HOSTNAME",
            "IP_ADDRESS", "NAMESERVER", "SEARCHDOMAIN", "ONBOOT", "INIT")


# what `set` changes in a running VE at once; the rest is read only when the VE starts (or at host boot)
LIVE = frozenset({"RAM", "SWAP", "CPUUNITS", "CPULIMIT", "CPUS", "NUMPROC", "HOSTNAME", "IP_ADDRESS", "NAMESERVER",
                  "SEARCHDOMAIN"})


_LIMIT_ARGS = {"ram": "RAM", "swap": "SWAP", "cpuunits": "CPUUNITS", "cpulimit": "CPULIMIT", "cpus": "CPUS",
               "numproc": "NUMPROC"}


def set_params(layout: Layout, veid: str, changes: dict[str, str], *, save: bool) -> tuple[bool, bool, list[str]]:
    """Validate and apply CHANGES (config keys -> values).

    Returns (applied to a running VE, saved, the changed keys that take effect only at the next start). A change
    that would change nothing — the VE is not running, or a key only read at start, and no --save — is refused
    (UsageError) before anything is applied."""
    from vzpkg.errors import UsageError

    veid = check_veid(veid)
    changes = dict(changes)
    ipadd, ipdel = changes.pop("IP_ADDRESS", None), changes.pop(IPDEL, None)
    ip_ops = _ip_ops(ipadd, ipdel) if ipadd is not None or ipdel is not None else None
    with VELock(layout, veid) as lock:
        conf = load_conf(layout, veid)
        for key, value in changes.items():
            conf.set(key, value)
        rec = running_init(layout, veid)
        if ip_ops is not None:
            live_ips = None
            if rec is not None:
                from . import net

                live_ips = [str(a) for a in net.live_addresses(rec.pid) or []]
            saved_ips = (conf.get("IP_ADDRESS") or "").split()
            changes["IP_ADDRESS"] = " ".join(_edit_addresses((conf.get("IP_ADDRESS") or "").split(), *ip_ops))
            conf.set("IP_ADDRESS", changes["IP_ADDRESS"])
            if live_ips is not None:
                changes["IP_ADDRESS"] = " ".join(_edit_addresses(live_ips, *ip_ops))
        from .backends import apply_disk_limits  # storage: disk limits resized now (grow live, shrink offline)
        now = apply_disk_limits(layout, veid, conf, changes, running=rec is not None, save=save, lock=lock)
        later = [k for k in changes if rec is None or k not in LIVE | now]
        if later and not save:
            if rec is None:
                raise UsageError(f"VE {veid} is not running and --save was not given: nothing would change; add "
                                 "--save to store the change in its config")
            raise UsageError(f"{', '.join(later)} cannot change in a running VE (read at its next start): add "
                             "--save to store it for then")
        if ip_ops is not None:
            _check_ipdel(veid, ip_ops[1], saved_ips if save else None, live_ips)
        if rec is not None:
            _apply_live(layout, veid, rec, conf, changes)
        if save:
            lock.begin("save")  # a SIGKILL in save leaves a temporary file that the next holder removes
            with _done(lock):
                conf.save(layout.conf(veid))
        return rec is not None and bool(LIVE & set(changes)), save, later if rec is not None else []


def _apply_live(layout: Layout, veid: str, rec: state.InitRecord, conf, changes: dict[str, str]) -> None:
    from .spawn import _resolv_conf

    if {"RAM", "SWAP", "CPUUNITS", "CPULIMIT", "CPUS", "NUMPROC"} & set(changes):
        limits = _limits_from_conf(conf)
        _cgroups().set_limits(layout.cgroup_name(veid), Limits(**{k: limits[k] for k, key in _LIMIT_ARGS.items()
                                                                 if key in changes and k in limits}))
    files = {}
    if changes.get("HOSTNAME"):
        files["etc/hostname"] = f"{changes['HOSTNAME']}\n"
    if {"NAMESERVER", "SEARCHDOMAIN"} & set(changes):
        files["etc/resolv.conf"] = _resolv_conf(conf)
    if "HOSTNAME" in changes or files:
        _in_ve(rec, changes.get("HOSTNAME"), files)
    if "IP_ADDRESS" in changes:  # (for a running VE: its live addresses with --ipadd/--ipdel applied)
        from . import net

        net.apply_addresses(layout.real_root(), veid, rec.pid, changes["IP_ADDRESS"],
                            net.bridge_name(conf.get("BRIDGE")))


IPDEL = "IPDEL"  # not a config key: `set --ipdel ADDR...|all`, applied to IP_ADDRESS


def _ip_ops(ipadd: str | None, ipdel: str | None) -> tuple[list[str], list[str] | None]:
    """(addresses to add, addresses to delete or None for all), validated (ConfigError names the option)."""
    import ipaddress

    from vzpkg.errors import ConfigError

    for opt, text in (("--ipadd", ipadd), ("--ipdel", ipdel)):
        for item in (text or "").split():
            if opt == "--ipdel" and item == "all":
                continue
            try:
                ipaddress.ip_interface(item)
            except ValueError:
                raise ConfigError(f"{opt} {text!r}: {item!r} is not an IP address (IP_ADDRESS takes IPv4/IPv6 "
                                  f"addresses, each optionally /prefix{'; or all' if opt == '--ipdel' else ''})"
                                  ) from None
    dels = (ipdel or "").split()
    if "all" in dels and len(dels) > 1:
        raise ConfigError(f"--ipdel {ipdel!r}: 'all' stands alone (it deletes every address)")
    return (ipadd or "").split(), None if dels == ["all"] else dels


def _ip_of(item: str):
    import ipaddress

    return ipaddress.ip_interface(item).ip


def _edit_addresses(current: list[str], add: list[str], delete: list[str] | None) -> list[str]:
    """CURRENT less DELETE (None: all; matched by address, whatever the prefix), then plus ADD (an address
    already there takes the new prefix), as OpenVZ's --ipdel before --ipadd."""
    gone = {_ip_of(d) for d in delete or ()}
    out = [] if delete is None else [c for c in current if _ip_of(c) not in gone]
    for a in add:
        same = [i for i, c in enumerate(out) if _ip_of(c) == _ip_of(a)]
        if same:
            out[same[0]] = a
        else:
            out.append(a)
    return out


def _check_ipdel(veid: str, delete: list[str] | None, saved: list[str] | None, live: list[str] | None) -> None:
    """--ipdel of an address the VE has neither in its config (with --save) nor on its eth0 (running) would
    change nothing: refused (UsageError), naming what it has."""
    from vzpkg.errors import UsageError

    have = {_ip_of(x) for x in (saved or []) + (live or [])}
    for d in delete or ():
        if _ip_of(d) not in have:
            shown = " ".join(dict.fromkeys((saved or []) + (live or []))) or "none"
            raise UsageError(f"--ipdel {d}: VE {veid} has no such address (it has: {shown})")


def _in_ve(rec: state.InitRecord, hostname: str | None, files: dict[str, str]) -> None:
    """In a child that joins the running VE's user, uts and mount namespaces: set the hostname, write FILES."""
    from .spawn import _write_files  # (before the fork: the host's module files are out of sight in the VE)

    pid = os.fork()
    if pid == 0:
        try:
            if not rec.privileged:
                ns.setns(os.open(f"/proc/{rec.pid}/ns/user", os.O_RDONLY), ns.CLONE_NEWUSER)
                ns.setresid(0, 0)
            ns.setns(os.open(f"/proc/{rec.pid}/ns/uts", os.O_RDONLY), ns.CLONE_NEWUTS)
            # joining the mount namespace makes its root (the VE's root) our root and cwd
            ns.setns(os.open(f"/proc/{rec.pid}/ns/mnt", os.O_RDONLY), ns.CLONE_NEWNS)
            if hostname:
                ns.sethostname(hostname)
            _write_files(files)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise VEError(f"could not apply {'the hostname' if hostname else 'the resolver settings'} in the running VE")

