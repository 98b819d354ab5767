"""What both cgroup drivers share: OpenVZ's resource units and the cgroup values they map to, both ways (pure
functions: CPUUNITS <-> cpu.shares (v1) / cpu.weight (v2), CPULIMIT <-> CFS quota, CPUS <-> cpuset lists); the
CgroupDriver interface and its version-independent half (attach, pids, kill_all, remove); the VE id check and
small helpers for cgroup files. One module rather than two: each module costs ~0.1 ms of `vzctl start`."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from vzpkg.errors import ConfigError, VEError

from ..layout import CGROUP_NAME_MAX, VEID_NAME_CHARS
from ..limits import Limits


class _LazyLog:
    """logging costs ~3 ms to import, on vzctl's hot path; only the rare notes below need it."""

    def __getattr__(self, name: str):
        import logging

        return getattr(logging.getLogger("vzpkg.runtime.cgroups"), name)


log = _LazyLog()

CFS_PERIOD_US = 100_000
CPUUNITS_MIN, CPUUNITS_MAX = 8, 500_000
SHARES_MIN, SHARES_MAX = 2, 262_144
WEIGHT_MIN, WEIGHT_MAX = 1, 10_000
_UNLIMITED = "unlimited"



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


# ---------------------------------------------------------------------------------------------------------
# the drivers' shared part

BASE = "vzpkg"
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids")
V2_CONTROLLERS = ("cpuset", "cpu", "io", "memory", "pids")
# v1 reports "no limit" as PAGE_COUNTER_MAX * PAGE_SIZE (9223372036854771712 with 4K pages); anything this
# large is unlimited for our purposes.
_V1_UNLIMITED_FLOOR = 1 << 62
_PAGE = os.sysconf("SC_PAGE_SIZE")

Counters = dict[str, dict[str, int | None]]


def _check_ve_id(ve_id: str) -> str:
    # the runtime passes <root tag>-<VEID> (layout.cgroup_name); a directory name: no '/', '.' or '..'
    if not (0 < len(ve_id) <= CGROUP_NAME_MAX and ve_id not in (".", "..") and set(ve_id) <= VEID_NAME_CHARS):
        raise VEError(f'VE id "{ve_id}": must be 1-{CGROUP_NAME_MAX} letters, digits, ".", "_" or "-"')
    return ve_id


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


class CgroupDriver:
    """What the runtime needs from cgroups; V1Driver and V2Driver implement it."""

    version: int = 0

    # -- layout, provided by the subclasses ------------------------------------------------------------------

    def _dirs(self, ve_id: str) -> list[Path]:
        """Every directory that makes up the VE's cgroup (one per v1 hierarchy; one in v2)."""
        raise NotImplementedError

    def create(self, ve_id: str) -> None:
        raise NotImplementedError

    def set_limits(self, ve_id: str, limits: Limits) -> None:
        """Apply LIMITS to the VE's cgroup; a None field is left as it is."""
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

    def self_join_files(self, ve_id: str) -> list[Path]:
        """Files to which a single-threaded process writes "0" to move itself into the VE's cgroups without an RCU
        grace period (v1 `tasks`: see V1Driver); [] where there are none (v2: the parent attaches the pid)."""
        return []

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
