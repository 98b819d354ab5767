"""vzctl migrate VEID DEST [--online] [--keep-dst]: move a VE to another VZ root on this machine.

Offline: stop, copy (config, private area, template generation if DEST lacks it), start there, destroy here.
Online: copy the private area while the VE runs, checkpoint it (CRIU dumps straight into DEST's dump/<id>; the
VE is frozen from here), copy what changed, restore on DEST, destroy on the source. The VE's storage backend
copies its storage (Backend.copy_to: rsync of overlay's upper/, the image file once after the dump, a btrfs
subvolume rsynced onto a snapshot of DEST's template subvolume). Iterative pre-dumps
need memory change tracking (`criu check --feature mem_dirty_track`); without it (this machine's kernel has no
MEM_SOFT_DIRTY) the one dump carries all memory, and vzctl says so once.

Failure safety: until DEST's restore succeeded the source is the VE — a failure restores it on the source from
the images (or starts it again, offline) and removes what reached DEST (unless --keep-dst). A vzctl killed
after the dump leaves the source *suspended* with its marker naming the images in DEST: `vzctl restore VEID`
on the source brings it back. The source is destroyed only after DEST runs, so the VE never runs on both.
`ssh://` destinations are not implemented yet (MigrationError says so).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from vzpkg import process
from vzpkg.errors import MigrationError, UsageError, VEError, VENotFoundError, VEStateError

from . import checkpoint, criu, ve
from .confcache import _conf_params, load_conf
from .layout import Layout, check_veid


def _ensure_template(src: Layout, dst: Layout, conf) -> None:
    from .confcache import _template_of

    there = _template_of(dst, "x", conf)
    if there.is_dir():
        return
    here = _template_of(src, "x", conf)
    tmp = there.with_name(f".tmp-{there.name}-{os.getpid()}")
    try:
        process.run(["cp", "-a", "--reflink=auto", str(here), str(tmp)], capture=True, text=True,
                    error=MigrationError, what=f"copying the template {here} to {there}")
    except MigrationError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(there)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another migration put it there first


def _check_dest(src: Layout, dst: Layout, veid: str, conf) -> None:
    if dst.real_root() == src.real_root():
        raise UsageError(f"migrate: {dst.root} is this VE's own VZ root")
    if ve.exists(dst, veid):
        raise VEStateError(f"VE {veid} already exists in {dst.root}: destroy it there first")
    from . import backends

    try:  # what DEST cannot hold (no btrfs pool there) is refused before anything moves
        backends.backend_of(conf).check(dst, backends.Limits.of(conf))
    except VEError as e:
        raise MigrationError(f"VE {veid} cannot move to {dst.root}: {e}") from None
    privileged, shift, _, _ = _conf_params(conf)
    if not privileged and conf.get("IDMAP") == "private":
        from .idrange import overlapping

        others = overlapping(dst, veid, shift)
        if others:
            raise MigrationError(f"VE {veid}'s id range (ID_SHIFT={shift}) overlaps VE {others[0][0]}'s in "
                                 f"{dst.root}: a checkpoint keeps its ids, so it cannot move there")


def _install_conf(src: Layout, dst: Layout, veid: str) -> None:
    from .conf import VEConfig

    conf = VEConfig.load(src.conf(veid))
    conf.set("VE_ROOT", str(dst.ve_root(veid)))
    conf.set("VE_PRIVATE", str(dst.private(veid)))
    dst.ve_root(veid).mkdir(parents=True, exist_ok=True)
    conf.save(dst.conf(veid))


def _remove_dest(dst: Layout, veid: str, backend) -> None:
    try:
        if dst.conf(veid).exists():
            ve.destroy(dst, veid, force=True)
        backend.discard_copy(dst, veid)
    except VEError:
        pass
    for p in (dst.private(veid), dst.private_dir / f".tmp-{veid}-migrate", dst.ve_root(veid), dst.dump(veid)):
        shutil.rmtree(p, ignore_errors=True)


def migrate(layout: Layout, veid: str, dest: str, *, online: bool = False, keep_dst: bool = False,
            lazy: bool = False) -> dict[str, float]:
    """Returns the time of each phase (seconds) and, online, "frozen"."""
    veid = check_veid(veid)
    if dest.startswith("ssh://"):
        raise MigrationError("migrate: ssh:// destinations are not implemented yet: migrate to a VZ root on this "
                             "machine (a directory), or copy the VE with rsync and 'vzctl restore' there")
    dst = Layout.at(dest)
    dst.secure_areas()
    if not layout.conf(veid).exists():
        raise VENotFoundError(f"VE {veid} does not exist")
    conf = load_conf(layout, veid)
    _check_dest(layout, dst, veid, conf)
    from . import backends

    store = _Storage(backends.backend_of(conf), layout, dst, veid, backends.Limits.of(conf))
    running = ve.running_init(layout, veid) is not None
    if online and not running:
        raise VEStateError(f"VE {veid} is not running: --online needs a running VE (drop --online)")
    if lazy and not online:
        raise UsageError("migrate: --lazy goes with --online (a post-copy restore on DEST)")
    if lazy:
        checkpoint.check_lazy(conf)
    times: dict[str, float] = {}
    staged = dst.private_dir / f".tmp-{veid}-migrate"

    def phase(name: str, t0: float) -> None:
        times[name] = time.monotonic() - t0

    t = time.monotonic()
    _ensure_template(layout, dst, conf)
    try:
        store.copy(staged, final=False)
    except BaseException:
        if not keep_dst:
            _remove_dest(dst, veid, store.backend)
        raise
    phase("copy", t)
    if not online:
        return _offline(layout, dst, veid, store, running, staged, keep_dst, times)
    if not _dirty_tracking():
        print("vzctl: note: this kernel has no memory change tracking (criu check --feature mem_dirty_track): "
              "migrating without iterative pre-dumps", file=sys.stderr)
    images = dst.dump(veid)
    t = time.monotonic()
    info = checkpoint.chkpnt(layout, veid, dumpdir=images)  # the VE is frozen, then gone from the source
    phase("dump", t)
    frozen0 = t
    try:
        t = time.monotonic()
        _sync_and_install(layout, dst, veid, store, staged)
        phase("sync", t)
        t = time.monotonic()
        checkpoint.restore(dst, veid, dumpdir=images, lazy=lazy)
        phase("restore", t)
        times["frozen"] = time.monotonic() - frozen0
        times["dump_frozen"] = info["frozen_s"]
    except BaseException as e:
        # the source is the VE until DEST runs it: bring it back there from the same images
        try:
            checkpoint.restore(layout, veid, dumpdir=images)
        except VEError as again:
            raise MigrationError(f"VE {veid}: migration failed ({e}) and restoring it on the source failed too "
                                 f"({again}): the images are in {images}; 'vzctl restore {veid} --dumpdir {images}'"
                                 ) from None
        finally:
            if not keep_dst:
                _remove_dest(dst, veid, store.backend)
        if isinstance(e, VEError):
            raise MigrationError(f"VE {veid}: migration to {dst.root} failed, the VE runs on the source again: "
                                 f"{e}") from None
        raise
    t = time.monotonic()
    ve.destroy(layout, veid, force=True)
    phase("destroy", t)
    return times


class _Storage:
    """The VE's storage backend copying it to DEST (copy failures are the migration's)."""

    def __init__(self, backend, src: Layout, dst: Layout, veid: str, limits) -> None:
        self.backend, self.src, self.dst, self.veid, self.limits = backend, src, dst, veid, limits

    def copy(self, staged: Path, *, final: bool) -> None:
        try:
            self.backend.copy_to(self.src, self.dst, self.veid, staged, self.limits, final=final)
        except VEError as e:
            if isinstance(e, MigrationError):
                raise
            raise MigrationError(f"VE {self.veid}: copying its storage to {self.dst.root} failed: {e}") from None


def _sync_and_install(layout: Layout, dst: Layout, veid: str, store: _Storage, staged: Path) -> None:
    """The last copy of the VE's files (the VE no longer runs on the source), moved into place on DEST with its
    config."""
    store.copy(staged, final=True)
    staged.rename(dst.private(veid))
    _install_conf(layout, dst, veid)


def _offline(layout: Layout, dst: Layout, veid: str, store: _Storage, running: bool, staged: Path, keep_dst: bool,
             times: dict[str, float]) -> dict[str, float]:
    t = time.monotonic()
    if running:
        ve.stop(layout, veid)
    times["stop"] = time.monotonic() - t
    try:
        t = time.monotonic()
        _sync_and_install(layout, dst, veid, store, staged)
        times["sync"] = time.monotonic() - t
        t = time.monotonic()
        if running:
            ve.start(dst, veid)
        times["start"] = time.monotonic() - t
    except BaseException as e:
        if not keep_dst:
            _remove_dest(dst, veid, store.backend)
        if running:
            ve.start(layout, veid)
        if isinstance(e, VEError):
            raise MigrationError(f"VE {veid}: migration to {dst.root} failed, the VE is back on the source: "
                                 f"{e}") from None
        raise
    t = time.monotonic()
    ve.destroy(layout, veid, force=True)
    times["destroy"] = time.monotonic() - t
    return times


def _dirty_tracking() -> bool:
    try:
        proc = process.run([criu.find(), "check", "--feature", "mem_dirty_track"], capture=True, timeout=60,
                           check=False, error=VEError)
        return proc.returncode == 0
    except VEError:
        return False
