"""Per-VE control groups on cgroup v1 and cgroup v2.

Every VE gets the cgroup ``vzpkg/<ve_id>``: in each v1 controller hierarchy, or once in the v2 unified
hierarchy. :func:`detect` picks the driver from /proc/self/mountinfo: if the v1 controllers are mounted
(legacy or hybrid hosts) they are where the limits live, so v1 wins; otherwise a cgroup2 mount with
controllers is used.

OpenVZ units are translated here (see docs/ve-config.md for the table): CPUUNITS -> cpu.shares / cpu.weight,
CPULIMIT (percent of one CPU) -> CFS quota, CPUS -> cpuset, RAM/SWAP -> memory limits, NUMPROC -> pids.max.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from vzpkg.errors import ConfigError, VEError

from .layout import CGROUP_NAME_MAX, VEID_NAME_CHARS


class _LazyLog:
    """logging costs ~3 ms to import, on vzctl's hot path; only the rare notes below need it."""

    def __getattr__(self, name: str):
        import logging

        return getattr(logging.getLogger(__name__), name)


log = _LazyLog()

BASE = "vzpkg"
CFS_PERIOD_US = 100_000
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids")
V2_CONTROLLERS = ("cpuset", "cpu", "io", "memory", "pids")
CPUUNITS_MIN, CPUUNITS_MAX = 8, 500_000
SHARES_MIN, SHARES_MAX = 2, 262_144
WEIGHT_MIN, WEIGHT_MAX = 1, 10_000
# v1 reports "no limit" as PAGE_COUNTER_MAX * PAGE_SIZE (9223372036854771712 with 4K pages); anything this
# large is unlimited for our purposes.
_V1_UNLIMITED_FLOOR = 1 << 62
_UNLIMITED = "unlimited"
_PAGE = os.sysconf("SC_PAGE_SIZE")

Limit = int | str | None
Counters = dict[str, dict[str, int | None]]


# ---------------------------------------------------------------------------------------------------------
# OpenVZ unit mapping (pure functions, unit tested)


def check_cpuunits(units: int) -> int:
    if not isinstance(units, int) or not CPUUNITS_MIN <= units <= CPUUNITS_MAX:
        raise ConfigError(f'CPUUNITS="{units}": must be an integer {CPUUNITS_MIN}..{CPUUNITS_MAX}')
    return units


def cpuunits_to_shares(units: int) -> int:
    """v1 cpu.shares: 1000 units (the OpenVZ default) = 1024 shares (the kernel default)."""
    check_cpuunits(units)
    return max(SHARES_MIN, min(SHARES_MAX, units * 1024 // 1000))


def shares_to_cpuunits(shares: int) -> int:
    return round(shares * 1000 / 1024)


def cpuunits_to_weight(units: int) -> int:
    """v2 cpu.weight: 1000 units = weight 100 (the kernel default); proportional, clamped to 1..10000."""
    check_cpuunits(units)
    return max(WEIGHT_MIN, min(WEIGHT_MAX, round(units / 10)))


def weight_to_cpuunits(weight: int) -> int:
    return weight * 10


def cpulimit_to_quota(percent: int, period_us: int = CFS_PERIOD_US) -> int | None:
    """CPULIMIT percent of one CPU -> CFS quota in microseconds per period; 0 -> None (no quota)."""
    if not isinstance(percent, int) or percent < 0:
        raise ConfigError(f'CPULIMIT="{percent}": must be an integer percent of one CPU (100 per core, 0 = unlimited)')
    if percent == 0:
        return None
    # The kernel refuses quotas below 1 ms.
    return max(1000, percent * period_us // 100)


def quota_to_cpulimit(quota_us: int | None, period_us: int = CFS_PERIOD_US) -> int:
    return 0 if quota_us is None else round(quota_us * 100 / period_us)


def parse_cpulist(text: str) -> list[int]:
    """Kernel cpu list '0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def format_cpulist(cpus: Iterable[int]) -> str:
    ordered = sorted(set(cpus))
    ranges: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        ranges.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(ranges)


def first_cpus(available: str, n: int) -> str:
    """The first n CPUs of a cpu list (all of them when n is 0 or more than there are)."""
    cpus = parse_cpulist(available)
    if n and n > len(cpus):
        log.info("CPUS=%d but only %d CPUs are available; using all of them", n, len(cpus))
    return format_cpulist(cpus[:n] if n else cpus)


def _limit(value: int | str, what: str, *, zero_is_unlimited: bool) -> int | None:
    """Normalize a limit argument: int bytes/count, or 'unlimited' (-> None)."""
    if isinstance(value, str):
        if value.lower() in (_UNLIMITED, "max"):
            return None
        raise ConfigError(f'{what}="{value}": must be a number or "unlimited"')
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f'{what}="{value}": must be a non-negative integer or "unlimited"')
    return None if value == 0 and zero_is_unlimited else value


def _check_ve_id(ve_id: str) -> str:
    # the runtime passes <root tag>-<VEID> (layout.cgroup_name); a directory name: no '/', '.' or '..'
    if not (0 < len(ve_id) <= CGROUP_NAME_MAX and ve_id not in (".", "..") and set(ve_id) <= VEID_NAME_CHARS):
        raise VEError(f'VE id "{ve_id}": must be 1-{CGROUP_NAME_MAX} letters, digits, ".", "_" or "-"')
    return ve_id


# ---------------------------------------------------------------------------------------------------------
# file helpers


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as e:
        raise VEError(f"cannot read {path}: {e.strerror}") from None


def _read_opt(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (FileNotFoundError, OSError):
        return None


def _write(path: Path, value: str | int) -> None:
    try:
        with open(path, "w") as f:
            f.write(str(value))
    except OSError as e:
        raise VEError(f"cannot write {str(value)!r} to {path}: {e.strerror}") from None


def _int_or_none(text: str | None, unlimited: Iterable[str] = ("max",)) -> int | None:
    if text is None or text in unlimited:
        return None
    n = int(text)
    return None if n >= _V1_UNLIMITED_FLOOR else n


def _keyed(text: str | None) -> dict[str, int]:
    """'key value' lines (memory.events, cpu.stat, pids.events, oom_control) -> dict."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _procs(path: Path) -> list[int]:
    text = _read_opt(path)
    return [int(x) for x in text.split()] if text else []


def _mkdir(path: Path) -> bool:
    """mkdir that tolerates a concurrent creator; returns True if this call created it."""
    try:
        path.mkdir()
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise VEError(f"cannot create cgroup {path}: {e.strerror}") from None


def _rmdir(path: Path, timeout: float = 2.0) -> None:
    # Just after the last task exits the kernel may still hold the cgroup for a moment (EBUSY).
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise VEError(f"cannot remove cgroup {path}: {e.strerror}; stop the VE's processes first") from None
            time.sleep(0.02)


def _wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ---------------------------------------------------------------------------------------------------------
# mount detection


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
        mnt, fstype, opts = Path(_unescape(fields[4])), tail[0], tail[2].split(",")
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
        return V1Driver(v1)
    if v2 is not None and _read_opt(v2 / "cgroup.controllers"):
        return V2Driver(v2)
    raise VEError(
        "no usable cgroup hierarchy: mount cgroup2 at /sys/fs/cgroup (or the v1 controllers) and enable "
        "the cpu, memory and pids controllers"
    )


# ---------------------------------------------------------------------------------------------------------
# drivers


class CgroupDriver:
    """What the runtime needs from cgroups; V1Driver and V2Driver implement it."""

    version: int = 0

    # -- layout, provided by the subclasses ------------------------------------------------------------------

    def _dirs(self, ve_id: str) -> list[Path]:
        """Every directory that makes up the VE's cgroup (one per v1 hierarchy; one in v2)."""
        raise NotImplementedError

    def create(self, ve_id: str) -> None:
        raise NotImplementedError

    def set_limits(
        self,
        ve_id: str,
        *,
        ram: Limit = None,
        swap: Limit = None,
        cpuunits: int | None = None,
        cpulimit: int | None = None,
        cpus: int | None = None,
        numproc: Limit = None,
    ) -> None:
        raise NotImplementedError

    def limits(self, ve_id: str) -> dict[str, int | str | None]:
        """Current limits read back in OpenVZ units (None = unlimited)."""
        raise NotImplementedError

    def setup_devices(self, ve_id: str, allowed: list[tuple[str, int, int, str]]) -> None:
        raise NotImplementedError

    def counters(self, ve_id: str) -> Counters:
        raise NotImplementedError

    def cpu_usage_ns(self, ve_id: str) -> int:
        raise NotImplementedError

    def _freeze(self, ve_id: str) -> bool:
        raise NotImplementedError

    def _thaw(self, ve_id: str) -> None:
        raise NotImplementedError

    def _kill_fast(self, ve_id: str, sig: int) -> bool:
        """A kernel-side kill of the whole cgroup, if there is one (v2 cgroup.kill)."""
        return False

    # -- shared behaviour -------------------------------------------------------------------------------------

    def procs_files(self, ve_id: str) -> list[Path]:
        return [d / "cgroup.procs" for d in self._dirs(_check_ve_id(ve_id))]

    def exists(self, ve_id: str) -> bool:
        return any(d.is_dir() for d in self._dirs(_check_ve_id(ve_id)))

    def attach(self, ve_id: str, pid: int) -> None:
        for f in self.procs_files(ve_id):
            _write(f, pid)

    def attach_self_fn(self, ve_id: str) -> Callable[[], None]:
        """A function for a forked child (preexec_fn) that moves the calling process into the VE's cgroups.

        Paths are encoded up front so the child does no allocation-heavy work or imports before exec.
        """
        paths = [os.fsencode(f) for f in self.procs_files(ve_id)]

        def attach_self() -> None:
            for p in paths:
                fd = os.open(p, os.O_WRONLY)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)

        return attach_self

    def pids(self, ve_id: str) -> list[int]:
        found: set[int] = set()
        for f in self.procs_files(ve_id):
            found.update(_procs(f))
        return sorted(found)

    def kill_all(self, ve_id: str, sig: int = signal.SIGKILL, *, wait: bool = True, timeout: float = 10.0) -> None:
        """Signal every process of the VE; with wait, return only once the cgroup is empty.

        The cgroup is frozen while signalling so a fork loop cannot outrun us.
        """
        if not self.exists(ve_id):
            return
        if not self._kill_fast(ve_id, sig):
            frozen = self._freeze(ve_id)
            try:
                self._signal(self.pids(ve_id), sig)
            finally:
                if frozen:
                    self._thaw(ve_id)
        if not wait:
            return

        def empty() -> bool:
            left = self.pids(ve_id)
            if left and sig == signal.SIGKILL:
                self._signal(left, sig)  # children forked before the freeze took hold
            return not left

        if not _wait_for(empty, timeout):
            left = self.pids(ve_id)
            raise VEError(
                f"VE {ve_id}: {len(left)} process(es) still running {timeout:g}s after signal {sig} "
                f"(pids {' '.join(map(str, left[:10]))}); they may be in uninterruptible sleep — retry, or "
                "use signal 9"
            )

    @staticmethod
    def _signal(pids: list[int], sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def remove(self, ve_id: str) -> None:
        """Remove the VE's cgroups (empty them with kill_all first). The shared parent is left in place."""
        for d in self._dirs(_check_ve_id(ve_id)):
            _rmdir(d)


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

    def set_limits(
        self,
        ve_id: str,
        *,
        ram: Limit = None,
        swap: Limit = None,
        cpuunits: int | None = None,
        cpulimit: int | None = None,
        cpus: int | None = None,
        numproc: Limit = None,
    ) -> None:
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

    def set_limits(
        self,
        ve_id: str,
        *,
        ram: Limit = None,
        swap: Limit = None,
        cpuunits: int | None = None,
        cpulimit: int | None = None,
        cpus: int | None = None,
        numproc: Limit = None,
    ) -> None:
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
        from . import bpfdev

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


def _pids_counters(d: Path) -> dict[str, int | None]:
    return {
        "held": _int_or_none(_read_opt(d / "pids.current")),
        "maxheld": _int_or_none(_read_opt(d / "pids.peak")),
        "limit": _int_or_none(_read_opt(d / "pids.max")),
        # pids.events "max" counts forks refused by pids.max.
        "failcnt": _keyed(_read_opt(d / "pids.events")).get("max"),
    }


def _device_rule(kind: str, major: int, minor: int, access: str) -> str:
    """('c', 1, 3, 'rwm') -> 'c 1:3 rwm' (v1 devices.allow syntax); -1 means any number."""
    if kind not in ("a", "b", "c") or not access or set(access) - set("rwm"):
        raise ConfigError(f"device rule {(kind, major, minor, access)}: type must be a/b/c and access from 'rwm'")
    if kind == "a":
        return "a"

    def num(n: int) -> str:
        return "*" if n == -1 else str(n)

    return f"{kind} {num(major)}:{num(minor)} {access}"
