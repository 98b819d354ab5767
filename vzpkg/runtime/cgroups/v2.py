"""The cgroup v2 driver: one directory vzpkg/<ve_id> in the unified hierarchy, with the controllers enabled
from the root down."""

from __future__ import annotations

import signal
from pathlib import Path

from vzpkg.errors import ConfigError, VEError

from ..limits import Limits
from .common import (
    BASE,
    CFS_PERIOD_US,
    V2_CONTROLLERS,
    CgroupDriver,
    Counters,
    _check_ve_id,
    _device_rule,
    _int_or_none,
    _keyed,
    _limit,
    _mkdir,
    _pids_counters,
    _read,
    _read_opt,
    _wait_for,
    _write,
    cpulimit_to_quota,
    cpuunits_to_weight,
    first_cpus,
    log,
    parse_cpulist,
    quota_to_cpulimit,
    weight_to_cpuunits,
)


class V2Driver(CgroupDriver):
    """Unified hierarchy: one directory per VE with all controllers enabled from the root down."""

    version = 2

    def __init__(self, root: Path, base: str = BASE) -> None:
        self.root = Path(root)
        self.base = base

    def _dirs(self, ve_id: str) -> list[Path]:
        return [self._dir(ve_id)]

    def _dir(self, ve_id: str) -> Path:
        return self.root / self.base / _check_ve_id(ve_id)

    def controllers(self) -> list[str]:
        available = (_read_opt(self.root / "cgroup.controllers") or "").split()
        return [c for c in V2_CONTROLLERS if c in available]

    # -- create --------------------------------------------------------------------------------------------------

    def create(self, ve_id: str) -> None:
        ctrls = self.controllers()
        parent = self.root / self.base
        self._enable(self.root, ctrls)
        _mkdir(parent)
        self._enable(parent, ctrls)
        _mkdir(self._dir(ve_id))

    @staticmethod
    def _enable(cg: Path, ctrls: list[str]) -> None:
        """Delegate controllers to cg's children (v2 only lets a child use what its parent enabled)."""
        if not ctrls:
            return
        try:
            _write(cg / "cgroup.subtree_control", " ".join(f"+{c}" for c in ctrls))
        except VEError as e:
            raise VEError(
                f"{e.message} — a cgroup with processes of its own cannot delegate controllers; run vzpkg "
                "from a delegated cgroup (e.g. systemd-run --scope -p Delegate=yes) or move those processes"
            ) from None

    # -- limits --------------------------------------------------------------------------------------------------

    def set_limits(self, ve_id: str, limits: Limits) -> None:
        ram, swap, cpuunits, cpulimit, cpus, numproc = (limits.ram, limits.swap, limits.cpuunits, limits.cpulimit,
                                                        limits.cpus, limits.numproc)
        d = self._dir(ve_id)
        if cpuunits is not None:
            _write(d / "cpu.weight", cpuunits_to_weight(cpuunits))
        if cpulimit is not None:
            quota = cpulimit_to_quota(cpulimit)
            _write(d / "cpu.max", f"{'max' if quota is None else quota} {CFS_PERIOD_US}")
        if cpus is not None:
            self._set_cpus(d, cpus)
        if ram is not None:
            n = _limit(ram, "RAM", zero_is_unlimited=True)
            _write(d / "memory.max", "max" if n is None else n)
        if swap is not None:
            self._set_swap(d, _limit(swap, "SWAP", zero_is_unlimited=False))
        if numproc is not None:
            n = _limit(numproc, "NUMPROC", zero_is_unlimited=True)
            _write(d / "pids.max", "max" if n is None else n)

    def _set_cpus(self, d: Path, n: int) -> None:
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f'CPUS="{n}": must be an integer number of CPUs (0 = unlimited)')
        if n == 0:
            # An empty cpuset.cpus inherits the parent's CPUs, which is what "unlimited" means.
            _write(d / "cpuset.cpus", "")
            return
        available = (
            _read_opt(d.parent / "cpuset.cpus.effective")
            or _read_opt(self.root / "cpuset.cpus.effective")
            or _read(Path("/sys/devices/system/cpu/online"))
        )
        _write(d / "cpuset.cpus", first_cpus(available, n))

    @staticmethod
    def _set_swap(d: Path, n: int | None) -> None:
        # Unlike v1's memsw, v2's memory.swap.max is the swap alone, exactly OpenVZ's SWAP.
        f = d / "memory.swap.max"
        try:
            _write(f, "max" if n is None else n)
        except VEError:
            if f.exists():
                raise
            log.info("%s: no swap accounting in this kernel; SWAP is not enforced", d)

    def limits(self, ve_id: str) -> dict[str, int | str | None]:
        d = self._dir(ve_id)
        out: dict[str, int | str | None] = {
            "ram": _int_or_none(_read_opt(d / "memory.max")),
            "swap": _int_or_none(_read_opt(d / "memory.swap.max")),
            "numproc": _int_or_none(_read_opt(d / "pids.max")),
        }
        weight = _read_opt(d / "cpu.weight")
        out["cpuunits"] = weight_to_cpuunits(int(weight)) if weight else None
        cpu_max = (_read_opt(d / "cpu.max") or "max 100000").split()
        quota = None if cpu_max[0] == "max" else int(cpu_max[0])
        out["cpulimit"] = quota_to_cpulimit(quota, int(cpu_max[1]) if len(cpu_max) > 1 else CFS_PERIOD_US)
        cpuset = _read_opt(d / "cpuset.cpus") or ""
        out["cpus"] = len(parse_cpulist(cpuset)) if cpuset else 0
        out["cpuset"] = cpuset
        return out

    def setup_devices(self, ve_id: str, allowed: list[tuple[str, int, int, str]]) -> None:
        """Deny all devices, then allow each (type, major, minor, access); -1 as a number means any.

        cgroup v2 has no devices.allow: the rules become a BPF_CGROUP_DEVICE program attached to the VE's
        cgroup (as runc and systemd do; see bpfdev), replacing the one a previous call attached."""
        for rule in allowed:
            _device_rule(*rule)
        d = self._dir(ve_id)
        from .. import bpfdev

        if not bpfdev.is_cgroup2(d):
            # only a test's fake tree (a plain directory) gets here: there is nothing to attach a program to
            log.warning("VE %s: %s is not on a cgroup2 filesystem; no BPF device filter attached", ve_id, d)
            return
        bpfdev.apply(d, allowed)

    # -- accounting -------------------------------------------------------------------------------------------

    def counters(self, ve_id: str) -> Counters:
        d = self._dir(ve_id)
        events = _keyed(_read_opt(d / "memory.events"))
        cpu = _keyed(_read_opt(d / "cpu.stat"))
        return {
            "memory": {
                "held": _int_or_none(_read_opt(d / "memory.current")),
                "maxheld": _int_or_none(_read_opt(d / "memory.peak")),
                "limit": _int_or_none(_read_opt(d / "memory.max")),
                # memory.events "max" counts allocations that hit memory.max: the closest thing to failcnt.
                "failcnt": events.get("max"),
                "oom_kills": events.get("oom_kill"),
            },
            "numproc": _pids_counters(d),
            "cpu": {
                "usage_ns": cpu["usage_usec"] * 1000 if "usage_usec" in cpu else None,
                "nr_throttled": cpu.get("nr_throttled"),
                "throttled_ns": cpu["throttled_usec"] * 1000 if "throttled_usec" in cpu else None,
            },
        }

    def cpu_usage_ns(self, ve_id: str) -> int:
        stat = _keyed(_read(self._dir(ve_id) / "cpu.stat"))
        return stat.get("usage_usec", 0) * 1000

    # -- freezing and killing -----------------------------------------------------------------------------------

    def _kill_fast(self, ve_id: str, sig: int) -> bool:
        kill = self._dir(ve_id) / "cgroup.kill"
        if sig != signal.SIGKILL or not kill.exists():
            return False
        _write(kill, 1)  # the kernel kills every process, including ones forking right now
        return True

    def _freeze(self, ve_id: str) -> bool:
        d = self._dir(ve_id)
        _write(d / "cgroup.freeze", 1)
        if not _wait_for(lambda: _keyed(_read_opt(d / "cgroup.events")).get("frozen") == 1, 5.0):
            log.warning("VE %s did not finish freezing; signalling anyway", ve_id)
        return True

    def _thaw(self, ve_id: str) -> None:
        _write(self._dir(ve_id) / "cgroup.freeze", 0)
