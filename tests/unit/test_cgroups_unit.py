"""cgroups without root: OpenVZ unit mapping, mount detection, and the files both drivers write (fake trees)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from vzpkg.errors import ConfigError, VEError
from vzpkg.runtime import cgroups
from vzpkg.runtime.cgroups import (
    V1Driver,
    V2Driver,
    cpulimit_to_quota,
    cpuunits_to_shares,
    cpuunits_to_weight,
    detect,
    first_cpus,
    format_cpulist,
    parse_cpulist,
    parse_mountinfo,
    quota_to_cpulimit,
    shares_to_cpuunits,
    weight_to_cpuunits,
)
from vzpkg.runtime.limits import Limits

V1_UNLIMITED = "9223372036854771712"

# -- unit mapping ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("units", "shares"), [(8, 8), (250, 256), (1000, 1024), (3000, 3072), (256000, 262144), (500000, 262144)]
)
def test_cpuunits_to_shares(units: int, shares: int) -> None:
    assert cpuunits_to_shares(units) == shares


@pytest.mark.parametrize("units", [8, 500, 1000, 3000, 100000])
def test_shares_round_trip(units: int) -> None:
    assert abs(shares_to_cpuunits(cpuunits_to_shares(units)) - units) <= 1


@pytest.mark.parametrize(
    ("units", "weight"), [(8, 1), (14, 1), (15, 2), (1000, 100), (3000, 300), (100000, 10000), (500000, 10000)]
)
def test_cpuunits_to_weight(units: int, weight: int) -> None:
    assert cpuunits_to_weight(units) == weight


def test_weight_ratio_is_proportional() -> None:
    assert cpuunits_to_weight(3000) / cpuunits_to_weight(1000) == 3
    assert weight_to_cpuunits(cpuunits_to_weight(2500)) == 2500


@pytest.mark.parametrize("units", [0, 7, 500001, -1])
def test_cpuunits_out_of_range(units: int) -> None:
    with pytest.raises(ConfigError, match=rf'^CPUUNITS="{units}": must be an integer 8..500000$'):
        cpuunits_to_shares(units)
    with pytest.raises(ConfigError):
        cpuunits_to_weight(units)


@pytest.mark.parametrize(("percent", "quota"), [(0, None), (1, 1000), (25, 25000), (100, 100000), (250, 250000)])
def test_cpulimit_to_quota(percent: int, quota: int | None) -> None:
    assert cpulimit_to_quota(percent) == quota
    assert quota_to_cpulimit(quota) == percent


def test_cpulimit_custom_period_and_floor() -> None:
    assert cpulimit_to_quota(50, 200_000) == 100_000
    assert cpulimit_to_quota(1, 10_000) == 1000  # the kernel's 1 ms minimum
    with pytest.raises(ConfigError, match="CPULIMIT"):
        cpulimit_to_quota(-5)


@pytest.mark.parametrize(
    ("text", "cpus"), [("0", [0]), ("0-3", [0, 1, 2, 3]), ("0-1,4,6-7\n", [0, 1, 4, 6, 7]), ("", [])]
)
def test_cpulist(text: str, cpus: list[int]) -> None:
    assert parse_cpulist(text) == cpus
    assert parse_cpulist(format_cpulist(cpus)) == cpus


def test_format_cpulist_compacts() -> None:
    assert format_cpulist([3, 0, 1, 2, 8, 10, 11]) == "0-3,8,10-11"


@pytest.mark.parametrize(
    ("available", "n", "expected"), [("0-7", 1, "0"), ("0-7", 3, "0-2"), ("2,4-6", 2, "2,4"), ("0-1", 0, "0-1"), ("0-1", 5, "0-1")]
)
def test_first_cpus(available: str, n: int, expected: str) -> None:
    assert first_cpus(available, n) == expected


# -- mount detection -------------------------------------------------------------------------------------------

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_parse_mountinfo_hybrid_with_comounted_controllers() -> None:
    v1, v2 = parse_mountinfo(HYBRID)
    assert v1["cpu"] == v1["cpuacct"] == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert v1["memory"] == Path("/sys/fs/cgroup/memory")
    assert "systemd" not in v1 and "freezer" not in v1
    assert v2 == Path("/sys/fs/cgroup/unified")
    drv = detect(HYBRID)
    assert isinstance(drv, V1Driver) and drv.version == 1
    # co-mounted controllers share one directory, so the VE has one cgroup there, not two
    assert len(drv._dirs("x")) == 4


def test_parse_mountinfo_unescapes_octal() -> None:
    v1, _ = parse_mountinfo("1 2 0:1 / /mnt/my\\040cg rw - cgroup cgroup rw,memory\n")
    assert v1["memory"] == Path("/mnt/my cg")


def test_detect_pure_v2(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    drv = detect(f"30 23 0:26 / {tmp_path} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")
    assert isinstance(drv, V2Driver) and drv.version == 2
    assert drv.controllers() == ["cpuset", "cpu", "io", "memory", "pids"]


def test_detect_nothing_usable(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("")
    with pytest.raises(VEError, match="no usable cgroup hierarchy"):
        detect(f"30 23 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n")


# -- V2 driver against a fake tree -----------------------------------------------------------------------------


@pytest.fixture
def v2(tmp_path: Path) -> V2Driver:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    (tmp_path / "cpuset.cpus.effective").write_text("0-7\n")
    drv = V2Driver(tmp_path)
    drv.create("101")
    return drv


def read(path: Path) -> str:
    return path.read_text().strip()


def test_v2_create_delegates_controllers(v2: V2Driver) -> None:
    enabled = "+cpuset +cpu +io +memory +pids"
    assert read(v2.root / "cgroup.subtree_control") == enabled
    assert read(v2.root / "vzpkg" / "cgroup.subtree_control") == enabled
    assert (v2.root / "vzpkg" / "101").is_dir()
    assert v2.exists("101") and not v2.exists("102")
    v2.create("101")  # idempotent
    assert v2.procs_files("101") == [v2.root / "vzpkg" / "101" / "cgroup.procs"]


def test_v2_set_limits_writes_files(v2: V2Driver) -> None:
    v2.set_limits("101", Limits(ram=64 << 20, swap=32 << 20, cpuunits=3000, cpulimit=25, cpus=2, numproc=20))
    d = v2.root / "vzpkg" / "101"
    assert read(d / "memory.max") == str(64 << 20)
    assert read(d / "memory.swap.max") == str(32 << 20)  # v2 swap is swap alone, like OpenVZ's SWAP
    assert read(d / "cpu.weight") == "300"
    assert read(d / "cpu.max") == "25000 100000"
    assert read(d / "cpuset.cpus") == "0-1"
    assert read(d / "pids.max") == "20"
    assert v2.limits("101") == {
        "ram": 64 << 20, "swap": 32 << 20, "numproc": 20, "cpuunits": 3000, "cpulimit": 25, "cpus": 2, "cpuset": "0-1"
    }  # fmt: skip


def test_v2_none_leaves_values_alone(v2: V2Driver) -> None:
    v2.set_limits("101", Limits(ram=64 << 20, numproc=20))
    v2.set_limits("101", Limits(cpuunits=1000))
    d = v2.root / "vzpkg" / "101"
    assert read(d / "memory.max") == str(64 << 20)
    assert read(d / "pids.max") == "20"
    assert not (d / "cpu.max").exists()


def test_v2_unlimited(v2: V2Driver) -> None:
    v2.set_limits("101", Limits(ram=0, swap="unlimited", cpulimit=0, cpus=0, numproc="unlimited"))
    d = v2.root / "vzpkg" / "101"
    assert read(d / "memory.max") == "max"
    assert read(d / "memory.swap.max") == "max"
    assert read(d / "cpu.max") == "max 100000"
    assert read(d / "cpuset.cpus") == ""
    assert read(d / "pids.max") == "max"
    v2.set_limits("101", Limits(swap=0))
    assert read(d / "memory.swap.max") == "0"  # SWAP=0 means no swap, not unlimited


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"cpuunits": 5}, "CPUUNITS"),
        ({"cpulimit": -1}, "CPULIMIT"),
        ({"cpus": -2}, "CPUS"),
        ({"ram": -1}, "RAM"),
        ({"ram": "lots"}, "RAM"),
        ({"numproc": "many"}, "NUMPROC"),
    ],
)
def test_v2_invalid_limits(v2: V2Driver, kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        v2.set_limits("101", Limits(**kwargs))  # type: ignore[arg-type]


def test_v2_counters(v2: V2Driver) -> None:
    d = v2.root / "vzpkg" / "101"
    (d / "memory.current").write_text("1048576\n")
    (d / "memory.peak").write_text("2097152\n")
    (d / "memory.max").write_text("max\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\noom_group_kill 0\n")
    (d / "pids.current").write_text("3\n")
    (d / "pids.max").write_text("20\n")
    (d / "pids.events").write_text("max 180\n")
    (d / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_throttled 4\nthrottled_usec 20\n")
    c = v2.counters("101")
    assert c["memory"] == {"held": 1 << 20, "maxheld": 2 << 20, "limit": None, "failcnt": 7, "oom_kills": 1}
    assert c["numproc"] == {"held": 3, "maxheld": None, "limit": 20, "failcnt": 180}
    assert c["cpu"] == {"usage_ns": 1_500_000, "nr_throttled": 4, "throttled_ns": 20_000}
    assert v2.cpu_usage_ns("101") == 1_500_000


def test_v2_attach(v2: V2Driver) -> None:
    procs = v2.root / "vzpkg" / "101" / "cgroup.procs"
    v2.attach("101", 4242)
    assert read(procs) == "4242"
    procs.write_text("")  # the real file has no content to overwrite; the fake one must be emptied
    v2.attach_self_fn("101")()
    assert read(procs) == "0"  # "0" means "the writing process" to the kernel


@pytest.fixture
def sleeper() -> subprocess.Popen[bytes]:
    p = subprocess.Popen(["sleep", "30"])
    yield p
    p.kill()
    p.wait()


def test_v2_kill_all_freezes_signals_thaws(v2: V2Driver, sleeper: subprocess.Popen[bytes]) -> None:
    d = v2.root / "vzpkg" / "101"
    (d / "cgroup.procs").write_text(f"{sleeper.pid}\n")
    (d / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    v2.kill_all("101", signal.SIGTERM, wait=False)
    assert sleeper.wait(5) == -signal.SIGTERM
    assert read(d / "cgroup.freeze") == "0"  # thawed again


def test_v2_kill_all_prefers_cgroup_kill(v2: V2Driver) -> None:
    d = v2.root / "vzpkg" / "101"
    (d / "cgroup.kill").write_text("")
    v2.kill_all("101")  # the fake cgroup.procs is empty, so waiting ends at once
    assert read(d / "cgroup.kill") == "1"
    assert not (d / "cgroup.freeze").exists()


def test_v2_setup_devices_validates_and_skips(v2: V2Driver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="vzpkg.runtime.cgroups")
    v2.setup_devices("101", [("c", 1, 3, "rwm"), ("c", 136, -1, "rw")])
    assert "BPF" in caplog.text
    with pytest.raises(ConfigError, match="device rule"):
        v2.setup_devices("101", [("x", 1, 3, "rwm")])


def test_v2_remove_is_idempotent(v2: V2Driver) -> None:
    v2.remove("101")  # a fake tree's dir is a plain empty directory, like an emptied cgroup
    assert not v2.exists("101")
    v2.remove("101")


@pytest.mark.parametrize("bad", ["", "..", ".", "a/b", "../etc", "x" * 81, "sp ace", "ünï"])
def test_ve_id_validation(v2: V2Driver, bad: str) -> None:
    with pytest.raises(VEError, match="VE id"):
        v2.create(bad)


# -- V1 driver against a fake tree -----------------------------------------------------------------------------


@pytest.fixture
def v1(tmp_path: Path) -> V1Driver:
    mounts = {c: tmp_path / c for c in ("cpu", "cpuacct", "cpuset", "memory", "pids", "freezer", "devices")}
    for m in mounts.values():
        m.mkdir()
    (mounts["cpuset"] / "cpuset.cpus").write_text("0-3\n")
    (mounts["cpuset"] / "cpuset.mems").write_text("0\n")
    drv = V1Driver(mounts)
    drv.create("101")
    d = mounts["memory"] / "vzpkg" / "101"
    (d / "memory.limit_in_bytes").write_text(V1_UNLIMITED)
    (d / "memory.memsw.limit_in_bytes").write_text(V1_UNLIMITED)
    return drv


def test_v1_create_copies_cpuset_to_parent_and_child(v1: V1Driver) -> None:
    for cg in (v1.mounts["cpuset"] / "vzpkg", v1.mounts["cpuset"] / "vzpkg" / "101"):
        assert read(cg / "cpuset.cpus") == "0-3"
        assert read(cg / "cpuset.mems") == "0"
    assert len(v1.procs_files("101")) == 7


def test_v1_cpu_limits(v1: V1Driver) -> None:
    v1.set_limits("101", Limits(cpuunits=3000, cpulimit=25, cpus=1, numproc=20))
    cpu = v1.mounts["cpu"] / "vzpkg" / "101"
    assert read(cpu / "cpu.shares") == "3072"
    assert read(cpu / "cpu.cfs_quota_us") == "25000"
    assert read(cpu / "cpu.cfs_period_us") == "100000"
    assert read(v1.mounts["cpuset"] / "vzpkg" / "101" / "cpuset.cpus") == "0"
    assert read(v1.mounts["pids"] / "vzpkg" / "101" / "pids.max") == "20"
    v1.set_limits("101", Limits(cpulimit=0, cpus=0, numproc=0))
    assert read(cpu / "cpu.cfs_quota_us") == "-1"
    assert read(v1.mounts["cpuset"] / "vzpkg" / "101" / "cpuset.cpus") == "0-3"
    assert read(v1.mounts["pids"] / "vzpkg" / "101" / "pids.max") == "max"


def test_v1_memsw_is_ram_plus_swap(v1: V1Driver) -> None:
    d = v1.mounts["memory"] / "vzpkg" / "101"
    v1.set_limits("101", Limits(ram=64 << 20, swap=32 << 20))
    assert read(d / "memory.limit_in_bytes") == str(64 << 20)
    assert read(d / "memory.memsw.limit_in_bytes") == str(96 << 20)
    v1.set_limits("101", Limits(ram=128 << 20))  # the swap allowance stays 32M
    assert read(d / "memory.memsw.limit_in_bytes") == str(160 << 20)
    v1.set_limits("101", Limits(swap=0))  # no swap: memsw = RAM plus one page, so the memory counter binds first
    assert read(d / "memory.memsw.limit_in_bytes") == str((128 << 20) + os.sysconf("SC_PAGE_SIZE"))
    assert v1.limits("101")["swap"] == 0
    v1.set_limits("101", Limits(swap="unlimited"))
    assert read(d / "memory.memsw.limit_in_bytes") == "-1"
    v1.set_limits("101", Limits(ram="unlimited", swap=0))
    assert read(d / "memory.limit_in_bytes") == "-1"
    assert read(d / "memory.memsw.limit_in_bytes") == "-1"  # unlimited RAM cannot bound RAM+swap


def test_v1_without_swap_accounting(v1: V1Driver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="vzpkg.runtime.cgroups")
    d = v1.mounts["memory"] / "vzpkg" / "101"
    (d / "memory.memsw.limit_in_bytes").unlink()
    v1.set_limits("101", Limits(ram=64 << 20, swap=0))
    assert read(d / "memory.limit_in_bytes") == str(64 << 20)
    assert "SWAP is not enforced" in caplog.text


def test_v1_devices(v1: V1Driver) -> None:
    v1.setup_devices("101", [("c", 1, 3, "rwm"), ("c", 136, -1, "rw")])
    d = v1.mounts["devices"] / "vzpkg" / "101"
    assert read(d / "devices.deny") == "a"
    assert read(d / "devices.allow") == "c 136:* rw"  # the last write; the real file keeps a list


def test_v1_missing_controller_is_named(tmp_path: Path) -> None:
    drv = V1Driver({"memory": tmp_path})
    drv.create("101")
    with pytest.raises(VEError, match="'pids' is not mounted"):
        drv.set_limits("101", Limits(numproc=5))


def test_pids_union_across_hierarchies(v1: V1Driver) -> None:
    files = v1.procs_files("101")
    files[0].write_text("10\n11\n")
    files[1].write_text("11\n12\n")
    assert v1.pids("101") == [10, 11, 12]


def test_attach_self_fn_in_forked_child(v1: V1Driver) -> None:
    fn = v1.attach_self_fn("101")
    for f in v1.procs_files("101"):
        f.write_text("")  # attach_self_fn never creates files: on cgroupfs they always exist
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            fn()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert all(read(f) == "0" for f in v1.procs_files("101"))


def test_module_constants() -> None:
    assert cgroups.BASE == "vzpkg"
    assert cgroups.CFS_PERIOD_US == 100_000


def test_limits_is_a_frozen_value() -> None:
    limits = Limits(ram=64 << 20, numproc="unlimited")
    assert limits == Limits(numproc="unlimited", ram=64 << 20) and limits != Limits(ram=64 << 20)
    assert limits.swap is None and limits.as_dict()["numproc"] == "unlimited"
    assert repr(limits) == "Limits(ram=67108864, numproc='unlimited')"
    with pytest.raises(AttributeError):
        limits.ram = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        Limits(diskspace=1)  # type: ignore[call-arg]
