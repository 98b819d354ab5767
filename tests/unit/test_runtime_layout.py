"""Unit tests of the runtime's pure parts: VEIDs, paths, state records, init source, CLI parsing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vzpkg.errors import UsageError
from vzpkg.runtime import layout as L
from vzpkg.runtime import state


@pytest.mark.parametrize("veid", ["101", "1", "2147483647", "web", "web-1.example", "a_b", "A" * 64])
def test_valid_veids(veid):
    assert L.check_veid(veid) == veid


@pytest.mark.parametrize("veid", ["", "../x", "a/b", ".", "..", "-x", "1a", "x" * 65, "a b", "é", "0", "00", "0101",
                                  "-5", "--foo", "2147483648", "99999999999", "\uff11"])
def test_invalid_veids(veid):
    with pytest.raises(UsageError) as exc:
        L.check_veid(veid)
    assert "\n" not in str(exc.value)


def test_invalid_veid_messages_say_why():
    with pytest.raises(UsageError, match="host"):
        L.check_veid("0")
    with pytest.raises(UsageError, match=r"without leading zeros \(101\)"):
        L.check_veid("0101")
    with pytest.raises(UsageError, match="cannot start with '-'"):
        L.check_veid("-5")


def test_the_veid_rule_is_the_one_of_its_users(tmp_path):
    """The VEID rule is defined once (layout): the cgroup driver takes the cgroup name of every valid VEID (the
    longest too) and refuses a longer one; the config's NAME takes a name VEID and refuses what no VEID could be
    named by (too long, other characters); the messages state the rule's numbers."""
    from vzpkg.errors import ConfigError, VEError
    from vzpkg.runtime import cgroups
    from vzpkg.runtime.conf import VEConfig

    lay = L.Layout(tmp_path)
    longest = "w" + "x" * (L.VEID_NAME_MAX - 1)
    for veid in (longest, str(L.VEID_MAX), "a._-Z9"):
        assert cgroups._check_ve_id(lay.cgroup_name(L.check_veid(veid)))
        if not veid.isdigit():
            VEConfig.parse("").set("NAME", veid)
    with pytest.raises(VEError, match=f"1-{L.CGROUP_NAME_MAX} letters"):
        cgroups._check_ve_id(lay.cgroup_name(longest + "x"))
    for bad in (longest + "x", "a b", "a/b", "é"):
        with pytest.raises(UsageError, match=f"up to {L.VEID_NAME_MAX} letters"):
            L.check_veid(bad)
        with pytest.raises(ConfigError, match=f"at most {L.VEID_NAME_MAX}"):
            VEConfig.parse("").set("NAME", bad)
    with pytest.raises(UsageError, match=f"use 1..{L.VEID_MAX}$"):
        L.check_veid("0")


def test_cgroup_names_are_scoped_by_vz_root(tmp_path):
    """The same VEID in two VZ roots gets two cgroup names and two veth host ends, each within the kernel's
    limits (cgroup names: the driver's CGROUP_NAME_MAX characters; interface names: 15)."""
    from vzpkg.runtime import net

    a, b = L.Layout(tmp_path / "a"), L.Layout(tmp_path / "b")
    assert a.cgroup_name("101") != b.cgroup_name("101")
    assert a.cgroup_name("101").endswith("-101") and len(a.cgroup_name("x" * 64)) == L.CGROUP_NAME_MAX
    assert L.Layout(tmp_path / "a" / ".." / "a").cgroup_name("101") == a.cgroup_name("101")  # the real path
    names = {net.host_ifname(lay.real_root(), v) for lay in (a, b) for v in ("101", "x" * 64)}
    assert len(names) == 4 and all(len(n) <= 15 for n in names)


def test_layout_paths(tmp_path):
    lay = L.Layout(tmp_path)
    assert lay.private("101") == tmp_path / "private/101"
    assert lay.ve_root("101") == tmp_path / "root/101"
    assert lay.conf("101") == tmp_path / "conf/101.conf"
    assert lay.lock("101") == tmp_path / "lock/101.lock"
    assert lay.dump("101") == tmp_path / "dump/101"
    assert lay.template("ab" * 32) == tmp_path / "template" / ("ab" * 32)
    assert lay.template("ab" * 32, 0) == tmp_path / "template" / (("ab" * 32) + "-0")


def test_veids_sorted_numbers_first(tmp_path):
    lay = L.Layout(tmp_path)
    lay.conf_dir.mkdir()
    for v in ("200", "web", "101", "alpha", "1000"):
        (lay.conf_dir / f"{v}.conf").write_text("")
    (lay.conf_dir / ".101.conf.tmp").write_text("")
    assert lay.veids() == ["101", "200", "1000", "alpha", "web"]


def test_templates_in_use(tmp_path):
    lay = L.Layout(tmp_path)
    lay.conf_dir.mkdir()
    sha1, sha2 = "a" * 64, "b" * 64
    (lay.conf_dir / "1.conf").write_text(f'TEMPLATE_SHA256="{sha1}"\nID_SHIFT="100000"\n')
    (lay.conf_dir / "2.conf").write_text(f'TEMPLATE_SHA256="{sha2}"\nID_SHIFT="0"\n')
    (lay.conf_dir / "3.conf").write_text('OSTEMPLATE="x"\n')
    assert L.templates_in_use(lay) == {sha1, f"{sha2}-0"}


def test_resolve_root(monkeypatch, tmp_path):
    monkeypatch.setenv("VZ_ROOT", str(tmp_path / "env"))
    assert L.resolve_root() == tmp_path / "env"
    assert L.resolve_root(tmp_path / "flag") == tmp_path / "flag"


def test_state_record_roundtrip(tmp_path):
    lay = L.Layout(tmp_path)
    rec = state.InitRecord(1234, 99, False)
    state.write_record(lay, "101", rec)
    back = state.read_record(lay, "101")
    assert (back.pid, back.starttime, back.privileged) == (1234, 99, False)
    assert state.InitRecord.parse("garbage") is None
    state.clear_record(lay, "101")
    assert state.read_record(lay, "101") is None


def test_record_alive_checks_starttime():
    me = os.getpid()
    st = state.proc_stat(me)
    assert st is not None and st[0] in "RS"
    # our own process is "alive" as a privileged record with the right start time...
    assert state.record_alive(state.InitRecord(me, st[1], True))
    # ...but not with another start time (a recycled pid), nor as a user-namespaced VE init
    assert not state.record_alive(state.InitRecord(me, st[1] + 1, True))
    assert not state.record_alive(state.InitRecord(me, st[1], False))
    assert state.proc_stat(2**22 + 7) is None


def test_zombie_is_not_alive():
    import time

    p = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10  # (not 100 polls of 10 ms: a loaded machine may take longer to run `true`)
    while (st := state.proc_stat(p.pid)) is not None and st[0] != "Z":
        assert time.monotonic() < deadline, st
        time.sleep(0.01)
    assert st is not None and st[0] == "Z"
    assert not state.record_alive(state.InitRecord(p.pid, st[1], True))
    p.wait()


def test_vzinit_compiles(tmp_path):
    from vzpkg.runtime import init

    if not any(os.access(os.path.join(d, "gcc"), os.X_OK) for d in os.environ.get("PATH", "").split(":")):
        pytest.skip("no gcc")
    path = init.build(tmp_path)
    assert path is not None and path.stat().st_size < 64 * 1024
    assert init.build(tmp_path) == path  # cached
    assert init.argv_for("minimal", b"x") == ("/run/vzinit", ["vzinit"])
    assert init.argv_for("distro", b"x")[0] == "/sbin/init"
    assert init.argv_for("minimal", None)[0] == "/bin/sh"


def test_vzctl_cli_usage_errors():
    env = {**os.environ, "VZ_ROOT": "/nonexistent-vz-root"}
    run = [sys.executable, "-m", "vzpkg.cli.vzctl"]
    p = subprocess.run([*run, "frobnicate"], capture_output=True, text=True, env=env)
    assert p.returncode == 2
    p = subprocess.run([*run, "status", "101"], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and p.stdout.strip() == "VEID 101 deleted unmounted down"
    p = subprocess.run([*run, "start", "../etc"], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "invalid VEID" in p.stderr
    p = subprocess.run([*run, "set", "101"], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "nothing to set" in p.stderr


def test_vzlist_unknown_field():
    env = {**os.environ, "VZ_ROOT": "/nonexistent-vz-root"}
    p = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzlist", "-o", "veid,bogus"], capture_output=True,
                       text=True, env=env)
    assert p.returncode == 2 and "bogus" in p.stderr
    p = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzlist", "-a"], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and p.stdout.split() == ["VEID", "NPROC", "STATUS", "IP_ADDR", "HOSTNAME"]


def test_leftover_names():
    """Temporary names are told apart even for VE names with dots and dashes."""
    from vzpkg.runtime import leftovers as lo

    assert lo._is_conf_tmp(".101.conf.abcd_123.tmp", "101")
    assert not lo._is_conf_tmp(".a.conf.x.conf.abcd_123.tmp", "a")  # VE a.conf.x's file, not a's
    assert lo._conf_tmp_veid(".a.conf.x.conf.abcd_123.tmp") == "a.conf.x"
    assert lo._conf_tmp_veid(".101.conf.tmp") is None
    assert lo._tmp_pid(".tmp-web-1-4242") == 4242 and lo._tmp_pid(".tmp-101-destroy-17") == 17
    assert lo._tmp_pid(".101.state.99") == 99 and lo._tmp_pid(".tmp-x") is None


def test_stop_timeouts():
    import math

    from vzpkg.cli.vzctl import parse_timeout
    from vzpkg.runtime import ve

    assert parse_timeout("0") == 0 and parse_timeout("2.5") == 2.5 and parse_timeout("3600") == 3600
    for bad in ("nan", "inf", "-inf", "1e300", "-1", "3600.5", "x", ""):
        with pytest.raises(UsageError, match="0 to 3600"):
            parse_timeout(bad)
    assert ve._sane_timeout(math.nan) == ve.DEFAULT_STOP_TIMEOUT
    assert ve._sane_timeout(math.inf) == ve.STOP_TIMEOUT_MAX and ve._sane_timeout(-3) == 0


def test_tmpfs_sizes_follow_ram():
    from vzpkg.runtime import spawn

    assert spawn._tmpfs_sizes(512 << 20) == ("size=262144k", "size=65536k")
    assert spawn._tmpfs_sizes(128 << 20) == ("size=65536k", "size=16384k")
    assert spawn._tmpfs_sizes(16 << 20) == ("size=8192k", "size=2048k")
    assert spawn._tmpfs_sizes("unlimited") == ("", "size=65536k")


def test_init_spec_is_frozen():
    from pathlib import Path

    from vzpkg.runtime.spawn import InitSpec

    spec = InitSpec(False, Path("/vz/root/1"), "h", "/run/vzinit", ["vzinit"], b"", {}, ("", "size=65536k"))
    assert (spec.privileged, spec.hostname, spec.tmpfs) == (False, "h", ("", "size=65536k"))
    with pytest.raises(AttributeError):
        spec.root = Path("/")
    with pytest.raises(AttributeError):
        spec.extra = 1
