"""Per-VE control groups on cgroup v1 and cgroup v2.

Every VE gets the cgroup ``vzpkg/<ve_id>``: in each v1 controller hierarchy, or once in the v2 unified
hierarchy. :func:`detect` picks the driver from /proc/self/mountinfo: if the v1 controllers are mounted
(legacy or hybrid hosts) they are where the limits live, so v1 wins; otherwise a cgroup2 mount with
controllers is used.

OpenVZ units are translated in units.py (see docs/ve-config.md for the table): CPUUNITS -> cpu.shares / cpu.weight,
CPULIMIT (percent of one CPU) -> CFS quota, CPUS -> cpuset, RAM/SWAP -> memory limits, NUMPROC -> pids.max.

The package: units.py (OpenVZ units <-> cgroup values), driver.py (the CgroupDriver interface, its shared half
and the cgroup file helpers), v1.py and v2.py (the drivers, each with its set_limits); here, the detection of
the hierarchy, and every name the runtime uses (as when this was one module).
"""

from __future__ import annotations

import re
from pathlib import Path

from vzpkg.errors import VEError

from ..limits import Limit
from .common import (
    BASE,
    CFS_PERIOD_US,
    CPUUNITS_MAX,
    CPUUNITS_MIN,
    SHARES_MAX,
    SHARES_MIN,
    V1_CONTROLLERS,
    V2_CONTROLLERS,
    WEIGHT_MAX,
    WEIGHT_MIN,
    CgroupDriver,
    Counters,
    _check_ve_id,
    _read_opt,
    check_cpuunits,
    cpulimit_to_quota,
    cpuunits_to_shares,
    cpuunits_to_weight,
    first_cpus,
    format_cpulist,
    parse_cpulist,
    quota_to_cpulimit,
    shares_to_cpuunits,
    weight_to_cpuunits,
)

__all__ = [
    "BASE", "CFS_PERIOD_US", "CPUUNITS_MAX", "CPUUNITS_MIN", "SHARES_MAX", "SHARES_MIN", "V1_CONTROLLERS",
    "V2_CONTROLLERS", "WEIGHT_MAX", "WEIGHT_MIN", "CgroupDriver", "Counters", "Limit", "V1Driver", "V2Driver",
    "check_cpuunits", "cpulimit_to_quota", "cpuunits_to_shares", "cpuunits_to_weight", "detect", "first_cpus",
    "format_cpulist", "parse_cpulist", "parse_mountinfo", "quota_to_cpulimit", "shares_to_cpuunits",
    "weight_to_cpuunits", "_check_ve_id",
]


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> tuple[dict[str, Path], Path | None]:
    """-> ({v1 controller: mount point}, cgroup2 mount point or None)."""
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype = tail[0]
        if fstype not in ("cgroup", "cgroup2"):
            continue  # (most lines: no path or option work for them, this is on every vzctl command's path)
        mnt, opts = Path(_unescape(fields[4]) if "\\" in fields[4] else fields[4]), tail[2].split(",")
        if fstype == "cgroup2" and v2 is None:
            v2 = mnt
        elif fstype == "cgroup":
            for ctrl in V1_CONTROLLERS:
                if ctrl in opts:
                    v1.setdefault(ctrl, mnt)
    return v1, v2


def detect(mountinfo: str | None = None) -> CgroupDriver:
    """The driver for this host: V1Driver when v1 controllers are mounted, else V2Driver."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    v1, v2 = parse_mountinfo(mountinfo)
    if "memory" in v1 or "cpu" in v1:
        from .v1 import V1Driver

        return V1Driver(v1)
    if v2 is not None and _read_opt(v2 / "cgroup.controllers"):
        from .v2 import V2Driver

        return V2Driver(v2)
    raise VEError(
        "no usable cgroup hierarchy: mount cgroup2 at /sys/fs/cgroup (or the v1 controllers) and enable "
        "the cpu, memory and pids controllers"
    )


def __getattr__(name: str) -> type[CgroupDriver]:
    """V1Driver and V2Driver, imported when first asked for: a host uses one of them (detect), and each costs
    ~0.1 ms of `vzctl start`."""
    if name == "V1Driver":
        from .v1 import V1Driver

        return V1Driver
    if name == "V2Driver":
        from .v2 import V2Driver

        return V2Driver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
