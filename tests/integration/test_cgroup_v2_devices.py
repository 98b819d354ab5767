"""cgroup v2 device filtering for real (root): a BPF_CGROUP_DEVICE program attached to a cgroup2 directory.

Device programs work on any cgroup2 directory, even one with no controllers (a hybrid host's
/sys/fs/cgroup/unified), and the kernel checks them in addition to v1's devices controller. Each test makes
its own cgroup vzpkg-test-<pid>-<n> at the top of the cgroup2 mount; a child moves itself into it and reports
what it could open and mknod. Children exit on their own and the cgroups are removed whatever the outcome.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzpkg.errors import VEError
from vzpkg.runtime import bpfdev
from vzpkg.runtime.cgroups import V2Driver, parse_mountinfo


def _cgroup2_mount() -> Path | None:
    try:
        _, v2 = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    except OSError:
        return None
    return v2 if v2 is not None and (v2 / "cgroup.procs").exists() else None


MNT = _cgroup2_mount()

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create cgroups and load BPF programs"),
    pytest.mark.skipif(MNT is None, reason="no cgroup2 mount"),
]

_ids = itertools.count()

# The child: join the cgroup named by argv[1] ('-' = stay where it is), then try each access and print
# {name: "ok" | errno name}.
CHILD = r"""
import errno, json, os, stat, sys
cg, tmp = sys.argv[1], sys.argv[2]
if cg != "-":
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
def opener(path, flags):
    return lambda: os.close(os.open(path, flags))
def mknod(name, kind, major, minor):
    return lambda: os.mknod(os.path.join(tmp, name), 0o600 | kind, os.makedev(major, minor))
attempt("write_null", opener("/dev/null", os.O_WRONLY))
attempt("read_zero", opener("/dev/zero", os.O_RDONLY))
attempt("write_full", opener("/dev/full", os.O_WRONLY))
attempt("read_full", opener("/dev/full", os.O_RDONLY))
attempt("mknod_null", mknod("null", stat.S_IFCHR, 1, 3))
attempt("mknod_full", mknod("full", stat.S_IFCHR, 1, 7))
attempt("mknod_loop", mknod("loop", stat.S_IFBLK, 7, 0))
attempt("read_loop", opener(os.path.join(tmp, "loop0"), os.O_RDONLY))
print(json.dumps(out))
"""


def probe(cgroup: Path | None, tmp: Path) -> dict[str, str]:
    """Run CHILD in cgroup (None: outside any test cgroup) with a fresh scratch dir holding a loop0 node."""
    scratch = tmp / f"scratch-{next(_ids)}"
    scratch.mkdir()
    os.mknod(scratch / "loop0", 0o600 | 0o060000, os.makedev(7, 0))  # made outside the filter
    p = subprocess.run(
        [sys.executable, "-c", CHILD, str(cgroup) if cgroup else "-", str(scratch)],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.fixture
def cgroup() -> Iterator[Path]:
    assert MNT is not None
    d = MNT / f"vzpkg-test-{os.getpid()}-{next(_ids)}"
    d.mkdir()
    try:
        yield d
    finally:
        # the children have exited; rmdir also detaches the programs
        for _ in range(50):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                import time

                time.sleep(0.05)
        assert not d.exists()


NULL_AND_ZERO = [("c", 1, 3, "rwm"), ("c", 1, 5, "rwm")]


def test_unfiltered_control(tmp_path: Path) -> None:
    """Outside the cgroup, root can do all of it: so an EPERM below is the filter's doing."""
    got = probe(None, tmp_path)
    assert got["write_full"] == got["mknod_full"] == got["mknod_loop"] == "ok"
    assert got["read_loop"] != "EPERM"  # ok, or ENXIO without a loop driver


def test_filter_allows_only_the_rules(cgroup: Path, tmp_path: Path) -> None:
    prog_id = bpfdev.apply(cgroup, NULL_AND_ZERO)
    assert prog_id > 0
    assert bpfdev.attached(cgroup) == ([prog_id], bpfdev.BPF_F_ALLOW_MULTI)
    got = probe(cgroup, tmp_path)
    assert got == {
        "write_null": "ok",
        "read_zero": "ok",
        "write_full": "EPERM",
        "read_full": "EPERM",
        "mknod_null": "ok",
        "mknod_full": "EPERM",
        "mknod_loop": "EPERM",
        "read_loop": "EPERM",
    }


def test_access_bits(cgroup: Path, tmp_path: Path) -> None:
    # /dev/full readable but not writable, no mknod of anything; a block rule that grants only mknod
    bpfdev.apply(cgroup, [("c", 1, 3, "rw"), ("c", 1, 5, "rw"), ("c", 1, 7, "r"), ("b", 7, -1, "m")])
    got = probe(cgroup, tmp_path)
    assert got["write_null"] == got["read_zero"] == got["read_full"] == "ok"
    assert got["write_full"] == got["mknod_null"] == got["mknod_full"] == "EPERM"
    assert got["mknod_loop"] == "ok" and got["read_loop"] == "EPERM"


def test_apply_again_replaces_the_program(cgroup: Path, tmp_path: Path) -> None:
    first = bpfdev.apply(cgroup, [("a", -1, -1, "rwm")])
    assert probe(cgroup, tmp_path)["write_full"] == "ok"
    second = bpfdev.apply(cgroup, NULL_AND_ZERO)
    assert second != first
    assert bpfdev.attached(cgroup)[0] == [second]
    got = probe(cgroup, tmp_path)
    assert got["write_null"] == "ok" and got["write_full"] == "EPERM"
    bpfdev.apply(cgroup, [])  # no rules: nothing at all
    got = probe(cgroup, tmp_path)
    assert set(got.values()) == {"EPERM"}
    assert len(bpfdev.attached(cgroup)[0]) == 1


def test_v2driver_setup_devices(tmp_path: Path) -> None:
    """Through the driver, with the runtime's own rules, on a V2Driver rooted at the cgroup2 mount."""
    from vzpkg.runtime.spawn import DEVICE_RULES

    assert MNT is not None
    base = f"vzpkg-test-{os.getpid()}-{next(_ids)}"
    drv = V2Driver(MNT, base=base)
    ve = "101"
    try:
        drv.create(ve)
        drv.setup_devices(ve, DEVICE_RULES)
        d = drv._dirs(ve)[0]
        assert len(bpfdev.attached(d)[0]) == 1
        got = probe(d, tmp_path)
        assert got["write_null"] == got["write_full"] == "ok"  # the VE's /dev has full
        assert got["mknod_null"] == "ok" and got["mknod_loop"] == got["read_loop"] == "EPERM"
        drv.setup_devices(ve, DEVICE_RULES)  # a restart over a leftover cgroup: still one program
        assert len(bpfdev.attached(d)[0]) == 1
    finally:
        drv.remove(ve)
        (MNT / base).rmdir()


def test_errors_are_one_line_and_named(cgroup: Path) -> None:
    missing = cgroup / "missing"
    with pytest.raises(VEError, match=f"cannot open cgroup {missing}"):
        bpfdev.apply(missing, NULL_AND_ZERO)
    # a program that never sets r0 or exits: the verifier says why
    with pytest.raises(VEError) as e:
        bpfdev.load(bpfdev.PROLOGUE, str(cgroup))
    msg = str(e.value)
    assert "\n" not in msg and str(cgroup) in msg and "EINVAL" in msg and "verifier:" in msg
    assert "processed" not in msg.split("verifier:")[1]  # the reason, not the statistics line
    # a plain directory is not a cgroup: EBADF from the kernel, named
    with pytest.raises(VEError, match="EBADF|EINVAL"):
        bpfdev.apply("/tmp", NULL_AND_ZERO)


def test_not_root_is_eperm(cgroup: Path) -> None:
    # root starts the interpreter (nobody may not be able to reach it), then drops to nobody before bpf(2)
    code = (
        "import os\n"
        "from vzpkg.runtime import bpfdev\n"
        "from vzpkg.errors import VEError\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        f"try:\n    bpfdev.apply({str(cgroup)!r}, [('c', 1, 3, 'rwm')])\n"
        "except VEError as e:\n    print(e)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert "EPERM" in p.stdout and str(cgroup) in p.stdout and "\n" not in p.stdout.strip()
    assert bpfdev.attached(cgroup)[0] == []
