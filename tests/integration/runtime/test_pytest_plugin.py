"""vzpkg's pytest plugin (vzpkg/pytest_plugin.py, loaded through its pytest11 entry point), run as users run it:
pytest processes on test files, against a VZ root of this test session."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .conftest import PROJECT, cgroup_dirs, cgroup_name, mounts_below

pytestmark = pytest.mark.root

EXAMPLES = PROJECT / "examples" / "testing-with-ves"


def _pytest(root: Path, cache_dir: Path, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--vz-root", str(root),
                             "--ve-cache-dir", str(cache_dir), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=kw.pop("cwd", PROJECT), **kw)


def _run(root: Path, cache_dir: Path, *args: str, **kw) -> tuple[int, str]:
    p = _pytest(root, cache_dir, *args, **kw)
    out, _ = p.communicate(timeout=300)
    return p.returncode, out


def _leftovers(root: Path) -> list[str]:
    """VEs, owner files, cgroups and mounts of the VZ root (an empty list: nothing left behind)."""
    left = [f"conf/{n}" for n in os.listdir(root / "conf")] if (root / "conf").is_dir() else []
    owners = root / "lock" / "owners"
    left += [f"owner {n}" for n in os.listdir(owners)] if owners.is_dir() else []
    private = root / "private"
    left += [f"private/{n}" for n in os.listdir(private)] if private.is_dir() else []
    if (root / "root").is_dir():
        for n in os.listdir(root / "root"):
            left += [f"cgroup {d}" for d in cgroup_dirs(cgroup_name(root, n))]
            left += [f"mount {m}" for m in mounts_below(root / "root" / n)]
    return left


@pytest.fixture(scope="module")
def _module_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin") / "vz"  # one per module: the template is unpacked once
    yield root
    import shutil

    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def plugin_root(_module_root, debian12_cache):
    root = _module_root
    assert _leftovers(root) == []
    yield root, debian12_cache[0]
    # whatever a failed assertion left: gone, so that the next test starts from an empty VZ root
    from vzpkg.runtime import owners
    from vzpkg.runtime.layout import Layout

    owners.sweep(Layout(root))


def test_the_example_suite(plugin_root):
    """docs/testing-with-ves.md's example suite passes, and leaves nothing in the VZ root."""
    root, cache = plugin_root
    code, out = _run(root, cache, str(EXAMPLES))
    assert code == 0, out
    assert "8 passed" in out
    assert _leftovers(root) == []


def test_failing_tests_and_a_sigkilled_run(plugin_root, tmp_path):
    """A failing test's VE is destroyed; a run killed with SIGKILL leaves its VE running, and the next session
    (of another test run on the same VZ root) removes it."""
    root, cache = plugin_root
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_fail.py").write_text(textwrap.dedent("""
        def test_fails(ve, ve_factory):
            ve_factory(start=False)
            assert ve.exec(["true"]).returncode == 1

        def test_errors(ve):
            raise RuntimeError("boom")
    """))
    code, out = _run(root, cache, str(suite / "test_fail.py"))
    assert code == 1 and "2 failed" in out, out
    assert _leftovers(root) == []

    (suite / "test_killed.py").write_text(textwrap.dedent("""
        import os

        def test_killed(ve):
            print("VEID", ve.veid, flush=True)
            os.kill(os.getpid(), 9)
    """))
    code, out = _run(root, cache, "-s", str(suite / "test_killed.py"))
    assert code == -9, out
    veid = out.split("VEID ", 1)[1].split()[0]
    assert (root / "conf" / f"{veid}.conf").exists()
    assert cgroup_dirs(cgroup_name(root, veid)), "the killed run's VE should still run"

    (suite / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    code, out = _run(root, cache, str(suite / "test_nothing.py"))
    assert code == 0, out
    assert _leftovers(root) == []


def test_concurrent_runs_leave_each_other_alone(plugin_root, tmp_path):
    """A second test run (whose session start sweeps) and its VEs do not touch a first run's VE in use."""
    root, cache = plugin_root
    suite = tmp_path / "suite"
    suite.mkdir()
    go = tmp_path / "go"
    (suite / "test_waits.py").write_text(textwrap.dedent(f"""
        import time
        from pathlib import Path

        def test_waits(ve):
            print("VEID", ve.veid, flush=True)
            while not Path({str(go)!r}).exists():
                time.sleep(0.05)
            assert ve.exec(["true"]).returncode == 0
    """))
    (suite / "test_other.py").write_text("def test_other(ve):\n    assert ve.exec(['true']).returncode == 0\n")
    first = _pytest(root, cache, "-s", str(suite / "test_waits.py"))
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "VEID" not in line and time.monotonic() < deadline:
            line = first.stdout.readline()
        veid = line.split("VEID ", 1)[1].split()[0]
        code, out = _run(root, cache, str(suite / "test_other.py"))
        assert code == 0, out
        assert (root / "conf" / f"{veid}.conf").exists()
        assert cgroup_dirs(cgroup_name(root, veid))
    finally:
        go.touch()
        out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    assert _leftovers(root) == []


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_run_destroys_its_ves(plugin_root, tmp_path, sig):
    """Ctrl-C or SIGTERM in the middle of a test: teardown runs, the VE is gone when pytest exits."""
    import signal

    from conftest import default_sigint

    root, cache = plugin_root
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_sleeps.py").write_text(textwrap.dedent("""
        import time

        def test_sleeps(ve):
            print("VEID", ve.veid, flush=True)
            time.sleep(120)
    """))
    run = _pytest(root, cache, "-s", str(suite / "test_sleeps.py"), preexec_fn=default_sigint)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "VEID" not in line and time.monotonic() < deadline:
            line = run.stdout.readline()
        veid = line.split("VEID ", 1)[1].split()[0]
        assert (root / "conf" / f"{veid}.conf").exists()
        run.send_signal(getattr(signal, sig))
        out, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0, out
    assert _leftovers(root) == []


WARM_SUITE = """
import pytest

# the warm-up leaves a process and a file that only a restore from the one checkpoint shares between VEs:
# /run is a tmpfs, restored from the image, and the stamp is taken once per boot
pytestmark = pytest.mark.ve(warmup="date +%s%N > /run/stamp; sh -c 'while :; do sleep 1; done' "
                                   ">/dev/null 2>&1 </dev/null & echo $! > /run/loop")

def _report(ve, tag):
    stamp = ve.exec(["cat", "/run/stamp"], check=True).stdout.strip()
    loop = ve.exec(["sh", "-c", "kill -0 $(cat /run/loop) && cat /run/loop"], check=True).stdout.strip()
    print(tag, ve.veid, stamp, loop, ve.status().init_pid, flush=True)

def test_one(ve):
    _report(ve, "ONE")
    ve.exec(["sh", "-c", "echo mine > /root/written"], check=True)

def test_two(ve):
    _report(ve, "TWO")
    assert ve.exec(["test", "-e", "/root/written"]).returncode == 1  # test_one's file is not here

def test_addresses(ve_factory):
    a = ve_factory(hostname="wa", ipadd="10.218.{n}.2/24")
    b = ve_factory(hostname="wb", ipadd="10.218.{n}.3/24")
    assert a.veid != b.veid and a.status().init_pid != b.status().init_pid
    assert a.exec(["hostname"]).stdout.strip() == "wa" and b.exec(["hostname"]).stdout.strip() == "wb"
    assert "10.218.{n}.2/24" in a.exec(["ip", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert "10.218.{n}.3/24" in b.exec(["ip", "-o", "addr", "show", "dev", "eth0"]).stdout
    _report(a, "A")
    _report(b, "B")
"""


def _need_criu() -> None:
    from vzpkg.runtime import criu, criu_install

    try:
        if not criu_install.check(criu.find())[0]:
            pytest.skip("criu check fails here")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no CRIU ({e}): run make criu")


def _reports(out: str) -> dict[str, list[str]]:
    """{tag: [veid, stamp, warm-up pid, init pid]} of the suite's lines (pytest -s may print a dot before one)."""
    import re

    return {m[0]: list(m[1:]) for m in re.findall(r"\b(ONE|TWO|A|B) (o\S+) (\d+) (\d+) (\d+)$", out, re.M)}


def _warm_images(root: Path) -> list[str]:
    d = root / "dump"
    return sorted(n for n in os.listdir(d) if "warm" in n) if d.is_dir() else []


def test_warm_checkpoint_fixtures(plugin_root, tmp_path):
    """--ve-warm=always, CRIU working: every `ve` is restored from one checkpoint of a warmed-up VE (the warm-up's
    stamp and process are the same in all of them, the warm-up ran once), yet each is its own — its own id, init,
    hostname, address, files (a file written in one test is not in the next); the image is gone after the run.
    A second run at the same time has its own. --ve-warm=never: each VE boots and warms up by itself."""
    _need_criu()
    root, cache = plugin_root
    suite, other = tmp_path / "suite", tmp_path / "other"
    for d, n in ((suite, os.getpid() % 100 + 20), (other, os.getpid() % 100 + 120)):
        d.mkdir()
        (d / "test_warm.py").write_text(WARM_SUITE.replace("{n}", str(n)))
    bridge = f"vzpw{os.getpid() % 100000}"  # the addresses of test_addresses on a bridge of this test's own
    env = {**os.environ, "VZ_BRIDGE": bridge}
    # two runs at once on one VZ root (as xdist workers): each its own images and VEs, neither touches the other's
    second = _pytest(root, cache, "-s", "-W", "error::pytest.PytestWarning", "--ve-warm=always", str(other), env=env)
    try:
        code, out = _run(root, cache, "-s", "-W", "error::pytest.PytestWarning", "--ve-warm=always", str(suite),
                         env=env)
    finally:
        out2, _ = second.communicate(timeout=300)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
    assert code == 0 and "3 passed" in out, out
    assert second.returncode == 0 and "3 passed" in out2, out2
    assert len({v[0] for v in _reports(out).values()} | {v[0] for v in _reports(out2).values()}) == 8
    r = _reports(out)
    assert len(r) == 4, out
    assert len({r[t][0] for t in r}) == 4, r  # four VEs, four ids
    assert len({r[t][3] for t in r}) == 4, r  # four inits on the host
    assert len({r[t][1] for t in r}) == 1, r  # one warm-up: the same stamp in each...
    assert len({r[t][2] for t in r}) == 1, r  # ...and its process, alive, with the pid it had in the image
    assert _warm_images(root) == [] and _leftovers(root) == []

    try:
        code, out = _run(root, cache, "-s", "--ve-warm=never", str(suite), env=env)
    finally:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
    assert code == 0 and "3 passed" in out, out
    r = _reports(out)
    assert len(r) == 4, out
    assert len({r[t][1] for t in r}) == 4, r  # a warm-up per VE
    assert _leftovers(root) == []


LIMITED_SUITE = """
import pytest

pytestmark = pytest.mark.ve(diskspace="60M:60M", warmup="date +%s%N > /run/stamp")

def _write(ve, mb):
    return ve.exec(["dd", "if=/dev/zero", "of=/root/fill", "bs=1M", f"count={mb}", "conv=fsync"]).returncode

@pytest.mark.parametrize("n", [1, 2])
def test_limited(ve, n):
    stamp = ve.exec(["cat", "/run/stamp"], check=True).stdout.strip()
    layout = ve.status().layout
    print("LIMITED", ve.veid, stamp, layout, flush=True)
    assert layout == "image"
    assert _write(ve, 80) != 0  # past the hard limit: ENOSPC inside this VE
    ve.exec(["rm", "-f", "/root/fill"], check=True)
    assert _write(ve, 40) == 0  # under it
"""


def test_warm_checkpoint_of_a_ve_with_a_disk_limit(plugin_root, tmp_path):
    """diskspace on the warm path: the checkpointed VE has the image layout and each restored VE its own copy of
    the image with the limit (a write past it fails in each; the warm-up ran once: one stamp)."""
    import re

    _need_criu()
    root, cache = plugin_root
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_limited.py").write_text(LIMITED_SUITE)
    code, out = _run(root, cache, "-s", "-W", "error::pytest.PytestWarning", "--ve-warm=always", str(suite))
    assert code == 0 and "2 passed" in out, out
    rows = re.findall(r"LIMITED (\S+) (\d+) (\S+)", out)
    assert len(rows) == 2 and rows[0][0] != rows[1][0], out
    assert rows[0][1] == rows[1][1], out  # restored from one warm checkpoint
    assert _warm_images(root) == [] and _leftovers(root) == []


def test_warm_images_of_a_sigkilled_run_are_swept(plugin_root, tmp_path):
    """A run killed after its warm checkpoint was made leaves the image (and the VE); the next session removes
    both."""
    _need_criu()
    root, cache = plugin_root
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_killed.py").write_text(textwrap.dedent("""
        import os
        import pytest

        @pytest.mark.ve(warmup="true")
        def test_killed(ve):
            print("VEID", ve.veid, flush=True)
            os.kill(os.getpid(), 9)
    """))
    code, out = _run(root, cache, "-s", str(suite / "test_killed.py"))
    assert code == -9, out
    assert len(_warm_images(root)) == 1, out  # auto: a warm-up, so the warm path
    (suite / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    code, out = _run(root, cache, str(suite / "test_nothing.py"))
    assert code == 0, out
    assert _warm_images(root) == [] and _leftovers(root) == []
