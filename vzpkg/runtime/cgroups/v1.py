"""The cgroup v1 driver: one hierarchy per controller (or co-mounted ones such as cpu,cpuacct), the VE's
cgroup vzpkg/<ve_id> in each."""

from __future__ import annotations

from pathlib import Path

from vzpkg.errors import ConfigError, VEError

from ..limits import Limit, Limits
from .common import (
    _PAGE,
    BASE,
    CFS_PERIOD_US,
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
    cpuunits_to_shares,
    first_cpus,
    log,
    parse_cpulist,
    quota_to_cpulimit,
    shares_to_cpuunits,
)


class V1Driver(CgroupDriver):
    """Legacy hierarchy: one mount per controller (or co-mounted ones such as cpu,cpuacct)."""

    version = 1

    def __init__(self, mounts: dict[str, Path], base: str = BASE) -> None:
        self.mounts = {c: Path(p) for c, p in mounts.items()}
        self.base = base

    def _mount_points(self) -> list[Path]:
        return list(dict.fromkeys(self.mounts.values()))

    def _dirs(self, ve_id: str) -> list[Path]:
        return [m / self.base / ve_id for m in self._mount_points()]

    def _dir(self, ctrl: str, ve_id: str) -> Path:
        if ctrl not in self.mounts:
            raise VEError(f"cgroup v1 controller '{ctrl}' is not mounted; mount it at /sys/fs/cgroup/{ctrl}")
        return self.mounts[ctrl] / self.base / _check_ve_id(ve_id)

    def _has(self, ctrl: str) -> bool:
        return ctrl in self.mounts

    def self_join_files(self, ve_id: str) -> list[Path]:
        """Each hierarchy's `tasks` file: a thread writing "0" there moves only itself, and the kernel then skips
        cgroup_threadgroup_rwsem, whose write side waits for an RCU grace period (8-19 ms here; cgroup.procs
        always takes it). For a single-threaded process (a fresh fork) moving its one thread moves the process:
        0.1 ms for all hierarchies."""
        return [d / "tasks" for d in self._dirs(_check_ve_id(ve_id))]

    # -- create --------------------------------------------------------------------------------------------------

    def create(self, ve_id: str) -> None:
        _check_ve_id(ve_id)
        for mnt in self._mount_points():
            parent = mnt / self.base
            _mkdir(parent)
            self._init_cgroup(mnt, parent)
            child = parent / ve_id
            _mkdir(child)
            self._init_cgroup(mnt, child)

    def _init_cgroup(self, mnt: Path, cg: Path) -> None:
        ctrls = {c for c, m in self.mounts.items() if m == mnt}
        if "cpuset" in ctrls:
            # A new v1 cpuset starts with no CPUs and no memory nodes, and attaching a task to it fails
            # with ENOSPC until both are filled in: copy them from the parent.
            for name in ("cpuset.mems", "cpuset.cpus"):
                if not _read_opt(cg / name):
                    _write(cg / name, _read(cg.parent / name))
        if "memory" in ctrls and cg.parent == mnt and _read_opt(cg / "memory.use_hierarchy") == "0":
            # Without hierarchy a VE's usage is not charged to the vzpkg parent; recent kernels force it on.
            _write(cg / "memory.use_hierarchy", 1)

    # -- limits --------------------------------------------------------------------------------------------------

    def set_limits(self, ve_id: str, limits: Limits) -> None:
        ram, swap, cpuunits, cpulimit, cpus, numproc = (limits.ram, limits.swap, limits.cpuunits, limits.cpulimit,
                                                        limits.cpus, limits.numproc)
        if cpuunits is not None:
            _write(self._dir("cpu", ve_id) / "cpu.shares", cpuunits_to_shares(cpuunits))
        if cpulimit is not None:
            quota = cpulimit_to_quota(cpulimit)
            d = self._dir("cpu", ve_id)
            _write(d / "cpu.cfs_period_us", CFS_PERIOD_US)
            _write(d / "cpu.cfs_quota_us", -1 if quota is None else quota)
        if cpus is not None:
            self._set_cpus(ve_id, cpus)
        if ram is not None or swap is not None:
            self._set_memory(ve_id, ram, swap)
        if numproc is not None:
            n = _limit(numproc, "NUMPROC", zero_is_unlimited=True)
            _write(self._dir("pids", ve_id) / "pids.max", "max" if n is None else n)

    def _set_cpus(self, ve_id: str, n: int) -> None:
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f'CPUS="{n}": must be an integer number of CPUs (0 = unlimited)')
        d = self._dir("cpuset", ve_id)
        _write(d / "cpuset.cpus", first_cpus(_read(d.parent / "cpuset.cpus"), n))

    def _set_memory(self, ve_id: str, ram: Limit, swap: Limit) -> None:
        d = self._dir("memory", ve_id)
        cur_ram = _int_or_none(_read(d / "memory.limit_in_bytes"))
        new_ram = cur_ram if ram is None else _limit(ram, "RAM", zero_is_unlimited=True)
        memsw = d / "memory.memsw.limit_in_bytes"
        if not memsw.exists():
            if swap is not None:
                log.info("%s: no swap accounting (memory.memsw.*) in this kernel; SWAP is not enforced", d)
            _write(d / "memory.limit_in_bytes", -1 if new_ram is None else new_ram)
            return
        cur_memsw = _int_or_none(_read(memsw))
        # OpenVZ's SWAP is swap on top of RAM; v1 limits RAM+swap together, so keep the swap part constant
        # when only RAM changes.
        if swap is None:
            new_swap = None if cur_ram is None or cur_memsw is None else cur_memsw - cur_ram
        else:
            new_swap = _limit(swap, "SWAP", zero_is_unlimited=False)
        new_memsw = None if new_ram is None or new_swap is None else new_ram + new_swap
        if new_memsw is not None and new_swap == 0:
            # With memsw == memory the memsw counter (charged first) is the one that refuses, and since
            # Linux 6.13 only the memory counter keeps a failcnt: one page of slack keeps failcnt meaningful.
            new_memsw += _PAGE
        # memsw must never be below the memory limit: lift it first, then set both in a valid order.
        _write(memsw, -1)
        _write(d / "memory.limit_in_bytes", -1 if new_ram is None else new_ram)
        _write(memsw, -1 if new_memsw is None else new_memsw)

    def limits(self, ve_id: str) -> dict[str, int | str | None]:
        out: dict[str, int | str | None] = {}
        if self._has("memory"):
            d = self._dir("memory", ve_id)
            ram = _int_or_none(_read(d / "memory.limit_in_bytes"))
            memsw = _int_or_none(_read_opt(d / "memory.memsw.limit_in_bytes"))
            out["ram"] = ram
            swap = None if ram is None or memsw is None else memsw - ram
            out["swap"] = 0 if swap == _PAGE else swap  # the slack page of _set_memory
        if self._has("cpu"):
            d = self._dir("cpu", ve_id)
            shares = _read_opt(d / "cpu.shares")
            out["cpuunits"] = shares_to_cpuunits(int(shares)) if shares else None
            quota = int(_read_opt(d / "cpu.cfs_quota_us") or -1)
            period = int(_read_opt(d / "cpu.cfs_period_us") or CFS_PERIOD_US)
            out["cpulimit"] = quota_to_cpulimit(None if quota < 0 else quota, period)
        if self._has("cpuset"):
            d = self._dir("cpuset", ve_id)
            mine, parent = _read_opt(d / "cpuset.cpus") or "", _read_opt(d.parent / "cpuset.cpus") or ""
            out["cpus"] = 0 if mine == parent else len(parse_cpulist(mine))
            out["cpuset"] = mine
        if self._has("pids"):
            out["numproc"] = _int_or_none(_read_opt(self._dir("pids", ve_id) / "pids.max"))
        return out

    def setup_devices(self, ve_id: str, allowed: list[tuple[str, int, int, str]]) -> None:
        """Deny all devices, then allow each (type, major, minor, access); -1 as a number means any."""
        d = self._dir("devices", ve_id)
        rules = [_device_rule(*rule) for rule in allowed]
        _write(d / "devices.deny", "a")
        for rule in rules:
            _write(d / "devices.allow", rule)

    # -- accounting -------------------------------------------------------------------------------------------

    def counters(self, ve_id: str) -> Counters:
        out: Counters = {}
        if self._has("memory"):
            d = self._dir("memory", ve_id)
            # A charge is tried against memsw first, then memory, and the first counter to refuse counts the
            # failure; so the two failcnts count disjoint events and together are OpenVZ's failcnt.
            failcnt = [_int_or_none(_read_opt(d / f)) for f in ("memory.failcnt", "memory.memsw.failcnt")]
            out["memory"] = {
                "held": _int_or_none(_read_opt(d / "memory.usage_in_bytes")),
                "maxheld": _int_or_none(_read_opt(d / "memory.max_usage_in_bytes")),
                "limit": _int_or_none(_read_opt(d / "memory.limit_in_bytes")),
                "failcnt": None if failcnt[0] is None else failcnt[0] + (failcnt[1] or 0),
                "oom_kills": _keyed(_read_opt(d / "memory.oom_control")).get("oom_kill"),
            }
        if self._has("pids"):
            out["numproc"] = _pids_counters(self._dir("pids", ve_id))
        out["cpu"] = {"usage_ns": self.cpu_usage_ns(ve_id)}
        if self._has("cpu"):
            stat = _keyed(_read_opt(self._dir("cpu", ve_id) / "cpu.stat"))
            out["cpu"]["nr_throttled"] = stat.get("nr_throttled")
            out["cpu"]["throttled_ns"] = stat.get("throttled_time")
        return out

    def cpu_usage_ns(self, ve_id: str) -> int:
        return int(_read(self._dir("cpuacct", ve_id) / "cpuacct.usage"))

    # -- freezing -------------------------------------------------------------------------------------------------

    def _freeze(self, ve_id: str) -> bool:
        if not self._has("freezer"):
            log.info("no freezer controller: signalling VE %s without freezing it first", ve_id)
            return False
        state = self._dir("freezer", ve_id) / "freezer.state"
        _write(state, "FROZEN")
        if not _wait_for(lambda: _read(state) == "FROZEN", 5.0):
            log.warning("VE %s did not finish freezing; signalling anyway", ve_id)
        return True

    def _thaw(self, ve_id: str) -> None:
        _write(self._dir("freezer", ve_id) / "freezer.state", "THAWED")
