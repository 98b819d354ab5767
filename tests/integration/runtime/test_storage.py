"""Disk limits and storage backends with real loop devices, ext4 images, a loop-backed btrfs pool and real VEs:
limits hold inside the VE (ENOSPC/EDQUOT), are raised on a running VE, usage comes from the kernel, destroy
leaves nothing, and a vzctl SIGKILLed while creating or growing an image leaves nothing the next command
cannot finish or remove."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import PROJECT, VZCTL, Runtime, mounts_below

pytestmark = pytest.mark.root

MB = 1 << 20


def _loops_below(path: Path) -> list[str]:
    """Loop devices whose backing file lies below PATH (read from sysfs, independently of the runtime)."""
    out = []
    for name in os.listdir("/sys/block"):
        f = Path("/sys/block") / name / "loop" / "backing_file"
        if name.startswith("loop") and f.exists():
            backing = f.read_text().strip().removesuffix(" (deleted)")
            if backing.startswith(str(path) + "/"):
                out.append(f"/dev/{name}: {backing}")
    return out


def _no_loops(path: Path) -> None:
    """No loop device is backed by a file below PATH (within 5 s: autoclear detaches after the last unmount,
    asynchronously)."""
    for _ in range(250):
        if not _loops_below(path):
            return
        time.sleep(0.02)
    assert _loops_below(path) == []


def _write(rt, veid: str, name: str, mb: int) -> subprocess.CompletedProcess[str]:
    return rt.sh(veid, f"dd if=/dev/zero of=/root/{name} bs=1M count={mb} conv=fsync 2>&1; sync")


def _quota(rt, veid: str) -> dict:
    return json.loads(rt.vzctl("status", veid, "--quota", "--json").stdout)["quota"]


def _assert_gone(rt, veid: str) -> None:
    assert not (rt.root / "private" / veid).exists()
    assert mounts_below(rt.root / "private" / veid) == [] and mounts_below(rt.ve_root(veid)) == []
    _no_loops(rt.private(veid))


def _limits_hold(rt, veid: str, other: str) -> None:
    """The issue's checks for a VE with a 50M hard space limit (shared by the image and btrfs backends)."""
    big = _write(rt, veid, "big", 60)
    assert big.returncode != 0 or "No space left" in big.stdout or "quota exceeded" in big.stdout, big.stdout
    assert "No space left on device" in big.stdout or "Disk quota exceeded" in big.stdout, big.stdout
    rt.sh(veid, "rm -f /root/big; sync", check=True)
    before = _quota(rt, veid)["diskspace"]["used"]
    ok = _write(rt, veid, "ok", 40)
    assert ok.returncode == 0 and "41943040 bytes" in ok.stdout, ok.stdout
    # the kernel's figure agrees with what was written, within 5 %
    used = _quota(rt, veid)["diskspace"]["used"] - before
    assert abs(used - 40 * 1024) <= 0.05 * 40 * 1024, used
    # full VE: another VE and the host still write
    full = _write(rt, veid, "more", 20)
    assert "No space left on device" in full.stdout or "Disk quota exceeded" in full.stdout, full.stdout
    assert _write(rt, other, "x", 20).returncode == 0
    host_file = rt.root / "host-write-check"
    host_file.write_bytes(b"\0" * (20 * MB))
    host_file.unlink()
    # raise the limit on the running VE: the 60 MB file now fits
    rt.sh(veid, "rm -f /root/more /root/ok; sync", check=True)
    p = rt.vzctl("set", veid, "--diskspace", "90M:90M", "--save")
    assert "next start" not in p.stdout, p.stdout
    assert _write(rt, veid, "big", 60).returncode == 0
    assert _quota(rt, veid)["diskspace"]["hard"] == 90 * 1024


# ---------------------------------------------------------------------------------------------------------
# image


def test_image_space_limit_usage_raise_and_destroy(rt):
    veid = rt.create("--layout", "image", "--diskspace", "50M:50M", "--diskinodes", "unlimited")
    other = rt.create("--layout", "image", "--diskspace", "200M")
    st = json.loads(rt.vzctl("status", veid, "--json").stdout)
    assert st["layout"] == "image"
    assert (rt.private(veid) / "root.img").is_file()
    assert _loops_below(rt.private(veid))
    _limits_hold(rt, veid, other)
    # vzlist shows the kernel's usage and the layout
    out = subprocess.run([*VZCTL[:-1], "vzpkg.cli.vzlist", "-a", "-H", "-o", "veid,layout,diskspace", veid],
                         env=rt.env, cwd=PROJECT, capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == [veid, "image"] and int(out[2]) >= 60 * 1024
    # stop unmounts and detaches; usage is still read (from the image's superblock)
    rt.vzctl("stop", veid)
    _no_loops(rt.private(veid))
    assert _quota(rt, veid)["diskspace"]["used"] >= 60 * 1024
    # lowering the limit below what is used is refused, and nothing changes
    conf = (rt.root / "conf" / f"{veid}.conf").read_text()
    p = rt.vzctl("set", veid, "--diskspace", "40M", "--save", check=False)
    assert p.returncode == 52 and "is used" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert (rt.root / "conf" / f"{veid}.conf").read_text() == conf
    rt.vzctl("destroy", veid)
    _assert_gone(rt, veid)


def test_image_inode_limit(rt):
    veid = rt.create("--layout", "image", "--diskspace", "50M", "--diskinodes", "2000:2000")
    n = rt.sh(veid, "i=0; while [ $i -lt 3000 ] && true > /root/f$i 2>/dev/null; do i=$((i+1)); done; echo $i")
    made = int(n.stdout.strip())
    assert 1900 <= made <= 2000, made  # (a few inodes are the VE's own: /root, its writes at start)
    q = _quota(rt, veid)["diskinodes"]
    assert q["hard"] == 2000 and 1990 <= q["used"] <= 2016, q
    # the inode count of an image cannot change: refused, named
    p = rt.vzctl("set", veid, "--diskinodes", "5000", "--save", check=False)
    assert p.returncode == 52 and "inode count" in p.stderr
    # a full VE (no inode left) still stops and starts again
    rt.vzctl("restart", veid)
    assert rt.vzctl("exec", veid, "true").returncode == 0


def test_image_grows_offline_and_refuses_what_it_cannot(rt):
    veid = rt.create("--layout", "image", "--diskspace", "50M", "--diskinodes", "unlimited", start=False)
    rt.vzctl("set", veid, "--diskspace", "400M", "--save")  # far past the file system: resize2fs, offline
    rt.vzctl("start", veid)
    assert _write(rt, veid, "big", 300).returncode == 0
    q = _quota(rt, veid)["diskspace"]
    assert q["hard"] == 400 * 1024 and q["size"] <= 400 * 1024 + 1024
    for args, code, words in ((["--layout", "image", "--diskspace", "unlimited"], 2, "needs a space limit"),
                              (["--layout", "image", "--diskspace", "4M"], 52, "at least 16M")):
        bad = rt.new_id()
        p = rt.vzctl("create", bad, "--ostemplate", rt.template, *args, check=False)
        assert p.returncode == code and words in p.stderr and p.stderr.count("\n") == 1, p.stderr
        assert not (rt.root / "conf" / f"{bad}.conf").exists() and not rt.private(bad).exists()


def _strace_kill(rt, args: list[str], ready, *, delay_us: int = 400000) -> None:
    """Run vzctl ARGS under strace with every rename(2) delayed by DELAY_US (so the moments between its steps
    last long enough to be hit), SIGKILL vzctl (not strace) as soon as READY() is true."""
    if shutil.which("strace") is None:
        pytest.skip("strace is needed to stretch the create's steps")
    proc = subprocess.Popen(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=rename",
                             "-e", f"inject=rename:delay_enter={delay_us}", *VZCTL, *args],
                            env=rt.env, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ready():
            assert proc.poll() is None, f"vzctl {' '.join(args)} finished before the moment to kill it"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)
    finally:
        proc.wait(timeout=30)


@pytest.mark.parametrize("moment", ["image-copied", "before-config"])
def test_image_create_killed_is_recovered(rt, moment):
    veid = rt.new_id()
    rt.created.append(veid)
    private = rt.root / "private"

    def ready() -> bool:
        if moment == "image-copied":
            return any(n.startswith(f".tmp-{veid}-") and (private / n / "root.img").is_file()
                       for n in os.listdir(private))
        return (rt.private(veid) / "root.img").is_file() and not (rt.root / "conf" / f"{veid}.conf").exists()

    _strace_kill(rt, ["create", veid, "--ostemplate", rt.template, "--layout", "image", "--diskspace", "60M"], ready)
    assert not (rt.root / "conf" / f"{veid}.conf").exists()
    assert any(n == veid or n.startswith(f".tmp-{veid}-") for n in os.listdir(private)), "the kill left nothing"
    # the next command on it finds the journal and removes the leftovers; a create then works
    rt.vzctl("create", veid, "--ostemplate", rt.template, "--layout", "image", "--diskspace", "60M")
    assert not [n for n in os.listdir(private) if n.startswith(f".tmp-{veid}-")]
    rt.vzctl("start", veid)
    assert rt.vzctl("exec", veid, "true").returncode == 0
    rt.vzctl("destroy", veid, "--force")
    _assert_gone(rt, veid)


def test_image_grow_killed_is_rolled_back(rt):
    """An offline grow (resize2fs with an undo file) killed half-way: the next start rolls the image back to a
    consistent file system, grows it again, and the VE runs with its new limit."""
    veid = rt.create("--layout", "image", "--diskspace", "50M", "--diskinodes", "unlimited", start=False)
    undo = rt.private(veid) / "resize.e2undo"
    for attempt in range(5):
        target = f"{300 + 20 * attempt}G"  # past the file system's 256G: an offline resize2fs
        proc = subprocess.Popen([*VZCTL, "set", veid, "--diskspace", target, "--save"], env=rt.env, cwd=PROJECT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not undo.exists():
            time.sleep(0.0005)
        proc.kill()
        proc.wait()
        if undo.exists():
            break
    else:
        pytest.fail("resize2fs finished before the kill each time")
    assert "resize" in (rt.root / "lock" / f"{veid}.lock").read_text()
    rt.vzctl("start", veid)  # recovery: e2undo, then the grow the config asks for
    assert not undo.exists()
    assert rt.vzctl("exec", veid, "true").returncode == 0
    rt.vzctl("stop", veid)
    fsck = subprocess.run(["e2fsck", "-fn", str(rt.private(veid) / "root.img")], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    rt.vzctl("destroy", veid)
    _assert_gone(rt, veid)


# ---------------------------------------------------------------------------------------------------------
# btrfs


@pytest.fixture(scope="module")
def btrfs_root(tmp_path_factory, debian12_cache):
    if shutil.which("mkfs.btrfs") is None:
        pytest.skip("btrfs-progs is not installed (make setup installs it)")
    root = tmp_path_factory.mktemp("vzbtrfs")
    cache_dir, name = debian12_cache
    env = {**os.environ, "VZ_ROOT": str(root), "VZPKG_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(PROJECT)}
    p = subprocess.run([*VZCTL, "storage", "init", "--btrfs", "2G"], env=env, cwd=PROJECT, capture_output=True,
                       text=True)
    assert p.returncode == 0 and str(root / "btrfs") in p.stdout, p.stderr
    try:
        yield root
    finally:
        from vzpkg.runtime import ve
        from vzpkg.runtime.layout import Layout

        for veid in Layout(root).veids():
            try:
                ve.destroy(Layout(root), veid, force=True)
            except Exception:
                pass
        subprocess.run(["umount", str(root / "btrfs")], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def brt(btrfs_root, debian12_cache):
    cache_dir, name = debian12_cache
    runtime = Runtime(btrfs_root, cache_dir, name)
    try:
        yield runtime
    finally:
        runtime.cleanup()


def _qgroups(pool: Path) -> list[str]:
    out = subprocess.run(["btrfs", "qgroup", "show", "--raw", str(pool)], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("0/")]


def _kernel() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def test_btrfs_space_limit_usage_raise_and_destroy(brt):
    pool = brt.root / "btrfs"
    veid = brt.create("--layout", "btrfs", "--diskspace", "50M:50M")
    other = brt.create("--layout", "btrfs", "--diskspace", "200M")
    assert json.loads(brt.vzctl("status", veid, "--json").stdout)["layout"] == "btrfs"
    sub = pool / "ves" / veid
    sid = subprocess.run(["btrfs", "subvolume", "show", str(sub)], capture_output=True, text=True,
                         check=True).stdout.split("Subvolume ID:")[1].split()[0]
    assert f"0/{sid}" in _qgroups(pool)
    if _kernel() >= (6, 7):  # simple quotas (see btrfs_ioctl.quota_enable): a create's snapshot commits no
        # backref walk of the template
        fsid = subprocess.run(["btrfs", "filesystem", "show", "--raw", str(pool)], capture_output=True, text=True,
                              check=True).stdout.split("uuid:")[1].split()[0]
        assert Path(f"/sys/fs/btrfs/{fsid}/qgroups/mode").read_text().strip() == "squota"
    _limits_hold(brt, veid, other)
    brt.vzctl("destroy", veid, "--force")
    assert not sub.exists() and not brt.private(veid).exists() and mounts_below(brt.ve_root(veid)) == []
    assert f"0/{sid}" not in _qgroups(pool)


def test_btrfs_refuses_inode_limits_and_a_missing_pool(brt, rt):
    veid = brt.new_id()
    p = brt.vzctl("create", veid, "--ostemplate", brt.template, "--layout", "btrfs", "--diskinodes", "1000",
                  check=False)
    assert p.returncode == 52 and "btrfs has no inode limits" in p.stderr and p.stderr.count("\n") == 1
    # the sample's inode limit is dropped (only an explicit one is refused)
    veid = brt.create("--layout", "btrfs", "--diskspace", "100M", start=False)
    assert 'DISKINODES="unlimited"' in (brt.root / "conf" / f"{veid}.conf").read_text()
    p = brt.vzctl("set", veid, "--diskinodes", "5000", "--save", check=False)
    assert p.returncode == 52 and "btrfs has no inode limits" in p.stderr
    # a VZ root without a pool: exit 54, naming the command that makes one
    bad = rt.new_id()
    p = rt.vzctl("create", bad, "--ostemplate", rt.template, "--layout", "btrfs", check=False)
    assert p.returncode == 54 and "vzctl storage init --btrfs SIZE" in p.stderr
    assert not (rt.root / "conf" / f"{bad}.conf").exists()
    # `storage init` a second time says where the pool is and changes nothing
    again = brt.vzctl("storage", "init", "--btrfs", "1G")
    assert "already" in again.stdout and str(brt.root / "btrfs") in again.stdout


def test_btrfs_init_again_turns_quotas_on(tmp_path, debian12_cache):
    """A pool without quotas (an init killed after its mkfs, or `btrfs quota disable`) gets them from the next
    `storage init`, which otherwise changes nothing: without them no limit would hold."""
    env = {**os.environ, "VZ_ROOT": str(tmp_path), "VZPKG_CACHE_DIR": str(debian12_cache[0]),
           "PYTHONPATH": str(PROJECT)}
    pool = tmp_path / "btrfs"
    init = [*VZCTL, "storage", "init", "--btrfs", "256M"]
    try:
        assert subprocess.run(init, env=env, cwd=PROJECT, capture_output=True).returncode == 0
        subprocess.run(["btrfs", "quota", "disable", str(pool)], check=True, capture_output=True)
        sysfs = Path("/sys/fs/btrfs") / subprocess.run(
            ["btrfs", "filesystem", "show", "--raw", str(pool)], capture_output=True, text=True,
            check=True).stdout.split("uuid:")[1].split()[0] / "qgroups"
        assert not sysfs.exists()
        p = subprocess.run(init, env=env, cwd=PROJECT, capture_output=True, text=True)
        assert p.returncode == 0 and "already" in p.stdout, p.stderr
        assert sysfs.is_dir()
        if _kernel() >= (6, 7):
            assert (sysfs / "mode").read_text().strip() == "squota"
    finally:
        subprocess.run(["umount", str(pool)], capture_output=True)


def test_btrfs_pool_is_mounted_again_after_a_reboot(brt):
    """A host reboot unmounts the loop-backed pool: the next start mounts it again."""
    veid = brt.create("--layout", "btrfs", "--diskspace", "100M")
    brt.vzctl("stop", veid)
    subprocess.run(["umount", str(brt.root / "btrfs")], check=True)
    brt.vzctl("start", veid)
    assert brt.vzctl("exec", veid, "true").returncode == 0


# ---------------------------------------------------------------------------------------------------------
# project quotas, second-level quotas, choice of backend


def test_projquota_and_quotaugidlimit_are_refused_naming_the_kernel_option(rt):
    for args in (["--layout", "projquota"], ["--layout", "image", "--diskspace", "50M", "--quotaugidlimit", "100"]):
        veid = rt.new_id()
        p = rt.vzctl("create", veid, "--ostemplate", rt.template, *args, check=False)
        assert p.returncode == 53 and "CONFIG_QFMT_V2" in p.stderr and p.stderr.count("\n") == 1, p.stderr
        assert not (rt.root / "conf" / f"{veid}.conf").exists()


def test_auto_layout_follows_the_limits(rt):
    limited = rt.create("--layout", "auto", "--diskspace", "100M", start=False)
    free = rt.create("--layout", "auto", "--config", "unlimited", start=False)
    assert json.loads(rt.vzctl("status", limited, "--json").stdout)["layout"] == "image"
    assert json.loads(rt.vzctl("status", free, "--json").stdout)["layout"] == "overlay"
    text = rt.vzctl("status", limited, "--quota", "-h").stdout
    assert "layout image" in text and "100.0M" in text
