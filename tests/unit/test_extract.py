"""The reported attacks on the unpack, file capabilities and extended attributes, and the no-follow walk.

Every attack runs with id_shift 0 (in-process, as update-cache does) and 100000 (in a user namespace, as
`vzctl create` does), and with openat2 and with its O_NOFOLLOW fallback.
"""

from __future__ import annotations

import errno
import os
import tarfile
from pathlib import Path

import pytest
from extract_support import M, make_archive, make_sandbox, snapshot

from vzpkg.errors import UnsafeArchiveError, VerifyError
from vzpkg.store import beneath
from vzpkg.store.extract import open_beneath, safe_unpack

pytestmark = pytest.mark.root  # chown, and the user namespace of id_shift

SHIFTS = [0, 100000]


@pytest.fixture(params=["openat2", "nofollow-walk"])
def resolver(request, monkeypatch) -> str:
    """Run the test with openat2 and again as on a kernel without it (the fork inherits the setting)."""
    if request.param == "nofollow-walk":
        monkeypatch.setattr(beneath, "_openat2_works", False)
    return request.param


def attack(tmp_path: Path, members_for, id_shift: int) -> tuple[Path, Path]:
    """Unpack an archive built by MEMBERS_FOR(outside) and check it is refused with nothing outside touched."""
    outside, target, archive = make_sandbox(tmp_path)
    make_archive(archive, members_for(outside))
    before = snapshot(tmp_path, skip=target)
    with pytest.raises(UnsafeArchiveError):
        safe_unpack(archive, target, id_shift=id_shift)
    assert snapshot(tmp_path, skip=target) == before
    return outside, target


@pytest.mark.parametrize("id_shift", SHIFTS)
def test_file_over_an_earlier_symlink_is_refused(tmp_path: Path, id_shift: int, resolver: str) -> None:
    """The reported hole: `a` -> host file, then a regular file `a` overwrote the host file as root."""
    outside, target = attack(tmp_path, lambda out: [
        M("dir", "."),
        M("symlink", "./a", link=str(out / "file")),
        M("file", "./a", data=b"owned\n", mode=0o4755),
    ], id_shift)
    assert (outside / "file").read_bytes() == b"sentinel\n"
    assert os.readlink(target / "a") == str(outside / "file")


@pytest.mark.parametrize("id_shift", SHIFTS)
def test_hard_link_named_like_an_earlier_symlink_is_refused_cleanly(tmp_path: Path, id_shift: int,
                                                                     resolver: str) -> None:
    """The second report: this gave a raw traceback; now it is an UnsafeArchiveError naming the member."""
    outside, target, archive = make_sandbox(tmp_path)
    make_archive(archive, [
        M("file", "./f", data=b"x"),
        M("symlink", "./a", link=str(outside / "file")),
        M("hardlink", "./a", link="./f"),
    ])
    with pytest.raises(UnsafeArchiveError, match=r"'\./a': repeats the name of an earlier symlink"):
        safe_unpack(archive, target, id_shift=id_shift)
    assert (outside / "file").read_bytes() == b"sentinel\n"


@pytest.mark.parametrize("id_shift", SHIFTS)
@pytest.mark.parametrize("case", ["file below a symlinked dir", "file over a file below a symlinked dir",
                                  "dir over a symlink", "hard link to a symlink",
                                  "hard link through a symlinked dir", "fifo over a symlink",
                                  "relative symlink climbing out", "file below a file"])
def test_link_attacks_are_refused(tmp_path: Path, id_shift: int, case: str, resolver: str) -> None:
    cases = {
        "file below a symlinked dir": lambda out: [M("symlink", "d", link=str(out / "dir")),
                                                   M("file", "d/new", data=b"planted")],
        "file over a file below a symlinked dir": lambda out: [M("symlink", "d", link=str(out / "dir")),
                                                               M("file", "d/inner", data=b"owned")],
        "dir over a symlink": lambda out: [M("symlink", "d", link=str(out / "dir")), M("dir", "d", mode=0o777)],
        "hard link to a symlink": lambda out: [M("symlink", "s", link=str(out / "file")),
                                               M("hardlink", "h", link="s")],
        "hard link through a symlinked dir": lambda out: [M("symlink", "d", link=str(out / "dir")),
                                                          M("hardlink", "h", link="d/inner")],
        "fifo over a symlink": lambda out: [M("symlink", "p", link=str(out / "file")), M("fifo", "p")],
        "relative symlink climbing out": lambda out: [M("dir", "a"), M("symlink", "a/up", link="../../outside")],
        "file below a file": lambda out: [M("file", "f", data=b"x"), M("file", "f/g", data=b"y")],
    }
    attack(tmp_path, cases[case], id_shift)


@pytest.mark.parametrize("id_shift", SHIFTS)
def test_errors_come_back_with_their_type_and_message(tmp_path: Path, id_shift: int) -> None:
    """From the user-namespace child too: an unreadable archive is a VerifyError, not a dead child."""
    _, target, archive = make_sandbox(tmp_path)
    make_archive(archive, [M("file", "big", data=os.urandom(300_000))])
    archive.write_bytes(archive.read_bytes()[:150_000])
    with pytest.raises(VerifyError, match="is unreadable"):
        safe_unpack(archive, target, id_shift=id_shift)


def test_open_beneath_never_follows_a_link(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "link")
    os.symlink("/", tmp_path / "abs")
    rootfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for works in (True, False):
            monkeypatch.setattr(beneath, "_openat2_works", works)
            fd = open_beneath(rootfd, "real", os.O_PATH | os.O_DIRECTORY)
            os.close(fd)
            for path in ("link", "abs/etc", "link/x"):
                with pytest.raises(OSError) as e:
                    open_beneath(rootfd, path, os.O_PATH | os.O_DIRECTORY)
                assert e.value.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT), path
    finally:
        os.close(rootfd)


CAP_NET_RAW = 13


def v2_capability(effective: bool = True) -> bytes:
    magic = 0x02000000 | (1 if effective else 0)
    return magic.to_bytes(4, "little") + (1 << CAP_NET_RAW).to_bytes(4, "little") + bytes(12)


def v3_capability(rootid: int) -> bytes:
    return (0x03000001).to_bytes(4, "little") + (1 << CAP_NET_RAW).to_bytes(4, "little") + bytes(12) + \
        rootid.to_bytes(4, "little")


def read_capability(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, "security.capability", follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None
        raise


@pytest.mark.parametrize("packed", ["v2", "v3 rootid 0", "v3 rootid 5000"])
def test_capabilities_in_a_ve_template_are_namespaced(tmp_path: Path, packed: str) -> None:
    """The reported hole: security.capability kept as is gave a host user the capability. Under id_shift the
    kernel stores a v3 capability whose root is id_shift: it means something only to the VE's root."""
    value = {"v2": v2_capability(), "v3 rootid 0": v3_capability(0), "v3 rootid 5000": v3_capability(5000)}[packed]
    _, target, archive = make_sandbox(tmp_path)
    make_archive(archive, [M("file", "./usr/bin/ping", data=b"\x7fELF", mode=0o755,
                             xattrs={"security.capability": value})])
    safe_unpack(archive, target, id_shift=100000)
    raw = read_capability(target / "usr/bin/ping")
    assert raw is not None
    magic = int.from_bytes(raw[:4], "little")
    assert magic & 0xFF000000 == 0x03000000, f"not a namespaced capability: {raw.hex()}"
    assert magic & 1 == 1  # effective flag kept
    assert len(raw) == 24 and int.from_bytes(raw[20:24], "little") == 100000
    assert int.from_bytes(raw[4:8], "little") == 1 << CAP_NET_RAW
    st = (target / "usr/bin/ping").stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (100000, 0o755)


def test_capabilities_kept_for_the_update_root(tmp_path: Path) -> None:
    """id_shift 0 (update-cache packs the root again): a package's v2 capability stays; a namespaced one, which
    the host root would turn into a host-wide one, is dropped with a note."""
    _, target, archive = make_sandbox(tmp_path)
    make_archive(archive, [
        M("file", "ping", data=b"\x7fELF", mode=0o4755, xattrs={"security.capability": v2_capability()}),
        M("file", "other", data=b"\x7fELF", mode=0o755, xattrs={"security.capability": v3_capability(5000)}),
        M("file", "bad", data=b"\x7fELF", mode=0o755, xattrs={"security.capability": b"\x01\x00"}),
    ])
    notes: list[str] = []
    safe_unpack(archive, target, note=notes.append)
    assert read_capability(target / "ping") == v2_capability()
    assert (target / "ping").stat().st_mode & 0o7777 == 0o4755  # mode set after chown and with the capability
    assert read_capability(target / "other") is None
    assert read_capability(target / "bad") is None
    assert notes == ["dropped 1 extended attributes: malformed security.capability",
                     "dropped 1 extended attributes: namespaced security.capability"]


@pytest.mark.parametrize("id_shift", SHIFTS)
def test_only_user_xattrs_are_kept(tmp_path: Path, id_shift: int) -> None:
    _, target, archive = make_sandbox(tmp_path)
    xattrs = {"user.mime_type": b"text/plain", "trusted.overlay.opaque": b"y",
              "security.selinux": b"system_u:object_r:shadow_t:s0", "security.ima": b"\x03\x02",
              "system.posix_acl_access": b"\x02\x00\x00\x00"}
    make_archive(archive, [M("dir", "d", mode=0o755, xattrs=dict(xattrs)), M("file", "d/f", data=b"x", xattrs=xattrs)])
    notes: list[str] = []
    safe_unpack(archive, target, id_shift=id_shift, note=notes.append)
    for p in (target / "d", target / "d/f"):
        assert os.listxattr(p) == ["user.mime_type"]
        assert os.getxattr(p, "user.mime_type") == b"text/plain"
    assert notes == ["dropped 4 extended attributes: security.*", "dropped 2 extended attributes: system.*",
                     "dropped 2 extended attributes: trusted.*"]


@pytest.mark.parametrize("id_shift", SHIFTS)
def test_contents_modes_owners_times(tmp_path: Path, id_shift: int, resolver: str) -> None:
    """A large file (more than one read), setuid after the owner change, a read-only directory filled after it is
    made, a directory given twice (the later one wins), implicit parents, hard links, directory times."""
    big = os.urandom(3 * (1 << 20) + 12345)
    _, target, archive = make_sandbox(tmp_path)
    make_archive(archive, [
        M("dir", "."),
        M("dir", "ro", mode=0o555, uid=3, gid=4, mtime=1_000_000),
        M("file", "ro/big", data=big, mode=0o4750, uid=0, gid=50, mtime=1_234_567),
        M("hardlink", "ro/big-again", link="./ro/big"),
        M("dir", "ro", mode=0o511, uid=5, gid=6, mtime=2_000_000),
        M("file", "deep/er/path/f", data=b"", mode=0o600, uid=65535, gid=65535),
        M("fifo", "pipe", mode=0o620, uid=7, gid=8, mtime=3_000_000),
        M("symlink", "abs", link="/etc/passwd", uid=9, gid=10, mtime=4_000_000),
    ])
    assert safe_unpack(archive, target, id_shift=id_shift) == 7
    s = id_shift
    ro = (target / "ro").lstat()
    assert (ro.st_mode & 0o7777, ro.st_uid, ro.st_gid, ro.st_mtime) == (0o511, 5 + s, 6 + s, 2_000_000)
    f = (target / "ro/big").lstat()
    assert (f.st_mode & 0o7777, f.st_uid, f.st_gid, f.st_mtime, f.st_nlink) == (0o4750, s, 50 + s, 1_234_567, 2)
    assert (target / "ro/big").read_bytes() == big
    assert (target / "ro/big-again").lstat().st_ino == f.st_ino
    for implicit in ("deep", "deep/er", "deep/er/path"):
        st = (target / implicit).lstat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o755, s, s)
    st = (target / "deep/er/path/f").lstat()
    assert (st.st_uid, st.st_gid) == (65535 + s, 65535 + s)
    st = (target / "pipe").lstat()
    assert (st.st_mode, st.st_uid, st.st_gid, st.st_mtime) == (0o10620, 7 + s, 8 + s, 3_000_000)
    st = (target / "abs").lstat()
    assert (os.readlink(target / "abs"), st.st_uid, st.st_gid, st.st_mtime) == ("/etc/passwd", 9 + s, 10 + s,
                                                                                  4_000_000)
    assert (target.stat().st_uid, target.stat().st_gid) == (s, s)


@pytest.mark.parametrize("id_shift", SHIFTS)
def test_implicit_parents_below_a_setgid_directory_are_roots(tmp_path: Path, id_shift: int) -> None:
    """The kernel gives a directory made below a setgid one that one's group: an implicit parent is root's, 0755,
    wherever it is made (test_extract_model.py found this only in rare random archives: a setgid directory with
    a non-root group and a member two levels below it)."""
    _, target, archive = make_sandbox(tmp_path)
    make_archive(archive, [M("dir", "g", mode=0o2775, uid=1000, gid=1000), M("file", "g/implicit/f", data=b"x")])
    safe_unpack(archive, target, id_shift=id_shift)
    s = id_shift
    g = (target / "g").lstat()
    assert (g.st_mode & 0o7777, g.st_uid, g.st_gid) == (0o2775, 1000 + s, 1000 + s)
    st = (target / "g/implicit").lstat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o755, s, s)


@pytest.mark.parametrize("name", ["/etc/passwd", "a/../../x", "."])
def test_refused_names(tmp_path: Path, name: str) -> None:
    _, target, archive = make_sandbox(tmp_path)
    make_archive(archive, [M("file", name, data=b"x")])
    with pytest.raises(UnsafeArchiveError):
        safe_unpack(archive, target)


def test_unsupported_member_type(tmp_path: Path) -> None:
    import io

    import zstandard

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("x")
        ti.type = b"V"  # a GNU volume header: not something a root filesystem contains
        tf.addfile(ti)
    _, target, archive = make_sandbox(tmp_path)
    archive.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    with pytest.raises(UnsafeArchiveError, match="unsupported type"):
        safe_unpack(archive, target)


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def test_the_user_namespace_child_dies_with_its_parent(tmp_path: Path) -> None:
    """The archive is a FIFO nobody writes: the child blocks opening it until its parent is killed."""
    import signal
    import subprocess
    import sys
    import time

    fifo, target = tmp_path / "blocked.tar.zst", tmp_path / "target"
    os.mkfifo(fifo)
    target.mkdir()
    code = ("import sys; from pathlib import Path; from vzpkg.store.extract import safe_unpack; "
            "safe_unpack(Path(sys.argv[1]), Path(sys.argv[2]), id_shift=100000)")
    parent = subprocess.Popen([sys.executable, "-c", code, str(fifo), str(target)])
    child = None
    try:
        deadline = time.monotonic() + 10
        while child is None and time.monotonic() < deadline:
            kids = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
            child = int(kids[0]) if kids else None
            time.sleep(0.02)
        assert child is not None, "safe_unpack started no child"
        time.sleep(0.2)  # let it reach the blocking open (after PR_SET_PDEATHSIG)
        assert _state(child) not in (None, "Z")
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while _state(child) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _state(child) in (None, "Z"), "the unpacking child outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None and _state(child) not in (None, "Z"):
            os.kill(child, signal.SIGKILL)
