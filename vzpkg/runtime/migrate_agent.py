"""The receiving end of a migration: `vzctl [--root R] migrate-receive VEID` on the destination.

The source's vzctl starts it (locally or over ssh, migrate_dest.py) and talks to it in JSON lines on its stdin and
stdout; the files themselves come with rsync. It holds the destination's lock on VEID for the whole session, with
the journal entry `receive`:

    hello {conf, online, lazy}  checks (VEID free there, id range, rsync, CRIU, that this root's storage backend
                          can hold the VE: Backend.check, e.g. a btrfs pool), says where to rsync: dump/<id> for
                          the images, and a template/.tmp-* dir when the VE's unpacked template is missing there
    template_done         the copied template renamed into place
    prepare               the backend makes ready where its storage goes (a staging dir private/.tmp-<id>-migrate-
                          <pid>, a btrfs snapshot of the template's subvolume) and answers {name: path}
    install               the backend completes it (receive_install: the limit), the staging dir becomes
                          private/<id>, the config (with this root's paths) is saved
    restore {lazy} | start  the VE runs here
    commit                the journal is emptied: the VE is this node's
    abort {keep} or EOF   everything above undone (the VE stopped if it runs; files kept with keep)

If the agent itself is killed, the `receive` entry stays: the next command on VEID here (or `vzpkg clean --ves`)
removes the half-received VE unless it runs (ve._recover). `migrate-receive VEID --query` takes the lock (so it
waits for a live agent, and recovers a dead one's work) and prints running, stopped or absent: the source asks
it when it has to tell whether the VE runs here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import IO

from vzpkg.errors import CriuUnavailableError, MigrationRemoteError, VEError, VEStateError, VzError

from . import checkpoint, criu, storage, ve
from .confcache import _conf_params, _template_of
from .layout import Layout, check_veid


def query(layout: Layout, veid: str) -> str:
    veid = check_veid(veid)
    layout.secure_areas()
    with ve.VELock(layout, veid):
        if ve.running_init(layout, veid) is not None:
            return "running"
        return "stopped" if layout.conf(veid).exists() else "absent"


class _Session:
    def __init__(self, layout: Layout, veid: str, lock: ve.VELock) -> None:
        self.layout, self.veid, self.lock = layout, veid, lock
        self.staged = layout.private_dir / f".tmp-{veid}-migrate-{os.getpid()}"
        self.template_tmp = None
        self.template = None
        self.conf_text = ""
        self.conf = None
        self.began = False

    def _backend(self):
        from . import backends

        return backends.backend_of(self.conf), backends.Limits.of(self.conf)

    def hello(self, conf: str, online: bool, lazy: bool = False) -> dict:
        from .conf import VEConfig

        layout, veid = self.layout, self.veid
        if ve.exists(layout, veid):
            raise VEStateError(f"VE {veid} already exists in {layout.root}: destroy it there first")
        parsed = VEConfig.parse(conf, source=f"VE {veid}'s config (from the source)")
        privileged, shift, _, _ = _conf_params(parsed)
        if not privileged and parsed.get("IDMAP") == "private":
            from .idrange import overlapping

            others = overlapping(layout, veid, shift)
            if others:
                raise VEStateError(f"VE {veid}'s id range (ID_SHIFT={shift}) overlaps VE {others[0][0]}'s in "
                                   f"{layout.root}: a checkpoint keeps its ids, so it cannot move there")
        if shutil.which("rsync") is None:
            raise MigrationRemoteError(f"no rsync on this node ({layout.root}): install rsync")
        if online:
            try:
                criu.find()
            except CriuUnavailableError as e:
                raise MigrationRemoteError(f"--online needs CRIU here: {e}") from None
            if lazy:
                checkpoint.check_lazy(parsed)
        self.conf_text, self.conf = conf, parsed
        backend, limits = self._backend()
        try:  # what this root cannot hold (no btrfs pool here) is refused before anything moves
            backend.check(layout, limits)
        except VzError as e:
            raise type(e)(f"VE {veid} cannot move there: {e}") from None
        self.lock.begin("receive")
        self.began = True
        self.template = _template_of(layout, veid, parsed)
        if not self.template.is_dir():
            self.template_tmp = self.template.with_name(f".tmp-{self.template.name}-migrate-{os.getpid()}")
            self.template_tmp.mkdir(parents=True, mode=0o700)
        return {"images": str(layout.dump(veid)), "root": str(layout.root),
                "template": str(self.template_tmp) if self.template_tmp else None}

    def template_done(self) -> dict:
        if self.template_tmp is not None:
            try:
                self.template_tmp.rename(self.template)
            except OSError:
                shutil.rmtree(self.template_tmp, ignore_errors=True)  # another migration put it there first
            self.template_tmp = None
        return {}

    def prepare(self) -> dict:
        backend, limits = self._backend()
        self.staged.mkdir(parents=True, mode=0o700, exist_ok=True)
        return {"targets": backend.receive_prepare(self.layout, self.veid, self.staged, self.template, limits)}

    def install(self) -> dict:
        from .conf import VEConfig

        layout, veid = self.layout, self.veid
        backend, limits = self._backend()
        backend.receive_install(layout, veid, self.staged, limits)
        self.staged.rename(layout.private(veid))
        conf = VEConfig.parse(self.conf_text)
        conf.set("VE_ROOT", str(layout.ve_root(veid)))
        conf.set("VE_PRIVATE", str(layout.private(veid)))
        layout.ve_root(veid).mkdir(parents=True, exist_ok=True)
        conf.save(layout.conf(veid))
        return {}

    def restore(self, lazy: bool = False) -> dict:
        info = checkpoint.restore_locked(self.layout, self.veid, dumpdir=self.layout.dump(self.veid), lazy=lazy)
        if not lazy:  # (a lazy restore's daemon still reads them: the VE's next chkpnt or destroy replaces them)
            shutil.rmtree(self.layout.dump(self.veid), ignore_errors=True)  # used up, as a suspend's are
        return {"pid": info["pid"], "restore_s": info["restore_s"]}

    def start(self) -> dict:
        pid = ve._start_locked(self.layout, self.veid, self.lock)
        self.lock.begin("receive")  # (start emptied the journal on its way out)
        return {"pid": pid}

    def commit(self) -> dict:
        self.lock.done()
        self.began = False
        return {}

    def undo(self, keep: bool = False) -> None:
        if not self.began:
            return
        layout, veid = self.layout, self.veid
        ve._stop_locked(layout, veid, fast=True, timeout=ve.DEFAULT_STOP_TIMEOUT)
        if self.template_tmp is not None:
            shutil.rmtree(self.template_tmp, ignore_errors=True)
        if not keep:
            layout.conf(veid).unlink(missing_ok=True)
            (layout.run_dir / f"{veid}.conf-cache").unlink(missing_ok=True)
            from . import backends

            backends.destroy_all(layout, veid)  # (mounts, loop devices, a btrfs subvolume, the private area)
            for p in (self.staged, layout.ve_root(veid), layout.dump(veid)):
                shutil.rmtree(p, ignore_errors=True)
        self.lock.done()
        self.began = False


def serve(layout: Layout, veid: str, inp: IO[bytes], out: IO[bytes]) -> int:
    """The session (see the module docstring); returns the exit status."""
    veid = check_veid(veid)
    layout.secure_areas()
    lock = ve.VELock(layout, veid, wait=False)
    try:
        lock.__enter__()
    except BlockingIOError:
        raise VEStateError(f"VE {veid} in {layout.root} is locked by another vzctl (a migration to the VE's own "
                           "VZ root, or one in progress there): try again when it is done") from None
    try:
        return _serve_locked(layout, veid, lock, inp, out)
    finally:
        lock.__exit__(None, None, None)


def _serve_locked(layout: Layout, veid: str, lock: ve.VELock, inp: IO[bytes], out: IO[bytes]) -> int:
    with storage.templates_lock(layout, exclusive=False):
        # (the shared hold on the template area: `vzpkg clean` must not take a template/.tmp-* being copied in)
        s = _Session(layout, veid, lock)
        ended = False
        try:
            for raw in inp:
                try:
                    req = json.loads(raw)
                    op = req.get("op")
                    if op == "hello":
                        reply = s.hello(str(req["conf"]), bool(req.get("online")), bool(req.get("lazy")))
                    elif op == "template_done":
                        reply = s.template_done()
                    elif op == "prepare":
                        reply = s.prepare()
                    elif op == "install":
                        reply = s.install()
                    elif op == "restore":
                        reply = s.restore(bool(req.get("lazy")))
                    elif op == "start":
                        reply = s.start()
                    elif op == "commit":
                        reply = s.commit()
                        ended = True
                    elif op == "abort":
                        s.undo(keep=bool(req.get("keep")))
                        reply, ended = {}, True
                    else:
                        raise VEError(f"migrate-receive: unknown request {op!r}")
                    reply["ok"] = True
                except VzError as e:
                    reply = {"ok": False, "code": e.exit_code, "error": str(e)}
                except (ValueError, KeyError, OSError) as e:
                    reply = {"ok": False, "code": 63, "error": f"{type(e).__name__}: {e}"}
                out.write(json.dumps(reply).encode() + b"\n")
                out.flush()
                if ended:
                    return 0
        finally:
            if not ended:  # the source went away (EOF, killed) or this end failed: nothing of it stays here
                s.undo()
    return 0


def main(layout: Layout, veid: str) -> int:
    # the protocol owns stdout: whatever else would print there (a library's note) goes to stderr
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return serve(layout, veid, sys.stdin.buffer, out)
