"""chkpnt / restore / clone / migrate of VEs on the image layout (a sparse ext4 image on a real loop device) and
the btrfs layout (a snapshot subvolume with a qgroup limit in a real loop-backed btrfs pool), with the real CRIU.

Each test runs for both layouts; every VE has a 100M hard space limit, which must hold after each operation
(a write past it fails), and its clone has its own image / subvolume and limit. What destroy leaves is checked
from the kernel's side: loop devices (sysfs), mounts (mountinfo), the pool's subvolumes and qgroups.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from vzpkg.runtime import criu

from . import test_storage
from .conftest import PROJECT, VZCTL, Runtime, mounts_below
from .test_checkpoint import COUNTER, _count, _wait
from .test_storage import _loops_below, _no_loops, _qgroups

btrfs_root = test_storage.btrfs_root  # (the module-scoped fixture: a VZ root with a loop-backed btrfs pool)
brt = test_storage.brt  # (a runtime in it)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

LIMIT = ("--diskspace", "100M:100M")


@pytest.fixture(scope="module")
def have_criu():
    try:
        return criu.find()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no CRIU >= 4.2 ({e}): run make criu")


@pytest.fixture(params=["image", "btrfs"])
def lrt(request, have_criu):
    """(runtime, layout): the image layout in the session's VZ root, btrfs in a VZ root with a pool."""
    kind = request.param
    return request.getfixturevalue("rt" if kind == "image" else "brt"), kind


def _ve(rt: Runtime, kind: str) -> str:
    veid = rt.create("--layout", kind, *LIMIT)
    rt.sh(veid, COUNTER, check=True)
    return veid


def _over_limit_fails(rt: Runtime, veid: str) -> None:
    """A 120 MB write into a VE limited to 100M fails (ENOSPC from the image, EDQUOT from the qgroup)."""
    p = rt.sh(veid, "dd if=/dev/zero of=/root/big bs=1M count=120 conv=fsync 2>&1; rm -f /root/big; sync")
    assert "No space left on device" in p.stdout or "Disk quota exceeded" in p.stdout, p.stdout
    ok = rt.sh(veid, "dd if=/dev/zero of=/root/ok bs=1M count=20 conv=fsync 2>&1; rm -f /root/ok; sync")
    assert "20971520 bytes" in ok.stdout, ok.stdout  # the limit, not a broken file system


def _goes_on(rt: Runtime, veid: str) -> int:
    n = _count(rt, veid)
    _wait(lambda: _count(rt, veid) > n, what=f"{veid}'s counter")
    return n


def _subvolume(rt: Runtime, veid: str) -> Path:
    return rt.root / "btrfs" / "ves" / veid


def _qgroup_limit(rt: Runtime, veid: str) -> tuple[str, int | None]:
    """(qgroup id, max exclusive bytes) of the VE's subvolume, from btrfs itself."""
    sid = subprocess.run(["btrfs", "subvolume", "show", str(_subvolume(rt, veid))], capture_output=True, text=True,
                         check=True).stdout.split("Subvolume ID:")[1].split()[0]
    out = subprocess.run(["btrfs", "qgroup", "show", "-e", "--raw", str(rt.root / "btrfs")], capture_output=True,
                         text=True, check=True).stdout
    for line in out.splitlines():
        f = line.split()
        if f and f[0] == f"0/{sid}":
            return f[0], int(f[3]) if f[3].isdigit() else None
    raise AssertionError(f"no qgroup 0/{sid} for {veid}")


def _own_storage(rt: Runtime, kind: str, veid: str) -> object:
    """The identity of the VE's own storage (the image file's inode, the subvolume's qgroup), checking its limit."""
    if kind == "image":
        image = rt.private(veid) / "root.img"
        assert image.is_file() and _loops_below(rt.private(veid))
        return os.stat(image).st_ino
    qgroup, limit = _qgroup_limit(rt, veid)
    assert limit == 100 << 20
    return qgroup


def _assert_gone(rt: Runtime, kind: str, veid: str, qgroup: object = None) -> None:
    assert not rt.private(veid).exists()
    assert mounts_below(rt.private(veid)) == [] and mounts_below(rt.ve_root(veid)) == []
    _no_loops(rt.private(veid))
    if kind == "btrfs":
        assert not _subvolume(rt, veid).exists()
        assert qgroup not in _qgroups(rt.root / "btrfs")


def test_chkpnt_restore_keeps_counter_files_and_disk_limit(lrt):
    """Twice: the counter continues from where it stopped, a file written before reads back, the VE is
    suspended without its storage mounted in between (no loop device), and its limit holds after restore."""
    rt, kind = lrt
    veid = _ve(rt, kind)
    rt.sh(veid, "echo before > /root/before", check=True)
    for _ in range(2):
        before = _goes_on(rt, veid)
        rt.vzctl("chkpnt", veid)
        assert rt.vzctl("status", veid).stdout.split()[-1] == "suspended"
        assert mounts_below(rt.ve_root(veid)) == [] and mounts_below(rt.private(veid)) == []
        _no_loops(rt.private(veid))
        rt.vzctl("restore", veid)
        after = _count(rt, veid)
        assert before <= after < before + 50, (before, after)
        _goes_on(rt, veid)
        assert rt.sh(veid, "cat /root/before", check=True).stdout.strip() == "before"
        _over_limit_fails(rt, veid)


def test_live_clone_own_storage_and_limit_then_destroy_leaves_nothing(lrt):
    """Both counters go on; a file written in one is not in the other; the clone has its own image (another
    file on another loop device) or subvolume (another qgroup) with the same limit, enforced; a stopped clone
    has the files too; destroying them all leaves no loop device, mount, image, subvolume, qgroup or snapshot."""
    rt, kind = lrt
    src = _ve(rt, kind)
    rt.sh(src, "echo shared > /root/shared", check=True)
    dst = rt.new_id()
    rt.created.append(dst)
    rt.vzctl("clone", src, dst, "--live")
    for v in (src, dst):
        _goes_on(rt, v)
        assert rt.sh(v, "cat /root/shared", check=True).stdout.strip() == "shared"
    rt.sh(src, "echo mine > /root/only-src", check=True)
    rt.sh(dst, "echo mine > /root/only-dst", check=True)
    assert rt.sh(dst, "test -e /root/only-src").returncode == 1
    assert rt.sh(src, "test -e /root/only-dst").returncode == 1
    ids = {v: _own_storage(rt, kind, v) for v in (src, dst)}
    assert ids[src] != ids[dst]
    if kind == "image":
        assert set(_loops_below(rt.private(src))).isdisjoint(_loops_below(rt.private(dst)))
    _over_limit_fails(rt, dst)
    _over_limit_fails(rt, src)
    # the clone itself checkpoints and restores
    rt.vzctl("chkpnt", dst)
    rt.vzctl("restore", dst)
    _goes_on(rt, dst)
    # a stopped clone of a running VE
    cold = rt.new_id()
    rt.created.append(cold)
    rt.vzctl("clone", src, cold)
    rt.vzctl("start", cold)
    assert rt.sh(cold, "cat /root/only-src", check=True).stdout.strip() == "mine"
    ids[cold] = _own_storage(rt, kind, cold)
    _over_limit_fails(rt, cold)
    rt.vzctl("chkpnt", src, "--leave-running")  # its files' snapshot goes with the VE's own dump/<id>
    if kind == "image":  # copied frozen (fsfreeze): a clean file system, not one that needs journal recovery
        sb = subprocess.run(["dumpe2fs", "-h", str(rt.root / "dump" / src / "fs" / "root.img")], capture_output=True,
                            text=True, check=True).stdout
        assert "needs_recovery" not in sb and "clean" in sb.split("Filesystem state:")[1].splitlines()[0], sb
    for v in (src, dst, cold):
        rt.vzctl("destroy", v, "--force")
        # (simple quotas charge an extent to the subvolume that wrote it: the source's qgroup stays while a
        # clone still shares what it wrote, and goes with the last clone)
        _assert_gone(rt, kind, v, ids[v] if v == cold else None)
    if kind == "btrfs":
        assert not set(ids.values()) & set(_qgroups(rt.root / "btrfs"))
        snaps = rt.root / "btrfs" / "snapshots"
        assert not snaps.is_dir() or os.listdir(snaps) == []


def test_warm_checkpoint_snapshot_lives_with_its_directory(brt, have_criu, tmp_path):
    """btrfs: a --leave-running checkpoint's files are a snapshot in the pool; two VEs restored from it run with
    their own subvolumes; once the directory is removed, destroying the source drops the snapshot; a checkpoint
    whose snapshot is gone is refused in one line (62)."""
    src = _ve(brt, "btrfs")
    d = tmp_path / "warm"
    brt.vzctl("chkpnt", src, "--leave-running", "--dumpdir", str(d))
    snaps = brt.root / "btrfs" / "snapshots"
    assert len([n for n in os.listdir(snaps) if not n.endswith(".owner")]) == 1
    news = []
    for _ in range(2):
        new = brt.new_id()
        brt.created.append(new)
        brt.vzctl("restore", new, "--from", str(d))
        news.append(new)
    assert len({_own_storage(brt, "btrfs", v) for v in news}) == 2
    for v in news:
        _goes_on(brt, v)
    # the source's files rolled back to the checkpoint by its own restore from it
    brt.sh(src, "echo later > /root/later", check=True)
    brt.vzctl("stop", src)
    brt.vzctl("restore", src, "--dumpdir", str(d))
    assert brt.sh(src, "test -e /root/later").returncode == 1
    _goes_on(brt, src)
    # the directory removed by hand: the snapshot is an orphan, dropped with the source
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(d), str(copy)], check=True)
    subprocess.run(["rm", "-rf", str(d)], check=True)
    brt.vzctl("destroy", src, "--force")
    assert [n for n in os.listdir(snaps) if not n.endswith(".owner")] == []
    p = brt.vzctl("restore", brt.new_id(), "--from", str(copy), check=False)
    assert p.returncode == 62 and "is gone" in p.stderr and p.stderr.count("\n") == 1, p.stderr


def _second_root(rt: Runtime, kind: str, tmp_path: Path) -> Runtime:
    root = tmp_path / "vz2"
    root.mkdir()
    there = Runtime(root, rt.cache_dir, rt.template)
    if kind == "btrfs":
        there.vzctl("storage", "init", "--btrfs", "1G")
    return there


def _teardown_root(there: Runtime) -> None:
    from vzpkg.runtime import ve
    from vzpkg.runtime.layout import Layout

    for v in Layout(there.root).veids():
        ve.destroy(Layout(there.root), v, force=True)
    subprocess.run(["umount", str(there.root / "btrfs")], capture_output=True)


def test_migrate_online_and_back_offline(lrt, tmp_path):
    """Online to a second VZ root: the counter continues there, the file is there, the limit holds there (its
    own image / subvolume and qgroup there), nothing of the VE is left on the source; then back offline."""
    rt, kind = lrt
    there = _second_root(rt, kind, tmp_path)
    try:
        veid = _ve(rt, kind)
        rt.sh(veid, "echo kept > /root/file", check=True)
        before = _goes_on(rt, veid)
        qgroup = _qgroup_limit(rt, veid)[0] if kind == "btrfs" else None
        p = rt.vzctl("migrate", veid, str(there.root), "--online", "-t")
        assert "frozen" in p.stdout
        assert not rt.vzctl("status", veid, check=False).stdout.strip().endswith("running")
        _assert_gone(rt, kind, veid, qgroup)
        assert before <= _goes_on(there, veid)
        assert there.sh(veid, "cat /root/file", check=True).stdout.strip() == "kept"
        _own_storage(there, kind, veid)
        _over_limit_fails(there, veid)
        back = subprocess.run([*VZCTL, "migrate", veid, str(rt.root)], env=there.env, capture_output=True,
                              text=True, cwd=PROJECT)
        assert back.returncode == 0, back.stderr
        rt.created.append(veid)
        assert rt.sh(veid, "cat /root/file", check=True).stdout.strip() == "kept"
        _own_storage(rt, kind, veid)
        _over_limit_fails(rt, veid)
        assert not there.private(veid).exists()
        _no_loops(there.private(veid))
        if kind == "btrfs":
            assert not _subvolume(there, veid).exists()
    finally:
        _teardown_root(there)


def test_migrate_btrfs_to_a_root_without_pool_is_refused(brt, have_criu, tmp_path):
    veid = _ve(brt, "btrfs")
    p = brt.vzctl("migrate", veid, str(tmp_path / "nopool"), "--online", check=False)
    assert p.returncode == 63 and "storage init --btrfs" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert brt.vzctl("status", veid).stdout.strip().endswith("running")
    assert not (tmp_path / "nopool" / "private" / veid).exists()


def _hide_storage(rt: Runtime, kind: str, veid: str) -> tuple[Path, Path]:
    """Move the suspended VE's storage away (the image file, the subvolume); returns (where, from)."""
    src = rt.private(veid) / "root.img" if kind == "image" else _subvolume(rt, veid)
    away = src.with_name(f"{src.name}.away")
    src.rename(away)
    return away, src


def test_failed_restore_keeps_the_dump_and_the_ve_restorable(lrt):
    """The VE's storage gone, then CRIU's images damaged: each restore fails with one line naming the kept
    images (61), leaves nothing mounted or attached, and the VE suspended; repaired, it restores."""
    rt, kind = lrt
    veid = _ve(rt, kind)
    rt.vzctl("chkpnt", veid)

    def still_suspended() -> None:
        assert rt.vzctl("status", veid).stdout.split()[-1] == "suspended"
        assert not rt.cgroup_dirs(veid)
        assert mounts_below(rt.ve_root(veid)) == [] and mounts_below(rt.private(veid)) == []
        _no_loops(rt.private(veid))

    away, back = _hide_storage(rt, kind, veid)
    p = rt.vzctl("restore", veid, check=False)
    assert p.returncode == 61 and "kept" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert str(back) in p.stderr
    still_suspended()
    away.rename(back)
    images = rt.root / "dump" / veid
    core = sorted(images.glob("core-*.img"))[0]
    core.rename(core.with_suffix(".hidden"))
    p = rt.vzctl("restore", veid, check=False)
    assert p.returncode == 61 and "kept" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    still_suspended()
    core.with_suffix(".hidden").rename(core)
    rt.vzctl("restore", veid)
    _goes_on(rt, veid)
    _over_limit_fails(rt, veid)


PERL_MEM = ("perl -e '$x = q(a) x (50 << 20); substr($x, 40 << 20, 6) = q(MARKER); while (1) { "
            "select(undef, undef, undef, 0.1); $i++; open F, q(>/root/mem); print F $i, q( ), substr($x, 40 << 20, 6), "
            "qq(\\n); close F }' >/dev/null 2>&1 </dev/null &")


def _lazy_possible(criu_bin: str) -> bool:
    return all(subprocess.run([criu_bin, "check", "--feature", f], capture_output=True).returncode == 0
               for f in ("uffd", "uffd-noncoop"))


def test_lazy_restore_post_copy_or_a_clear_refusal(rt, have_criu):
    """--lazy: a VE with its own user namespace where vm.unprivileged_userfaultfd is 0 is refused in one line
    (67), still suspended, and restores normally after; a privileged VE (tasks that may open a userfaultfd) is
    restored post-copy: its 50 MB process goes on with its memory intact, the lazy-pages daemon copies every
    page and exits."""
    if not _lazy_possible(have_criu):
        pytest.skip("criu check --feature uffd/uffd-noncoop fails here")
    unpriv = _ve(rt, "image")
    rt.vzctl("chkpnt", unpriv)
    p = rt.vzctl("restore", unpriv, "--lazy", check=False)
    if Path("/proc/sys/vm/unprivileged_userfaultfd").read_text().strip() != "1":
        assert p.returncode == 67 and "vm.unprivileged_userfaultfd" in p.stderr and p.stderr.count("\n") == 1
        assert rt.vzctl("status", unpriv).stdout.split()[-1] == "suspended"
        rt.vzctl("restore", unpriv)
    else:
        assert p.returncode == 0, p.stderr
    _goes_on(rt, unpriv)
    priv = rt.create("--layout", "image", *LIMIT, "--privileged")
    rt.sh(priv, PERL_MEM, check=True)

    def mem() -> tuple[int, str]:
        text = rt.sh(priv, "cat /root/mem 2>/dev/null").stdout.split()
        return (int(text[0]), text[1]) if len(text) == 2 else (0, "")

    _wait(lambda: mem()[0] > 0, what="the perl process")
    rt.vzctl("chkpnt", priv)
    rt.vzctl("restore", priv, "--lazy")
    n = mem()[0]
    assert _wait(lambda: (m := mem())[0] > n + 5 and m[1] == "MARKER" and m)
    log = max((rt.root / "dump" / ".logs").glob(f"{priv}-lazy-pages-*.log"), key=os.path.getmtime)

    def daemon_done() -> bool:
        text = log.read_text(errors="replace")
        return "Error" not in text and not [p for p in os.listdir("/proc") if p.isdigit()
                                            and str(log) in _cmdline(p)]
    assert _wait(daemon_done, what="the lazy-pages daemon to copy every page and exit")
    assert "UFFD transferred pages" in log.read_text()


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_destroy_under_a_kept_snapshot_keeps_disk_limits_enforced(brt, have_criu, tmp_path):
    """Destroying a btrfs VE whose checkpoint still holds a snapshot of it can leave the pool's qgroup numbers
    marked inconsistent, and the kernel then enforces no limit at all: vzctl rescans, so the next VE's limit holds
    (before the fix its 120 MB write went through)."""
    from vzpkg.runtime.backends import btrfs, btrfs_ioctl

    src = _ve(brt, "btrfs")
    brt.vzctl("chkpnt", src, "--leave-running", "--dumpdir", str(tmp_path / "kept"))
    t = time.monotonic()
    brt.vzctl("destroy", src, "--force")
    # with simple quotas the VE's qgroup stays charged for what the kept snapshot shares: destroy does not wait
    # for it (btrfs.QGROUP_WAIT, 30 s) once the subvolume is dropped
    assert time.monotonic() - t < btrfs.QGROUP_WAIT / 2
    assert not btrfs_ioctl.qgroups_inconsistent(brt.root / "btrfs")
    _over_limit_fails(brt, _ve(brt, "btrfs"))
