"""Helpers for the unpack tests: hand-made tar.zst archives, a sandbox with sentinels, and snapshots."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import zstandard


@dataclass
class M:
    """One archive member: kind is file, dir, symlink, hardlink, chr, blk or fifo."""

    kind: str
    name: str
    data: bytes = b""
    link: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 1_600_000_000
    xattrs: dict[str, bytes] = field(default_factory=dict)
    rdev: tuple[int, int] = (1, 3)


_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
          "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}


def make_archive(path: Path, members: list[M]) -> Path:
    """Write MEMBERS, in order and unchecked, as a pax tar compressed with zstandard."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            ti = tarfile.TarInfo(m.name)
            ti.type = _TYPES[m.kind]
            ti.mode, ti.uid, ti.gid, ti.mtime = m.mode, m.uid, m.gid, m.mtime
            ti.linkname = m.link
            ti.devmajor, ti.devminor = m.rdev
            if m.xattrs:
                # GNU tar's encoding of extended attributes (binary values survive via surrogateescape)
                ti.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in m.xattrs.items()}
            if m.kind == "file":
                ti.size = len(m.data)
                tf.addfile(ti, io.BytesIO(m.data))
            else:
                tf.addfile(ti)
    path.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    return path


def make_sandbox(base: Path) -> tuple[Path, Path, Path]:
    """base/outside (sentinels an attack would aim at) and an empty base/target. Returns (outside, target,
    archive path to use)."""
    outside = base / "outside"
    outside.mkdir()
    (outside / "file").write_bytes(b"sentinel\n")
    (outside / "file").chmod(0o644)
    (outside / "dir").mkdir()
    (outside / "dir/inner").write_bytes(b"inner\n")
    (outside / "setuid").write_bytes(b"#!/bin/sh\n")
    (outside / "setuid").chmod(0o4755)
    os.setxattr(outside / "file", "user.sentinel", b"1")
    os.symlink(outside / "file", outside / "link-to-file")
    os.symlink("dir", outside / "link-to-dir")
    target = base / "target"
    target.mkdir()
    return outside, target, base / "archive.tar.zst"


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Everything observable under ROOT (not following links, leaving out SKIP): types, modes, owners, sizes,
    times, contents, link targets, extended attributes, hard-link counts."""
    out: dict[str, tuple] = {}

    def record(p: Path) -> None:
        st = os.lstat(p)
        content: bytes | str | None = None
        if stat.S_ISREG(st.st_mode):
            content = p.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(p)
        try:
            xattrs = {k: os.getxattr(p, k, follow_symlinks=False) for k in os.listxattr(p, follow_symlinks=False)}
        except OSError:
            xattrs = {}
        out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                                         st.st_nlink, content, tuple(sorted(xattrs.items())))

    record(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = Path(dirpath) / n
            if skip is not None and p == skip:
                continue
            record(p)
        dirnames[:] = [d for d in dirnames if skip is None or Path(dirpath) / d != skip]
    return out
