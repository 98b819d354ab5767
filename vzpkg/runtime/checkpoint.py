"""Checkpoint and restore of whole VEs with CRIU: chkpnt (suspend), restore (resume), clones, migration helpers.

A checkpoint is a directory of CRIU images plus `vzpkg-checkpoint.json` (the VE's config as it was, eth0's MAC
address, times) and, when the VE kept running (`--leave-running`), `fs/`: a copy of its private area made in
the same freeze (CRIU's `post-dump` action runs while the tasks are still frozen), so files and memory agree for
a clone or a later restore. Images are written to `<dir>.tmp-<pid>` and renamed into place: a failed or killed
dump never leaves something that looks like a checkpoint.

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


def require_file_layout(veid: str, kind: str, what: str) -> None:
    """Checkpoints, clones and migrations copy the VE's files as a tree (overlay upper/ or copy root/); the
    image, btrfs and projquota layouts keep them in a filesystem of their own, which these do not move yet."""
    if kind not in ("overlay", "copy"):
        from vzpkg.errors import StorageUnsupportedError

        raise StorageUnsupportedError(f"VE {veid}: {what} of a VE on the {kind} layout is not supported yet (only "
                                      "overlay and copy); create the VE with --layout overlay")


def _private_payload(layout: Layout, veid: str, kind: str) -> Path:
    return layout.private(veid) / ("upper" if kind == "overlay" else "root")


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
    with VELock(layout, veid):
        return _chkpnt_locked(layout, veid, dumpdir, leave_running)


def _chkpnt_locked(layout: Layout, veid: str, dumpdir, leave_running: bool) -> dict:
    conf = load_conf(layout, veid)
    rec = running_init(layout, veid)
    if rec is None:
        raise VEStateError(f"VE {veid} is not running: nothing to checkpoint (start it, or 'vzctl restore {veid}' "
                           "if it is suspended)")
    criu = criu_mod.find()
    _, _, kind, _ = _conf_params(conf)
    require_file_layout(veid, kind, "a checkpoint")
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
    if leave_running:  # the private area, copied in the same freeze: files and memory agree
        src = _private_payload(layout, veid, kind)
        lines += [f"mkdir -p {q(str(tmp / 'fs'))}", f"cp -a --reflink=auto {q(str(src))} {q(str(tmp / 'fs' / src.name))}"]
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
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        script.unlink(missing_ok=True)
    if not leave_running:
        _cleanup(layout, veid)  # CRIU killed the tasks: the cgroups, the root mount, the record, the veth
    return {"dir": str(target), "dump_s": took, "frozen_s": frozen, "size": _du(target), "log": str(log)}


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


def _restore_into(layout: Layout, veid: str, conf, images: Path, mac: str | None, *, clone: bool) -> tuple[int, float]:
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
        root = storage.mount_root(layout, veid, template, kind, _idmap_shift(conf))
        script = _action_script(layout, veid, conf, mac, clone=clone)
        undo.callback(script.unlink, missing_ok=True)
        undo.callback(_net_batch(script).unlink, missing_ok=True)
        undo.callback(pidfile.unlink, missing_ok=True)
        args = criu_mod.restore_args(images, root, pidfile, f"/vzpkg/{cgname}", script)
        if clone:
            args.append("--tcp-close")  # its connections were bound to the source's address
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


def _set_hostname(pid: int, hostname: str) -> None:
    """The kernel hostname of the restored VE (its uts namespace came from the image)."""
    from . import ns

    child = os.fork()
    if child == 0:
        try:
            fd = os.open(f"/proc/{pid}/ns/uts", os.O_RDONLY)
            ns.setns(fd, 0x04000000)  # CLONE_NEWUTS
            ns.sethostname(hostname)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(child, 0)
    if status != 0:
        raise RestoreError(f"restored, but setting the hostname {hostname!r} in pid {pid}'s namespace failed")


def restore(layout: Layout, veid: str, *, dumpdir: str | os.PathLike | None = None) -> dict:
    """Bring the VE back from its checkpoint (DUMPDIR, else where chkpnt put it). Returns {"pid", "restore_s"}."""
    veid = check_veid(veid)
    layout.secure_areas()
    with VELock(layout, veid):
        if not layout.conf(veid).exists():
            raise VENotFoundError(f"VE {veid} does not exist (to restore a checkpoint as a new VE: "
                                  f"'vzctl restore {veid} --from DIR')")
        if running_init(layout, veid):
            raise VEStateError(f"VE {veid} is running: stop it (or checkpoint it) before restoring")
        images = Path(dumpdir).absolute() if dumpdir else (suspended_at(layout, veid) or layout.dump(veid))
        meta = _load_meta(images)
        conf = load_conf(layout, veid)
        if meta.get("fs"):
            # a --leave-running checkpoint: roll the files back to the moment of the dump, or open files and
            # memory would disagree
            _, _, kind, _ = _conf_params(conf)
            _cleanup(layout, veid)
            _install_payload(images / "fs", layout, veid, kind, replace=True)
        pid, took = _restore_into(layout, veid, conf, images, meta.get("mac"), clone=False)
        marker(layout, veid).unlink(missing_ok=True)
        if images == layout.dump(veid) and not meta.get("fs"):
            shutil.rmtree(images, ignore_errors=True)  # a suspend's images are used up (OpenVZ does the same)
        return {"pid": pid, "restore_s": took, "dir": str(images)}


def _install_payload(fs: Path, layout: Layout, veid: str, kind: str, *, replace: bool) -> None:
    """Make private/<id> hold a copy of the snapshot FS (upper/ or root/), built aside and renamed into place."""
    src = fs / ("upper" if kind == "overlay" else "root")
    if not src.is_dir():
        raise CheckpointNotFoundError(f"the checkpoint's file snapshot {src} is missing")
    layout.private_dir.mkdir(parents=True, exist_ok=True)
    tmp = layout.private_dir / f".tmp-{veid}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    try:
        process.run(["cp", "-a", "--reflink=auto", str(src), str(tmp / src.name)], capture=True, text=True,
                    error=RestoreError, what=f"copying the checkpoint's files {src}")
        if kind == "overlay":
            (tmp / "work").mkdir(mode=0o700)
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
               ipadd: str | None = None) -> dict:
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
        lock.begin("create")  # killed from here: the next command on VEID removes the half-made VE
        try:
            _install_payload(images / "fs", layout, veid, meta.get("layout") or "overlay", replace=False)
            layout.ve_root(veid).mkdir(parents=True, exist_ok=True)
            conf.save(layout.conf(veid))
            conf = load_conf(layout, veid)
            pid, took = _restore_into(layout, veid, conf, images, None, clone=True)
            _set_hostname(pid, conf.get("HOSTNAME"))
        except BaseException:
            _cleanup(layout, veid)
            layout.conf(veid).unlink(missing_ok=True)
            storage.remove_private(layout, veid)
            shutil.rmtree(layout.ve_root(veid), ignore_errors=True)
            raise
        finally:
            lock.done()
        return {"pid": pid, "restore_s": took, "dir": str(images)}


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
    try:
        if live:
            info = chkpnt(layout, src, dumpdir=tmp, leave_running=True)
            out = restore_as(layout, dst, tmp, hostname=hostname, ipadd=ipadd)
            out.update(dump_s=info["dump_s"], frozen_s=info["frozen_s"])
        else:
            with VELock(layout, src):
                _, _, kind, _ = _conf_params(load_conf(layout, src))
                require_file_layout(src, kind, "a clone")
                fs = tmp / "fs"
                fs.mkdir(parents=True, mode=0o700)
                payload = _private_payload(layout, src, kind)
                process.run(["cp", "-a", "--reflink=auto", str(payload), str(fs / payload.name)], capture=True,
                            text=True, error=VEStateError, what=f"copying VE {src}'s files")
                conf_text = layout.conf(src).read_text()
            _clone_stopped(layout, dst, conf_text, fs, kind, hostname, ipadd)
            out = {}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["clone_s"] = time.monotonic() - t0
    return out


def _clone_stopped(layout: Layout, dst: str, conf_text: str, fs: Path, kind: str, hostname, ipadd) -> None:
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
            _install_payload(fs, layout, dst, kind, replace=False)
            layout.ve_root(dst).mkdir(parents=True, exist_ok=True)
            conf.save(layout.conf(dst))
        except BaseException:
            layout.conf(dst).unlink(missing_ok=True)
            storage.remove_private(layout, dst)
            raise
        finally:
            lock.done()
