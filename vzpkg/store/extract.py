"""Unpacking cache archives so that nothing is ever written through a link.

tarfile only parses the stream here; every file is created by this module, relative to directory file
descriptors, never by path:

- Every parent directory is opened with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
  RESOLVE_NO_XDEV) from the target's descriptor (or, on kernels without openat2, one O_NOFOLLOW component at a
  time): the kernel refuses a symlink anywhere on the way, whatever the archive did before.
- Every entry is created exclusively (O_CREAT|O_EXCL, mkdirat, symlinkat, linkat, mknodat): an existing name is
  never opened, replaced or followed. Owner, mode and times are set on the new descriptor, or with
  AT_SYMLINK_NOFOLLOW; the mode after the owner (chown clears setuid bits); directory times last.
- A member repeating an earlier member's name is refused, except a directory repeating a directory (GNU tar
  lists '.' and a directory given twice that way): the later one's owner, mode and time win.
- Refused as well: absolute names, '..' components, a name below a non-directory, symlinks whose relative target
  climbs out of the root, hard links to anything but an earlier regular-file member, device nodes outside dev/,
  other member types.
- Extended attributes: user.* is kept; security.capability only on regular files (see below); trusted.*,
  security.* (SELinux labels, IMA, ...) and system.* are dropped with a counted note.

With id_shift > 0 (a template area for user-namespaced VEs) the whole unpack runs in a child process in a new
user namespace mapping 0..65535 to id_shift..id_shift+65535, as that namespace's root, in a target owned by
id_shift. The kernel then shifts every owner itself, stores file capabilities as namespaced (v3) capabilities
whose root is id_shift (they grant nothing to host users), refuses device nodes (skipped with a note: a VE's
/dev is a tmpfs) and gives even a bug no power over host files owned by host users. Owners outside 0..65535 are
refused. With id_shift == 0 (update-cache's build root, which is packed again) the same code runs in-process;
device nodes under dev/ are created and plain (v2) file capabilities are kept, as packages installed them.

The openat2 walk is in beneath.py (open_beneath).
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import signal
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .. import errors
from ..errors import UnsafeArchiveError, VerifyError, VzError
from .beneath import DIR_FLAGS, open_beneath

_CHUNK = 1 << 20
_NS_SIZE = 65536  # ids a VE's user namespace maps

_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# errors that mean "the archive's names collide or lead somewhere they must not"
_STRUCTURE_ERRNOS = {errno.EEXIST, errno.ENOTDIR, errno.ELOOP, errno.EXDEV, errno.ENAMETOOLONG, errno.EISDIR}

_XATTR_PREFIX = "SCHILY.xattr."
_CAPABILITY = "security.capability"
_VFS_CAP_REVISION_2 = 0x02000000
_VFS_CAP_REVISION_3 = 0x03000000
_VFS_CAP_REVISION_MASK = 0xFF000000
_VFS_CAP_FLAGS_EFFECTIVE = 0x000001


def _capability_v2(value: bytes) -> bytes | None:
    """A v2 or v3 security.capability value as v2 (no root id), or None if it is neither.

    Written inside a VE's user namespace the kernel turns a v2 value into a v3 one whose root is that namespace's
    root, whatever root id the packer's namespace had."""
    if len(value) not in (20, 24):
        return None
    magic = int.from_bytes(value[:4], "little")
    revision = magic & _VFS_CAP_REVISION_MASK
    if (revision, len(value)) not in ((_VFS_CAP_REVISION_2, 20), (_VFS_CAP_REVISION_3, 24)):
        return None
    flags = magic & _VFS_CAP_FLAGS_EFFECTIVE
    return (_VFS_CAP_REVISION_2 | flags).to_bytes(4, "little") + value[4:20]


class _Extractor:
    """Creates the members of one archive below ROOTFD, member by member, in archive order."""

    _PARENT_CACHE = 64  # open parent directories kept (GNU tar's sorted order revisits only a few)

    def __init__(self, rootfd: int, *, userns: bool) -> None:
        self.root = rootfd
        self.userns = userns
        self.chown = os.geteuid() == 0  # as tarfile: without root, files stay the caller's
        self.kinds: dict[str, str] = {}  # name -> "dir", "file", "symlink", "fifo", "device"
        self.parents: dict[str, int] = {}  # LRU of open directory descriptors by name
        self.dir_times: dict[str, float] = {}
        self.count = 0
        self.skipped_devices = 0
        self.dropped_xattrs: dict[str, int] = {}
        self.tf: tarfile.TarFile | None = None

    # ---- the walk ----

    def run(self, stream: IO[bytes]) -> None:
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            self.tf = tf
            for member in tf:
                self.member(member)
        self.finish()

    def member(self, member: tarfile.TarInfo) -> None:
        raw = member.name
        if raw.startswith("/"):
            raise UnsafeArchiveError(f"unsafe archive member {raw!r}: absolute path")
        if ".." in raw.split("/"):
            raise UnsafeArchiveError(f"unsafe archive member {raw!r}: '..' component")
        name = posixpath.normpath(raw)
        if name == ".":
            if not member.isdir():
                raise UnsafeArchiveError(f"unsafe archive member {raw!r}: names the target directory itself")
            return  # the target exists; its owner and mode are the caller's
        self.count += 1
        if self.userns and not (0 <= member.uid < _NS_SIZE and 0 <= member.gid < _NS_SIZE):
            raise UnsafeArchiveError(f"archive member {raw!r}: owner {member.uid}:{member.gid} outside 0..65535")
        earlier = self.kinds.get(name)
        if earlier is not None:
            if earlier == "dir" and member.isdir():
                self._repeat_dir(name, member)
                return
            raise UnsafeArchiveError(f"unsafe archive member {raw!r}: repeats the name of an earlier {earlier}")
        parent, base = posixpath.split(name)
        try:
            pfd = self._parent(parent, raw)
            if member.isfile():
                self._file(pfd, base, member)
                kind = "file"
            elif member.isdir():
                self._dir(pfd, base, name, member)
                kind = "dir"
            elif member.issym():
                self._symlink(pfd, base, name, member)
                kind = "symlink"
            elif member.islnk():
                self._hardlink(base, name, member)
                kind = "file"
            elif member.ischr() or member.isblk():
                if not name.startswith("dev/"):
                    raise UnsafeArchiveError(f"unsafe archive member {raw!r}: device node outside /dev")
                self._device(pfd, base, member)
                kind = "device"
            elif member.isfifo():
                os.mkfifo(base, 0o600, dir_fd=pfd)
                self._attrs_at(pfd, base, member)
                kind = "fifo"
            else:
                raise UnsafeArchiveError(f"unsafe archive member {raw!r}: unsupported type {member.type!r}")
        except OSError as e:
            if e.errno in _STRUCTURE_ERRNOS:
                raise UnsafeArchiveError(f"unsafe archive member {raw!r}: {e.strerror}") from None
            raise VzError(f"cannot unpack archive member {raw!r}: {e.strerror}") from None
        self.kinds[name] = kind

    def finish(self) -> None:
        # Creating entries bumps their directory's mtime: put the recorded times back last, deepest first.
        for name in reversed(self.dir_times):
            parent, base = posixpath.split(name)
            mtime = self.dir_times[name]
            try:
                os.utime(base, (mtime, mtime), dir_fd=self._parent(parent, name), follow_symlinks=False)
            except OSError as e:
                raise VzError(f"cannot set the time of unpacked directory {name!r}: {e.strerror}") from None
        self.close()

    def close(self) -> None:
        for fd in self.parents.values():
            os.close(fd)
        self.parents.clear()

    # ---- directories ----

    def _parent(self, parent: str, raw: str) -> int:
        """An open descriptor of directory PARENT (created, root's with mode 0755, if no member made it yet)."""
        if not parent:
            return self.root
        fd = self.parents.pop(parent, None)
        if fd is None:
            kind = self.kinds.get(parent)
            if kind is None:
                self._implicit_dir(parent, raw)
                fd = self.parents.pop(parent)
            elif kind != "dir":
                raise UnsafeArchiveError(f"unsafe archive member {raw!r}: {parent!r} above it is a {kind}")
            else:
                fd = open_beneath(self.root, parent, DIR_FLAGS)
            if len(self.parents) >= self._PARENT_CACHE:
                os.close(self.parents.pop(next(iter(self.parents))))
        self.parents[parent] = fd
        return fd

    def _implicit_dir(self, name: str, raw: str) -> None:
        up, base = posixpath.split(name)
        pfd = self._parent(up, raw)
        os.mkdir(base, 0o700, dir_fd=pfd)
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        if self.chown:
            # root's, as the mode is 0755: below a setgid directory the kernel gives it that directory's group
            os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o755)
        self.kinds[name] = "dir"
        self._remember(name, fd)

    def _remember(self, name: str, fd: int) -> None:
        if len(self.parents) >= self._PARENT_CACHE:
            os.close(self.parents.pop(next(iter(self.parents))))
        self.parents[name] = fd

    def _dir(self, pfd: int, base: str, name: str, member: tarfile.TarInfo) -> None:
        os.mkdir(base, 0o700, dir_fd=pfd)
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            self._attrs_fd(fd, member, regular=False)
        except BaseException:
            os.close(fd)
            raise
        self._remember(name, fd)  # its children usually follow
        self.dir_times[name] = member.mtime

    def _repeat_dir(self, name: str, member: tarfile.TarInfo) -> None:
        try:
            fd = open_beneath(self.root, name, os.O_RDONLY | os.O_DIRECTORY)
            try:
                self._attrs_fd(fd, member, regular=False)
            finally:
                os.close(fd)
        except OSError as e:
            raise UnsafeArchiveError(f"unsafe archive member {member.name!r}: {e.strerror}") from None
        self.dir_times[name] = member.mtime

    # ---- other members ----

    def _file(self, pfd: int, base: str, member: tarfile.TarInfo) -> None:
        fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=pfd)
        try:
            remaining = member.size
            if remaining:
                assert self.tf is not None
                src = self.tf.extractfile(member)
                assert src is not None
                read, write = src.read, os.write
                while remaining > 0:
                    buf = read(min(remaining, _CHUNK))
                    if not buf:
                        raise tarfile.ReadError("unexpected end of data")
                    remaining -= len(buf)
                    while buf:
                        buf = buf[write(fd, buf):]
            self._attrs_fd(fd, member, regular=True)
        finally:
            os.close(fd)

    def _symlink(self, pfd: int, base: str, name: str, member: tarfile.TarInfo) -> None:
        target = member.linkname
        if not target:
            raise UnsafeArchiveError(f"unsafe archive member {member.name!r}: symlink with an empty target")
        # Absolute targets are resolved inside the root when the root is in use (as in every OS tree);
        # a relative target must not climb out of the root.
        if not target.startswith("/"):
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
            if resolved == ".." or resolved.startswith("../"):
                raise UnsafeArchiveError(f"unsafe archive member {member.name!r}: symlink to {target!r} "
                                         "escapes the root")
        os.symlink(target, base, dir_fd=pfd)
        if self.chown:
            os.chown(base, member.uid, member.gid, dir_fd=pfd, follow_symlinks=False)
        os.utime(base, (member.mtime, member.mtime), dir_fd=pfd, follow_symlinks=False)

    def _hardlink(self, base: str, name: str, member: tarfile.TarInfo) -> None:
        target = member.linkname
        if target.startswith("/") or ".." in target.split("/"):
            raise UnsafeArchiveError(f"unsafe archive member {member.name!r}: hard link to {target!r} "
                                     "escapes the root")
        tname = posixpath.normpath(target)
        if self.kinds.get(tname) != "file":
            raise UnsafeArchiveError(f"unsafe archive member {member.name!r}: hard link to {target!r}, "
                                     "not an earlier regular file of the archive")
        tparent, tbase = posixpath.split(tname)
        tfd = self._parent(tparent, member.name)
        pfd = self._parent(posixpath.dirname(name), member.name)  # the most recently used two stay open
        # linkat without AT_SYMLINK_FOLLOW, both ends relative to directories opened without following links
        os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)

    def _device(self, pfd: int, base: str, member: tarfile.TarInfo) -> None:
        if self.userns:
            self.skipped_devices += 1  # mknod is refused in a user namespace; a VE's /dev is a tmpfs anyway
            return
        kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
        os.mknod(base, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=pfd)
        self._attrs_at(pfd, base, member)

    # ---- owners, modes, times, extended attributes ----

    def _attrs_fd(self, fd: int, member: tarfile.TarInfo, *, regular: bool) -> None:
        if self.chown:
            os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, member.mode & 0o7777)  # after chown, which clears setuid and setgid bits
        if member.pax_headers:
            self._xattrs(fd, member, regular)  # after chown, which clears security.capability
        if regular:
            os.utime(fd, (member.mtime, member.mtime))

    def _attrs_at(self, pfd: int, base: str, member: tarfile.TarInfo) -> None:
        if self.chown:
            os.chown(base, member.uid, member.gid, dir_fd=pfd, follow_symlinks=False)
        os.chmod(base, member.mode & 0o7777, dir_fd=pfd, follow_symlinks=False)
        os.utime(base, (member.mtime, member.mtime), dir_fd=pfd, follow_symlinks=False)
        if any(k.startswith(_XATTR_PREFIX) for k in member.pax_headers):
            self._drop("on a fifo or device node")

    def _xattrs(self, fd: int, member: tarfile.TarInfo, regular: bool) -> None:
        for key, text in member.pax_headers.items():
            if not key.startswith(_XATTR_PREFIX):
                continue
            attr = key[len(_XATTR_PREFIX):]
            value = text.encode("utf-8", "surrogateescape")
            if attr == _CAPABILITY:
                if not regular:
                    self._drop("security.capability on a directory")
                    continue
                v2 = _capability_v2(value)
                if v2 is None:
                    self._drop("malformed security.capability")
                    continue
                if not self.userns and value != v2:
                    # a namespaced capability written by the host root would become a host-wide one
                    self._drop("namespaced security.capability")
                    continue
                value = v2
            elif not attr.startswith("user."):
                self._drop(attr.split(".", 1)[0] + ".*")
                continue
            try:
                os.setxattr(fd, attr, value)
            except OSError as e:
                self._drop(f"{attr.split('.', 1)[0]}.* refused by the filesystem ({e.strerror})")

    def _drop(self, what: str) -> None:
        self.dropped_xattrs[what] = self.dropped_xattrs.get(what, 0) + 1

    def notes(self) -> list[str]:
        out = []
        if self.skipped_devices:
            out.append(f"skipped {self.skipped_devices} device nodes (a VE's /dev is a tmpfs of its own)")
        for what, n in sorted(self.dropped_xattrs.items()):
            out.append(f"dropped {n} extended attributes: {what}")
        return out


# ---- entry points ----------------------------------------------------------------------------------


def _extract(archive: Path, stream: IO[bytes], rootfd: int, *, userns: bool) -> dict[str, Any]:
    import zstandard

    ex = _Extractor(rootfd, userns=userns)
    try:
        ex.run(stream)
    except (tarfile.TarError, EOFError, zstandard.ZstdError) as e:
        raise VerifyError(f"archive {archive} is unreadable ({e}): check it with 'vzpkg verify-cache'") from None
    finally:
        ex.close()
    return {"count": ex.count, "notes": ex.notes()}


def _open_target(target: Path) -> int:
    return os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def safe_unpack(archive: Path, target: Path, *, id_shift: int = 0, note: Callable[[str], None] | None = None) -> int:
    """Unpack a .tar.zst into TARGET (an existing, empty directory), refusing hostile members.

    The rules are in this module's docstring. With id_shift > 0 the unpack runs in a user namespace whose ids
    0..65535 are id_shift..id_shift+65535 on the host (TARGET is chowned to id_shift first). NOTE, if given, is
    called with a line for anything left out (device nodes, extended attributes). Returns the number of members.
    """
    from .archive import open_decompressed

    if any(target.iterdir()):
        raise UnsafeArchiveError(f"unpack target {target} is not empty")
    if id_shift:
        if os.geteuid() != 0:
            raise VzError(f"unpacking {archive} for user-namespaced VEs (id_shift {id_shift}) needs root")
        os.chown(target, id_shift, id_shift)
        result = _run_in_userns(archive, target, id_shift)
    else:
        rootfd = _open_target(target)
        try:
            with open_decompressed(archive) as stream:
                result = _extract(archive, stream, rootfd, userns=False)
        finally:
            os.close(rootfd)
    if note is not None:
        for line in result["notes"]:
            note(line)
    return int(result["count"])


def _run_in_userns(archive: Path, target: Path, id_shift: int) -> dict[str, Any]:
    """Fork a child that unpacks as root of a new user namespace mapped onto id_shift..id_shift+65535."""
    from ..runtime import ns
    from .archive import open_decompressed

    res_r, res_w = os.pipe()
    go_r, go_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        status = 1
        try:
            os.close(res_r)
            os.close(go_w)
            payload: dict[str, Any]
            try:
                ns.set_pdeathsig(signal.SIGKILL)
                if os.getppid() != parent:
                    os._exit(1)
                # opened as the host's root, before the namespace exists
                rootfd = _open_target(target)
                stream = open_decompressed(archive)
                ns.unshare(ns.CLONE_NEWUSER)
                os.write(res_w, b"R")
                if os.read(go_r, 1) != b"G":
                    os._exit(1)
                ns.setresid(0, 0)  # the namespace's root: host id_shift, with every capability inside it
                with stream:
                    payload = _extract(archive, stream, rootfd, userns=True)
                status = 0
            except BaseException as e:  # noqa: B036 - everything goes back to the parent
                payload = {"error": {"type": type(e).__name__, "message": str(e),
                                     "errno": getattr(e, "errno", None)}}
            data = json.dumps(payload).encode()
            while data:
                data = data[os.write(res_w, data):]
        finally:
            os._exit(status)
    os.close(res_w)
    os.close(go_r)
    finished = False
    try:
        first = os.read(res_r, 1)
        if first == b"R":
            try:
                ns.write_id_maps(pid, id_shift)
            except OSError as e:
                raise VzError(f"cannot map ids {id_shift}..{id_shift + _NS_SIZE - 1} for unpacking: {e}") from None
            os.write(go_w, b"G")
            first = b""
        os.close(go_w)
        go_w = -1
        chunks = [first]
        while chunk := os.read(res_r, 65536):
            chunks.append(chunk)
        finished = True
    finally:
        os.close(res_r)
        if go_w >= 0:
            os.close(go_w)
        if not finished:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    try:
        payload = json.loads(b"".join(chunks))
    except ValueError:
        raise VzError(f"unpacking {archive} failed: the unpacking process died (wait status {status})") from None
    if "error" in payload:
        raise _rebuild(payload["error"], archive)
    return payload


def _rebuild(err: dict[str, Any], archive: Path) -> BaseException:
    """The child's exception as the same type and message (only types we know: nothing is unpickled)."""
    kind, message = str(err.get("type")), str(err.get("message"))
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, VzError):
        return cls(message)
    if kind == "KeyboardInterrupt":
        return KeyboardInterrupt()
    if err.get("errno") is not None and kind in ("OSError", "FileNotFoundError", "PermissionError"):
        return OSError(int(err["errno"]), message)
    return VzError(f"unpacking {archive} failed: {kind}: {message}")
