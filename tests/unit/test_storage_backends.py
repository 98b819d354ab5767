"""The storage backends' pure parts: choice of backend, limits from configs, the project-quota backend's
commands (this kernel cannot run them), loop/btrfs ioctl structs, image sizing, superblock reading."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vzpkg.errors import DiskLimitError, LoopDevicesExhaustedError, StorageError, UsageError
from vzpkg.runtime import backends
from vzpkg.runtime.backends import Limits, choose, image, projquota
from vzpkg.runtime.conf import VEConfig
from vzpkg.runtime.confcache import _ConfView
from vzpkg.runtime.layout import Layout


def test_limits_from_a_config_and_from_the_config_cache_agree():
    conf = VEConfig.parse('DISKSPACE="10G:11G"\nDISKINODES="200000:220000"\n')
    view = _ConfView(conf.to_dict(), {}, "x")
    for source in (conf, view):
        lim = Limits.of(source)
        assert (lim.space_soft, lim.space_hard) == (10 << 30, 11 << 30)
        assert (lim.inodes_soft, lim.inodes_hard) == (200000, 220000)
    assert not Limits.of(VEConfig.parse('DISKSPACE="unlimited"\n')).any
    assert not Limits.of(_ConfView({}, {}, "x")).any


def test_choose_follows_request_default_and_limits(tmp_path):
    layout = Layout(tmp_path)
    limited, free = Limits((1 << 30, 1 << 30)), Limits()
    assert choose(layout, None, limited) == "image"
    assert choose(layout, None, free) == "overlay"
    assert choose(layout, "auto", Limits(inodes=(10, 10))) == "image"
    assert choose(layout, "copy", limited) == "copy"
    backends.write_storage_conf(layout, {"DEFAULT_LAYOUT": "overlay"})
    assert choose(layout, None, limited) == "overlay"
    assert backends.read_storage_conf(layout) == {"DEFAULT_LAYOUT": "overlay"}
    with pytest.raises(UsageError, match="unknown layout 'ploop'"):
        choose(layout, "ploop", limited)
    # a btrfs pool (its image file is what marks it) makes auto choose btrfs for space-only limits
    backends.write_storage_conf(layout, {"DEFAULT_LAYOUT": "auto"})
    (tmp_path / "btrfs.img").write_bytes(b"")
    assert choose(layout, None, limited) == "btrfs"
    assert choose(layout, None, Limits((1 << 30, 1 << 30), (10, 10))) == "image"  # btrfs has no inode limits


def test_projquota_commands_ext4_and_xfs():
    mnt, upper = Path("/var/lib/vz"), Path("/var/lib/vz/private/101/upper")
    pid = projquota.project_id("101")
    assert pid == projquota.PROJID_BASE + 101
    assert projquota.project_id("web") == projquota.project_id("web") != projquota.project_id("web2")
    assert projquota.project_id("web") >= 1 << 31
    lim = Limits((10 << 30, 11 << 30), (200000, 220000))
    assert projquota.setup_commands("ext4", mnt, upper, pid) == [["chattr", "-R", "-p", str(pid), "+P", str(upper)]]
    assert projquota.limit_commands("ext4", mnt, pid, lim) == [
        ["setquota", "-P", str(pid), str(10 << 20), str(11 << 20), "200000", "220000", "/var/lib/vz"]]
    assert projquota.setup_commands("xfs", mnt, upper, pid) == [
        ["xfs_quota", "-x", "-c", f"project -s -p {upper} {pid}", "/var/lib/vz"]]
    assert projquota.limit_commands("xfs", mnt, pid, lim) == [
        ["xfs_quota", "-x", "-c", f"limit -p bsoft={10 << 20}k bhard={11 << 20}k isoft=200000 ihard=220000 {pid}",
         "/var/lib/vz"]]
    # unlimited is 0 for both tools; release sets every limit to 0
    assert projquota.release_commands("ext4", mnt, pid) == [["setquota", "-P", str(pid), "0", "0", "0", "0",
                                                              "/var/lib/vz"]]
    assert projquota.usage_command("xfs", mnt, pid)[:3] == ["xfs_quota", "-x", "-c"]
    assert projquota.ugid_mkfs_options() == ["-O", "quota", "-E", "quotatype=usrquota:grpquota"]


@pytest.mark.root
def test_projquota_is_refused_here_naming_the_kernel_option(tmp_path):
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs root and e2fsprogs")
    problem = projquota.kernel_quota_problem()
    assert problem is not None and "CONFIG_QFMT_V2" in problem  # this kernel lacks it (ENVIRONMENT.md)
    with pytest.raises(Exception, match="CONFIG_QFMT_V2") as exc:
        projquota.ProjQuotaBackend().check(Layout(tmp_path), Limits())
    assert exc.value.exit_code == 53
    with pytest.raises(Exception, match="--quotaugidlimit 10 .*CONFIG_QFMT_V2"):
        projquota.check_quotaugidlimit(10)
    projquota.check_quotaugidlimit(0)  # 0 = none: nothing to refuse


def test_loop_and_btrfs_ioctl_structs_have_the_kernels_sizes():
    # the kernel reads these many bytes (uapi/linux/loop.h, uapi/linux/btrfs.h): a wrong layout is EFAULT or,
    # worse, a misread field
    import ctypes

    from vzpkg.runtime import loop
    from vzpkg.runtime.backends import btrfs_ioctl as b

    assert ctypes.sizeof(loop.LoopInfo64) == 232 and ctypes.sizeof(loop.LoopConfig) == 304
    assert ctypes.sizeof(b.QgroupLimit) == 40 and ctypes.sizeof(b.QgroupLimitArgs) == 48
    assert ctypes.sizeof(b.QgroupCreateArgs) == 16
    # the ioctl numbers btrfs-progs uses (_IOW(0x94, 23, 4096) etc.)
    assert (b.SNAP_CREATE_V2, b.SNAP_DESTROY_V2, b.INO_LOOKUP) == (0x50009417, 0x5000943F, 0xD0009412)
    assert (b.QGROUP_LIMIT, b.QGROUP_CREATE, b.SYNC) == (0x8030942B, 0x4010942A, 0x9408)
    # BTRFS_IOC_QUOTA_CTL _IOWR(0x94, 40, 16), BTRFS_IOC_TREE_SEARCH _IOWR(0x94, 17, 4096)
    assert (b.QUOTA_CTL, b.TREE_SEARCH) == (0xC0109428, 0xD0009411)
    assert ctypes.sizeof(b.SearchKey) == 104 and ctypes.sizeof(b.SearchArgs) == 4096
    assert b.SearchKey.nr_items.offset == 64  # after 7 u64s and min_type/max_type


def test_loop_exhaustion_message_names_the_way_out():
    from vzpkg.runtime import loop

    err = LoopDevicesExhaustedError(loop._exhausted_message("x"))
    assert err.exit_code == 51 and "max_loop" in err.message and "stop VEs" in err.message


def test_image_sizes():
    with pytest.raises(UsageError, match="needs a space limit"):
        image.image_size(Limits())
    with pytest.raises(DiskLimitError, match="at least 16M"):
        image.image_size(Limits((4 << 20, 4 << 20)))
    assert image.image_size(Limits((50 << 20, 50 << 20))) == 50 << 20
    assert image.image_size(Limits((1, (50 << 20) + 1))) == (50 << 20) + 4096
    # without an inode limit: at least 256G (a limit raised live up to that needs no resize2fs), one prepared
    # image for every limit up to ~126G; twice the limit beyond
    assert image.fs_size(50 << 20) == image.fs_size(1 << 30) == image.GROW_ROOM
    assert image.fs_size(200 << 30) >= 400 << 30
    # with one: twice the limit (at least 64M more), plus the inode tables (ext4 puts >= 16 inodes in each block
    # group, so a huge file system would break a small inode limit)
    assert image.fs_size(50 << 20, 2000) >= (50 << 20) + (64 << 20) + 2000 * 256
    assert image.fs_size(50 << 20, 2000) < 1 << 30


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")
def test_superblock_reads_what_dumpe2fs_reads(tmp_path):
    img = tmp_path / "x.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-N", "1000", str(img)], check=True)
    sb = image.superblock(img)
    out = subprocess.run(["dumpe2fs", "-h", str(img)], capture_output=True, text=True).stdout
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
    assert sb["inodes"] == int(fields["Inode count"]) and sb["blocks"] == int(fields["Block count"])
    assert sb["free_blocks"] == int(fields["Free blocks"]) and sb["free_inodes"] == int(fields["Free inodes"])
    assert sb["block_size"] == 4096 and sb["overhead"] == int(fields.get("Overhead clusters", "0"))
    img.write_bytes(b"\0" * 4096)
    with pytest.raises(StorageError, match="not an ext4 image"):
        image.superblock(img)
