"""What a template directory may hold besides template.toml: its `files/` tree and its `scripts/`.

Nothing here follows a symlink out of the template. A `files/` tree holds regular files, directories and
symlinks only; a symlink is copied into the root as a symlink (its target string, never what it points to on
the host) and a symlinked directory is not descended into. A script may be a symlink only to a file of the same
template directory. Everything else (fifos, sockets, devices, a symlinked `files/`) is a TemplateError naming
the path.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import TemplateError

#: scripts run on the host (with the root as $1): they must be executable themselves
HOST_SCRIPTS = ("pre-cache", "post-cache", "pre-update")


@dataclass(frozen=True)
class TreeEntry:
    rel: PurePosixPath   # path below the tree's top
    path: Path           # path on the host (inside the template directory)
    st: os.stat_result   # lstat: the entry itself, never what a symlink points to

    @property
    def kind(self) -> str:
        mode = self.st.st_mode
        for test, name in ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"),
                           (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                           (stat.S_ISBLK, "block device")):
            if test(mode):
                return name
        return "special file"

    @property
    def times_ns(self) -> tuple[int, int]:
        return self.st.st_atime_ns, self.st.st_mtime_ns


def _entries(directory: Path, rel: PurePosixPath) -> list[TreeEntry]:
    try:
        with os.scandir(directory) as it:
            return [TreeEntry(rel / e.name, Path(e.path), e.stat(follow_symlinks=False))
                    for e in sorted(it, key=lambda e: e.name)]
    except OSError as e:
        raise TemplateError(f"{directory}: cannot read: {e.strerror}") from e


def walk(top: Path) -> Iterator[TreeEntry]:
    """Every entry below TOP, parents before children, names sorted; symlinks are entries, never followed."""
    stack = [iter(_entries(top, PurePosixPath()))]  # a stack, not recursion: no depth limit
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        yield item
        if item.kind == "dir":
            stack.append(iter(_entries(item.path, item.rel)))


def files_tree(template_dir: Path) -> Path | None:
    """The template's `files/` directory, None without one; a symlinked or non-directory `files` is refused."""
    path = template_dir / "files"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise TemplateError(f"{path}: cannot read: {e.strerror}") from e
    if stat.S_ISLNK(st.st_mode):
        raise TemplateError(f"{path}: is a symlink (to {os.readlink(path)}): files/ must be a directory of the "
                            f"template, it is never followed")
    if not stat.S_ISDIR(st.st_mode):
        raise TemplateError(f"{path}: not a directory")
    return path


def files_entries(tree: Path) -> list[TreeEntry]:
    """The entries of a `files/` tree, checked: regular files, directories and symlinks only."""
    found = []
    for entry in walk(tree):
        kind = entry.kind
        if kind not in ("dir", "file", "symlink"):
            raise TemplateError(f"{entry.path}: a {kind} in files/: only regular files, directories and symlinks "
                                f"can be copied into a root; remove it")
        if kind == "symlink" and entry.rel.suffix == ".j2":
            raise TemplateError(f"{entry.path}: a symlink cannot be rendered (it is never followed): make the .j2 "
                                f"file a regular file, or drop the .j2 suffix to copy the symlink as it is")
        found.append(entry)
    return found


def open_regular(path: Path) -> int:
    """An fd of the regular file PATH, refusing a symlink or anything else in its place."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TemplateError(f"{path}: cannot read: {e.strerror}") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TemplateError(f"{path}: not a regular file")
    return fd


def read_regular(path: Path) -> bytes:
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def check_scripts(template_dir: Path, names: tuple[str, ...]) -> None:
    """`scripts/` holds only known names, each a regular file of the template (a symlink only within it)."""
    scripts = template_dir / "scripts"
    try:
        st = os.lstat(scripts)
    except FileNotFoundError:
        return
    top = os.path.realpath(template_dir)
    if stat.S_ISLNK(st.st_mode) and not _inside(os.path.realpath(scripts), top):
        raise TemplateError(f"{scripts}: a symlink to {os.path.realpath(scripts)}, outside the template directory "
                            f"{template_dir}: scripts must be files of the template")
    if not scripts.is_dir():
        raise TemplateError(f"{scripts}: not a directory")
    for entry in sorted(os.scandir(scripts), key=lambda e: e.name):
        path = Path(entry.path)
        if entry.name not in names:
            raise TemplateError(f"{path}: unknown script name (known: {', '.join(names)})")
        if entry.is_symlink():
            real = os.path.realpath(path)
            if not _inside(real, top):
                raise TemplateError(f"{path}: a symlink to {real}, outside the template directory {template_dir}: "
                                    f"a script must be a file of the template (copy it in)")
        try:
            st = path.stat()
        except OSError as e:
            raise TemplateError(f"{path}: cannot read the script: {e.strerror}") from e
        if not stat.S_ISREG(st.st_mode):
            raise TemplateError(f"{path}: a script must be a regular file")
        if entry.name in HOST_SCRIPTS and not st.st_mode & 0o111:
            raise TemplateError(f"{path}: not executable (it runs on the host): chmod +x {path}")
