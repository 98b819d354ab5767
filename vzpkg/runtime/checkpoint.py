"""Checkpoint and restore of whole VEs with CRIU: chkpnt (suspend), restore (resume), clones, migration helpers.

A checkpoint is a directory of CRIU images plus `vzpkg-checkpoint.json` (the VE's config as it was, eth0's MAC
address, times) and, when the VE kept running (`--leave-running`), `fs/`: a copy of its private area made in
the same freeze (CRIU's `post-dump` action runs while the tasks are still frozen), so files and memory agree for
a clone or a later restore. The VE's storage backend makes that copy and mounts the root for restore
(backends/base.py: snapshot_lines, install_snapshot, drop_snapshot, mount): nothing here depends on the layout.
Images are written to `<dir>.tmp-<pid>` and renamed into place: a failed or killed dump never leaves something
that looks like a checkpoint.

Restore (own VE or a new one `--from` a checkpoint): vzctl creates the VE's cgroups with its limits, mounts its
root and lets CRIU restore the process tree into them (`--cgroup-root`), in an empty network namespace that an
action script fills at `setup-namespaces` from the VE's *current* config (eth0 on the bridge, addresses, MAC,
default route, lo up) — which is how a clone gets its own address. A clone has the same user-namespace map as
its source (CRIU restores the map as dumped): its config says IDRANGE_SHARED="yes".

A failed dump leaves the VE running (CRIU resumes the tasks); a failed restore undoes what vzctl set up and
keeps the images, so the VE stays restorable. CRIU's log of every run is kept in `dump/.logs/`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

from vzpkg import process
from vzpkg.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    RestoreError,
    UsageError,
    VEError,
    VENotFoundError,
    VEStateError,
)

from . import criu as criu_mod
from . import state, storage
from .confcache import _conf_params, _idmap_shift, _limits_from_conf, _template_of, load_conf
from .layout import Layout, check_veid
from .limits import Limits
from .ve import VELock, _cgroups, _cleanup, exists, running_init

META = "vzpkg-checkpoint.json"


def log_dir(layout: Layout) -> Path:
    return layout.root / "dump" / ".logs"


def marker(layout: Layout, veid: str) -> Path:
    """run/<id>.suspended: the VE was checkpointed and stopped; holds the images' directory."""
    return layout.run_dir / f"{veid}.suspended"


def suspended_at(layout: Layout, veid: str) -> Path | None:
    try:
        return Path(marker(layout, veid).read_text().strip())
    except OSError:
        return None


def _eth0_mac(pid: int) -> str | None:
    proc = process.run(["nsenter", f"--net=/proc/{pid}/ns/net", "--", "ip", "-j", "link", "show", "eth0"],
                       capture=True, text=True, check=False, error=VEError)
    try:
        return json.loads(proc.stdout)[0].get("address") if proc.returncode == 0 else None
    except (ValueError, IndexError, AttributeError):
        return None


def _write_script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n# written by vzctl for one CRIU run (vzpkg/runtime/checkpoint.py)\n" + body)
    path.chmod(0o700)
    return path


# ---------------------------------------------------------------------------------------------------------
# chkpnt


def chkpnt(layout: Layout, veid: str, *, dumpdir: str | os.PathLike | None = None, leave_running: bool = False
           ) -> dict:
    """Dump the running VE into DUMPDIR (default dump/<id>). Without LEAVE_RUNNING the VE is stopped and marked
    suspended. Returns {"dir", "dump_s", "frozen_s", "size"}."""
    veid = check_veid(veid)
    layout.secure_areas()
    with VELock(layout, veid) as lock:
        lock.begin("chkpnt")  # killed: the next command on the VE removes the images' temporary directory
        try:
            return chkpnt_locked(layout, veid, dumpdir, leave_running)
        finally:
            lock.done()


def chkpnt_locked(layout: Layout, veid: str, dumpdir, leave_running: bool) -> dict:
    conf = load_conf(layout, veid)
    rec = running_init(layout, veid)
    if rec is None:
        raise VEStateError(f"VE {veid} is not running: nothing to checkpoint (start it, or 'vzctl restore {veid}' "
                           "if it is suspended)")
    criu = criu_mod.find()
    _, _, kind, _ = _conf_params(conf)
    problem = criu_mod.undumpable(_cgroups().pids(layout.cgroup_name(veid)))
    if problem:
        raise CheckpointError(f"VE {veid}: cannot checkpoint, the VE keeps running: {problem}")
    target = Path(dumpdir).absolute() if dumpdir else layout.dump(veid)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # 0711: the restored tasks (the VE's uids) open some images through CRIU's descriptor of this directory;
    # the dump/ area around it stays 0700, so nobody else reaches it by path
    tmp.mkdir(mode=0o711)
    tmp.chmod(0o711)
    log = criu_mod.log_path(log_dir(layout), veid, "dump")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    m = marker(layout, veid)
    m.parent.mkdir(parents=True, exist_ok=True)
    q = shlex.quote
    # CRIU's post-dump action runs while the tasks are still frozen, and it is CRIU that runs it: the checkpoint
    # is put in place (and, without --leave-running, the VE marked suspended) even if vzctl is killed meanwhile;
    # before it nothing looks like a checkpoint, after it the VE is restorable
    lines = ['[ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] || exit 0', "set -e"]
    if leave_running:  # the private area, copied by its storage backend in the same freeze: files and memory agree
        from . import backends

        lines += [f"mkdir -p {q(str(tmp / 'fs'))}",
                  *backends.get(kind).snapshot_lines(layout, veid, tmp / "fs", target / "fs")]
    lines += [f"if [ -e {q(str(target))} ]; then mv {q(str(target))} {q(str(old))}; fi", f"mv {q(str(tmp))} {q(str(target))}"]
    if not leave_running:
        lines.append(f"printf '%s\\n' {q(str(target))} > {q(str(m))}.tmp && mv {q(str(m))}.tmp {q(str(m))}")
    script = _write_script(layout.run_dir / f".{veid}.criu-dump-{os.getpid()}.sh", "\n".join(lines) + "\n")
    try:
        meta = {"veid": veid, "conf": layout.conf(veid).read_text(), "mac": _eth0_mac(rec.pid)
                if conf.get("IP_ADDRESS") else None, "layout": kind, "fs": leave_running, "time": time.time(),
                "criu": criu_mod.version_of(criu)}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        ok, took = criu_mod.run(criu, criu_mod.dump_args(rec.pid, tmp, leave_running=leave_running,
                                                         action_script=script), log)
        if not ok:
            alive = running_init(layout, veid) is not None
            why = criu_mod.explain_dump_failure(log)
            raise CheckpointError(f"VE {veid}: checkpoint failed, {'the VE keeps running' if alive else 'the VE died'}"
                                  f": {why + '; ' if why else ''}CRIU says: {criu_mod.last_errors(log)} "
                                  f"(full log: {log})")
        frozen = _frozen_seconds(log, took)
        _drop_snapshot(layout, old)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        _drop_snapshot(layout, tmp, kind)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        script.unlink(missing_ok=True)
    if not leave_running:
        _cleanup(layout, veid)  # CRIU killed the tasks: the cgroups, the root mount, the record, the veth
    return {"dir": str(target), "dump_s": took, "frozen_s": frozen, "size": _du(target), "log": str(log)}


def _drop_snapshot(layout: Layout, images: Path, kind: str | None = None) -> None:
    """What a checkpoint's file snapshot holds outside IMAGES (a btrfs snapshot in the pool), before IMAGES is
    removed; KIND: its layout, else from its META."""
    if not (images / "fs").is_dir():
        return
    if kind is None:
        try:
            kind = json.loads((images / META).read_text()).get("layout")
        except (OSError, ValueError):
            return
    from . import backends

    try:
        backends.get(kind).drop_snapshot(layout, images / "fs")
    except VEError:
        pass


def _frozen_seconds(log: Path, total: float) -> float:
    """From CRIU's log (-v4): from the first task seized to the first let go (resumed or, without --leave-running,
    killed); TOTAL if the lines are not found."""
    start = end = None
    try:
        for line in log.read_text(errors="replace").splitlines():
            if not line.startswith("("):
                continue
            try:
                t = float(line[1:line.index(")")])
            except ValueError:
                continue
            if start is None and "Seized task" in line:  # the first task stopped
                start = t
            if end is None and "Unseizing" in line:  # the first task let go (resumed, or killed)
                end = t
    except OSError:
        return total
    return end - start if start is not None and end is not None and end >= start else total


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


# ---------------------------------------------------------------------------------------------------------
# restore


def _load_meta(images: Path) -> dict:
    if not (images / META).is_file() or not (images / "inventory.img").is_file():
        raise CheckpointNotFoundError(f"no checkpoint in {images} ({META} and CRIU's inventory.img): make one with "
                                      "'vzctl chkpnt VEID [--dumpdir DIR]'")
    try:
        return json.loads((images / META).read_text())
    except ValueError as e:
        raise CheckpointNotFoundError(f"{images / META} is not valid JSON ({e}): not a vzctl checkpoint") from None


_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
# what `ip -batch` may take inside double quotes as it is (it knows no escapes); anything else goes through sh
_BATCH_SAFE = re.compile(r"^[A-Za-z0-9 _./+:,@%=-]*$")


def _action_script(layout: Layout, veid: str, conf, mac: str | None, *, clone: bool = False) -> Path:
    """The script CRIU runs at each restore stage; at setup-namespaces it gives the VE's empty network namespace
    lo and (with IP_ADDRESS) eth0 on the bridge with the config's addresses.

    Few processes, because CRIU waits for the script with the VE half-restored: one `ip -batch` on the host (the
    veth pair, its peer born in the VE's namespace as eth0 with the MAC address) and one `ip -batch` of the
    addresses and routes inside (one shell for the promote_secondaries sysctl, as vzctl start sets it) — 4
    processes where one `ip` per step took 13 (22.7 ms measured at setup-namespaces, docs/performance.md)."""
    from . import net

    q = shlex.quote
    ns = 'nsenter --net=/proc/$CRTOOLS_INIT_PID/ns/net --'
    setup = []
    unlock = "exit 0"
    addresses = conf.get("IP_ADDRESS")
    inside = ["link set lo up"]
    if addresses:
        addrs = net._interfaces(addresses)
        bridge = net.bridge_name(conf.get("BRIDGE"))
        net.ensure_bridge(bridge)
        root = layout.real_root()
        host = net.host_ifname(root, veid)
        net.remove_veth(root, veid)  # a host end left by a VE that died uncleanly
        # the host routes first (as vzctl start): the host reaches the VE through the bridge, never the default
        # route; removed again by the cleanup of a failed restore (run/<id>.routes)
        net.add_routes(root, veid, bridge, addrs)
        alias = net.host_alias(root, veid)
        peer = "peer name eth0" + (f" address {mac}" if mac and _MAC.match(mac) else "")
        # the host end stays down until CRIU unlocks the network: a peer's retransmission reaching the address
        # before the TCP sockets are back would be answered with a reset. A clone has a new address and its
        # connections closed (--tcp-close): no peer to protect, so up at once (one `ip` less)
        host_batch = [f"link add {host} master {bridge} type veth {peer} netns $CRTOOLS_INIT_PID"]
        if _BATCH_SAFE.match(alias):
            host_batch.append(f'link set {host} alias "{alias}"')
        if clone:
            host_batch.append(f"link set {host} up")
        setup.append("ip -batch - <<EOF\n" + "\n".join(host_batch) + "\nEOF")
        if not _BATCH_SAFE.match(alias):
            setup.append(f"ip link set {host} alias {q(alias)} || true")
        unlock = "exit 0" if clone else f"exec ip link set {host} up"
        inside += [f"addr add {a} dev eth0" for a in addrs]
        inside.append("link set eth0 up")
        if any(a.version == 4 for a in addrs):
            inside.append("route replace default dev eth0")
        batch = layout.run_dir / f".{veid}.criu-net-{os.getpid()}.batch"
        batch.write_text("\n".join(inside) + "\n")
        v6 = " && { ip -6 route replace default dev eth0 || true; }" if any(a.version == 6 for a in addrs) else ""
        cmd = (f"echo 1 > /proc/sys/net/ipv4/conf/eth0/promote_secondaries && ip -batch - < {q(str(batch))}{v6}")
        setup.append(f"exec {ns} sh -c {q(cmd)}")
    else:
        setup.append(f"exec {ns} ip link set lo up")
    body = ("set -e\ncase \"$CRTOOLS_SCRIPT_ACTION\" in\nsetup-namespaces)\n" + "".join(f"  {ln}\n" for ln in setup)
            + f";;\nnetwork-unlock)\n  {unlock}\n;;\nesac\n")
    return _write_script(layout.run_dir / f".{veid}.criu-restore-{os.getpid()}.sh", body)


def _net_batch(script: Path) -> Path:
    """The `ip -batch` file of the action script SCRIPT (written next to it when the VE has addresses)."""
    return script.with_name(script.name.replace("-restore-", "-net-").replace(".sh", ".batch"))


def _restore_into(layout: Layout, veid: str, conf, images: Path, mac: str | None, *, clone: bool,
                  lazy: bool = False) -> tuple[int, float]:
    """Set up the VE's cgroups, root and network hook, and let CRIU restore IMAGES into them. Undone on failure."""
    from .spawn import DEVICE_RULES

    criu = criu_mod.find()
    privileged, _, kind, _ = _conf_params(conf)
    template = _template_of(layout, veid, conf)
    _cleanup(layout, veid, keep_mount=True)
    cg = _cgroups()
    cgname = layout.cgroup_name(veid)
    log = criu_mod.log_path(log_dir(layout), veid, "restore")
    pidfile = layout.run_dir / f".{veid}.criu-pid-{os.getpid()}"
    with ExitStack() as undo:
        undo.callback(_cleanup, layout, veid)
        cg.create(cgname)
        cg.set_limits(cgname, Limits(**_limits_from_conf(conf)))
        cg.setup_devices(cgname, DEVICE_RULES)
        try:
            root = _mount_for_restore(layout, veid, conf, template, kind)
        except VEError as e:
            raise RestoreError(f"VE {veid}: restore failed, the images in {images} are kept: {e}") from None
        script = _action_script(layout, veid, conf, mac, clone=clone)
        undo.callback(script.unlink, missing_ok=True)
        undo.callback(_net_batch(script).unlink, missing_ok=True)
        undo.callback(pidfile.unlink, missing_ok=True)
        args = criu_mod.restore_args(images, root, pidfile, f"/vzpkg/{cgname}", script)
        if clone:
            args.append("--tcp-close")  # its connections were bound to the source's address
        if lazy:
            undo.callback(criu_mod.stop_lazy_pages, criu_mod.start_lazy_pages(criu, images, log))
            args.append("--lazy-pages")
        ok, took = criu_mod.run(criu, args, log, kdat_cache=True)
        if not ok:
            raise RestoreError(f"VE {veid}: restore failed, the images in {images} are kept: CRIU says: "
                               f"{criu_mod.last_errors(log)} (full log: {log})")
        pid = int(pidfile.read_text().strip())
        st = state.proc_stat(pid)
        if st is None:
            raise RestoreError(f"VE {veid}: restored, but its init (pid {pid}) exited at once (log: {log})")
        state.write_record(layout, veid, state.InitRecord(pid, st[1], privileged))
        script.unlink(missing_ok=True)
        _net_batch(script).unlink(missing_ok=True)
        pidfile.unlink(missing_ok=True)
        undo.pop_all()
    return pid, took


def _mount_for_restore(layout: Layout, veid: str, conf, template: Path, kind: str) -> Path:
    """The VE's root, made available by its storage backend (the image mounted on its loop device, the btrfs
    subvolume bound) with its disk limits enforced: CRIU is told only the root (--root), never the loop device
    or the pool below it."""
    if kind == "overlay":  # (the common case without importing the backends)
        return storage.mount_root(layout, veid, template, kind, _idmap_shift(conf))
    from . import backends

    _, id_shift, _, _ = _conf_params(conf)
    return backends.get(kind).mount(layout, veid, template, id_shift, _idmap_shift(conf), backends.Limits.of(conf))


def check_lazy(conf) -> None:
    """Refuse --lazy (LazyRestoreUnavailableError) where post-copy restore cannot work, before anything changes."""
    from vzpkg.errors import LazyRestoreUnavailableError

    privileged, _, _, _ = _conf_params(conf)
    why = criu_mod.lazy_unavailable(criu_mod.find(), privileged=privileged)
    if why:
        raise LazyRestoreUnavailableError(f"--lazy (post-copy restore) is not available: {why}; restore without "
                                          "--lazy")


def restore(layout: Layout, veid: str, *, dumpdir: str | os.PathLike | None = None, lazy: bool = False) -> dict:
    """Bring the VE back from its checkpoint (DUMPDIR, else where chkpnt put it). Returns {"pid", "restore_s"}.
    LAZY: post-copy, the memory paged in on demand by a `criu lazy-pages` daemon."""
    veid = check_veid(veid)
    layout.secure_areas()
    with VELock(layout, veid) as lock:
        lock.begin("restore")  # killed: the next command on the VE undoes what was set up (the images stay)
        try:
            return restore_locked(layout, veid, dumpdir=dumpdir, lazy=lazy)
        finally:
            lock.done()


def restore_locked(layout: Layout, veid: str, *, dumpdir: str | os.PathLike | None = None,
                   lazy: bool = False) -> dict:
    """restore's work, under the VE's lock (held by the caller: restore, or a migration)."""
    if not layout.conf(veid).exists():
        raise VENotFoundError(f"VE {veid} does not exist (to restore a checkpoint as a new VE: "
                              f"'vzctl restore {veid} --from DIR')")
    if running_init(layout, veid):
        raise VEStateError(f"VE {veid} is running: stop it (or checkpoint it) before restoring")
    images = Path(dumpdir).absolute() if dumpdir else (suspended_at(layout, veid) or layout.dump(veid))
    meta = _load_meta(images)
    conf = load_conf(layout, veid)
    if lazy:
        check_lazy(conf)
    if meta.get("fs"):
        # a --leave-running checkpoint: roll the files back to the moment of the dump, or open files and
        # memory would disagree
        _cleanup(layout, veid)
        _install_payload(images / "fs", layout, veid, conf, replace=True)
    pid, took = _restore_into(layout, veid, conf, images, meta.get("mac"), clone=False, lazy=lazy)
    marker(layout, veid).unlink(missing_ok=True)
    if images == layout.dump(veid) and not meta.get("fs") and not lazy:
        # a suspend's images are used up (OpenVZ does the same); after a lazy restore the lazy-pages daemon
        # still reads them: the next chkpnt (or destroy) replaces them
        shutil.rmtree(images, ignore_errors=True)
    return {"pid": pid, "restore_s": took, "dir": str(images)}


def _install_payload(fs: Path, layout: Layout, veid: str, conf, *, replace: bool, move: bool = False) -> None:
    """Make private/<id> from the checkpoint's file snapshot FS (its storage backend's: CONF's LAYOUT, limits
    from CONF), built aside and renamed into place. MOVE: FS is used up (a live clone's)."""
    from . import backends

    layout.private_dir.mkdir(parents=True, exist_ok=True)
    tmp = layout.private_dir / f".tmp-{veid}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    try:
        try:
            backends.backend_of(conf).install_snapshot(layout, veid, fs, tmp, backends.Limits.of(conf), move=move)
        except VEError as e:
            if isinstance(e, CheckpointNotFoundError):
                raise
            raise RestoreError(f"VE {veid}: installing the checkpoint's files from {fs} failed: {e}") from None
        final = layout.private(veid)
        if replace and final.exists():
            old = layout.private_dir / f".tmp-{veid}-old-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def restore_as(layout: Layout, veid: str, images: str | os.PathLike, *, hostname: str | None = None,
               ipadd: str | None = None, lazy: bool = False, _move: bool = False) -> dict:
    """A new VE VEID from a --leave-running checkpoint IMAGES (`vzctl restore NEW --from DIR`): its config is the
    checkpointed one with its own VE_ROOT/VE_PRIVATE, hostname (HOSTNAME or the VEID) and address (IPADD, else
    none), its files a copy of the snapshot; then restored into its own cgroups and network."""
    from .conf import VEConfig, validate_value

    veid = check_veid(veid)
    images = Path(images).absolute()
    meta = _load_meta(images)
    if not meta.get("fs"):
        raise CheckpointNotFoundError(f"{images} was made without --leave-running and has no copy of the VE's files: "
                                      "make the checkpoint with 'vzctl chkpnt SRC --leave-running --dumpdir DIR'")
    if hostname:
        validate_value("HOSTNAME", hostname)
    if ipadd:
        validate_value("IP_ADDRESS", ipadd)
    layout.secure_areas()
    with VELock(layout, veid) as lock:
        if exists(layout, veid):
            raise VEStateError(f"VE {veid} already exists: pick another VEID or destroy it")
        conf = VEConfig.parse(meta["conf"], source=f"{images / META}")
        conf.set("VE_ROOT", str(layout.ve_root(veid)))
        conf.set("VE_PRIVATE", str(layout.private(veid)))
        conf.set("HOSTNAME", hostname or veid)
        if ipadd:
            conf.set("IP_ADDRESS", ipadd)
        else:
            conf.unset("IP_ADDRESS")
        conf.set("IDRANGE_SHARED", "yes")  # the user-namespace map is the source's (CRIU restores it as dumped)
        if lazy:
            check_lazy(conf)
        lock.begin("create")  # killed from here: the next command on VEID removes the half-made VE
        try:
            _install_payload(images / "fs", layout, veid, conf, replace=False, move=_move)
            layout.ve_root(veid).mkdir(parents=True, exist_ok=True)
            conf.save(layout.conf(veid))
            conf = load_conf(layout, veid)
            pid, took = _restore_into(layout, veid, conf, images, None, clone=True, lazy=lazy)
            # its kernel hostname and its own /etc/hostname (the source's came with the files), written from
            # inside the VE: a symlink the VE planted there resolves within the VE, never on the host
            from . import live

            name = conf.get("HOSTNAME")
            live._in_ve(state.InitRecord(pid, 0, _conf_params(conf)[0]), name, {"etc/hostname": f"{name}\n"})
        except BaseException:
            _cleanup(layout, veid)
            layout.conf(veid).unlink(missing_ok=True)
            _remove_storage(layout, veid)
            shutil.rmtree(layout.ve_root(veid), ignore_errors=True)
            raise
        finally:
            lock.done()
        return {"pid": pid, "restore_s": took, "dir": str(images)}


def _remove_storage(layout: Layout, veid: str) -> None:
    """A half-made VE's storage of any layout (its private area, image, btrfs subvolume)."""
    from .backends import destroy_all

    destroy_all(layout, veid)


# ---------------------------------------------------------------------------------------------------------
# clone


def clone(layout: Layout, src: str, dst: str, *, live: bool = False, hostname: str | None = None,
          ipadd: str | None = None) -> dict:
    """Without LIVE: a stopped copy of SRC (config and private area). With LIVE: SRC (running) is dumped with
    --leave-running and its files copied in the same freeze, and DST restored from that image."""
    src, dst = check_veid(src), check_veid(dst)
    if src == dst:
        raise UsageError("vzctl clone: SRC and DST are the same VE")
    if not layout.conf(src).exists():
        raise VENotFoundError(f"VE {src} does not exist")
    if exists(layout, dst):
        raise VEStateError(f"VE {dst} already exists: pick another VEID or destroy it")
    tmp = layout.root / "dump" / f".clone-{src}-{dst}-{os.getpid()}"
    t0 = time.monotonic()
    kind = None
    try:
        if live:
            info = chkpnt(layout, src, dumpdir=tmp, leave_running=True)
            out = restore_as(layout, dst, tmp, hostname=hostname, ipadd=ipadd, _move=True)
            out.update(dump_s=info["dump_s"], frozen_s=info["frozen_s"])
        else:
            with VELock(layout, src):
                from . import backends

                _, _, kind, _ = _conf_params(load_conf(layout, src))
                fs = tmp / "fs"
                fs.mkdir(parents=True, mode=0o700)
                script = "set -e\n" + "\n".join(backends.get(kind).snapshot_lines(layout, src, fs)) + "\n"
                process.run(["sh", "-c", script], capture=True, text=True, error=VEStateError,
                            what=f"copying VE {src}'s files")
                conf_text = layout.conf(src).read_text()
            _clone_stopped(layout, dst, conf_text, fs, hostname, ipadd)
            out = {}
    finally:
        _drop_snapshot(layout, tmp, kind if not live else None)
        shutil.rmtree(tmp, ignore_errors=True)
    out["clone_s"] = time.monotonic() - t0
    return out


def _clone_stopped(layout: Layout, dst: str, conf_text: str, fs: Path, hostname, ipadd) -> None:
    from .conf import VEConfig, validate_value

    if hostname:
        validate_value("HOSTNAME", hostname)
    if ipadd:
        validate_value("IP_ADDRESS", ipadd)
    with VELock(layout, dst) as lock:
        if exists(layout, dst):
            raise VEStateError(f"VE {dst} already exists: pick another VEID or destroy it")
        conf = VEConfig.parse(conf_text)
        conf.set("VE_ROOT", str(layout.ve_root(dst)))
        conf.set("VE_PRIVATE", str(layout.private(dst)))
        conf.set("HOSTNAME", hostname or dst)
        if ipadd:
            conf.set("IP_ADDRESS", ipadd)
        else:
            conf.unset("IP_ADDRESS")
        conf.set("IDRANGE_SHARED", "yes")  # the files are owned by the source's id range
        lock.begin("create")
        try:
            _install_payload(fs, layout, dst, conf, replace=False, move=True)
            layout.ve_root(dst).mkdir(parents=True, exist_ok=True)
            conf.save(layout.conf(dst))
        except BaseException:
            layout.conf(dst).unlink(missing_ok=True)
            _remove_storage(layout, dst)
            raise
        finally:
            lock.done()
