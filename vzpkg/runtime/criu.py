"""Driving CRIU's command line: which criu, the options a VE needs, the log of every run, errors in one line.

Which criu: $VZ_CRIU, else `criu` in the vzpkg config file, else the private prefix `make criu` fills
(/opt/vzpkg/criu/bin/criu), else `criu` in PATH if it is >= 4.2 (criu_install.py says why older ones fail here).

Why these options (each was needed on this kernel, see docs/checkpoint.md):
- `--external mnt[]`: the VE's /dev/null, /dev/zero, ... are bind mounts of the host's device nodes; CRIU
  dumps them as external mounts and binds the same host paths again at restore.
- `--manage-cgroups=soft` + `--cgroup-root /vzpkg/<tag>-<id>`: vzctl creates the VE's cgroups with its limits
  before restoring; CRIU puts the tasks there (a clone into its own) and leaves the limits alone.
- `--network-lock nftables`: no iptables binaries needed; TCP peers see silence, not resets, while frozen.
- `--empty-ns net` at restore + an action script at `setup-namespaces`: vzctl rebuilds eth0 from the config
  (restoring a veth through CRIU fails inside a user namespace).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

from vzpkg import process
from vzpkg.errors import CriuUnavailableError, VEError

PRIVATE_CRIU = Path("/opt/vzpkg/criu/bin/criu")
MIN_VERSION = (4, 2)
COMMON = ["--tcp-established", "--file-locks", "--link-remap", "--external", "mnt[]", "--manage-cgroups=soft"]
KDAT_DIR = Path("/dev/shm/vzpkg-criu-run")  # see kdat_preexec
CONFIG_FILE = "/etc/vzpkg/vzpkg.conf"  # = vzpkg.config.DEFAULT_CONFIG_FILE (a unit test says so)
# lines of CRIU's log that say "Error" but are harmless here (the machine's hard RLIMIT_NOFILE is low)
_NOISE = ("RLIMIT_NOFILE",)


def _configured() -> str | None:
    env = os.environ.get("VZ_CRIU")
    if env:
        return env
    # (vzpkg.config's DEFAULT_CONFIG_FILE; importing that module to read a file that rarely exists costs
    # 10-15 ms of every vzctl restore: tomllib, dataclasses)
    path = Path(os.environ.get("VZPKG_CONFIG") or CONFIG_FILE)
    if not path.exists():
        return None
    try:
        from vzpkg.config import _read_config_file

        value = _read_config_file(path).get("criu")
        return str(value) if value else None
    except Exception:
        return None


_versions: dict[str, tuple[int, ...] | None] = {}


def _kdat_dir_ok(create: bool = False) -> bool:
    """KDAT_DIR is a directory of root's, not a link (/dev/shm is writable by anyone)."""
    import stat

    try:
        if create:
            KDAT_DIR.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(KDAT_DIR)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022


def _version_key(criu: str) -> str | None:
    try:
        st = os.stat(criu)
    except OSError:
        return None
    return f"{os.path.abspath(criu)} {st.st_ino} {st.st_size} {st.st_mtime_ns}"


def version_of(criu: str) -> tuple[int, ...] | None:
    """CRIU's version (criu --version: ~7 ms through the private prefix's loader), remembered per process and,
    keyed by the file's inode, size and mtime, in KDAT_DIR (a tmpfs: forgotten at reboot) for the next vzctl."""
    key = _version_key(criu)
    if key is not None and key in _versions:
        return _versions[key]
    cache = KDAT_DIR / "versions"
    if key is not None and _kdat_dir_ok():
        try:
            for line in cache.read_text().splitlines():
                k, _, v = line.rpartition(" ")
                if k == key:
                    _versions[key] = tuple(int(x) for x in v.split("."))
                    return _versions[key]
        except (OSError, ValueError):
            pass
    v = _run_version(criu)
    if key is not None and v is not None:
        _versions[key] = v
        try:
            if _kdat_dir_ok(create=True):
                with open(cache, "a") as f:
                    f.write(f"{key} {'.'.join(map(str, v))}\n")
        except OSError:
            pass
    return v


def _run_version(criu: str) -> tuple[int, ...] | None:
    try:
        out = process.run([criu, "--version"], capture=True, text=True, timeout=30, check=False, error=VEError).stdout
    except VEError:
        return None
    for line in out.splitlines():
        if line.startswith("Version:"):
            try:
                return tuple(int(x) for x in line.split()[1].split("."))
            except ValueError:
                return None
    return None


def find() -> str:
    """The criu to run (see the module docstring); CriuUnavailableError naming what to do if there is none."""
    configured = _configured()
    candidates = [configured] if configured else [str(PRIVATE_CRIU), shutil.which("criu")]
    tried = []
    for c in candidates:
        if not c:
            continue
        if not os.access(c, os.X_OK):
            tried.append(f"{c} (missing)")
            continue
        v = version_of(c)
        if v is not None and v >= MIN_VERSION:
            return c
        tried.append(f"{c} ({'.'.join(map(str, v)) if v else 'no version'})")
    raise CriuUnavailableError(f"no CRIU >= {'.'.join(map(str, MIN_VERSION))} found (tried: {', '.join(tried) or 'none'}"
                               "): run 'make criu' (CRIU from the Debian archive into /opt/vzpkg/criu), or set "
                               "VZ_CRIU to one")


def log_path(log_dir: Path, veid: str, action: str) -> Path:
    log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return log_dir / f"{veid}-{action}-{stamp}-{os.getpid()}.log"


def last_errors(log: Path, n: int = 3) -> str:
    """CRIU's last N error lines (without the timestamp prefix), joined by ' | '."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log written"
    errs = [ln for ln in lines if "Error" in ln and not any(x in ln for x in _NOISE)]
    picked = errs[-n:] if errs else lines[-n:]
    out = []
    for ln in picked:
        ln = ln.strip()
        if ln.startswith("(") and ")" in ln:
            ln = ln.split(")", 1)[1].strip()
        out.append(ln)
    return " | ".join(out) or "no error lines"


# descriptors CRIU dumps (anon_inode names); anything else anonymous is named when a dump fails on a process
_DUMPABLE_ANON = {"[eventfd]", "[eventpoll]", "[signalfd]", "inotify", "[fanotify]", "[timerfd]", "[userfaultfd]",
                  "[pidfd]", "[memfd]"}


def _undumpable_fds(pid: int | str) -> list[str]:
    """PID's descriptors CRIU has no dumper for ("fd 7 anon_inode:[io_uring]", ...); [] if it is gone."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    odd = []
    for fd in sorted(fds, key=int):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("anon_inode:") and target[11:] not in _DUMPABLE_ANON:
            odd.append(f"fd {fd} {target}")
    return odd


def undumpable(pids: list[int]) -> str | None:
    """What CRIU would fail on among PIDS (the VE's processes), checked before it touches them: a failed
    parasite injection (io_uring descriptors, for one) can cost the process its life."""
    for pid in pids:
        odd = _undumpable_fds(pid)
        if odd:
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                nspid = [ln.split()[-1] for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                         if ln.startswith("NSpid:")][0]
            except (OSError, IndexError):
                comm, nspid = "?", "?"
            return (f"process {nspid} in the VE (host pid {pid}, {comm}) holds {', '.join(odd)}, which CRIU cannot "
                    "dump: stop that process and try again")
    return None


def explain_dump_failure(log: Path) -> str | None:
    """Name what CRIU could not dump: the process its log blames (`(pid: N)`) and its descriptors CRIU does not
    support (anon_inode:[io_uring], ...). CRIU's own words for some of these are only "send_fds failed"."""
    import re

    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    pids = re.findall(r"\(pid: (\d+)\)", text) + re.findall(r"Can't dump .*? (\d+)\b", text)
    for pid in dict.fromkeys(pids):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        odd = _undumpable_fds(pid)
        if odd:
            return f"process {pid} ({comm}) holds {', '.join(odd)}, which CRIU cannot dump: stop it and try again"
    return None


# CRIU keeps what it probed of the kernel (~20 ms of every run: test namespaces, a veth, vdso parsing) in
# /run/criu.kdat, but only where /run is a tmpfs; where it is not, CRIU runs in a mount namespace of its own whose
# /run is this directory on /dev/shm (a tmpfs), so the probe is paid once per boot


_fstypes: dict[str, bool] = {}


def _is_tmpfs(path: str) -> bool:
    """PATH is on a tmpfs (os.statvfs has no f_type: the mount table says), asked once per process."""
    if path not in _fstypes:
        _fstypes[path] = _mounted_fstype(path) == "tmpfs"
    return _fstypes[path]


def _mounted_fstype(path: str) -> str:
    best, fstype = "", ""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                point = pre.split()[4]
                if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                    best, fstype = point, post.split()[0]
    except OSError:
        return ""
    return fstype


def kdat_preexec():
    """A preexec_fn for criu (or None where it would not help): in the child, a mount namespace of its own (all
    mounts slaves of the host's, so nothing it mounts reaches the host) with KDAT_DIR bound on /run. Any failure
    leaves the child as it was: CRIU then probes the kernel as usual."""
    if _is_tmpfs("/run") or not _is_tmpfs(str(KDAT_DIR.parent)):
        return None
    if not _kdat_dir_ok(create=True):
        return None
    from . import ns

    ns.libc()  # loaded in the parent: the child must not import
    target = str(KDAT_DIR)

    def child() -> None:
        try:  # (in this order: the bind only once nothing propagates back to the host)
            ns.unshare(ns.CLONE_NEWNS)
            ns.mount(None, "/", None, ns.MS_REC | ns.MS_SLAVE)
            ns.mount(target, "/run", None, ns.MS_BIND)
        except Exception:  # noqa: BLE001 - CRIU then probes the kernel itself, as it would anyway
            pass

    return child


def run(criu: str, args: list[str], log: Path, *, timeout: float = 600, kdat_cache: bool = False
        ) -> tuple[bool, float]:
    """Run `criu ARGS -o LOG -v4`; (succeeded, seconds). stdout/stderr are appended to the log too. KDAT_CACHE:
    let CRIU keep its kernel probe across runs where /run is no tmpfs (kdat_preexec)."""
    preexec = kdat_preexec() if kdat_cache else None
    t0 = time.monotonic()
    interrupted = None
    with open(log.with_suffix(".out"), "wb") as out:
        # a session of its own (Ctrl-C on the terminal does not reach it) and waited for even when vzctl is
        # interrupted: CRIU stopped half-way would leave the VE frozen, its network locked, its memory half-dumped
        # no parent-death signal either: a SIGKILLed vzctl leaves CRIU to finish (its post-dump step records
        # the outcome)
        with process.spawn([criu, *args, "-o", str(log), "-v4"], stdout=out, stderr=process.STDOUT,
                           error=VEError, what="criu", pdeathsig=None, preexec=preexec) as proc:
            # a blocking wait, the timeout from a timer: Popen.wait(timeout=) polls with sleeps growing to 50 ms,
            # which made every ~170 ms restore take 214 ms (measured; docs/performance.md)
            timer = threading.Timer(timeout, proc.kill)
            timer.daemon = True
            timer.start()
            try:
                while True:
                    try:
                        proc.wait()
                        break
                    except KeyboardInterrupt as e:
                        interrupted = e
            finally:
                timer.cancel()
        ok = proc.returncode == 0
    took = time.monotonic() - t0
    try:  # one file per run: CRIU's own output (rarely anything) appended to its log
        extra = log.with_suffix(".out").read_bytes()
        if extra:
            with open(log, "ab") as f:
                f.write(b"\n--- criu stdout/stderr ---\n" + extra)
        log.with_suffix(".out").unlink()
    except OSError:
        pass
    if interrupted is not None:
        raise interrupted
    return ok, took


def dump_args(pid: int, images: Path, *, leave_running: bool, action_script: Path | None) -> list[str]:
    args = ["dump", "-t", str(pid), "-D", str(images), *COMMON, "--network-lock", "nftables"]
    if leave_running:
        args.append("--leave-running")
    if action_script is not None:
        args += ["--action-script", str(action_script)]
    return args


def cgroup_root_args(cgroup_root: str) -> list[str]:
    """--cgroup-root for the hierarchies vzctl manages: on a v1 host one per controller hierarchy (a named one
    such as name=systemd keeps the image's path, where vzctl never puts VEs and would not clean up); on a pure
    v2 host the default root."""
    try:
        with open("/proc/self/cgroup") as f:
            hierarchies = [line.split(":")[1] for line in f if line.count(":") >= 2]
    except OSError:
        hierarchies = []
    v1 = [h for h in hierarchies if h and not h.startswith("name=")]
    if not v1:
        return ["--cgroup-root", cgroup_root]
    return [a for h in v1 for a in ("--cgroup-root", f"{h}:{cgroup_root}")]


CGROUP_DIR = "/sys/fs/cgroup"


def cgroup_yard() -> str | None:
    """/sys/fs/cgroup if it is laid out as CRIU wants a yard (--cgroup-yard): every hierarchy this process is in
    mounted at a directory named after its controllers (comma-separated; a named one without "name="; cgroup v2
    "unified"), as systemd's v1 and hybrid layouts are. Then CRIU uses those mounts instead of mounting every
    hierarchy again in a yard of its own (8-12 ms of each restore here, measured). None otherwise."""
    if os.environ.get("VZ_CRIU_NO_YARD"):  # (the A/B measurement's switch; docs/performance.md)
        return None
    try:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
        with open("/proc/self/cgroup") as f:
            cgroups = f.read()
    except OSError:
        return None
    return CGROUP_DIR if yard_matches(mountinfo, cgroups) else None


def yard_matches(mountinfo: str, cgroups: str) -> bool:
    """MOUNTINFO (/proc/self/mountinfo) has each hierarchy of CGROUPS (/proc/self/cgroup) mounted where CRIU's
    --cgroup-yard convention puts it below CGROUP_DIR."""
    mounts: dict[str, tuple[str, set[str]]] = {}
    for line in mountinfo.splitlines():
        pre, _, post = line.partition(" - ")
        fields = post.split()
        if len(fields) >= 3 and fields[0] in ("cgroup", "cgroup2") and len(pre.split()) > 4:
            mounts[pre.split()[4]] = (fields[0], set(fields[2].split(",")))
    entries = [line.split(":", 2) for line in cgroups.splitlines() if line.count(":") >= 2]
    if not entries:
        return False
    for _, controllers, _ in entries:
        if not controllers:
            fstype, want, name = "cgroup2", set(), "unified"
        else:
            fstype, want = "cgroup", set(controllers.split(","))
            name = ",".join(c.removeprefix("name=") for c in controllers.split(","))
        got = mounts.get(f"{CGROUP_DIR}/{name}")
        if got is None or got[0] != fstype or not want <= got[1]:
            return False
    return True


def restore_args(images: Path, root: Path, pidfile: Path, cgroup_root: str, action_script: Path) -> list[str]:
    yard = cgroup_yard()
    return ["restore", "-d", "-D", str(images), "--root", str(root), *COMMON, *cgroup_root_args(cgroup_root),
            *(["--cgroup-yard", yard] if yard else []), "--empty-ns", "net", "--action-script", str(action_script),
            "--pidfile", str(pidfile)]


# ---------------------------------------------------------------------------------------------------------
# lazy (post-copy) restore: the tasks run at once, their memory is paged in from the images on first touch by
# a `criu lazy-pages` daemon (userfaultfd), which copies the rest in the background and exits when done


def lazy_unavailable(criu: str, *, privileged: bool) -> str | None:
    """Why lazy restore cannot work here, or None: the kernel's userfaultfd (non-cooperative, for a process tree)
    as CRIU checks it, and whether the restored tasks may open one: in a VE's own user namespace they lack
    CAP_SYS_PTRACE over the host, so the kernel lets them only with vm.unprivileged_userfaultfd = 1."""
    for feature in ("uffd", "uffd-noncoop"):
        proc = process.run([criu, "check", "--feature", feature], capture=True, text=True, timeout=60, check=False,
                           error=VEError)
        if proc.returncode != 0:
            return f"`criu check --feature {feature}` fails here (the kernel's userfaultfd)"
    if not privileged:
        try:
            allowed = Path("/proc/sys/vm/unprivileged_userfaultfd").read_text().strip() == "1"
        except OSError:
            allowed = False
        if not allowed:
            return ("the VE's tasks run in their own user namespace and vm.unprivileged_userfaultfd is 0, so they may "
                    "not open a userfaultfd (the host's administrator can set it to 1 with sysctl)")
    return None


def start_lazy_pages(criu: str, images: Path, log: Path) -> int:
    """Start the lazy-pages daemon serving IMAGES (it listens on IMAGES/lazy-pages.socket once this returns);
    returns its pid."""
    pidfile = images / f".lazy-pages-{os.getpid()}.pid"
    pidfile.unlink(missing_ok=True)
    lazy_log = log.with_name(log.name.replace("-restore-", "-lazy-pages-"))
    proc = process.run([criu, "lazy-pages", "-D", str(images), "--daemon", "--pidfile", str(pidfile),
                        "-o", str(lazy_log), "-v4"], capture=True, text=True, timeout=60, check=False, error=VEError)
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        pid = 0
    finally:
        pidfile.unlink(missing_ok=True)
    if proc.returncode != 0 or not pid:
        from vzpkg.errors import RestoreError

        raise RestoreError(f"criu lazy-pages did not start: {last_errors(lazy_log)} (full log: {lazy_log})")
    return pid


def stop_lazy_pages(pid: int) -> None:
    """A restore failed: the daemon has nobody to serve."""
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
