"""Project quotas on ext4 or XFS: the overlay layout, with the VE's upper dir in a project of its own.

For hosts whose kernel has quota formats (most distribution kernels: CONFIG_QUOTA, CONFIG_QFMT_V2 for ext4's
quota feature, CONFIG_XFS_QUOTA for XFS). The VZ root's file system must be mounted with project quotas (ext4:
made with `-O quota,project` or `tune2fs -O quota,project`, mounted with `prjquota`; XFS: mounted with
`prjquota`). A VE's project id is PROJID_BASE + a number from its VEID (numeric VEIDs map directly).

What it runs (the functions below build the argv lists; tests/unit check them):
  create   chattr -p ID +P <upper>                       (ext4: tag the dir, new files inherit the project)
           xfs_quota -x -c 'project -s -p <upper> ID' MNT (XFS)
  limits   setquota -P ID SOFT_KB HARD_KB ISOFT IHARD MNT (ext4; 0 = unlimited)
           xfs_quota -x -c 'limit -p bsoft=Sk bhard=Hk isoft=I ihard=J ID' MNT (XFS)
  usage    quotactl(Q_GETQUOTA, PRJQUOTA) through `quota -P ID -w -p` / xfs_quota 'quota -p -N -b -i ID'
  destroy  the limits set to 0 (the files go with the private area)

This kernel has neither (see /work/shared/ENVIRONMENT.md): `check` probes an ext4 file system with the quota
feature and refuses, naming the missing option. The second quota level, `--quotaugidlimit N` (user and group
quotas inside a VE), is designed on the image backend: the VE's ext4 image is made with `-O quota` and mounted
with `usrquota,grpquota`, and N bounds the uid/gid entries (OpenVZ's QUOTAUGIDLIMIT); it needs CONFIG_QFMT_V2
too and is refused the same way.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from vzpkg import process
from vzpkg.errors import StorageUnsupportedError, VEError

from ..layout import Layout
from .base import Limits
from .overlay import OverlayBackend

PROJID_BASE = 1 << 20
_probe_result: str | None | bool = False  # False: not probed yet


def project_id(veid: str) -> int:
    """Numeric VEIDs map to PROJID_BASE + VEID (below 2^32); names to a crc32-derived id above those."""
    if veid.isdigit() and int(veid) < (1 << 31) - PROJID_BASE:
        return PROJID_BASE + int(veid)
    return (1 << 31) + zlib.crc32(veid.encode()) % (1 << 30)


def setup_commands(fstype: str, mnt: Path, upper: Path, projid: int) -> list[list[str]]:
    if fstype == "xfs":
        return [["xfs_quota", "-x", "-c", f"project -s -p {upper} {projid}", str(mnt)]]
    return [["chattr", "-R", "-p", str(projid), "+P", str(upper)]]


def _kb(n: int | None) -> int:
    return 0 if n is None else -(-n // 1024)


def _count(n: int | None) -> int:
    return 0 if n is None else n


def limit_commands(fstype: str, mnt: Path, projid: int, limits: Limits) -> list[list[str]]:
    bs, bh = _kb(limits.space_soft), _kb(limits.space_hard)
    is_, ih = _count(limits.inodes_soft), _count(limits.inodes_hard)
    if fstype == "xfs":
        return [["xfs_quota", "-x", "-c", f"limit -p bsoft={bs}k bhard={bh}k isoft={is_} ihard={ih} {projid}",
                 str(mnt)]]
    return [["setquota", "-P", str(projid), str(bs), str(bh), str(is_), str(ih), str(mnt)]]


def usage_command(fstype: str, mnt: Path, projid: int) -> list[str]:
    if fstype == "xfs":
        return ["xfs_quota", "-x", "-c", f"quota -p -N -b -i {projid}", str(mnt)]
    return ["quota", "-P", str(projid), "-w", "-p", "-f", str(mnt)]


def release_commands(fstype: str, mnt: Path, projid: int) -> list[list[str]]:
    return limit_commands(fstype, mnt, projid, Limits())


def ugid_mkfs_options() -> list[str]:
    """What the image backend would add to mkfs.ext4 for --quotaugidlimit (user and group quotas inside)."""
    return ["-O", "quota", "-E", "quotatype=usrquota:grpquota"]


def kernel_quota_problem() -> str | None:
    """Why this kernel cannot do ext4 quotas (probed once: an ext4 image with the quota feature, mounted), or
    None. The probe is what the kernel does, not what a config file claims."""
    global _probe_result
    if _probe_result is not False:
        return _probe_result  # type: ignore[return-value]
    import os
    import tempfile


    with tempfile.TemporaryDirectory(prefix="vzpkg-quota-probe-") as d:
        img, mnt = Path(d) / "q.img", Path(d) / "m"
        mnt.mkdir()
        with open(img, "wb") as f:
            f.truncate(32 << 20)
        mk = process.run(["mkfs.ext4", "-q", "-F", "-O", "quota,project", str(img)], capture=True, text=True, check=False, error=VEError)
        if mk.returncode != 0:
            _probe_result = f"mkfs.ext4 cannot make the quota feature ({mk.stderr.strip()})"
            return _probe_result
        proc = process.run(["mount", "-o", "loop,prjquota", str(img), str(mnt)], capture=True, text=True, check=False, error=VEError)
        if proc.returncode == 0:
            process.run(["umount", str(mnt)], capture=True, check=False, error=VEError)
            _probe_result = None
        else:
            _probe_result = ("this kernel cannot mount ext4 with quotas: it lacks CONFIG_QFMT_V2 (and XFS quota, "
                             "CONFIG_XFS_QUOTA); use a kernel built with them (most distribution kernels are)")
        del os
    return _probe_result


class ProjQuotaBackend(OverlayBackend):
    kind = "projquota"
    space_limits = True
    inode_limits = True

    def check(self, layout: Layout, limits: Limits) -> None:
        problem = kernel_quota_problem()
        if problem is not None:
            raise StorageUnsupportedError(f"--layout projquota: {problem}; use --layout image (or btrfs) here")
        raise StorageUnsupportedError("--layout projquota: the VZ root's file system must be mounted with "
                                      "prjquota; this version only plans its commands (see docs/storage.md)")


def check_quotaugidlimit(value: int) -> None:
    """`--quotaugidlimit N`: refused here, naming the kernel support it needs."""
    if value == 0:
        return
    problem = kernel_quota_problem()
    if problem is not None:
        raise StorageUnsupportedError(f"--quotaugidlimit {value} (user and group quotas inside the VE): {problem}")
    raise StorageUnsupportedError(f"--quotaugidlimit {value}: second-level quotas are designed (docs/storage.md) "
                                  "but not implemented yet")
