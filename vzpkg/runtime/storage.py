"""A VE's file system: the shared template area, the private area, and the root mount.

Template area: a cache is unpacked once per (sha256, id shift) with the safe unpack, under a temporary name
that is renamed into place, with a lock so concurrent creates unpack it once. It is never written to again:
VEs made from it keep it, even after the cache is rebuilt (a new sha256 gets a new directory).

Private area, per layout:
  overlay   private/<id>/upper + private/<id>/work; root/<id> is an overlay whose lower layer is the template
  copy      private/<id>/root, an independent copy (cp -a --reflink=auto); root/<id> is a bind mount of it

A VE with a private id range (IDMAP="private") uses the template generation unpacked with the shared shift
(100000) through an idmapped mount: a read-only clone of the template's mount whose ids 100000.. appear as the
VE's ID_SHIFT.., attached at private/<id>/lower only while the overlay is mounted on it (overlayfs keeps a
private clone of each layer, so the attachment is detached right after and no mount is left to clean up), or
while the copy layout copies from it. No second unpack, and about 0.3 ms per mount.
"""

from __future__ import annotations

import os
from pathlib import Path

from vzpkg.errors import CacheNotFoundError, VEError
from vzpkg.flock import lock_file

from . import ns
from .layout import DEFAULT_ID_SHIFT, ID_RANGE, Layout

TMP_PREFIX = ".tmp-"
LOWER = "lower"  # private/<id>/lower: where the idmapped template is attached while it is used


class templates_lock:  # noqa: N801 (used as a context manager, like open)
    """The template area's lock: creates hold it shared from unpacking a template until their config (which
    names the template) is saved; `vzpkg clean --templates` holds it exclusively while removing unused ones."""

    def __init__(self, layout: Layout, *, exclusive: bool) -> None:
        self.path = layout.template_dir / ".area.lock"
        self.exclusive = exclusive
        self.fd = -1

    def __enter__(self) -> templates_lock:
        self.fd = lock_file(self.path, shared=not self.exclusive)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def remove_unused_templates(layout: Layout) -> list[tuple[Path, int]]:
    """Remove unpacked template generations that no VE uses; return (path, bytes freed) for each."""
    import shutil

    from .layout import templates_in_use

    removed: list[tuple[Path, int]] = []
    if not layout.template_dir.is_dir():
        return removed
    with templates_lock(layout, exclusive=True):
        used = templates_in_use(layout)
        for path in sorted(layout.template_dir.iterdir()):
            # only generations (<sha256> or <sha256>-<shift>): the default cache dir, /var/lib/vz/template/cache,
            # lives here too
            if not _is_generation(path.name) or not path.is_dir() or path.name in used:
                continue
            size = disk_usage(path)
            shutil.rmtree(path)
            (layout.template_dir / f".{path.name}.lock").unlink(missing_ok=True)
            removed.append((path, size))
    return removed


def _is_generation(name: str) -> bool:
    sha, _, shift = name.partition("-")
    return len(sha) == 64 and set(sha) <= set("0123456789abcdef") and (shift == "" or shift.isdigit())


def cache_init(cache_dir: Path, name: str) -> str:
    """The template's default init recorded in the cache's manifest (minimal for caches that do not say)."""
    init = _read_manifest(cache_dir, name).get("init")
    return init if init in ("minimal", "distro") else "minimal"


_HEX = frozenset("0123456789abcdef")


def cache_sha256(cache_dir: Path, name: str) -> str:
    """The sha256 of the current cache NAME, from its manifest (<cache_dir>/<name>.json, see cache.CacheStore)."""
    data = _read_manifest(cache_dir, name)
    manifest = cache_dir / f"{name}.json"
    sha = data.get("sha256")
    # It names a directory under template/: anything but 64 hex digits ("/..", "../../x") would point elsewhere.
    if not isinstance(sha, str) or len(sha) != 64 or not set(sha) <= _HEX:
        raise CacheNotFoundError(f"cache manifest {manifest} has no valid sha256: rebuild the cache")
    return sha


def _read_manifest(cache_dir: Path, name: str) -> dict:
    """The cache's manifest through vzpkg.manifest's reader (stdlib only: `vzctl create` loads no archive code)."""
    from vzpkg.manifest import ManifestReadError, read_data

    manifest = cache_dir / f"{name}.json"
    try:
        return read_data(manifest)
    except ManifestReadError as e:
        if e.kind == "missing":
            raise CacheNotFoundError(
                f"no cache for template {name!r} in {cache_dir}: run 'vzpkg create-cache {name}' "
                "(or point --cache-dir / $VZPKG_CACHE_DIR at the right directory)"
            ) from None
        if e.kind == "not-regular":
            raise CacheNotFoundError(f"cache manifest {manifest} is {e.detail}: rebuild the cache") from None
        if e.kind == "not-object":
            raise CacheNotFoundError(f"cache manifest {manifest} is not a JSON object: rebuild the cache") from None
        raise CacheNotFoundError(f"cannot read cache manifest {manifest}: {e.cause}") from None


def ensure_template(layout: Layout, cache_dir: Path, name: str, id_shift: int) -> tuple[str, Path]:
    """Return (sha256, directory) of the unpacked current cache NAME, unpacking it if needed."""
    sha = cache_sha256(cache_dir, name)
    target = layout.template(sha, id_shift)
    if target.is_dir():
        return sha, target
    lock_fd = lock_file(layout.template_dir / f".{target.name}.lock")
    try:
        if target.is_dir():
            return sha, target
        import shutil

        from vzpkg.store.archive import sha256_file
        from vzpkg.store.extract import safe_unpack

        archive = cache_dir / f"{name}.tar.zst"
        if not archive.is_file():
            raise CacheNotFoundError(f"cache archive {archive} is missing: run 'vzpkg create-cache {name}'")
        if sha256_file(archive) != sha:
            raise VEError(f"cache {archive} does not match its manifest's sha256: run 'vzpkg verify-cache {name}'")
        # leftovers of an interrupted unpack of this generation
        for p in layout.template_dir.glob(f"{TMP_PREFIX}{target.name}-*"):
            shutil.rmtree(p, ignore_errors=True)
        tmp = layout.template_dir / f"{TMP_PREFIX}{target.name}-{os.getpid()}"
        tmp.mkdir(mode=0o755)
        try:
            safe_unpack(archive, tmp, id_shift=id_shift)
            os.chown(tmp, id_shift, id_shift)
            os.chmod(tmp, 0o755)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return sha, target
    finally:
        os.close(lock_fd)


def _idmapped_tree(template: Path, id_shift: int) -> int:
    """A detached read-only clone of TEMPLATE's mount (owned by DEFAULT_ID_SHIFT..) with ids shown as ID_SHIFT.."""
    try:
        userns = ns.idmap_userns(DEFAULT_ID_SHIFT, id_shift, ID_RANGE)
        try:
            return ns.open_tree_idmapped(template, userns)
        finally:
            os.close(userns)
    except OSError as e:
        raise VEError(f"cannot make an idmapped mount of the template {template} ({e.strerror}): this needs "
                      "Linux >= 5.19 and a file system with idmapped mounts (ext4, xfs, btrfs, ...); use "
                      "'vzctl create --idmap shared' on this host") from None


def check_idmap(template: Path, id_shift: int) -> None:
    """Fail at create, not at every start, where idmapped mounts do not work."""
    os.close(_idmapped_tree(template, id_shift))


def attach_idmapped(template: Path, at: Path, id_shift: int) -> None:
    """Attach TEMPLATE at AT, read-only, its ids DEFAULT_ID_SHIFT.. seen as ID_SHIFT.."""
    tree = _idmapped_tree(template, id_shift)
    try:
        ns.move_mount_fd(tree, at)
    finally:
        os.close(tree)


def detach(path: Path) -> None:
    """Lazily unmount everything mounted on PATH (an attached template left by a crash)."""
    while is_mounted(path):
        ns.umount(path, ns.MNT_DETACH)


def mounts_below(path: Path) -> list[bytes]:
    """Mount points at or below PATH in our mount namespace, deepest first (as /proc/self/mountinfo escapes them)."""
    prefix = _mountinfo_escape(path)
    found = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ", 5)
            if len(fields) > 4 and (fields[4] == prefix or fields[4].startswith(prefix + b"/")):
                found.append(fields[4])
    return sorted(set(found), key=len, reverse=True)


def detach_below(path: Path) -> None:
    """Lazily unmount every mount at or below PATH before it is deleted: a tree removal must never descend into
    a mount (an attached template, a VE root a crash left mounted) and delete what lies beyond it."""
    for _ in range(100):  # stacked mounts: each round removes the top ones
        points = mounts_below(path)
        if not points:
            return
        for point in points:
            unescaped = point.replace(b"\\040", b" ").replace(b"\\011", b"\t").replace(b"\\012", b"\n") \
                .replace(b"\\134", b"\\")
            try:
                ns.umount(os.fsdecode(unescaped), ns.MNT_DETACH)
            except OSError:
                pass
    raise VEError(f"cannot unmount what is mounted below {path}: see 'findmnt -R {path}'")


def create_private(layout: Layout, veid: str, template: Path, layout_kind: str, id_shift: int, *,
                   idmapped: bool = False, backend, limits) -> Path:
    """Build private/<id> under a temporary name and rename it into place. Returns the private dir.

    BACKEND (a backends.Backend, chosen by the caller: storage sits below the backends) fills the temporary area
    to LIMITS (backends.Limits). IDMAPPED: TEMPLATE
    is owned by DEFAULT_ID_SHIFT.. and the VE's range is ID_SHIFT.. (a copy is made through an idmapped mount,
    so it is owned by the VE's range with setuid bits and file capabilities intact)."""
    final = layout.private(veid)
    if final.exists():
        raise VEError(f"private area {final} already exists: destroy VE {veid} first or remove it by hand")
    layout.private_dir.mkdir(parents=True, exist_ok=True)
    tmp = layout.private_dir / f"{TMP_PREFIX}{veid}-{os.getpid()}"
    try:
        tmp.mkdir(mode=0o700)
        backend.prepare(layout, veid, tmp, template, id_shift, idmapped=idmapped, limits=limits)
        os.rename(tmp, final)
    except BaseException:
        remove_tree(tmp)  # (unmounts and detaches what a backend attached there first)
        raise
    return final


def fill_private(tmp: Path, veid: str, template: Path, layout_kind: str, id_shift: int, *,
                 idmapped: bool = False) -> None:
    """The overlay layout's upper/ + work/, or the copy layout's root/, in TMP."""
    if layout_kind == "overlay":
        upper = tmp / "upper"
        upper.mkdir(mode=0o755)
        os.chown(upper, id_shift, id_shift)
        (tmp / "work").mkdir(mode=0o700)
    elif layout_kind == "copy":
        import signal

        from .. import process

        source = template
        if idmapped:
            source = tmp / LOWER
            source.mkdir(mode=0o700)
            attach_idmapped(template, source, id_shift)
        try:
            # dies with vzctl: a killed create must not leave a cp filling the temporary area
            proc = process.run(["cp", "-a", "--reflink=auto", str(source), str(tmp / "root")], capture=True,
                               text=True, check=False, error=VEError, pdeathsig=signal.SIGKILL)
        finally:
            if idmapped:
                detach(source)
                source.rmdir()
        if proc.returncode != 0:
            raise VEError(f"copying {template} for VE {veid} failed: {proc.stderr.strip()}")
    else:
        raise VEError(f"unknown layout {layout_kind!r}: use overlay or copy")


def _mountinfo_escape(path: Path) -> bytes:
    return os.fsencode(path).replace(b"\\", b"\\134").replace(b" ", b"\\040").replace(b"\t", b"\\011") \
        .replace(b"\n", b"\\012")


def is_mounted(path: Path) -> bool:
    """Is PATH a mount point in our mount namespace? (reads /proc/self/mountinfo, no stat of the path)"""
    escaped = _mountinfo_escape(path)
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ", 5)
            if len(fields) > 4 and fields[4] == escaped:
                return True
    return False


def mount_root(layout: Layout, veid: str, template: Path, layout_kind: str, idmap_shift: int | None = None,
               layers: Path | None = None) -> Path:
    """Mount root/<id>. IDMAP_SHIFT (overlay layout): the lower layer is TEMPLATE seen through an idmapped
    mount with its ids DEFAULT_ID_SHIFT.. shown as IDMAP_SHIFT... LAYERS: where upper/ and work/ are (default
    the private area; the image backend's mounted image)."""
    target = layout.ve_root(veid)
    if os.path.islink(target):
        # mount(2) follows it: the VE's root would be mounted over whatever host directory it names, and stop
        # (which unmounts root/<id>) would leave it there. It is only our mount point: replace it.
        os.unlink(target)
    target.mkdir(parents=True, exist_ok=True)
    if is_mounted(target):
        return target
    private = layout.private(veid)
    if not private.is_dir():
        raise VEError(f"VE {veid} has no private area {private}: it was not created or is damaged")
    if layout_kind == "copy":
        ns.mount(private / "root", target, None, ns.MS_BIND)
    else:
        if not template.is_dir():
            raise VEError(f"VE {veid}: its template generation {template} is gone (removed by 'vzpkg clean'?)")
        lower = template
        if idmap_shift is not None:
            lower = private / LOWER
            # (a mount left here by a start killed at the wrong moment is only covered: umount_root removes it)
            lower.mkdir(mode=0o700, exist_ok=True)
            attach_idmapped(template, lower, idmap_shift)
        try:
            layers = layers or private
            opts = f"lowerdir={lower},upperdir={layers / 'upper'},workdir={layers / 'work'},xino=off"
            ns.mount("overlay", target, "overlay", 0, opts)
        finally:
            if idmap_shift is not None:
                # the overlay holds its own clone of the layer: the attachment is not needed any more
                ns.umount(lower, ns.MNT_DETACH)
    # the VE root must never propagate mounts made inside it back to the host, nor receive the host's
    try:
        ns.mount(None, target, None, ns.MS_PRIVATE)
    except OSError:
        pass
    return target


def umount_root(layout: Layout, veid: str) -> None:
    target = layout.ve_root(veid)
    while is_mounted(target):
        try:
            ns.umount(target)
        except OSError:
            ns.umount(target, ns.MNT_DETACH)
    detach(layout.private(veid) / LOWER)


def remove_private(layout: Layout, veid: str) -> None:
    import shutil

    private = layout.private(veid)
    if not private.exists():
        return
    detach_below(private)  # never delete through an attached template or a left-over mount
    # rename first so a crash half-way leaves a .tmp- leftover, never a half-deleted VE that looks intact
    doomed = layout.private_dir / f"{TMP_PREFIX}{veid}-destroy-{os.getpid()}"
    os.rename(private, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
    if doomed.exists():
        # overlay work dirs can hold a d--------- 'work' dir: make everything writable and retry
        from .. import process

        process.run(["rm", "-rf", "--one-file-system", str(doomed)], capture=True, check=False, error=VEError)


def disk_usage(path: Path) -> int:
    """Bytes allocated below PATH (st_blocks), without following mounts or symlinks."""
    return disk_usage_counts(path)[0]


def disk_usage_counts(path: Path) -> tuple[int, int]:
    """(bytes allocated, inodes) below PATH, without following mounts or symlinks."""
    total = inodes = 0
    try:
        dev = os.lstat(path).st_dev
    except FileNotFoundError:
        return 0, 0
    stack = [os.fsencode(path)]
    seen: set[tuple[int, int]] = set()
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_dev != dev:
                    continue
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                total += st.st_blocks * 512
                inodes += 1
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
    return total, inodes


def kill_writers(path: Path, timeout: float = 5.0) -> None:
    """SIGKILL every process whose cwd, root, an open file or an argument lies under PATH; wait until they are gone.

    A killed vzctl's children live on: the `cp -a` of a copy-layout create keeps filling its temporary
    directory, and would refill what we remove."""
    import signal
    import time

    prefix = os.fsencode(path)
    me = os.getpid()
    victims = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        links = [f"/proc/{name}/cwd", f"/proc/{name}/root"]
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            links += [f"/proc/{name}/fd/{fd}" for fd in os.listdir(f"/proc/{name}/fd")]
        except OSError:
            continue
        if any(a == prefix or a.startswith(prefix + b"/") for a in args):  # cp -a TEMPLATE PATH/root
            victims.append(int(name))
            continue
        for link in links:
            try:
                target = os.readlink(os.fsencode(link))
            except OSError:
                continue
            if target == prefix or target.startswith(prefix + b"/"):
                victims.append(int(name))
                break
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while victims and time.monotonic() < deadline:
        victims = [p for p in victims if _running(p)]
        time.sleep(0.01)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def remove_tree(path: Path) -> int:
    """Remove PATH (a directory tree or a file) without following symlinks or crossing mounts; return bytes freed.
    Processes still working in it (children of a killed vzctl) are killed first."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if os.path.isdir(path) and not os.path.islink(path):
        kill_writers(path)
        detach_below(path)  # e.g. the template a killed copy-layout create had attached at .tmp-<id>-*/lower
    if not os.path.isdir(path) or os.path.islink(path):
        os.unlink(path)
        return st.st_blocks * 512
    size = disk_usage(path)
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        # overlay work dirs can hold a d--------- 'work' dir that rmtree cannot enter
        from .. import process
        from ..errors import VEError

        process.run(["rm", "-rf", "--one-file-system", str(path)], capture=True, check=False, error=VEError)
    return size
