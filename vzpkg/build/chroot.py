"""Run commands inside a root being built, with mounts that are always undone."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import BuildError, ScriptError
from .inroot import require_inside

_MNT_DETACH = 2
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

POLICY_RC_D = "#!/bin/sh\n# installed by vzpkg while building: no daemon starts in a cache being built\nexit 101\n"


def die_with_parent() -> None:
    """preexec_fn: children get SIGTERM when vzpkg dies, so a killed build leaves no bootstrapper running."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _killed_with_parent() -> None:
    """preexec_fn of the namespace wrapper: SIGKILL when vzpkg dies (unshare blocks SIGTERM while it waits)."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


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
    subprocess.run(cmd, check=True, capture_output=True)


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
        subprocess.run(["mount", "--make-rslave", str(root / "dev")], check=True, capture_output=True)
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
    except subprocess.CalledProcessError as e:
        if mode == "yes":
            raise BuildError(f"cannot mount a tmpfs for the build root: {e.stderr.decode(errors='replace').strip()}") from e
        return False
    return True


def run_tool(cmd: Sequence[str], *, env: dict[str, str], stdout=None, stderr=None,
             on_line: Callable[[bytes], None] | None = None) -> int:
    """Run a tool in a process group of its own; if vzpkg is interrupted, the whole group is stopped first.

    Stopping the group (not just the direct child) matters: a bootstrapper killed alone leaves dpkg writing
    into the root while we remove it. If vzpkg is killed outright, the tool's pid namespace dies with it
    (tool_namespace_wrapper). With ON_LINE, the tool's output (stdout and stderr) is handed over line by line
    instead.
    """
    if on_line is not None:
        stdout, stderr = subprocess.PIPE, subprocess.STDOUT
    wrapper = tool_namespace_wrapper()
    if wrapper and _NAMESPACED_MOUNTS:
        wrapper += ["sh", "-c", _MOUNT_PRELUDE, "vzpkg-mounts", str(_NAMESPACED_MOUNTS[-1])]
    proc = subprocess.Popen([*wrapper, *cmd], env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                            start_new_session=True, preexec_fn=_killed_with_parent if wrapper else die_with_parent)
    try:
        if on_line is not None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                on_line(raw)
        return proc.wait()
    except BaseException:
        _stop_group(proc)
        raise


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            # The leader may be gone while members of its group still run.
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


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
    out = None
    if quiet:
        out = log.open("ab") if log else subprocess.DEVNULL
    try:
        returncode = run_tool(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if quiet else None)
    except OSError as e:  # missing, not executable, a directory, ...
        raise error(f"{what}: cannot run {cmd[0]}: {e.strerror}") from e
    finally:
        if quiet and log:
            out.close()  # type: ignore[union-attr]
    if returncode != 0:
        status = f"exit status {returncode}" if returncode > 0 else f"killed by signal {-returncode}"
        hint = f"; see {log}" if log else ""
        raise error(f"{what} failed ({status}){hint}")
