"""Dev and test VEs from Python: the runtime's verbs as objects, in-process (no `vzctl` process per call).

    from vzpkg.api import VE

    with VE.create(template="debian-12-x86_64", ram="256M") as v:    # an id is allocated; destroyed on exit
        v.start()
        r = v.exec(["sh", "-c", "echo hi; cat"], input="there")
        assert r.returncode == 0 and r.stdout == "hi\\nthere"

Every method calls the same functions as `vzctl` (vzpkg.runtime.ve, attach, live), takes the same VE lock and
raises the same exceptions (vzpkg.errors: VENotFoundError, VEStateError, ...; each has the exit code vzctl
would exit with). Safe from several threads and processes at once: each verb holds the VE's flock, ids are
allocated per owner (vzpkg.runtime.owners) and cgroup names carry the VZ root's tag. Needs root, like vzctl.

VEs created without an id belong to this process: named `<owner token>-<n>`, destroyed at interpreter exit, and
— if the process is killed with SIGKILL — by the next owner's first create, the pytest plugin's next session, or
`vzpkg clean --ves`. Give an id (`VE.create("web1", ...)`) for a VE that outlives the process.
"""

from __future__ import annotations

import _thread
import atexit
import os
from pathlib import Path
from typing import TYPE_CHECKING

from vzpkg.errors import VECommandError, VENotFoundError, VEStateError, VzError
from vzpkg.runtime.layout import Layout

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["DEFAULT_TEMPLATE", "PARAMS", "VE", "ExecResult", "VECommandError", "VEStatus"]

DEFAULT_TEMPLATE = "debian-12-x86_64"

# keyword -> config key: the parameters of VE.create(**params) and VE.set(**params) (vzctl set's options)
PARAMS = {
    "ram": "RAM", "swap": "SWAP", "cpuunits": "CPUUNITS", "cpulimit": "CPULIMIT", "cpus": "CPUS",
    "numproc": "NUMPROC", "diskspace": "DISKSPACE", "diskinodes": "DISKINODES", "hostname": "HOSTNAME",
    "ipadd": "IP_ADDRESS", "ipdel": "IPDEL", "nameserver": "NAMESERVER", "searchdomain": "SEARCHDOMAIN",
    "onboot": "ONBOOT", "init": "INIT", "quotaugidlimit": "QUOTAUGIDLIMIT",
}


class ExecResult:
    """What VE.exec returns. returncode: the command's exit status, or -N if a signal N killed it (as
    subprocess); stdout, stderr: str (decoded as UTF-8, undecodable bytes replaced) or bytes with text=False."""

    __slots__ = ("veid", "argv", "returncode", "stdout", "stderr", "timed_out")

    def __init__(self, veid: str, argv: list[str], returncode: int, stdout: str | bytes, stderr: str | bytes,
                 timed_out: bool = False) -> None:
        self.veid = veid
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out

    def __repr__(self) -> str:
        return f"ExecResult(veid={self.veid!r}, argv={self.argv!r}, returncode={self.returncode})"

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def check_returncode(self) -> ExecResult:
        """Raise VECommandError unless the command exited 0 in time; returns self."""
        if self.timed_out:
            raise VECommandError(f"VE {self.veid}: {' '.join(self.argv)!r} ran past its timeout and was killed", self)
        if self.returncode != 0:
            err = self.stderr.decode(errors="replace") if isinstance(self.stderr, bytes) else self.stderr
            tail = err.strip().splitlines()[-1:] if err else []
            raise VECommandError(f"VE {self.veid}: {' '.join(self.argv)!r} exited with status {self.returncode}"
                                 + (f": {tail[0][:200]}" if tail else ""), self)
        return self


class VEStatus:
    """VE.status(): exist (config present), mounted (root mounted), running (init alive), init_pid (host pid),
    suspended (checkpointed by `vzctl chkpnt`), layout (its storage backend), beancounters (with
    beancounters=True: the resource counters vzctl status --beancounters prints)."""

    __slots__ = ("veid", "exist", "mounted", "running", "init_pid", "suspended", "layout", "beancounters")

    def __init__(self, st: dict) -> None:
        self.veid: str = st["veid"]
        self.exist: bool = st["exist"]
        self.mounted: bool = st["mounted"]
        self.running: bool = st["running"]
        self.init_pid: int | None = st["init_pid"]
        self.suspended: bool = bool(st.get("suspended"))
        self.layout: str | None = st.get("layout")
        self.beancounters: dict | None = st.get("beancounters")

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__slots__}
        if self.beancounters is None:
            del d["beancounters"]
        return d

    def line(self) -> str:
        """The line `vzctl status` prints."""
        from vzpkg.runtime.ve import status_line

        return status_line(self.as_dict())

    def __repr__(self) -> str:
        return f"VEStatus({self.line()!r})"


# one Layout per VZ root (it caches the root's real path and tag), one Owner per VZ root and process
_lock = _thread.allocate_lock()  # (not threading: the CLI may import this module; _thread costs nothing)
_layouts: dict[str | None, Layout] = {}
_owners: dict[str, object] = {}


def layout_for(root: str | os.PathLike[str] | None = None) -> Layout:
    """The Layout of ROOT (else $VZ_ROOT, else the config file's vz_root, else /var/lib/vz), shared per process."""
    key = None if root is None else os.fspath(root)
    if key is None and os.environ.get("VZ_ROOT"):
        key = os.environ["VZ_ROOT"]
    with _lock:
        lay = _layouts.get(key)
        if lay is None:
            lay = _layouts[key] = Layout.at(key)
        return lay


def owner_for(layout: Layout):
    """This process's Owner of LAYOUT's VZ root (made, and dead owners swept, on first use)."""
    from vzpkg.runtime import owners

    key = layout.real_root()
    with _lock:
        own = _owners.get(key)
        if own is not None and own.pid == os.getpid() and own.fd >= 0:  # type: ignore[attr-defined]
            return own
        layout.secure_areas()
        owners.sweep(layout)
        own = _owners[key] = owners.Owner(layout)
        return own


def _str_params(params: dict[str, object]) -> dict[str, str]:
    from vzpkg.errors import UsageError

    changes = {}
    for name, value in params.items():
        key = PARAMS.get(name)
        if key is None:
            raise UsageError(f"unknown VE parameter {name!r}: use {', '.join(PARAMS)}")
        if isinstance(value, bool):
            value = "yes" if value else "no"
        changes[key] = str(value)
    return changes


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("VZPKG_CACHE_DIR"):
        return Path(os.environ["VZPKG_CACHE_DIR"])
    from vzpkg.config import load_settings

    return Path(load_settings().cache_dir)


class VE:
    """A VE of a VZ root (it need not exist yet: VE("web1") names it; VE.create makes one)."""

    def __init__(self, veid: str, *, root: str | os.PathLike[str] | None = None, layout: Layout | None = None
                 ) -> None:
        from vzpkg.runtime.layout import check_veid

        self.veid = check_veid(str(veid))
        self.layout = layout if layout is not None else layout_for(root)
        self.owned = False  # made by VE.create with an allocated id: destroyed at exit

    def __repr__(self) -> str:
        return f"VE({self.veid!r}, root={str(self.layout.root)!r})"

    @property
    def root(self) -> Path:
        """The VZ root."""
        return self.layout.root

    @property
    def path(self) -> Path:
        """The VE's root mount point on the host (root/<id>; its files while the VE is mounted or running)."""
        return self.layout.ve_root(self.veid)

    # ------------------------------------------------------------------------------------------------------
    # lifecycle

    @classmethod
    def create(cls, veid: str | None = None, template: str = DEFAULT_TEMPLATE, *,
               root: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None,
               config: str | None = None, fs_layout: str | None = None, privileged: bool = False,
               idmap: str | None = None, id_shift: int | None = None, **params: object) -> VE:
        """`vzctl create VEID --ostemplate TEMPLATE [--config C] [--layout L] [--privileged] [--idmap M]
        [--id-shift N]`, then `vzctl set VEID --PARAM VALUE... --save` for PARAMS (ram="256M", numproc=200,
        hostname="web1", ...: see PARAMS). Without VEID an id of this process's own is allocated (see the module
        docstring). A failure leaves nothing behind (a VE whose parameters are refused is destroyed again)."""
        from vzpkg.runtime import ve

        layout = layout_for(root)
        changes = _str_params(params)
        cache = _cache_dir(cache_dir)
        # the hostname is create's own (one config write); the rest as `vzctl set --save` afterwards
        kw = dict(cache_dir=cache, hostname=changes.pop("HOSTNAME", None), sample=config, layout_kind=fs_layout,
                  privileged=privileged, idmap=idmap, id_shift=id_shift)
        if veid is not None:
            ve.create(layout, str(veid), template, **kw)  # type: ignore[arg-type]
            obj = cls(str(veid), layout=layout)
        else:
            owner = owner_for(layout)
            while True:
                new = owner.next_id()
                if ve.exists(layout, new):
                    continue  # a VE of an earlier owner with the same token (not possible) or made by hand
                try:
                    ve.create(layout, new, template, **kw)  # type: ignore[arg-type]
                except VEStateError:
                    if ve.exists(layout, new):
                        continue
                    raise
                break
            obj = cls(new, layout=layout)
            obj.owned = True
            _owned_add(owner, new)
        if changes:
            try:
                from vzpkg.runtime import live

                live.set_params(layout, obj.veid, changes, save=True)
            except BaseException:
                obj.destroy(force=True)
                raise
        return obj

    def start(self, *, timeout: float = 30.0, exec_server: bool = True) -> int:
        """`vzctl start`: returns the host pid of the VE's init. VEStateError if it runs already.

        EXEC_SERVER: this process's exec() calls are served by a process forked into the VE at start
        (vzpkg/runtime/execserver.py: no cgroup migration per command; it counts as one of the VE's NUMPROC
        processes). False: each exec() joins the VE's cgroups and namespaces itself, as vzctl exec does."""
        from vzpkg.runtime import ve

        return ve.start(self.layout, self.veid, timeout=timeout, exec_server=exec_server)

    def stop(self, *, fast: bool = False, timeout: float = 10.0) -> bool:
        """`vzctl stop [--fast] [--timeout T]`: False if it was not running (its leftovers are cleaned up all the
        same)."""
        from vzpkg.runtime import execserver, ve

        execserver.stop_server(execserver.key(self.layout, self.veid), kill=True)
        return ve.stop(self.layout, self.veid, fast=fast, timeout=timeout)

    def restart(self, *, fast: bool = False, timeout: float = 10.0) -> int:
        self.stop(fast=fast, timeout=timeout)
        return self.start()

    def destroy(self, *, force: bool = False) -> None:
        """`vzctl destroy [--force]` (force: stop it first if it runs)."""
        from vzpkg.runtime import execserver, ve

        if force:
            execserver.stop_server(execserver.key(self.layout, self.veid), kill=True)
        ve.destroy(self.layout, self.veid, force=force)
        execserver.stop_server(execserver.key(self.layout, self.veid))
        _owned_discard(self.layout, self.veid)

    def mount(self) -> None:
        from vzpkg.runtime import ve

        ve.mount(self.layout, self.veid)

    def umount(self) -> None:
        from vzpkg.runtime import ve

        ve.umount(self.layout, self.veid)

    def set(self, *, save: bool = False, **params: object) -> tuple[bool, bool, list[str]]:
        """`vzctl set VEID --PARAM VALUE... [--save]`: a running VE's limits change at once. Returns (applied,
        saved, the keys that take effect only at the next start). As vzctl: a change that would change nothing
        (not running and save=False) is refused (UsageError)."""
        from vzpkg.errors import UsageError
        from vzpkg.runtime import live

        changes = _str_params(params)
        if not changes:
            raise UsageError(f"VE {self.veid}: set: nothing to set")
        return live.set_params(self.layout, self.veid, changes, save=save)

    def status(self, *, beancounters: bool = False) -> VEStatus:
        """`vzctl status [--beancounters]`."""
        from vzpkg.runtime import ve

        return VEStatus(ve.status(self.layout, self.veid, beancounters=beancounters))

    def exists(self) -> bool:
        return self.layout.conf(self.veid).exists()

    def running(self) -> bool:
        from vzpkg.runtime import ve

        return ve.running_init(self.layout, self.veid) is not None

    # ------------------------------------------------------------------------------------------------------
    # commands

    def exec(self, argv: Sequence[str] | str, input: str | bytes | None = None, timeout: float | None = None,
             check: bool = False, *, env: dict[str, str] | None = None, text: bool = True) -> ExecResult:
        """Run ARGV in the running VE (as `vzctl exec`: its root, its namespaces, cgroups and seccomp filter, the
        VE's environment plus ENV), stdin from INPUT (else /dev/null), stdout and stderr captured. A string is a
        shell command line (/bin/sh -c, as `vzctl exec VEID 'a b'`). TIMEOUT seconds: then the command is killed
        (SIGKILL) and VECommandError raised. CHECK: a non-zero status raises VECommandError (exit code 35).
        A command killed by the VE's memory limit raises VEOutOfMemoryError (as vzctl exec)."""

        args = ["/bin/sh", "-c", argv] if isinstance(argv, str) else [os.fspath(a) for a in argv]
        data = input.encode() if isinstance(input, str) else input
        from .runtime import capture

        cap = capture.run_captured(self.layout, self.veid, args, input=data, timeout=timeout, env=env)
        out: str | bytes = cap.stdout
        err: str | bytes = cap.stderr
        if text:
            out, err = cap.stdout.decode(errors="replace"), cap.stderr.decode(errors="replace")
        result = ExecResult(self.veid, args, cap.returncode, out, err, cap.timed_out)
        if check or cap.timed_out:
            result.check_returncode()
        return result

    # ------------------------------------------------------------------------------------------------------
    # checkpoint and restore (CRIU: vzpkg.runtime.checkpoint, docs/checkpoint.md)

    def checkpoint(self, dumpdir: str | os.PathLike[str] | None = None, *, leave_running: bool = False) -> Path:
        """`vzctl chkpnt VEID [--dumpdir DIR] [--leave-running]`: the VE's processes, memory and (with
        LEAVE_RUNNING, copied in the same freeze) files into DUMPDIR (default dump/<id>); returns the directory.
        A checkpoint made with LEAVE_RUNNING is a warm image: VE.restore(dir) makes new VEs from it. This
        process's exec server in the VE is stopped first (CRIU cannot dump its connection to this process)."""
        from vzpkg.runtime import checkpoint, execserver

        execserver.stop_server(execserver.key(self.layout, self.veid), kill=True)
        info = checkpoint.chkpnt(self.layout, self.veid, dumpdir=dumpdir, leave_running=leave_running)
        return Path(info["dir"])

    def resume(self, dumpdir: str | os.PathLike[str] | None = None) -> int:
        """`vzctl restore VEID [--dumpdir DIR]`: the VE back from its own checkpoint; returns its init's host pid."""
        from vzpkg.runtime import checkpoint

        return checkpoint.restore(self.layout, self.veid, dumpdir=dumpdir)["pid"]

    @classmethod
    def restore(cls, images: str | os.PathLike[str], veid: str | None = None, *,
                root: str | os.PathLike[str] | None = None, hostname: str | None = None,
                ipadd: str | None = None) -> VE:
        """`vzctl restore VEID --from IMAGES [--hostname H] [--ipadd A]`: a new, running VE from a warm checkpoint
        (one made with leave_running=True), its processes as they were at the dump, with its own id, cgroups,
        hostname (HOSTNAME, default its id) and address (IPADD, else none). Without VEID an id of this process's
        own is allocated (see the module docstring), as VE.create. Any number of VEs from one checkpoint."""
        from vzpkg.runtime import checkpoint, ve

        layout = layout_for(root)
        if veid is not None:
            checkpoint.restore_as(layout, str(veid), images, hostname=hostname, ipadd=ipadd)
            return cls(str(veid), layout=layout)
        owner = owner_for(layout)
        while True:
            new = owner.next_id()
            if ve.exists(layout, new):
                continue
            _owned_add(owner, new)  # before: a restore interrupted half-way is destroyed at exit all the same
            try:
                checkpoint.restore_as(layout, new, images, hostname=hostname, ipadd=ipadd)
            except VEStateError:
                _owned_discard(layout, new)
                if ve.exists(layout, new):
                    continue
                raise
            except BaseException:
                _owned_discard(layout, new)
                raise
            break
        obj = cls(new, layout=layout)
        obj.owned = True
        return obj

    # ------------------------------------------------------------------------------------------------------
    # context manager: destroyed on exit (stopped first), however the block ends

    def __enter__(self) -> VE:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.destroy(force=True)
        except VENotFoundError:
            pass


# VEs with allocated ids still alive, per VZ root, of process _owned_pid: destroyed at interpreter exit
_owned: dict[str, set[str]] = {}
_owned_pid = 0


def _owned_add(owner, veid: str) -> None:
    global _owned_pid
    with _lock:
        if _owned_pid != os.getpid():  # a forked child: its parent's VEs are not its own
            _owned.clear()
            _owned_pid = os.getpid()
        first = not _owned
        _owned.setdefault(owner.layout.real_root(), set()).add(veid)
    if first:
        atexit.register(destroy_owned)


def _owned_discard(layout: Layout, veid: str) -> None:
    with _lock:
        s = _owned.get(layout.real_root())
        if s is not None:
            s.discard(veid)


def destroy_owned() -> list[str]:
    """Destroy every VE this process created with an allocated id that still exists (at exit; also the pytest
    plugin's last word), and give up the owner files. Returns the problems (one line each)."""
    problems: list[str] = []
    if _owned_pid != os.getpid():
        return problems  # (inherited by fork: the parent's VEs)
    with _lock:
        items = [(root, sorted(ids)) for root, ids in _owned.items()]
        owners = [o for o in _owners.values() if o.pid == os.getpid()]  # type: ignore[attr-defined]
    for root, ids in items:
        for veid in ids:
            try:
                VE(veid, root=root).destroy(force=True)
            except VENotFoundError:
                _owned_discard(layout_for(root), veid)
            except VzError as e:
                problems.append(f"VE {veid}: {e}")
    for own in owners:
        with _lock:
            left = _owned.get(own.layout.real_root())  # type: ignore[attr-defined]
        if not left:
            own.release()  # type: ignore[attr-defined]
    return problems
