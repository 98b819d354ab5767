"""Property test: random archives from a grammar of members, unpacked next to sentinels.

For every generated archive: nothing outside the target changes (contents, modes, owners, times, xattrs), and
either the archive is refused with UnsafeArchiveError exactly when the model of the rules below says it is
unsafe, or the unpacked tree is exactly what the model predicts (types, link targets, contents, modes, owners
shifted by id_shift, times, hard links, user xattrs).
"""

from __future__ import annotations

import os
import posixpath
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from extract_support import M, make_archive, make_sandbox, snapshot
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vzpkg.errors import UnsafeArchiveError
from vzpkg.store.extract import safe_unpack

pytestmark = pytest.mark.root

OUT = "@OUT@"  # replaced by the sandbox's sentinel directory (an absolute path outside the target)

# A small name pool makes collisions (repeated names, members below files and links) frequent; the parts that
# make a member unsafe by itself ('..', a leading '/', owners above 65535) are rare, so that most archives get
# far enough to test the interesting rules.
plain_component = st.sampled_from(["a", "b", "dev", "c"])


def rarely(strategy, otherwise, one_in: int):
    return st.integers(1, one_in).flatmap(lambda n: strategy if n == 1 else otherwise)


component = rarely(st.sampled_from([".", "..", "long" * 8]), plain_component, 40)


@st.composite
def names(draw, top: str | None = None) -> str:
    depth = draw(rarely(st.just(12), st.integers(1, 3), 20))  # sometimes deep
    parts = [top] if top else []
    parts += [draw(component) for _ in range(depth)]
    prefix = draw(rarely(st.just("/"), st.sampled_from(["", "./"]), 60))
    return prefix + "/".join(parts)


link_targets = st.sampled_from([
    "a", "a/b", "b", "dev/a", "..", "../a", "../../outside/file", "../../outside", "a/../../..", "/a", "/dev/a",
    f"{OUT}/file", f"{OUT}/dir", f"{OUT}/link-to-file", f"{OUT}/link-to-dir", "/",
])
hardlink_targets = rarely(st.sampled_from(["../a", f"{OUT}/file", "a/../a"]),
                          st.sampled_from(["a", "a/b", "b", "./a", "dev/a", "c/a", "c", "a/a", "b/a"]), 20)
ids = rarely(st.just(70000), st.sampled_from([0, 0, 1, 1000, 65535]), 60)
file_modes = st.sampled_from([0o644, 0o755, 0o4755, 0o2711, 0o600, 0o000, 0o1644])
dir_modes = st.sampled_from([0o755, 0o700, 0o555, 0o1777, 0o2775, 0o000])
mtimes = st.integers(0, 2**31 - 1)
xattr_sets = st.dictionaries(st.sampled_from(["user.a", "user.b", "trusted.t", "security.selinux"]),
                             st.binary(min_size=1, max_size=8), max_size=3)


@st.composite
def members(draw) -> M:
    kind = draw(st.sampled_from(["file", "file", "dir", "dir", "symlink", "hardlink", "chr", "blk", "fifo"]))
    device = kind in ("chr", "blk")
    m = M(kind, draw(rarely(names(), names("dev"), 6) if device else names()), uid=draw(ids), gid=draw(ids),
          mtime=draw(mtimes))
    if kind == "file":
        m.data = draw(st.binary(max_size=64) | st.just(b"x" * 70000))
        m.mode = draw(file_modes)
        m.xattrs = draw(xattr_sets)
    elif kind == "dir":
        m.mode = draw(dir_modes)
        m.xattrs = draw(xattr_sets)
    elif kind == "symlink":
        m.link = draw(link_targets)
    elif kind == "hardlink":
        m.link = draw(hardlink_targets)
    elif device:
        m.mode = 0o660
        m.rdev = (1, 3)
    else:
        m.mode = draw(st.sampled_from([0o644, 0o600, 0o4644]))
    return m


archives = st.lists(members(), min_size=1, max_size=12)


# ---- the model ----------------------------------------------------------------------------------------


@dataclass
class Node:
    kind: str  # file, dir, symlink, fifo, chr, blk, skipped-device
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: int | None = None  # None: an implicit directory, time not predicted
    data: bytes = b""
    link: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    inode: int = 0


class Unsafe(Exception):
    pass


def model(archive: list[M], id_shift: int) -> dict[str, Node]:
    """What the rules predict: the tree by name, or Unsafe."""
    tree: dict[str, Node] = {}
    inodes = iter(range(1, 10_000))
    for m in archive:
        if m.name.startswith("/") or ".." in m.name.split("/"):
            raise Unsafe("absolute or '..'")
        name = posixpath.normpath(m.name.rstrip("/") if m.kind == "dir" else m.name)
        if name == ".":
            if m.kind != "dir":
                raise Unsafe("'.' not a directory")
            continue
        if id_shift and max(m.uid, m.gid) > 65535:
            raise Unsafe("owner out of range")
        user_xattrs = {k: v for k, v in m.xattrs.items() if k.startswith("user.")}
        if name in tree:
            if tree[name].kind == "dir" and m.kind == "dir":
                node = tree[name]
                node.mode, node.uid, node.gid, node.mtime = m.mode, m.uid, m.gid, m.mtime
                node.xattrs.update(user_xattrs)
                continue
            raise Unsafe("repeated name")
        parts = name.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix not in tree:
                tree[prefix] = Node("dir", 0o755, 0, 0, None)
            elif tree[prefix].kind != "dir":
                raise Unsafe("below a non-directory")
        if m.kind == "file":
            tree[name] = Node("file", m.mode, m.uid, m.gid, m.mtime, m.data, xattrs=user_xattrs, inode=next(inodes))
        elif m.kind == "dir":
            tree[name] = Node("dir", m.mode, m.uid, m.gid, m.mtime, xattrs=user_xattrs)
        elif m.kind == "symlink":
            if not m.link.startswith("/"):
                resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.link))
                if resolved == ".." or resolved.startswith("../"):
                    raise Unsafe("symlink climbs out")
            tree[name] = Node("symlink", 0, m.uid, m.gid, m.mtime, link=m.link)
        elif m.kind == "hardlink":
            if m.link.startswith("/") or ".." in m.link.split("/"):
                raise Unsafe("hard link out")
            earlier = tree.get(posixpath.normpath(m.link))
            if earlier is None or earlier.kind != "file":
                raise Unsafe("hard link to a non-file")
            tree[name] = earlier  # the same inode
        elif m.kind in ("chr", "blk"):
            if not name.startswith("dev/"):
                raise Unsafe("device outside dev/")
            tree[name] = Node("skipped-device" if id_shift else m.kind, m.mode, m.uid, m.gid, m.mtime)
        else:
            tree[name] = Node("fifo", m.mode, m.uid, m.gid, m.mtime)
    return tree


def check_tree(target: Path, tree: dict[str, Node], id_shift: int) -> None:
    expected = {n for n, node in tree.items() if node.kind != "skipped-device"}
    found = set()
    for dirpath, dirnames, filenames in os.walk(target):
        for n in dirnames + filenames:
            found.add(str((Path(dirpath) / n).relative_to(target)))
    assert found == expected
    inode_of: dict[int, int] = {}
    for name in sorted(expected):
        node = tree[name]
        path = target / name
        st_ = path.lstat()
        kind = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
                stat.S_IFCHR: "chr", stat.S_IFBLK: "blk"}[stat.S_IFMT(st_.st_mode)]
        assert kind == node.kind, name
        assert (st_.st_uid, st_.st_gid) == (node.uid + id_shift, node.gid + id_shift), name
        if node.mtime is not None:
            assert st_.st_mtime == node.mtime, name
        if kind == "symlink":
            assert os.readlink(path) == node.link
            continue
        assert stat.S_IMODE(st_.st_mode) == node.mode, name
        if kind in ("file", "dir"):
            assert {k: os.getxattr(path, k) for k in os.listxattr(path)} == node.xattrs, name
        if kind == "file":
            assert path.read_bytes() == node.data, name
            # hard links: the same model inode <=> the same inode on disk
            assert inode_of.setdefault(node.inode, st_.st_ino) == st_.st_ino, name
            assert st_.st_nlink == sum(1 for n in expected if tree[n] is node), name
        if kind in ("chr", "blk"):
            assert os.major(st_.st_rdev) == 1 and os.minor(st_.st_rdev) == 3
    assert len(set(inode_of.values())) == len(inode_of)


def concretise(archive: list[M], outside: Path) -> list[M]:
    for m in archive:
        m.link = m.link.replace(OUT, str(outside))
    return archive


def run_example(archive: list[M], id_shift: int) -> None:
    with tempfile.TemporaryDirectory(prefix="vzpkg-unpack-model-") as tmp:
        base = Path(tmp)
        outside, target, path = make_sandbox(base)
        archive = concretise(archive, outside)
        make_archive(path, archive)
        before = snapshot(base, skip=target)
        try:
            expected: dict[str, Node] | None = model(archive, id_shift)
        except Unsafe as e:
            event(f"unsafe: {e}")
            expected = None
        else:
            event("safe")
        if expected is None:
            with pytest.raises(UnsafeArchiveError):
                safe_unpack(path, target, id_shift=id_shift)
        else:
            safe_unpack(path, target, id_shift=id_shift)
            check_tree(target, expected, id_shift)
        assert snapshot(base, skip=target) == before


COMMON = settings(max_examples=150, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@COMMON
@given(archives)
def test_model_in_process(archive: list[M]) -> None:
    """id_shift 0: update-cache's build root, unpacked by this process."""
    run_example(archive, 0)


@COMMON
@given(archives)
def test_model_in_user_namespace(archive: list[M]) -> None:
    """id_shift 100000: a VE template area, unpacked in a user namespace."""
    run_example(archive, 100000)
