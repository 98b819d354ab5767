"""An example test suite that uses vzpkg's pytest plugin (docs/testing-with-ves.md).

Run it as root, with a template cache built (`vzpkg create-cache debian-12-x86_64`):

    pytest examples/testing-with-ves [--vz-root DIR] [--ve-cache-dir DIR]

Each test gets a fresh, running VE; it is destroyed after the test, whether the test passes or fails.
"""

from __future__ import annotations

import pytest

from vzpkg.errors import VECommandError


def test_a_fresh_ve(ve):
    r = ve.exec(["cat", "/etc/debian_version"])
    assert r.returncode == 0
    assert r.stdout.startswith("12.")
    assert ve.status().running


def test_stdin_stdout_stderr_and_status(ve):
    r = ve.exec("read x; echo out:$x; echo err >&2; exit 3", input="hello\n")
    assert (r.returncode, r.stdout, r.stderr) == (3, "out:hello\n", "err\n")


def test_check_raises(ve):
    with pytest.raises(VECommandError) as info:
        ve.exec(["false"], check=True)
    assert info.value.exit_code == 35
    assert info.value.result.returncode == 1


def test_changes_stay_in_the_ve(ve):
    ve.exec("echo 127.0.0.2 example.test >> /etc/hosts", check=True)
    assert "example.test" in ve.exec(["cat", "/etc/hosts"]).stdout


def test_each_test_starts_clean(ve):
    # the previous test's change is not here: a new VE from the same template
    assert "example.test" not in ve.exec(["cat", "/etc/hosts"]).stdout


@pytest.mark.ve(ram="128M", numproc=64, hostname="limited")
def test_limits_from_the_marker(ve):
    assert ve.exec(["hostname"]).stdout.strip() == "limited"
    # the VE's own pids limit: a shell loop that forks 100 sleepers hits it
    r = ve.exec("for i in $(seq 100); do sleep 1 & done; wait", timeout=20)
    assert "fork" in r.stderr.lower()


def test_several_ves(ve_factory):
    a = ve_factory(hostname="a")
    b = ve_factory(hostname="b")
    assert a.veid != b.veid
    assert a.exec(["hostname"]).stdout.strip() == "a"
    assert b.exec(["hostname"]).stdout.strip() == "b"


def test_a_stopped_ve(ve_factory):
    v = ve_factory(start=False)
    assert not v.status().running
    v.start()
    assert v.exec(["true"]).returncode == 0
    v.stop()
    assert v.status().line().endswith("exist unmounted down")
