"""The storage hot path without helper processes (issue 10's benchmark follow-up), with real loop devices, a
real loop-backed btrfs pool and real VEs: loop devices set up by ioctl with autoclear and direct I/O, btrfs
snapshots/limits/deletes by ioctl giving what `btrfs` gave, an image VE's limit raised past twice its first
value on the running VE at once, `vzpkg clean` of prepared images, and loop exhaustion met for real in a
private /dev."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import PROJECT, VZCTL, mounts_below
from .test_storage import _assert_gone, _loops_below, _qgroups, _quota, _write, brt, btrfs_root  # noqa: F401

pytestmark = pytest.mark.root

MB = 1 << 20


def _loop_of(backing: Path) -> str:
    """The loop device (loopN) whose backing file is BACKING, read from sysfs."""
    for name in os.listdir("/sys/block"):
        f = Path("/sys/block") / name / "loop" / "backing_file"
        if name.startswith("loop") and f.exists() and f.read_text().strip() == str(backing):
            return name
    raise AssertionError(f"no loop device is backed by {backing}")


def _loop_flags(name: str) -> tuple[str, str]:
    d = Path("/sys/block") / name / "loop"
    return (d / "dio").read_text().strip(), (d / "autoclear").read_text().strip()


def test_image_loop_has_direct_io_and_autoclear_and_a_live_grow_past_twice(rt):
    """50M -> 200M on the running VE lets a 150 MB write through at once (the file system is made large: no
    resize2fs, which needs CAP_SYS_RESOURCE this machine's root lacks); its loop device does direct I/O and
    detaches itself; destroy leaves no loop device, mount or image."""
    veid = rt.create("--layout", "image", "--diskspace", "50M:50M", "--diskinodes", "unlimited")
    loopdev = _loop_of(rt.private(veid) / "root.img")
    assert _loop_flags(loopdev) == ("1", "1")
    big = _write(rt, veid, "big", 150)
    assert "No space left on device" in big.stdout, big.stdout
    rt.sh(veid, "rm -f /root/big; sync", check=True)
    p = rt.vzctl("set", veid, "--diskspace", "200M:200M", "--save")
    assert "next start" not in p.stdout + p.stderr, p.stdout + p.stderr
    ok = _write(rt, veid, "big", 150)
    assert ok.returncode == 0 and f"{150 * MB} bytes" in ok.stdout, ok.stdout
    q = _quota(rt, veid)["diskspace"]
    assert q["hard"] == 200 * 1024 and q["used"] >= 150 * 1024
    # and the new limit holds: 200M, not the file system's size
    more = _write(rt, veid, "more", 80)
    assert "No space left on device" in more.stdout, more.stdout
    rt.vzctl("destroy", veid, "--force")
    _assert_gone(rt, veid)
    assert not Path(f"/sys/block/{loopdev}/loop/backing_file").exists() or \
        str(rt.private(veid)) not in Path(f"/sys/block/{loopdev}/loop/backing_file").read_text()


def test_btrfs_ioctls_give_the_snapshot_and_limit_the_commands_gave(brt):  # noqa: F811
    pool = brt.root / "btrfs"
    assert _loop_flags(_loop_of(brt.root / "btrfs.img")) == ("1", "1")  # the pool's loop: direct I/O too
    veid = brt.create("--layout", "btrfs", "--diskspace", "50M:50M", start=False)
    sub = pool / "ves" / veid
    template = next(p for p in (pool / "templates").iterdir() if not p.name.startswith("."))

    def show(path: Path) -> dict[str, str]:
        out = subprocess.run(["btrfs", "subvolume", "show", str(path)], capture_output=True, text=True,
                             check=True).stdout
        return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()[1:]) if v}

    def limit(sid: str) -> str:
        out = subprocess.run(["btrfs", "qgroup", "show", "-e", "--raw", "--sync", str(pool)], capture_output=True,
                             text=True, check=True).stdout
        return next(line.split()[3] for line in out.splitlines() if line.split()[:1] == [f"0/{sid}"])

    # what the `btrfs` commands made before, next to it, for comparison
    ref = pool / "ves" / f"ref-{veid}"
    subprocess.run(["btrfs", "subvolume", "snapshot", str(template), str(ref)], capture_output=True, check=True)
    subprocess.run(["btrfs", "qgroup", "limit", "-e", str(50 * MB), str(ref)], capture_output=True, check=True)
    try:
        mine, theirs = show(sub), show(ref)
        assert mine["Parent UUID"] == theirs["Parent UUID"] == show(template)["UUID"]
        assert mine["Flags"] == theirs["Flags"] == "-"  # writable snapshots of the read-only template
        assert limit(mine["Subvolume ID"]) == limit(theirs["Subvolume ID"]) == str(50 * MB)
    finally:
        subprocess.run(["btrfs", "subvolume", "delete", str(ref)], capture_output=True)
    # the pool is mounted nodatasum (see btrfs.POOL_MOUNT_OPTS): the limit holds for direct writes too
    opts = Path("/proc/self/mounts").read_text().split(f" {pool} btrfs ")[1].split()[0]
    assert "nodatasum" in opts.split(","), opts
    brt.vzctl("start", veid)
    over = brt.sh(veid, "dd if=/dev/zero of=/root/d bs=1M count=60 oflag=direct 2>&1")
    assert "Disk quota exceeded" in over.stdout, over.stdout
    brt.sh(veid, "rm -f /root/d; sync", check=True)
    brt.vzctl("set", veid, "--diskspace", "70M:70M", "--save")
    assert limit(mine["Subvolume ID"]) == str(70 * MB)
    assert brt.sh(veid, "dd if=/dev/zero of=/root/d bs=1M count=60 oflag=direct 2>&1").returncode == 0
    brt.vzctl("set", veid, "--diskspace", "unlimited", "--save")
    assert limit(mine["Subvolume ID"]) == "none"
    brt.vzctl("destroy", veid, "--force")
    # no subvolume, no qgroup (not even a stale one: destroy waited for the cleaner), no private area
    assert not sub.exists() and not brt.private(veid).exists() and mounts_below(brt.ve_root(veid)) == []
    assert f"0/{mine['Subvolume ID']}" not in _qgroups(pool)


def test_btrfs_destroy_leaves_a_spare_the_next_create_takes(brt):  # noqa: F811
    """A destroy makes one spare snapshot per unpacked template generation (spares/<generation>); the next create
    renames it into place (its subvolume is the spare itself: no snapshot on the create's path) and limits it
    before anything runs; a killed refill's leftover and the spare of a generation no longer unpacked go at
    the next refill."""
    from vzpkg.runtime.backends import btrfs_ioctl

    pool = brt.root / "btrfs"
    first = brt.create("--layout", "btrfs", "--diskspace", "50M:50M", start=False)
    gen = next(n for n in os.listdir(pool / "templates") if not n.startswith("."))
    dead = subprocess.Popen(["true"])
    dead.wait()
    (pool / "spares").mkdir(mode=0o700, exist_ok=True)
    for name in (f".tmp-{gen}-{dead.pid}", "f" * 64):
        subprocess.run(["btrfs", "subvolume", "snapshot", str(pool / "templates" / gen), str(pool / "spares" / name)],
                       check=True, capture_output=True)
    brt.vzctl("destroy", first)
    assert os.listdir(pool / "spares") == [gen]
    spare = btrfs_ioctl.subvolume_id(pool / "spares" / gen)
    veid = brt.create("--layout", "btrfs", "--diskspace", "50M:50M")
    assert btrfs_ioctl.subvolume_id(pool / "ves" / veid) == spare and os.listdir(pool / "spares") == []
    over = brt.sh(veid, "dd if=/dev/zero of=/root/d bs=1M count=60 oflag=direct 2>&1")
    assert "Disk quota exceeded" in over.stdout, over.stdout
    # a create that finds no spare snapshots, as before
    other = brt.create("--layout", "btrfs", "--diskspace", "50M:50M", start=False)
    assert btrfs_ioctl.subvolume_id(pool / "ves" / other) not in (None, spare)


def test_clean_removes_prepared_images_no_ve_and_no_sample_uses(rt, tmp_path):
    from vzpkg.runtime.backends import Limits, image

    keep = rt.create("--layout", "image", "--diskspace", "60M", "--diskinodes", "unlimited", start=False)
    gone = rt.create("--layout", "image", "--diskspace", "60M", "--diskinodes", "3001", start=False)
    images = rt.root / "template" / ".images"
    odd = images / image._prepared_key(Limits((60 * MB, 60 * MB), (3001, 3001)))
    kept = images / image._prepared_key(Limits((60 * MB, 60 * MB)))
    assert odd.is_file() and kept.is_file()
    rt.vzctl("destroy", gone)
    env = {**rt.env, "PYTHONPATH": str(PROJECT)}
    p = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzpkg", "clean", "--templates", "--root", str(rt.root),
                        "--cache-dir", str(tmp_path), "--json"], env=env, cwd=PROJECT, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    assert str(odd) in json.loads(p.stdout)["removed"]
    assert not odd.exists() and kept.is_file()  # still what VE `keep` (and a re-create of it) copies
    # a create that needs the removed one makes it again
    again = rt.create("--layout", "image", "--diskspace", "60M", "--diskinodes", "3001", start=False)
    assert odd.is_file()
    for veid in (keep, again):
        rt.vzctl("destroy", veid)


_NO_LOOP_DEV = textwrap.dedent("""
    # In a private mount namespace: a /dev of its own with every host node except the loop devices and
    # loop-control, then the command. Nothing of the host's /dev (or its loop devices) is changed.
    import os, stat, subprocess, sys
    new = sys.argv[1]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "vzpkg-test-dev", new], check=True)
    for name in os.listdir("/dev"):
        src, dst = "/dev/" + name, new + "/" + name
        st = os.lstat(src)
        if name.startswith("loop") or name in ("block", "disk"):
            continue
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISCHR(st.st_mode):
            os.mknod(dst, st.st_mode, st.st_rdev)
        elif stat.S_ISDIR(st.st_mode):
            os.mkdir(dst)
            subprocess.run(["mount", "--bind", src, dst], check=True)
    subprocess.run(["mount", "--move", new, "/dev"], check=True)
    assert not os.path.exists("/dev/loop-control")
    os.execv(sys.argv[2], sys.argv[2:])
""")


def test_loop_exhaustion_is_exit_51_and_leaves_nothing(rt, tmp_path):
    """No loop device to be had (a private /dev without loop-control and /dev/loopN): `vzctl start` of an image
    VE fails with exit 51 in one line naming the way out, through the real attach code; nothing is left mounted
    or attached, and the VE starts normally afterwards."""
    veid = rt.create("--layout", "image", "--diskspace", "60M", start=False)
    script = tmp_path / "nodev.py"
    script.write_text(_NO_LOOP_DEV)
    newdev = tmp_path / "dev"
    newdev.mkdir()
    p = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, str(script), str(newdev),
                        *VZCTL, "start", veid], env=rt.env, cwd=PROJECT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 51, p.stdout + p.stderr
    assert p.stderr.startswith("vzctl: error: no free loop device") and p.stderr.count("\n") == 1, p.stderr
    assert "loop-control is missing" in p.stderr and "max_loop" in p.stderr
    assert json.loads(rt.vzctl("status", veid, "--json").stdout)["running"] is False
    assert mounts_below(rt.private(veid)) == [] and mounts_below(rt.ve_root(veid)) == []
    assert _loops_below(rt.private(veid)) == []
    rt.vzctl("start", veid)
    assert rt.vzctl("exec", veid, "true").returncode == 0


def test_a_second_mount_of_a_live_pool_is_the_same_file_system(brt, tmp_path):  # noqa: F811
    """Attaching a file that a loop device still serves reuses that device (as mount(8) did): a VE's mount
    namespace that is still going away can keep the pool's file system alive after its mount point was
    unmounted, and a second device would mount a second, independent btrfs (a temporary fsid) on the same
    file that sees neither the first one's uncommitted changes nor keeps the two from overwriting each other."""
    from vzpkg.runtime import loop, ns
    from vzpkg.runtime.backends import btrfs
    from vzpkg.runtime.layout import Layout

    pool = btrfs.ensure_pool(Layout(brt.root))  # (mounted again if a previous test unmounted it)
    first = _loop_of(brt.root / "btrfs.img")
    other = tmp_path / "again"
    other.mkdir()
    dev = loop.mount(brt.root / "btrfs.img", other, "btrfs")
    try:
        assert dev == f"/dev/{first}"
        (pool / "ves" / "probe").write_text("uncommitted")
        assert (other / "ves" / "probe").read_text() == "uncommitted"  # one file system, not two
    finally:
        (pool / "ves" / "probe").unlink(missing_ok=True)
        ns.umount(other)
