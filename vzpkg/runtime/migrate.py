"""vzctl migrate VEID DEST [--online] [--keep-dst] [-t]: move a VE to another VZ root, here or over ssh.

DEST is a VZ root on this machine or ssh://[user@]host[:port][/vzroot] (migrate_dest.py: the only part that
differs). On DEST a receiving vzctl (`migrate-receive`, migrate_agent.py) holds that side's lock and does that
side's work; files and images go with rsync (over ssh for a remote node), as OpenVZ's vzmigrate did.

Offline: copy the private area while the VE runs, stop, copy what changed, install, start there, destroy here.
Online: copy the private area while the VE runs, checkpoint it here (dump/<id>; the VE is frozen from here on),
copy what changed and the images, restore there, destroy here. Iterative pre-dumps need memory change tracking
(`criu check --feature mem_dirty_track`); without it (this machine's kernel has no MEM_SOFT_DIRTY) the one dump
carries all memory, and vzctl says so once. If the destination lacks the VE's unpacked template, it is copied.
--lazy (online): a post-copy restore there (CRIU's lazy-pages daemon serves the memory from the images).

Storage: the VE's backend says what to send (Backend.migrate_items: overlay's upper/ in two passes, the image file
once after the dump or stop, the btrfs subvolume); the destination's backend says where it goes (receive_prepare:
e.g. a snapshot of its own template subvolume, so rsync sends only what the VE changed) and completes it
(receive_install: the limit, the rename into place). rsync moves it, the same way to a local root and over ssh.

Failure safety (migrate_journal.py has the phases): the VE's lock is held throughout, with a `migrate` journal
entry. Until the destination runs the VE, the source is the VE: a failure undoes the destination's part and
restores (or starts) the VE here again; a vzctl killed half-way leaves the entry, and the next command on the
VE finishes the migration (the VE runs there: destroyed here) or undoes it (left suspended or stopped here,
restorable). The VE runs here again only after the destination said it does not run there.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from vzpkg import process
from vzpkg.errors import (
    MigrationError,
    MigrationRemoteError,
    MigrationUnreachableError,
    UsageError,
    VEError,
    VENotFoundError,
    VEStateError,
)

from . import checkpoint, criu, migrate_dest, migrate_journal, ve
from .confcache import _conf_params, _template_of, load_conf
from .layout import Layout, check_veid

_CODES = {65: MigrationRemoteError, 66: MigrationUnreachableError, 32: VEStateError}


class Agent:
    """The receiving end on DEST, as a child process (local, or ssh running it there) spoken to in JSON lines."""

    def __init__(self, dest: migrate_dest.Destination, veid: str) -> None:
        self.dest = dest
        self.argv = dest.command(["migrate-receive", veid])
        self.err = tempfile.TemporaryFile()
        self.proc = None
        self._cm = None

    def __enter__(self) -> Agent:
        # no parent-death signal: if this vzctl is killed the agent sees its stdin end and undoes its work itself
        self._cm = process.spawn(self.argv, stdin=process.PIPE, stdout=process.PIPE, stderr=self.err,
                                 error=MigrationRemoteError, what=f"the receiving vzctl on {self.dest.describe()}",
                                 pdeathsig=None)
        self.proc = self._cm.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.proc.poll() is None and exc[0] is None:
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001 (the block below kills it)
            pass
        finally:
            self._cm.__exit__(*exc)
            self.err.close()

    def call(self, op: str, **kw) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}).encode() + b"\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except OSError:
            line = b""
        if not line:
            try:
                rc = self.proc.wait(timeout=30)
            except process.TimeoutExpired:
                rc = -1
            self.err.seek(0)
            raise self.dest.failure(rc, self.err.read().decode(errors="replace"))
        try:
            reply = json.loads(line)
        except ValueError:  # (a login shell that prints something, or not our vzctl at the other end)
            raise MigrationRemoteError(f"migrate: the receiving vzctl on {self.dest.describe()} answered "
                                       f"{line[:80].decode(errors='replace').strip()!r}, not the migration "
                                       "protocol: check --remote-vzctl and that the login prints nothing") from None
        if not isinstance(reply, dict) or not reply.get("ok"):
            reply = reply if isinstance(reply, dict) else {}
            raise _CODES.get(reply.get("code"), MigrationError)(f"{self.dest.describe()}: {reply.get('error')}")
        return reply

    def abort(self, keep: bool) -> None:
        """Best effort: the agent undoes its work and ends (if it is gone, its journal entry does that there)."""
        try:
            self.call("abort", keep=keep)
        except (VEError, ValueError):
            pass


def _rsync(dest: migrate_dest.Destination, src: Path, there: str, *, file: bool = False) -> None:
    """SRC made equal at THERE on DEST: a directory tree, or FILE, one sparse file (an image: its holes stay
    holes there; it is sent once, to a new name, so --inplace would gain nothing)."""
    if file:
        # over ssh the holes would go as zeros: compressed (lz4, cheap) they cost next to nothing on the wire
        squeeze = ["--compress", "--compress-choice=lz4"] if dest.rsync_shell() else []
        cmd = ["rsync", "-a", "--sparse", *squeeze, "--numeric-ids", *dest.rsync_shell(), str(src),
               dest.rsync_path(there)]
    else:
        cmd = ["rsync", "-aHAX", "--numeric-ids", "--delete", *dest.rsync_shell(), f"{src}/",
               dest.rsync_path(there.rstrip("/") + "/")]
    proc = process.run(cmd, capture=True, text=True, check=False, error=MigrationError,
                       what=f"rsync of {src} to {dest.describe()}")
    if proc.returncode == 0:
        return
    if proc.returncode == 255 or "connection unexpectedly closed" in (proc.stderr or ""):
        raise dest.failure(255, proc.stderr)
    tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
    raise MigrationError(f"rsync of {src} to {dest.describe()} failed: {tail[0]}")


def _send_storage(dest: migrate_dest.Destination, backend, layout: Layout, veid: str, targets: dict, *,
                  final: bool) -> None:
    """What the VE's backend says to send (Backend.migrate_items) to where DEST's backend said it goes."""
    for item in backend.migrate_items(layout, veid, final=final):
        there = targets.get(item.name)
        if not there:
            raise MigrationError(f"VE {veid}: {dest.describe()} has no place for its {item.name} (a vzctl of "
                                 "another version there?)")
        _rsync(dest, item.path, there, file=item.file)


def migrate(layout: Layout, veid: str, dest: str, *, online: bool = False, keep_dst: bool = False,
            lazy: bool = False, remote_vzctl: str | None = None) -> dict[str, float]:
    """Returns the time of each phase (seconds) and, online, "frozen". LAZY: a post-copy restore on DEST."""
    veid = check_veid(veid)
    if lazy and not online:
        raise UsageError("migrate: --lazy goes with --online (a post-copy restore on DEST)")
    d = migrate_dest.parse(dest, vzctl=remote_vzctl)
    if isinstance(d, migrate_dest.SSH):
        d = d.shared()
    if isinstance(d, migrate_dest.LocalRoot) and os.path.realpath(d.root) == layout.real_root():
        raise UsageError(f"migrate: {d.root} is this VE's own VZ root")
    layout.secure_areas()
    with ve.VELock(layout, veid) as lock:
        if not layout.conf(veid).exists():
            raise VENotFoundError(f"VE {veid} does not exist")
        conf = load_conf(layout, veid)
        _, _, kind, _ = _conf_params(conf)
        running = ve.running_init(layout, veid) is not None
        if online and not running:
            raise VEStateError(f"VE {veid} is not running: --online needs a running VE (drop --online)")
        if not running and checkpoint.suspended_at(layout, veid):
            raise VEStateError(f"VE {veid} is suspended: 'vzctl restore {veid}' first, then migrate it --online")
        if lazy:
            checkpoint.check_lazy(conf)
        migrate_journal.clear(layout, veid)  # (details of a migration killed before its journal entry was made)
        return _Migration(layout, veid, d, lock, kind, running, online, keep_dst, lazy).run(conf)


class _Migration:
    def __init__(self, layout: Layout, veid: str, dest: migrate_dest.Destination, lock: ve.VELock, kind: str,
                 running: bool, online: bool, keep_dst: bool, lazy: bool = False) -> None:
        from . import backends

        self.layout, self.veid, self.dest, self.lock, self.kind = layout, veid, dest, lock, kind
        self.running, self.online, self.keep_dst, self.lazy = running, online, keep_dst, lazy
        self.backend = backends.get(kind)
        self.times: dict[str, float] = {}
        self.rec = {"dest": migrate_dest.to_record(dest), "online": online, "running": running, "phase": "copy"}

    def _phase(self, name: str) -> None:
        self.rec["phase"] = name
        migrate_journal.write(self.layout, self.veid, self.rec)

    def _timed(self, name: str, t0: float) -> None:
        self.times[name] = time.monotonic() - t0

    def run(self, conf) -> dict[str, float]:
        layout, veid = self.layout, self.veid
        with Agent(self.dest, veid) as agent:
            t = time.monotonic()
            info = agent.call("hello", conf=layout.conf(veid).read_text(), online=self.online, lazy=self.lazy)
            # from here the destination holds a half-received VE: the journal says where, for the next command
            migrate_journal.write(layout, veid, self.rec)
            self.lock.begin("migrate")
            try:
                self._move(agent, info, conf, t)
            except BaseException as e:
                self._fail(agent, e)  # raises
        # the VE runs there: it goes from here (the journal now says destroy: a kill finishes it)
        migrate_journal.clear(layout, veid)
        t = time.monotonic()
        ve._destroy_locked(layout, veid, self.lock, force=True)
        self._timed("destroy", t)
        return self.times

    def _move(self, agent: Agent, info: dict, conf, t: float) -> None:
        layout, veid, dest = self.layout, self.veid, self.dest
        if info.get("template"):
            _rsync(dest, _template_of(layout, veid, conf), info["template"])
            agent.call("template_done")
        targets = agent.call("prepare")["targets"]
        _send_storage(dest, self.backend, layout, veid, targets, final=False)
        self._timed("copy", t)
        if self.online:
            if not _dirty_tracking():
                print("vzctl: note: this kernel has no memory change tracking (criu check --feature "
                      "mem_dirty_track): migrating without iterative pre-dumps", file=sys.stderr)
            t = frozen0 = time.monotonic()
            dump = checkpoint.chkpnt_locked(layout, veid, layout.dump(veid), False)  # frozen, then gone from here
            self._phase("frozen")
            self._timed("dump", t)
            t = time.monotonic()
            _send_storage(dest, self.backend, layout, veid, targets, final=True)
            _rsync(dest, layout.dump(veid), info["images"])
            agent.call("install")
            self._timed("sync", t)
            t = time.monotonic()
            self._phase("restoring")
            agent.call("restore", lazy=self.lazy)
            self._timed("restore", t)
            self.times["frozen"] = time.monotonic() - frozen0
            self.times["dump_frozen"] = dump["frozen_s"]
        else:
            t = time.monotonic()
            if self.running:
                ve._stop_locked(layout, veid, fast=False, timeout=ve.DEFAULT_STOP_TIMEOUT)
            self._phase("stopped")
            self._timed("stop", t)
            t = time.monotonic()
            _send_storage(dest, self.backend, layout, veid, targets, final=True)
            agent.call("install")
            self._timed("sync", t)
            t = time.monotonic()
            self._phase("restoring")
            if self.running:
                agent.call("start")
            self._timed("start", t)
        self._phase("committing")
        agent.call("commit")

    def _fail(self, agent: Agent, e: BaseException) -> None:
        """Undo (or, if the VE runs there after all, finish) and raise."""
        layout, veid = self.layout, self.veid
        agent.abort(self.keep_dst)
        result = migrate_journal.outcome(veid, self.rec)
        if result == "finish":  # the commit reached it: the migration went through (run() destroys it here)
            return
        if result == "unknown":
            raise MigrationError(f"VE {veid}: migration to {self.dest.describe()} failed ({e}) and that node "
                                 "cannot be asked whether the VE runs there; when it answers again, any vzctl "
                                 f"command on {veid} finishes or undoes the migration") from None
        self.lock.done()
        migrate_journal.clear(layout, veid)
        try:
            if self.rec["phase"] != "copy" and self.online:
                checkpoint.restore_locked(layout, veid)
            elif self.rec["phase"] != "copy" and self.running:
                ve._start_locked(layout, veid, self.lock)
        except VEError as again:
            raise MigrationError(f"VE {veid}: migration to {self.dest.describe()} failed ({e}) and bringing it "
                                 f"back on the source failed too ({again}): "
                                 f"'vzctl {'restore' if self.online else 'start'} {veid}'") from None
        if isinstance(e, MigrationError):
            raise e from None
        if isinstance(e, VEError):
            raise MigrationError(f"VE {veid}: migration to {self.dest.describe()} failed, the VE is back on the "
                                 f"source: {e}") from None
        raise e


def _dirty_tracking() -> bool:
    try:
        proc = process.run([criu.find(), "check", "--feature", "mem_dirty_track"], capture=True, timeout=60,
                           check=False, error=VEError)
        return proc.returncode == 0
    except VEError:
        return False
