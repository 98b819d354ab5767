"""Run commands inside a root being built, with mounts that are always undone."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import IO

from .. import process
from ..errors import BuildError, ScriptError, VzError
from .inroot import require_inside

_MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

POLICY_RC_D = "#!/bin/sh\n# installed by vzpkg while building: no daemon starts in a cache being built\nexit 101\n"


def tool_namespace_wrapper() -> list[str]:
    """`unshare` arguments that run a build tool as pid 1 of a pid namespace of its own, in a mount namespace
    of its own; empty where that is not possible (not root, no unshare).

    A parent-death signal alone does not reach every process of a build: apt's download methods change their
    credentials (setresuid to _apt), which clears PR_SET_PDEATHSIG, so a SIGKILLed vzpkg used to leave apt-get and
    its methods running in the abandoned root, with the bootstrapper's mounts. Now vzpkg's death SIGKILLs unshare,
    unshare's --kill-child SIGKILLs the namespace's pid 1, and the kernel kills everything else in the
    namespace; the mounts the tool made (proc, sys, dev in the root) lived only in its mount namespace and go
    with it."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return []
    return ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--propagation", "private", "--"]


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below PATH, deepest first."""
    real = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mount_point = line.split()[4].replace("\\040", " ")
            if mount_point == real or mount_point.startswith(real.rstrip("/") + "/"):
                found.append(mount_point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def unmount_below(path: Path) -> None:
    for mount_point in mounts_below(path):
        if _libc.umount2(mount_point.encode(), _MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err not in (22, 2):  # EINVAL: no longer a mount point; ENOENT: gone
                raise BuildError(f"cannot unmount {mount_point}: {os.strerror(err)}")


def _mount(source: str, target: Path, fstype: str | None, options: Sequence[str] = (), bind: bool = False) -> None:
    target.mkdir(parents=True, exist_ok=True)
    cmd = ["mount"]
    if bind:
        cmd += ["--rbind"]
    if fstype:
        cmd += ["-t", fstype]
    if options:
        cmd += ["-o", ",".join(options)]
    cmd += [source, str(target)]
    process.run(cmd, capture=True, error=BuildError, what=f"mounting {source} on {target}")


# Roots inside a `build_mounts` block whose /proc, /sys and /dev each tool mounts in its own mount namespace.
_NAMESPACED_MOUNTS: list[Path] = []

# Run by the namespace's pid 1 before it becomes the tool: the mounts exist only in the tool's namespace, so they
# vanish with it however vzpkg ends (a SIGKILLed update-cache used to leave 8 mounts in the abandoned root).
# The proc mounted from inside the new pid namespace shows only the tool's own processes.
_MOUNT_PRELUDE = """r=$1; shift
mkdir -p "$r/proc" "$r/sys" "$r/dev" &&
mount -t proc -o nosuid,nodev,noexec proc "$r/proc" &&
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$r/sys" &&
mount --rbind /dev "$r/dev" &&
mount --make-rslave "$r/dev" &&
exec "$@"
"""


@contextmanager
def build_mounts(root: Path) -> Iterator[None]:
    """/proc, /sys, /dev and /dev/pts inside ROOT for the tools run in the block (package scripts, dnf).

    Where tools run in namespaces of their own (tool_namespace_wrapper), each tool mounts them in its own mount
    namespace and nothing is mounted in vzpkg's; otherwise they are mounted here and undone on every exit path."""
    for d in ("proc", "sys", "dev"):  # mount(8) follows symlinks: a root's `proc -> /proc` would cover the host's
        require_inside(root, root / d, "mount over")
    if tool_namespace_wrapper():
        _NAMESPACED_MOUNTS.append(root)
        try:
            yield
        finally:
            _NAMESPACED_MOUNTS.remove(root)
        return
    try:
        _mount("proc", root / "proc", "proc", ["nosuid", "nodev", "noexec"])
        _mount("sysfs", root / "sys", "sysfs", ["ro", "nosuid", "nodev", "noexec"])
        _mount("/dev", root / "dev", None, bind=True)
        process.run(["mount", "--make-rslave", str(root / "dev")], capture=True, error=BuildError)
        yield
    finally:
        unmount_below(root / "proc")
        unmount_below(root / "sys")
        unmount_below(root / "dev")


@contextmanager
def no_daemons(root: Path) -> Iterator[None]:
    """policy-rc.d that refuses every service start, removed afterwards."""
    policy = root / "usr/sbin/policy-rc.d"
    require_inside(root, policy, "write")
    existed = policy.exists()
    if not existed:
        policy.parent.mkdir(parents=True, exist_ok=True)
        policy.write_text(POLICY_RC_D)
        policy.chmod(0o755)
    try:
        yield
    finally:
        if not existed:
            policy.unlink(missing_ok=True)


@contextmanager
def host_resolver(root: Path) -> Iterator[None]:
    """The host's resolv.conf inside the root while packages are fetched; the root's own is put back."""
    target = root / "etc/resolv.conf"
    require_inside(root, target.parent, "write")  # resolv.conf itself is renamed away, never written through
    saved = None
    if target.exists() or target.is_symlink():
        saved = target.with_name(".resolv.conf.vzpkg-saved")
        os.rename(target, saved)
    try:
        if Path("/etc/resolv.conf").exists():
            shutil.copy2("/etc/resolv.conf", target)
        yield
    finally:
        target.unlink(missing_ok=True)
        if saved is not None:
            os.rename(saved, target)


def run_in_root(root: Path, argv: Sequence[str], *, env: dict[str, str], what: str, quiet: bool = True,
                log: Path | None = None) -> None:
    """Run ARGV chrooted in ROOT; raise BuildError (naming WHAT) when it fails."""
    cmd = ["chroot", str(root), *argv]
    _run(cmd, env=env, what=what, quiet=quiet, log=log)


def run_script(script: Path, *, root: Path, inside: bool, env: dict[str, str], quiet: bool = True,
               log: Path | None = None) -> None:
    """Run a template script: inside the root (copied in, chrooted) or on the host with the root's path."""
    label = f"script {script.parent.parent.name}/scripts/{script.name}"
    if inside:
        staged = root / "tmp" / f".vzpkg-{script.name}"
        require_inside(root, staged, "stage a script at")
        shutil.copy2(script, staged)
        staged.chmod(0o755)
        try:
            _run(["chroot", str(root), f"/tmp/{staged.name}"], env=env, what=label, quiet=quiet, log=log,
                 error=ScriptError)
        finally:
            staged.unlink(missing_ok=True)
    else:
        _run([str(script), str(root)], env=env, what=label, quiet=quiet, log=log, error=ScriptError)


IN_MEMORY_MIN_AVAILABLE = 4 << 30


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def prepare_build_root(root: Path, mode: str) -> bool:
    """Create the directory a root is built in; on a tmpfs when MODE says so (auto: with enough free memory).

    dpkg and tar create thousands of small files; on a tmpfs that is about a fifth faster than on disk. The
    mount sits inside the work directory, so removing the work directory undoes it. Returns True for tmpfs.
    """
    root.mkdir()
    if mode == "no" or (mode == "auto" and _mem_available() < IN_MEMORY_MIN_AVAILABLE):
        return False
    try:
        _mount("tmpfs", root, "tmpfs", ["mode=0755", "size=50%"])
    except BuildError as e:
        if mode == "yes":
            raise BuildError(f"cannot mount a tmpfs for the build root: {e}") from e
        return False
    return True


def run_tool(cmd: Sequence[str], *, env: dict[str, str], on_line: Callable[[bytes], None] | None = None,
             log: IO[bytes] | None = None, echo: IO[bytes] | None = None, check: bool = False,
             error: type[VzError] = BuildError, what: str | None = None, hint: str = "") -> process.Result:
    """Run a build tool through the process layer (own process group, stopped as a whole if vzpkg is interrupted),
    in namespaces of its own where possible: if vzpkg is killed outright, the tool's pid namespace dies with it
    (tool_namespace_wrapper). Inside a `build_mounts` block the tool's namespace gets the root's /proc, /sys and
    /dev first. Its output goes line by line to LOG, ECHO and ON_LINE; the last lines are in Result.tail."""
    wrapper = tool_namespace_wrapper()
    if wrapper and _NAMESPACED_MOUNTS:
        wrapper += ["sh", "-c", _MOUNT_PRELUDE, "vzpkg-mounts", str(_NAMESPACED_MOUNTS[-1])]
    # SIGKILL for the namespace wrapper: unshare blocks SIGTERM while it waits
    return process.run([*wrapper, *cmd], env=env, on_line=on_line, log=log, echo=echo, check=check, error=error,
                       what=what or process.describe(cmd), hint=hint,
                       pdeathsig=signal.SIGKILL if wrapper else signal.SIGTERM)


def kill_processes_in(path: Path) -> int:
    """SIGKILL every process whose root or working directory is at or below PATH (left by a killed build)."""
    real = os.path.realpath(path).rstrip("/") + "/"
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for link in ("root", "cwd"):
            try:
                target = os.readlink(f"/proc/{entry}/{link}").rstrip("/") + "/"
            except OSError:
                continue
            if target.startswith(real):
                try:
                    os.kill(int(entry), signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
                break
    return killed


def remove_work_dir(path: Path) -> None:
    """Undo everything below a work directory: processes, mounts, files."""
    if not path.exists():
        return
    kill_processes_in(path)
    unmount_below(path)
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():  # a process still writing may have recreated entries
        kill_processes_in(path)
        unmount_below(path)
        shutil.rmtree(path)


def _run(cmd: Sequence[str], *, env: dict[str, str], what: str, quiet: bool, log: Path | None,
         error: type[BuildError] = BuildError) -> None:
    """Run CMD; its output to the build log (and the terminal unless QUIET); on failure ERROR naming WHAT, its
    status and its last lines."""
    import sys

    with log.open("ab") if log else nullcontext() as out:
        run_tool(cmd, env=env, log=out, echo=None if quiet else sys.stdout.buffer, check=True, error=error,
                 what=what, hint=f"see {log}" if log else "")
