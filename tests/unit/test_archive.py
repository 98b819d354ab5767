"""Packing is reproducible; the safe unpack refuses hostile archives."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from vzpkg.errors import UnsafeArchiveError
from vzpkg.store.archive import pack, sha256_file
from vzpkg.store.extract import safe_unpack


def make_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("ve\n")
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(b"\x7fELF" + b"x" * 5000)
    (root / "usr/bin/tool").chmod(0o4755)
    os.symlink("usr/bin", root / "bin")
    os.symlink("/etc/hostname", root / "etc/abs-link")
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-hardlink")
    os.mkfifo(root / "fifo")


def test_pack_roundtrip_and_reproducible(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    a, b = tmp_path / "a.tar.zst", tmp_path / "b.tar.zst"
    ra = pack(src, a, source_date_epoch=1700000000)
    os.utime(src / "etc/hostname", (1800000000, 1800000000))  # newer mtimes are clamped
    rb = pack(src, b, source_date_epoch=1700000000)
    assert ra.sha256 == rb.sha256 == sha256_file(a) == sha256_file(b)
    assert ra.packed_size == a.stat().st_size
    dest = tmp_path / "dest"
    dest.mkdir()
    assert safe_unpack(a, dest) >= 7
    assert (dest / "etc/hostname").read_text() == "ve\n"
    assert os.readlink(dest / "bin") == "usr/bin"
    assert (dest / "usr/bin/tool").stat().st_mode & 0o7777 == 0o4755
    assert (dest / "usr/bin/tool").stat().st_ino == (dest / "usr/bin/tool-hardlink").stat().st_ino
    assert (dest / "etc/hostname").stat().st_mtime <= 1700000000


def test_pack_differs_without_clamp(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    a = pack(src, tmp_path / "a.tar.zst", source_date_epoch=1700000000)
    (src / "etc/hostname").write_text("other\n")
    b = pack(src, tmp_path / "b.tar.zst", source_date_epoch=1700000000)
    assert a.sha256 != b.sha256


def hostile(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    path = tmp_path / "hostile.tar.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    return path


def info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", size: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = linkname
    ti.size = size
    ti.mode = 0o644
    return ti


def dev(name: str, kind: bytes = tarfile.CHRTYPE) -> tarfile.TarInfo:
    ti = info(name, kind)
    ti.devmajor, ti.devminor = 8, 0
    return ti


CASES = {
    "absolute path": [(info("/etc/passwd", size=1), b"x")],
    "dot-dot": [(info("./etc/../../outside", size=1), b"x")],
    "symlink escape": [(info("./evil", tarfile.SYMTYPE, "../../../../etc"), None)],
    "write through symlink": [
        (info("./etc", tarfile.SYMTYPE, "/etc"), None),
        (info("./etc/passwd", size=1), b"x"),
    ],
    "hard link outside": [(info("./shadow", tarfile.LNKTYPE, "/etc/shadow"), None)],
    "hard link dot-dot": [(info("./shadow", tarfile.LNKTYPE, "../etc/shadow"), None)],
    "hard link to missing": [(info("./x", tarfile.LNKTYPE, "etc/shadow"), None)],
    "block device outside /dev": [(dev("./sda", tarfile.BLKTYPE), None)],
    "char device outside /dev": [(dev("./home/mem"), None)],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_archives_are_refused(tmp_path: Path, case: str) -> None:
    archive = hostile(tmp_path, CASES[case])
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(UnsafeArchiveError):
        safe_unpack(archive, target)
    # Nothing was written outside the target.
    assert not (tmp_path / "outside").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.tar.zst", "target"]


def test_absolute_symlinks_inside_root_are_allowed(tmp_path: Path) -> None:
    archive = hostile(tmp_path, [(info("./etc", tarfile.DIRTYPE), None),
                                 (info("./etc/localtime", tarfile.SYMTYPE, "/usr/share/zoneinfo/UTC"), None)])
    target = tmp_path / "target"
    target.mkdir()
    safe_unpack(archive, target)
    assert os.readlink(target / "etc/localtime") == "/usr/share/zoneinfo/UTC"


def test_refuses_non_empty_target(tmp_path: Path) -> None:
    archive = hostile(tmp_path, [(info("./a", size=1), b"x")])
    target = tmp_path / "target"
    target.mkdir()
    (target / "something").write_text("")
    with pytest.raises(UnsafeArchiveError, match="not empty"):
        safe_unpack(archive, target)


@pytest.mark.root
def test_id_shift_rejects_ids_out_of_range(tmp_path: Path) -> None:
    ti = info("./a", size=1)
    ti.uid = 70000
    archive = hostile(tmp_path, [(ti, b"x")])
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(UnsafeArchiveError, match="outside 0..65535"):
        safe_unpack(archive, target, id_shift=100000)


def device_archive(tmp_path: Path) -> Path:
    ti = info("./a", size=1)
    ti.uid, ti.gid = 0, 5
    null = dev("./dev/null")
    null.devmajor, null.devminor = 1, 3
    return hostile(tmp_path, [(info("./dev", tarfile.DIRTYPE), None), (null, None), (ti, b"x")])


@pytest.mark.root
def test_id_shift_moves_owners_and_skips_devices(tmp_path: Path) -> None:
    """In the VE's user namespace mknod is refused: device nodes are left out, with a note."""
    target = tmp_path / "target"
    target.mkdir()
    notes: list[str] = []
    assert safe_unpack(device_archive(tmp_path), target, id_shift=100000, note=notes.append) == 3
    st = (target / "a").stat()
    assert (st.st_uid, st.st_gid) == (100000, 100005)
    assert (target / "dev").stat().st_uid == 100000
    assert not (target / "dev/null").exists()
    assert notes == ["skipped 1 device nodes (a VE's /dev is a tmpfs of its own)"]


@pytest.mark.root
def test_devices_in_dev_without_id_shift(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    safe_unpack(device_archive(tmp_path), target)
    assert os.major((target / "dev/null").lstat().st_rdev) == 1
    assert (target / "a").stat().st_gid == 5
