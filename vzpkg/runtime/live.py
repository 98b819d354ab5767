"""`vzctl set`: validate changes, apply what can change in a running VE at once (cgroup limits, hostname, resolver,
addresses), save the config.

The hostname and the resolver are written from a child that joins the VE's user, uts and mount namespaces, so a
symlink the VE planted resolves within the VE, never on the host.
"""

from __future__ import annotations

import os

from vzpkg.errors import VEError

from . import ns, state
from .confcache import _limits_from_conf, load_conf
from .layout import Layout, check_veid
from .ve import VELock, _cgroups, _done, running_init

SETTABLE = ("RAM", "SWAP", "CPUUNITS", "CPULIMIT", "CPUS", "NUMPROC", "DISKSPACE", "DISKINODES", "HOSTNAME",
            "IP_ADDRESS", "NAMESERVER", "ONBOOT", "INIT")


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
    with VELock(layout, veid) as lock:
        conf = load_conf(layout, veid)
        for key, value in changes.items():
            conf.set(key, value)
        rec = running_init(layout, veid)
        from .backends import apply_disk_limits  # storage: disk limits resized now (grow live, shrink offline)
        now = apply_disk_limits(layout, veid, conf, changes, running=rec is not None, save=save, lock=lock)
        later = [k for k in changes if rec is None or k not in LIVE | now]
        if later and not save:
            if rec is None:
                raise UsageError(f"VE {veid} is not running and --save was not given: nothing would change; add "
                                 "--save to store the change in its config")
            raise UsageError(f"{', '.join(later)} cannot change in a running VE (read at its next start): add "
                             "--save to store it for then")
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
        _cgroups().set_limits(layout.cgroup_name(veid), **{k: limits[k] for k, key in _LIMIT_ARGS.items()
                                                          if key in changes and k in limits})
    files = {}
    if {"NAMESERVER", "SEARCHDOMAIN"} & set(changes) and conf.get("NAMESERVER"):
        files["etc/resolv.conf"] = _resolv_conf(conf)
    if "HOSTNAME" in changes or files:
        _in_ve(rec, changes.get("HOSTNAME"), files)
    if "IP_ADDRESS" in changes:
        from . import net

        net.apply_addresses(layout.real_root(), veid, rec.pid, conf.get("IP_ADDRESS") or "",
                            net.bridge_name(conf.get("BRIDGE")))


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

