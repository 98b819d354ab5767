"""Bad input to vzctl and vzlist: refused with one line and its exit code, nothing changed, nothing left."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from .conftest import PROJECT, cgroup_dirs, cgroup_name, mounts_below

pytestmark = pytest.mark.root


def one_error_line(p: subprocess.CompletedProcess[str], prog: str = "vzctl") -> str:
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


def _sha_line(conf_text: str) -> str:
    return next(line for line in conf_text.splitlines() if line.startswith("TEMPLATE_SHA256="))


@pytest.mark.parametrize("edit", ["drop", "empty", "short"])
def test_config_without_template_sha256_is_refused(rt, edit):
    """Without a valid TEMPLATE_SHA256 the VE's lower layer would be the whole template area: start and mount
    refuse (exit 13, naming the config file and what to do) and set up nothing."""
    veid = rt.create(start=False)
    conf = rt.root / "conf" / f"{veid}.conf"
    good = conf.read_text()
    line = _sha_line(good)
    bad = {"drop": "", "empty": 'TEMPLATE_SHA256=""', "short": 'TEMPLATE_SHA256="abc123"'}[edit]
    conf.write_text(good.replace(line, bad))
    for cmd in ("start", "mount"):
        p = rt.vzctl(cmd, veid, check=False)
        msg = one_error_line(p)
        assert p.returncode == 13, p.stderr
        assert str(conf) in msg and "TEMPLATE_SHA256" in msg and "recreate the VE" in msg
        assert mounts_below(rt.ve_root(veid)) == [] and rt.cgroup_dirs(veid) == []
    assert rt.vzctl("status", veid).stdout.strip().endswith("unmounted down")
    conf.write_text(good)
    rt.vzctl("start", veid)
    assert rt.vzctl("exec", veid, "true").returncode == 0


@pytest.mark.parametrize("opt,value,key,accepted", [
    ("--numproc", "5000000", "NUMPROC", "1..4194304"),
    ("--cpulimit", "99999999999999", "CPULIMIT", "0..819200"),
    ("--ram", "99999999999T", "RAM", "16M..1024T"),
    ("--swap", "99999999999T", "SWAP", "0..1024T"),
    ("--cpuunits", "500001", "CPUUNITS", "8..500000"),
    ("--cpus", "9000", "CPUS", "0..8192"),
])
def test_limits_beyond_the_kernel_are_refused(rt, opt, value, key, accepted):
    """set refuses, in one line naming the key and the accepted range; the config is unchanged and the VE starts."""
    veid = rt.create(start=False)
    conf = rt.root / "conf" / f"{veid}.conf"
    before = conf.read_text()
    p = rt.vzctl("set", veid, opt, value, "--save", check=False)
    msg = one_error_line(p)
    assert p.returncode == 13 and key in msg and value in msg and accepted in msg
    assert conf.read_text() == before
    rt.vzctl("start", veid)
    # a hand-edited config with the value is refused at start, naming the file
    rt.vzctl("stop", veid)
    conf.write_text(before + f'{key}="{value}"\n')
    p = rt.vzctl("start", veid, check=False)
    msg = one_error_line(p)
    assert p.returncode == 13 and str(conf) in msg and accepted in msg


@pytest.mark.ve(numproc=4194304, cpulimit=819200, ram="1024T", swap="1024T", cpus=8192, cpuunits=500000)
def test_largest_accepted_limits_start(ve):
    """The upper ends of the ranges are what the kernel takes: the VE starts with them."""
    assert ve.status(beancounters=True).beancounters["numproc"]["limit"] == 4194304
    assert ve.exec(["true"]).returncode == 0


@pytest.mark.parametrize("timeout", ["nan", "inf", "-inf", "1e300", "-1", "3601", "soon"])
def test_bad_stop_timeouts_are_usage_errors(rt, timeout):
    veid = rt.create()
    pid = rt.init_pid(veid)
    for cmd in ("stop", "restart"):
        for args in (["--timeout", timeout], [f"--timeout={timeout}"]):
            p = rt.vzctl(cmd, veid, *args, check=False)
            msg = one_error_line(p)
            assert p.returncode == 2 and "--timeout" in msg and "3600" in msg, msg
    assert rt.init_pid(veid) == pid and rt.vzctl("exec", veid, "true").returncode == 0


def test_stop_in_the_library_survives_any_timeout(ve):
    """The library clamps what the CLI refuses: stop never fails half-way, and leaves nothing behind."""
    for t in (math.nan, math.inf, 1e300, -5.0):
        assert ve.stop(timeout=t) is True
        assert cgroup_dirs(cgroup_name(ve.root, ve.veid)) == [] and mounts_below(ve.root / "root" / ve.veid) == []
        ve.start()


@pytest.mark.parametrize("veid,why", [("0", "host"), ("0101", "leading zeros"), ("-5", "cannot start with '-'"),
                                      ("2147483648", "1..2147483647"), ("00", "host")])
def test_bad_veids_are_usage_errors(rt, veid, why):
    for args in (["create", veid, "--ostemplate", rt.template], ["start", veid], ["stop", veid],
                 ["destroy", veid], ["status", veid]):
        p = rt.vzctl(*args, check=False)
        msg = one_error_line(p)
        assert p.returncode == 2 and why in msg, msg
    assert not (rt.root / "conf" / f"{veid}.conf").exists()
    assert not (rt.root / "lock" / f"{veid}.lock").exists()
    assert not rt.private(veid).exists()


def test_option_like_veid(rt):
    p = rt.vzctl("start", "--foo", check=False)
    one_error_line(p)
    assert p.returncode == 2


def _vzlist(rt, *args):
    return subprocess.run([sys.executable, "-m", "vzpkg.cli.vzlist", *args], env=rt.env, capture_output=True,
                          text=True, cwd=PROJECT)


def test_vzlist_of_an_unknown_ve_is_an_error(rt):
    veid = rt.create(start=False)
    p = _vzlist(rt, "nosuch")
    msg = one_error_line(p, "vzlist")
    assert p.returncode == 31 and "nosuch" in msg and "does not exist" in msg and p.stdout == ""
    p = _vzlist(rt, "-a", veid, "nosuch")
    assert p.returncode == 31
    p = _vzlist(rt, "0101")
    assert p.returncode == 2 and "leading zeros" in one_error_line(p, "vzlist")
    p = _vzlist(rt, "-a", "-H", "-o", "veid", veid)
    assert p.returncode == 0 and p.stdout.split() == [veid]
    # a stray file that is no VE's config does not break the listing
    (rt.root / "conf" / "0101.conf").write_text("")
    try:
        p = _vzlist(rt, "-a", "-H", "-o", "veid")
        assert p.returncode == 0 and "0101" not in p.stdout.split()
    finally:
        os.unlink(rt.root / "conf" / "0101.conf")
