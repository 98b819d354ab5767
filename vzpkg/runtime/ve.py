"""VE lifecycle verbs (create, mount, start, stop, umount, destroy, status) and the VE lock.

The start path (namespaces, mounts, the exec of init) is in spawn.py, with its picture; exec and enter in
attach.py; set in live.py; the config cache in confcache.py; vzlist's rows in listing.py.

A VE is running iff its recorded init is alive with the recorded start time (see state.py); so `status`,
`stop` and `destroy` work after any crash, and stop undoes everything it finds (processes in the VE's
cgroups, the root mount, the cgroups) whether or not the VE is running.
"""

from __future__ import annotations

import errno
import os
import signal
from contextlib import ExitStack
from pathlib import Path

from vzpkg.errors import VEError, VENotFoundError, VEStateError
from vzpkg.flock import open_lockfile, take

from . import state, storage
from .confcache import _check_private_range, _conf_params, _idmap_shift, _template_of, load_conf, load_conf_cached
from .layout import DEFAULT_ID_SHIFT, ID_RANGE, Layout, check_veid, template_shift
from .limits import Limits

DEFAULT_STOP_TIMEOUT = 10.0


# ---------------------------------------------------------------------------------------------------------
# helpers


class VELock:
    """flock on lock/<id>.lock: one vzctl operation per VE at a time.

    The lock file is also the VE's journal (see leftovers.py): `begin("create")` ... `done()` around work that
    a SIGKILL could cut off half-way; whoever takes the lock next finds the name there and finishes or undoes
    that work (`recovered` lists what it removed). The lock file of a VE that does not exist is removed on the
    way out, under the lock; a waiter that then gets the lock on the removed file notices (the path names
    another inode, or none) and takes the lock again."""

    def __init__(self, layout: Layout, veid: str, *, wait: bool = True) -> None:
        self.layout = layout
        self.veid = veid
        self.path = layout.lock(veid)
        self.fd = -1
        self.wait = wait  # False: raise BlockingIOError if someone holds it
        self.recovered: list[tuple[Path, int]] = []

    def __enter__(self) -> VELock:
        while True:
            fd = open_lockfile(self.path, dir_mode=0o700)
            try:
                if not take(fd, wait=self.wait):
                    raise BlockingIOError(errno.EWOULDBLOCK, f"{self.path} is locked")
                st, now = os.fstat(fd), os.stat(self.path)
                if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                    break
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        self.fd = fd
        intent = os.pread(fd, 256, 0)
        if intent.strip():
            try:
                self.recovered = _recover(self.layout, self.veid, intent.decode(errors="replace").strip(), fd)
            except BaseException:
                os.close(fd)
                self.fd = -1
                raise
        return self

    def begin(self, what: str) -> None:
        data = f"{what} {os.getpid()}\n".encode()
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))

    def done(self) -> None:
        os.ftruncate(self.fd, 0)

    def __exit__(self, *exc) -> None:
        if self.fd < 0:
            return
        try:
            if not exists(self.layout, self.veid) and not os.pread(self.fd, 1, 0):
                os.unlink(self.path)  # a VE that does not exist leaves no lock file
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


def exists(layout: Layout, veid: str) -> bool:
    return layout.conf(veid).exists() or os.path.lexists(layout.private(veid))


def _recover(layout: Layout, veid: str, intent: str, fd: int) -> list[tuple[Path, int]]:
    """Finish or undo what an operation killed half-way left (its name is INTENT, read from the journal)."""
    from . import leftovers

    op = intent.split()[0]
    if op == "migrate":  # a migration cut off: finished (-> the destroy here) or undone (migrate_journal.py)
        from . import migrate_journal

        intent = migrate_journal.recover(layout, veid)
    elif op == "receive":  # a half-received migration (migrate_agent.py): kept only if the VE runs here
        intent = "" if running_init(layout, veid) is not None else "destroy"
    elif op == "restore" and running_init(layout, veid) is None:  # cgroups and root mount of a restore cut off
        _cleanup(layout, veid)  # (not _stop_locked: the suspend marker stays, the VE stays restorable)
    if intent and intent.split()[0] in ("destroy", "start"):  # a start cut off half-way is undone: stopped
        _stop_locked(layout, veid, fast=True, timeout=DEFAULT_STOP_TIMEOUT)
    removed = leftovers.recover_files(layout, veid, intent)
    leftovers.clear_intent(fd)
    return removed


# re-exported: the verbs' callers (api, live, leftovers) know them here
_cgroups = state.cgroup_driver
running_init = state.live_init


# ---------------------------------------------------------------------------------------------------------
# create / destroy / mount


def create(
    layout: Layout,
    veid: str,
    ostemplate: str,
    *,
    cache_dir: Path,
    hostname: str | None = None,
    sample: str | None = None,
    layout_kind: str | None = None,
    privileged: bool = False,
    id_shift: int | None = None,
    idmap: str | None = None,
    diskspace: str | None = None,
    diskinodes: str | None = None,
    quotaugidlimit: str | None = None,
) -> None:
    """IDMAP "private" (default): the VE gets a range of its own (ID_SHIFT; allocated unless given) and sees the
    shared template through an idmapped mount. "shared": ID_SHIFT (default 100000, the range every shared VE
    has) is the shift of the template generation it uses. A privileged VE has shift 0 and no range."""
    from vzpkg.errors import UsageError

    from .conf import VEConfig, sample_path, validate_value

    veid = check_veid(veid)
    validate_value("OSTEMPLATE", ostemplate)
    if id_shift is not None and not 0 < id_shift <= 2**32 - ID_RANGE and not privileged:
        raise UsageError(f"--id-shift {id_shift}: must be 1..{2**32 - ID_RANGE} (host uid of the VE's root)")
    if idmap not in (None, "private", "shared"):
        raise UsageError(f"--idmap {idmap!r}: use private or shared")
    if hostname:
        validate_value("HOSTNAME", hostname)
    layout.secure_areas()
    with VELock(layout, veid) as lock:
        if layout.conf(veid).exists():
            raise VEStateError(f"VE {veid} already exists ({layout.conf(veid)}): pick another VEID or destroy it")
        if os.path.lexists(layout.private(veid)):
            raise VEStateError(f"VE {veid} has a private area {layout.private(veid)} but no config: restore "
                               f"{layout.conf(veid)}, or remove the private area, or pick another VEID")
        conf = VEConfig.load(sample_path(sample or "basic"))
        for key, value in (("DISKSPACE", diskspace), ("DISKINODES", diskinodes), ("QUOTAUGIDLIMIT", quotaugidlimit)):
            if value is not None:
                conf.set(key, value)
        from . import backends

        limits = backends.Limits.of(conf)
        # --layout, else the sample's LAYOUT unless it is auto (no preference), else the VZ root's DEFAULT_LAYOUT
        sample_kind = conf.get("LAYOUT") if conf.get("LAYOUT") != backends.AUTO else None
        kind = backends.choose(layout, layout_kind or sample_kind, limits)
        if kind == "btrfs" and diskinodes is None and limits.inodes_hard is not None:
            conf.set("DISKINODES", "unlimited")  # the sample's inode limit: btrfs has none (an explicit one is refused)
            limits = backends.Limits.of(conf)
        backend = backends.get(kind)
        backend.check(layout, limits)  # what this host cannot do is refused before anything is made
        if conf.get("QUOTAUGIDLIMIT") not in (None, "", "0"):
            from .backends.projquota import check_quotaugidlimit

            check_quotaugidlimit(int(conf.get("QUOTAUGIDLIMIT") or 0))
        privileged = privileged or conf.get("PRIVILEGED") == "yes"
        if privileged:
            if idmap == "private":
                raise UsageError("a --privileged VE has no id range of its own (it runs as host root): "
                                 "drop --idmap private")
            mode, shift = "shared", 0
        else:
            mode = idmap or conf.get("IDMAP") or ("shared" if id_shift == DEFAULT_ID_SHIFT else "private")
            if mode == "private" and id_shift == DEFAULT_ID_SHIFT:
                raise UsageError(f"id shift {DEFAULT_ID_SHIFT} is the range shared VEs have, not a private one: "
                                 "use --idmap shared, or another --id-shift")
            shift = DEFAULT_ID_SHIFT if mode == "shared" and id_shift is None else id_shift
            if mode == "private" and shift is not None:
                from .idrange import overlapping

                others = overlapping(layout, veid, shift)
                if others:
                    raise UsageError(f"--id-shift {shift} overlaps the id range of VE {others[0][0]} "
                                     f"(ID_SHIFT={others[0][1]}; a range is {ID_RANGE} ids): a private range is "
                                     "the VE's alone; leave --id-shift out to get a free one")
        # Shared hold on the template area until the config naming the template is saved: `vzpkg clean
        # --templates` cannot remove a generation between its unpacking and its first user.
        lock.begin("create")  # a SIGKILL from here on: the next command on the VE removes what was made
        with _done(lock), storage.templates_lock(layout, exclusive=False):
            unpacked_at = template_shift(privileged, DEFAULT_ID_SHIFT if shift is None else shift, mode)
            sha, template = storage.ensure_template(layout, Path(cache_dir), ostemplate, unpacked_at)
            if shift is None:  # a private range to allocate: reserved until the config recording it is saved
                from .idrange import reserve

                allocation = reserve(layout, veid)
            else:
                from contextlib import nullcontext

                allocation = nullcontext(shift)
            with allocation as shift:
                _create_locked(layout, veid, conf, template, ostemplate, sha, kind, privileged, mode, shift,
                               hostname, Path(cache_dir), backend, limits)


def _create_locked(layout: Layout, veid: str, conf, template: Path, ostemplate: str, sha: str, kind: str,
                   privileged: bool, mode: str, shift: int, hostname: str | None, cache_dir: Path, backend,
                   limits) -> None:
    """The private area and the config, under the VE's lock and the template area's shared lock."""
    from . import backends

    idmapped = mode == "private"
    if idmapped and kind != "copy":
        storage.check_idmap(template, shift)
    storage.create_private(layout, veid, template, kind, shift, idmapped=idmapped, backend=backend, limits=limits)
    with ExitStack() as undo:  # a failure before the config is saved removes what was made (last in, first out)
        undo.callback(_rmdir_quiet, layout.ve_root(veid))
        undo.callback(backends.destroy_all, layout, veid)
        conf.set("OSTEMPLATE", ostemplate)
        conf.set("TEMPLATE_SHA256", sha)
        conf.set("LAYOUT", kind)
        conf.set("PRIVILEGED", "yes" if privileged else "no")
        conf.set("ID_SHIFT", str(shift))
        conf.set("IDMAP", mode)
        conf.set("VE_ROOT", str(layout.ve_root(veid)))
        conf.set("VE_PRIVATE", str(layout.private(veid)))
        if hostname:
            conf.set("HOSTNAME", hostname)
        if conf.get("INIT") is None:
            conf.set("INIT", storage.cache_init(cache_dir, ostemplate))
        layout.ve_root(veid).mkdir(exist_ok=True)
        conf.save(layout.conf(veid))
        undo.pop_all()  # created: keep it


def _rmdir_quiet(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


class _done:  # noqa: N801 (a context manager, like open)
    """Empty the journal when the block ends, however it ends (a Python-level failure undoes its own work)."""

    def __init__(self, lock: VELock) -> None:
        self.lock = lock

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.lock.done()


def mount(layout: Layout, veid: str) -> None:
    veid = check_veid(veid)
    layout.secure_areas()
    with VELock(layout, veid):
        conf = load_conf(layout, veid)
        _mount(layout, veid, conf)


def _mount(layout: Layout, veid: str, conf) -> Path:
    """root/<id>, mounted by the VE's storage backend (its LAYOUT)."""
    from . import backends

    privileged, id_shift, kind, _ = _conf_params(conf)
    return backends.get(kind).mount(layout, veid, _template_of(layout, veid, conf), id_shift, _idmap_shift(conf),
                                    backends.Limits.of(conf))


def umount(layout: Layout, veid: str) -> None:
    veid = check_veid(veid)
    with VELock(layout, veid):
        load_conf(layout, veid)
        if running_init(layout, veid):
            raise VEStateError(f"VE {veid} is running: stop it first ('vzctl stop {veid}')")
        from .backends import unmount_all

        unmount_all(layout, veid)


def destroy(layout: Layout, veid: str, *, force: bool = False) -> None:
    veid = check_veid(veid)
    with VELock(layout, veid) as lock:
        if not exists(layout, veid):
            if lock.recovered:
                return  # the leftovers of an interrupted create or destroy of it were just removed
            raise VENotFoundError(f"VE {veid} does not exist")
        _destroy_locked(layout, veid, lock, force=force)


def _destroy_locked(layout: Layout, veid: str, lock: VELock, *, force: bool) -> None:
    if running_init(layout, veid):
        if not force:
            raise VEStateError(f"VE {veid} is running: stop it first, or use 'vzctl destroy {veid} --force'")
    _stop_locked(layout, veid, fast=True, timeout=DEFAULT_STOP_TIMEOUT)
    # the point of no return: from here a SIGKILL leaves a journal entry and the next command on the VE (or
    # `vzpkg clean --ves`) finishes the destroy; the config goes first, so a half-destroyed VE never looks
    # like one that exists
    lock.begin("destroy")
    layout.conf(veid).unlink(missing_ok=True)
    (layout.run_dir / f"{veid}.conf-cache").unlink(missing_ok=True)
    from .backends import destroy_all

    destroy_all(layout, veid)  # mounts, loop device, image, btrfs subvolume and qgroup, private area
    for p in (layout.ve_root(veid), layout.dump(veid)):
        if p.is_dir():
            import shutil

            shutil.rmtree(p, ignore_errors=True)
    lock.done()  # (the lock file itself goes on the way out: the VE no longer exists)


# ---------------------------------------------------------------------------------------------------------
# start


def start(layout: Layout, veid: str, *, timeout: float = 30.0, exec_server: bool = False) -> int:
    """Start the VE; returns the host pid of its init. EXEC_SERVER (the Python API): with an exec server for this
    process (execserver.py)."""
    veid = check_veid(veid)
    layout.secure_areas()
    with VELock(layout, veid) as lock:
        return _start_locked(layout, veid, lock, exec_server=exec_server)


def _start_locked(layout: Layout, veid: str, lock: VELock, *, exec_server: bool = False) -> int:
    """start's work, under the VE's lock (held by the caller: start, or a migration's receiving end)."""
    from .spawn import DEVICE_RULES, _spawn, open_join_fds

    conf = load_conf_cached(layout, veid)
    if running_init(layout, veid):
        raise VEStateError(f"VE {veid} is already running")
    if os.path.exists(layout.run_dir / f"{veid}.suspended"):
        raise VEStateError(f"VE {veid} is suspended (checkpoint in "
                           f"{(layout.run_dir / f'{veid}.suspended').read_text().strip()}): resume it with "
                           f"'vzctl restore {veid}', or discard the checkpoint with 'vzctl stop {veid}'")
    # whatever a crashed start or a dead VE left behind
    _cleanup(layout, veid, keep_mount=True)
    privileged, id_shift, kind, _ = _conf_params(conf)
    template = _template_of(layout, veid, conf)  # before anything is set up: a bad config changes nothing
    if conf.get("IDMAP") == "private" and not privileged:
        _check_private_range(layout, veid, conf, id_shift)
    init_kind = conf.get("INIT") or "minimal"
    vzinit = None
    if init_kind != "distro":
        from . import init as init_mod

        path = init_mod.build(layout.lib_dir)
        vzinit = path.read_bytes() if path else None
    cg = _cgroups()
    cgname = layout.cgroup_name(veid)
    lock.begin("start")  # a SIGKILL from here on: the next command on the VE stops what was started
    with _done(lock), ExitStack() as undo:  # a failure from here on undoes it all (last in, first out)
        cg.create(cgname)
        undo.callback(_cleanup, layout, veid)  # processes in its cgroups, cgroups, root mount, record, veth
        undo.callback(_kill_recorded_init, layout, veid)
        cg.set_limits(cgname, Limits(**conf.limits))
        cg.setup_devices(cgname, DEVICE_RULES)
        try:
            if kind == "overlay":
                root = storage.mount_root(layout, veid, template, kind, _idmap_shift(conf))
            else:
                from . import backends

                root = backends.get(kind).mount(layout, veid, template, id_shift, _idmap_shift(conf),
                                                backends.Limits.of(conf))
            server = None
            if exec_server:
                from . import execserver

                server = execserver.fork_server(privileged, open_join_fds(cg, cgname))
                undo.callback(server.close)
            pid = _spawn(layout, veid, cg, root, conf, privileged, id_shift, init_kind, vzinit,
                         server.pid if server and not server.joined else 0)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or kind == "overlay":
                raise
            from vzpkg.errors import DiskLimitError

            raise DiskLimitError(f"VE {veid} cannot start: its disk is full (its {kind} layout's limits "
                                 "DISKSPACE/DISKINODES are reached; see 'vzctl status --quota'): raise "
                                 f"them with 'vzctl set {veid} --diskspace ... --save', or 'vzctl mount "
                                 f"{veid}' and remove files below {layout.ve_root(veid)}") from None
        if conf.get("IP_ADDRESS"):
            from . import net

            net.setup_veth(layout.real_root(), veid, pid, conf.get("IP_ADDRESS"),
                           net.bridge_name(conf.get("BRIDGE")))
        undo.pop_all()  # started: keep it
        if server is not None:
            rec = state.read_record(layout, veid)
            if rec is not None and rec.pid == pid:
                execserver.register(execserver.key(layout, veid), server, rec)
                execserver.join(server)
            else:
                server.close()
        return pid


def _kill_recorded_init(layout: Layout, veid: str) -> None:
    rec = state.read_record(layout, veid)
    if rec is not None and state.record_alive(rec):
        os.kill(rec.pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------
# stop and cleanup


def _cleanup(layout: Layout, veid: str, *, keep_mount: bool = False) -> None:
    """Undo everything a VE may hold on the host: processes in its cgroups, cgroups, root mount, record."""
    try:
        cg = _cgroups()
    except VEError:
        cg = None
    name = layout.cgroup_name(veid)
    if cg is not None and cg.exists(name):
        if cg.pids(name):  # (kill_all freezes first: skip it when the pid namespace already emptied it)
            cg.kill_all(name)
        cg.remove(name)
    if not keep_mount:
        from .backends import unmount_all

        unmount_all(layout, veid)
    state.clear_record(layout, veid)
    from . import net

    net.remove_veth(layout.real_root(), veid)


STOP_TIMEOUT_MAX = 3600.0


def _sane_timeout(timeout: float) -> float:
    """Any number (nan, inf, negative, 1e300) -> seconds in 0..STOP_TIMEOUT_MAX (the CLI refuses such values;
    the library never fails on them half-way through a stop)."""
    try:
        t = float(timeout)
    except (TypeError, ValueError):
        return DEFAULT_STOP_TIMEOUT
    if t != t:  # nan
        return DEFAULT_STOP_TIMEOUT
    return min(max(t, 0.0), STOP_TIMEOUT_MAX)


def _wait_exit(pidfd: int, timeout: float) -> bool:
    import select

    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(int(_sane_timeout(timeout) * 1000)))


def _stop_locked(layout: Layout, veid: str, *, fast: bool, timeout: float) -> bool:
    """Stop (if running) and clean up. Returns whether the VE was running."""
    rec = running_init(layout, veid)
    was_running = rec is not None
    try:
        if rec is not None:
            try:
                pidfd = os.pidfd_open(rec.pid)
            except ProcessLookupError:
                pidfd = -1
            if pidfd >= 0:
                try:
                    # the pid may have been recycled between the check and pidfd_open: check again
                    if state.record_alive(rec):
                        sig = signal.SIGKILL if fast else signal.SIGTERM
                        signal.pidfd_send_signal(pidfd, sig)
                        if not _wait_exit(pidfd, timeout) and not fast:
                            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                            _wait_exit(pidfd, 5.0)
                finally:
                    os.close(pidfd)
    finally:
        # whatever happened above (even Ctrl-C while waiting): never leave processes, mounts or cgroups behind
        _cleanup(layout, veid)
        try:
            (layout.run_dir / f"{veid}.suspended").unlink()  # stop discards a suspend (the images stay)
        except FileNotFoundError:
            pass
    return was_running


def stop(layout: Layout, veid: str, *, fast: bool = False, timeout: float = DEFAULT_STOP_TIMEOUT) -> bool:
    """Stop the VE and undo its mounts and cgroups. Returns False if it was not running (cleanup still done)."""
    veid = check_veid(veid)
    with VELock(layout, veid):
        if not layout.conf(veid).exists():
            raise VENotFoundError(f"VE {veid} does not exist")
        return _stop_locked(layout, veid, fast=fast, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------
# status


from .listing import status, status_line  # noqa: E402,F401  (re-exported: the verbs' callers know them here)
