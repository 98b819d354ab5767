"""What state a VE is in, read from the kernel.

start records the VE init's host pid and its start time (field 22 of /proc/PID/stat, in clock ticks since
boot) in run/<id>.state. A VE is *running* only if that pid is alive (not a zombie), has that start time
(so a recycled pid is never mistaken for the VE), is in the VE's cgroup (vzpkg/<root tag>-<id>) and, unless the VE is
privileged, lives in a user namespace other than ours. The file alone proves nothing: after vzctl, the VE or
the host crashed, the kernel's answer wins.
"""

from __future__ import annotations

import os

from ..errors import VEError
from .layout import Layout


class InitRecord:
    __slots__ = ("pid", "starttime", "privileged")

    def __init__(self, pid: int, starttime: int, privileged: bool) -> None:
        self.pid = pid
        self.starttime = starttime
        self.privileged = privileged

    def render(self) -> str:
        return f"pid={self.pid}\nstarttime={self.starttime}\nprivileged={'yes' if self.privileged else 'no'}\n"

    @classmethod
    def parse(cls, text: str) -> InitRecord | None:
        kv = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        try:
            return cls(int(kv["pid"]), int(kv["starttime"]), kv.get("privileged") == "yes")
        except (KeyError, ValueError):
            return None


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, starttime) of PID, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = data[data.rindex(b")") + 2:].split()
    # rest[0] is field 3 (state); field 22 (starttime) is rest[19]
    return rest[0].decode(), int(rest[19])


def write_record(layout: Layout, veid: str, rec: InitRecord) -> None:
    path = layout.state(veid)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(rec.render())
    os.rename(tmp, path)


def read_record(layout: Layout, veid: str) -> InitRecord | None:
    try:
        return InitRecord.parse(layout.state(veid).read_text())
    except FileNotFoundError:
        return None


def clear_record(layout: Layout, veid: str) -> None:
    try:
        layout.state(veid).unlink()
    except FileNotFoundError:
        pass


def record_alive(rec: InitRecord | None, cgroup: str | None = None) -> bool:
    """Is REC's process alive, with its recorded start time, (with CGROUP, the VE's cgroup name) in the VE's
    cgroup, and (unless privileged) in a user namespace of its own?"""
    if rec is None:
        return False
    st = proc_stat(rec.pid)
    if st is None or st[0] in ("Z", "X") or st[1] != rec.starttime:
        return False
    if cgroup is not None and not in_cgroup(rec.pid, cgroup):
        return False
    if not rec.privileged:
        # a VE init lives in a user namespace of its own
        try:
            return os.readlink(f"/proc/{rec.pid}/ns/user") != os.readlink("/proc/self/ns/user")
        except OSError:
            return False
    return True


def running_init(layout: Layout, veid: str) -> InitRecord | None:
    """The VE's init if the VE is running, else None."""
    rec = read_record(layout, veid)
    return rec if record_alive(rec, layout.cgroup_name(veid)) else None


def in_cgroup(pid: int, cgroup: str) -> bool:
    """Is PID in the cgroup vzpkg/<cgroup> (any hierarchy)?"""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            text = f.read()
    except OSError:
        return False
    suffix = f"/vzpkg/{cgroup}"
    return any(line.rstrip().endswith(suffix) for line in text.splitlines())


def ns_pid_chain(pid: int) -> list[int]:
    """NSpid of PID: its pid in each pid namespace from the host's down to its own."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except OSError:
        pass
    return []


def adopt_init(layout: Layout, veid: str, pids: list[int]) -> InitRecord | None:
    """Find the VE's init among PIDS (the processes of its cgroups) when no valid record exists.

    Used after vzctl was killed between forking the init and recording it: the init is the process that is
    pid 1 of its own pid namespace, one level below ours. The record is written again, so later commands
    are fast.
    """
    if not layout.conf(veid).exists():
        return None
    try:
        root = os.stat(layout.ve_root(veid))
    except OSError:
        return None
    depth = len(ns_pid_chain(os.getpid()))
    for pid in pids:
        chain = ns_pid_chain(pid)
        if len(chain) == depth + 1 and chain[-1] == 1:
            st = proc_stat(pid)
            if st is None or st[0] in ("Z", "X"):
                continue
            try:
                privileged = os.readlink(f"/proc/{pid}/ns/user") == os.readlink("/proc/self/ns/user")
                its_root = os.stat(f"/proc/{pid}/root")
            except OSError:
                continue
            if (its_root.st_dev, its_root.st_ino) != (root.st_dev, root.st_ino):
                continue
            rec = InitRecord(pid, st[1], privileged)
            write_record(layout, veid, rec)
            return rec
    return None


_DRIVER = None


def cgroup_driver():
    """The host's cgroup driver, detected once per process (from mountinfo: a start, stop and destroy each asked
    for it several times; the hierarchies a host mounts do not change under a running command or API user)."""
    global _DRIVER
    if _DRIVER is None:
        from . import cgroups

        _DRIVER = cgroups.detect()
    return _DRIVER


def live_init(layout: Layout, veid: str) -> InitRecord | None:
    """The VE's init if it runs: from the record, or else found in the VE's cgroups (crash recovery)."""
    rec = running_init(layout, veid)
    if rec is not None:
        return rec
    try:
        cg = cgroup_driver()
        name = layout.cgroup_name(veid)
        if not cg.exists(name):
            return None
        return adopt_init(layout, veid, cg.pids(name))
    except VEError:
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
