"""The start path of a VE: namespaces, the VE's mounts, and the exec of its init.

Start, in one picture (no subprocess, only fork and system calls through ctypes):

    vzctl (host root)                 child                              grandchild = VE pid 1
    ─────────────────                 ─────                              ─────────────────────
    cgroups: create, limits, devices
    mount root/<id> (overlay/bind)
    open the cgroups' tasks files
    fork ───────────────────────────► "0" to each tasks file (v1: into the VE's cgroups, no grace period)
                                      unshare(USER)  ── "U" ──►
    write uid_map/gid_map
    (v2: attach child to the VE cgroup) ── "G" ──►
                                      setresuid(0) (= host 100000)
                                      unshare(MNT UTS IPC NET CGROUP PID)
                                      fork ─────────────────────────────► setsid; rprivate; bind root/<id>
                                      ◄── "P<host pid>" ── exit           proc, ro sys, tmpfs dev (+ devpts,
    record pid + start time                                               shm), run, masks; pivot_root;
    read until EOF (or "E<error>")                                        hostname; lo up; close fds;
                                                                          seccomp; exec init (pipe closes)

Everything after the fork runs without imports (the children are in other mount namespaces, where the host's
module files may be out of sight): what they need is imported here, and passed down in one InitSpec.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
from pathlib import Path

from vzpkg.errors import VEError

from . import ns, state
from .layout import ID_RANGE
from .state import live_init as running_init

# (name in /dev, type, major, minor): what a VE's /dev holds; the device cgroup allows just these and ptys
DEVICES = (
    ("null", "c", 1, 3), ("zero", "c", 1, 5), ("full", "c", 1, 7), ("random", "c", 1, 8),
    ("urandom", "c", 1, 9), ("tty", "c", 5, 0),
)


DEVICE_RULES = [(t, ma, mi, "rwm") for _, t, ma, mi in DEVICES] + [
    ("c", 5, 1, "rwm"),  # /dev/console
    ("c", 5, 2, "rwm"),  # /dev/ptmx
    ("c", 136, -1, "rwm"),  # /dev/pts/*
]


# /proc entries that show or change host-wide state: files hidden behind /dev/null, directories behind an
# empty read-only tmpfs, and what stays visible but read-only (the user namespace already makes the kernel
# refuse writes to host-owned sysctls: this is defence in depth)
MASKED_FILES = ("proc/kcore", "proc/keys", "proc/timer_list", "proc/sched_debug", "proc/latency_stats",
                "proc/kallsyms", "proc/kmsg")


MASKED_DIRS = ("proc/acpi", "proc/scsi", "proc/driver", "sys/firmware", "sys/kernel/debug", "sys/kernel/security")


READONLY = ("proc/sys", "proc/sysrq-trigger", "proc/irq", "proc/bus", "proc/fs")


WRITABLE_AGAIN = ("proc/sys/net",)  # owned by the VE's network namespace


# the capabilities a --privileged VE keeps (Docker's default set): no SYS_ADMIN, SYS_MODULE, SYS_RAWIO, ...
PRIVILEGED_CAPS = {0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31}


VE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "TERM": "linux",
    "container": "vzpkg",
}


class InitSpec:
    """What the VE's pid 1 is made of, handed from start down the fork chain (_child, then _ve_init).

    Frozen (setting an attribute raises), as a frozen dataclass would be, but written out: dataclasses brings
    inspect (~6 ms of imports) and a typing.NamedTuple costs ~1 ms to define, both on the start path (measured
    with -X importtime); this class costs nothing measurable."""

    __slots__ = ("privileged", "root", "hostname", "init_path", "init_argv", "vzinit", "files", "tmpfs")
    privileged: bool  # no user namespace; capabilities cut to PRIVILEGED_CAPS
    root: Path  # the VE's root mount on the host (root/<id>)
    hostname: str
    init_path: str  # what is exec'ed as pid 1, with init_argv
    init_argv: list[str]
    vzinit: bytes | None  # the minimal init's binary, written to /run/vzinit when init_path names it
    files: dict  # written into the VE's tree (paths relative to /) before the exec: text, or old text -> text
    tmpfs: tuple[str, str]  # size= options of /dev/shm and /run (_tmpfs_sizes)

    def __init__(self, privileged: bool, root: Path, hostname: str, init_path: str, init_argv: list[str],
                 vzinit: bytes | None, files: dict[str, str], tmpfs: tuple[str, str]) -> None:
        values = (privileged, root, hostname, init_path, init_argv, vzinit, files, tmpfs)
        for name, value in zip(self.__slots__, values, strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"InitSpec is frozen: cannot set {name}")


def _read_msgs(fd: int):
    """Yield the lines the children write to the status pipe, until every writer has gone."""
    buf = b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            if buf:
                yield buf.decode(errors="replace")
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode(errors="replace")


def _spawn(layout, veid, cg, root, conf, privileged, id_shift, init_kind, vzinit, also_attach: int = 0) -> int:
    """ALSO_ATTACH: a pid moved into the VE's cgroups right after the VE's first process (the exec server of
    execserver.py: on cgroup v1 a second migration right after the first does not wait for another RCU grace
    period)."""
    from . import init as init_mod

    hostname = conf.get("HOSTNAME") or veid
    # files the VE's pid 1 writes into its tree before pivot_root (as the VE's root, so owned by it)
    files = {}
    if conf.get("HOSTNAME"):
        files["etc/hostname"] = f"{hostname}\n"
    if conf.get("NAMESERVER") or conf.get("SEARCHDOMAIN"):
        files["etc/resolv.conf"] = _resolv_conf(conf)
    init_path, init_argv = init_mod.argv_for(init_kind, vzinit)
    spec = InitSpec(privileged, root, hostname, init_path, init_argv, vzinit, files, _tmpfs_sizes(conf.limits.get("ram")))
    cgname = layout.cgroup_name(veid)
    join_fds = open_join_fds(cg, cgname)  # v1: the child moves itself (no grace period); else we attach it
    up_r, up_w = os.pipe2(os.O_CLOEXEC)
    down_r, down_w = os.pipe2(os.O_CLOEXEC)
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except BaseException:
        for fd in (up_r, up_w, down_r, down_w, *(fd for _, fd in join_fds)):
            os.close(fd)
        raise
    if pid == 0:
        os.close(up_r)
        os.close(down_w)
        _child(parent, up_w, down_r, spec, join_fds)
    os.close(up_w)
    os.close(down_r)
    for _, fd in join_fds:
        os.close(fd)
    init_pid = 0
    error = None
    try:
        msgs = _read_msgs(up_r)
        first = next(msgs, None)
        if first != "U":
            error = first[1:] if first and first.startswith("E") else "the VE's first process died"
        else:
            if not privileged:
                ns.write_id_maps(pid, id_shift, ID_RANGE)
            if not join_fds:
                cg.attach(cgname, pid)
            if also_attach:
                cg.attach(cgname, also_attach)
            os.write(down_w, b"G")
            for msg in msgs:
                if msg.startswith("P"):
                    init_pid = int(msg[1:])
                    st = state.proc_stat(init_pid)
                    if st is not None:
                        state.write_record(layout, veid, state.InitRecord(init_pid, st[1], privileged))
                elif msg.startswith("E") and error is None:
                    error = msg[1:]
    finally:
        os.close(up_r)
        os.close(down_w)
        os.waitpid(pid, 0)
    if error is None and init_pid == 0:
        error = "the VE's init was not started"
    if error is None and not running_init(layout, veid):
        error = "the VE's init exited at once"
    if error is not None:
        raise VEError(f"VE {veid}: start failed: {error}")
    return init_pid


def _report(fd: int, exc: BaseException) -> None:
    msg = f"{exc}".replace("\n", " ") or type(exc).__name__
    try:
        os.write(fd, f"E{msg}\n".encode())
    except OSError:
        pass


def open_join_fds(cg, cgname: str) -> list[tuple[str, int]]:
    """[(path, fd)] of the cgroup files through which a forked child moves itself into the VE's cgroups
    (join_self; cgroup v1's `tasks`), opened here, as host root; [] where the parent attaches it instead."""
    out: list[tuple[str, int]] = []
    try:
        for f in cg.self_join_files(cgname):
            out.append((str(f), os.open(f, os.O_WRONLY | os.O_CLOEXEC)))
    except OSError as e:
        for _, fd in out:
            os.close(fd)
        raise VEError(f"cannot open {e.filename}: {e.strerror}") from None
    return out


def join_self(join_fds: list[tuple[str, int]]) -> None:
    """In a freshly forked (so single-threaded) child: into the VE's cgroups through the fds of open_join_fds."""
    for path, fd in join_fds:
        try:
            os.write(fd, b"0")
        except OSError as e:
            raise OSError(e.errno, f"cannot join the VE's cgroup {path.rpartition('/')[0]}: {e.strerror}") from None
        os.close(fd)


def _child(parent: int, up_w: int, down_r: int, spec: InitSpec, join_fds: list[tuple[str, int]]) -> None:
    """The middle process: makes the user namespace, then the others, then forks the VE's pid 1."""
    try:
        ns.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
        join_self(join_fds)  # before the cgroup namespace is made: its root is then the VE's cgroup
        if not spec.privileged:
            ns.unshare(ns.CLONE_NEWUSER)
        os.write(up_w, b"U\n")
        if os.read(down_r, 1) != b"G":
            os._exit(1)
        os.close(down_r)
        ns.unshare(ns.CLONE_NEWNS | ns.CLONE_NEWUTS | ns.CLONE_NEWIPC | ns.CLONE_NEWNET | ns.CLONE_NEWCGROUP
                   | ns.CLONE_NEWPID)
        # Still with the host's uid 0 (unmapped in the new user namespace, but the owner of the VZ root's
        # directories, which may be 0700): take hold of the VE root now. The bind makes it a mount of this
        # namespace (copied mounts are locked and pivot_root refuses them); the VE's pid 1 inherits the cwd.
        ns.mount(None, "/", None, ns.MS_REC | ns.MS_PRIVATE)
        ns.mount(spec.root, spec.root, None, ns.MS_BIND | ns.MS_REC)
        os.chdir(spec.root)
        if not spec.privileged:
            ns.setresid(0, 0)
        pid = os.fork()
        if pid == 0:
            try:
                _ve_init(up_w, spec)
            except BaseException as e:
                _report(up_w, e)
            os._exit(1)
        os.write(up_w, f"P{pid}\n".encode())
        os._exit(0)
    except BaseException as e:
        _report(up_w, e)
        os._exit(1)


def _touch(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def _mkdirs(path: str, mode: int = 0o755) -> None:
    try:
        os.makedirs(path, mode)
    except FileExistsError:
        pass


def _bind_ro(path: str) -> None:
    ns.mount(path, path, None, ns.MS_BIND | ns.MS_REC)
    ns.mount(None, path, None, ns.MS_BIND | ns.MS_REMOUNT | ns.MS_RDONLY | ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC)


RUN_SIZE_MAX = 64 << 20


def _tmpfs_sizes(ram) -> tuple[str, str]:
    """size= options of the VE's /dev/shm and /run. Their pages are charged to the VE's memory cgroup and cannot
    be reclaimed without swap: unbounded, a full /dev/shm leaves no memory for processes and every later
    command is OOM-killed. So /dev/shm gets half of RAM and /run an eighth (at most 64 MB); without a RAM limit,
    /dev/shm keeps tmpfs's default (half of the host's memory) and /run 64 MB."""
    if not isinstance(ram, int) or ram <= 0:
        return "", f"size={RUN_SIZE_MAX >> 10}k"
    return f"size={max(ram // 2 >> 10, 64)}k", f"size={max(min(ram // 8, RUN_SIZE_MAX) >> 10, 64)}k"


def _ve_init(up_w: int, spec: InitSpec) -> None:
    """VE pid 1 before exec: build the VE's world, pivot into it, exec the init."""
    os.setsid()
    r = "."  # the cwd is the VE root (see _child): every path below is relative to it
    nosuid_nodev_noexec = ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC
    for d in ("proc", "sys", "dev", "run"):
        _mkdirs(f"{r}/{d}")
    ns.mount("proc", f"{r}/proc", "proc", nosuid_nodev_noexec)
    try:
        ns.mount("sysfs", f"{r}/sys", "sysfs", nosuid_nodev_noexec | ns.MS_RDONLY)
    except OSError:
        # the kernel refuses a new sysfs when the host's is partly covered: show the host's, read-only
        ns.mount("/sys", f"{r}/sys", None, ns.MS_BIND | ns.MS_REC)
        ns.mount(None, f"{r}/sys", None, ns.MS_BIND | ns.MS_REMOUNT | ns.MS_RDONLY | nosuid_nodev_noexec)
    dev = f"{r}/dev"
    ns.mount("tmpfs", dev, "tmpfs", ns.MS_NOSUID | ns.MS_NOEXEC, "mode=755,size=64k,nr_inodes=256")
    for name, _, _, _ in DEVICES:
        _touch(f"{dev}/{name}")
        ns.mount(f"/dev/{name}", f"{dev}/{name}", None, ns.MS_BIND)
    # console output is discarded: /dev/console is the VE's null device
    _touch(f"{dev}/console")
    ns.mount(f"{dev}/null", f"{dev}/console", None, ns.MS_BIND)
    os.mkdir(f"{dev}/pts", 0o755)
    ns.mount("devpts", f"{dev}/pts", "devpts", ns.MS_NOSUID | ns.MS_NOEXEC,
             "newinstance,ptmxmode=0666,mode=0620,gid=5")
    os.symlink("pts/ptmx", f"{dev}/ptmx")
    for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{link}")
    os.mkdir(f"{dev}/shm")
    shm_size, run_size = spec.tmpfs
    ns.mount("tmpfs", f"{dev}/shm", "tmpfs", ns.MS_NOSUID | ns.MS_NODEV, ",".join(filter(None, ("mode=1777", shm_size))))
    os.mkdir(f"{dev}/mqueue")
    try:
        ns.mount("mqueue", f"{dev}/mqueue", "mqueue", nosuid_nodev_noexec)
    except OSError:
        pass
    ns.mount("tmpfs", f"{r}/run", "tmpfs", ns.MS_NOSUID | ns.MS_NODEV, f"mode=755,{run_size}")
    os.mkdir(f"{r}/run/lock", 0o1777)
    os.chmod(f"{r}/run/lock", 0o1777)
    # masks
    for p in MASKED_FILES:
        if os.path.exists(f"{r}/{p}"):
            ns.mount(f"{dev}/null", f"{r}/{p}", None, ns.MS_BIND)
    # one empty tmpfs, bound on the others: CRIU saves and restores every tmpfs by running tar and gzip (~5 ms
    # each at dump and at restore), a bind of one it restores with a bind
    first = None
    for p in MASKED_DIRS:
        if os.path.isdir(f"{r}/{p}"):
            try:
                if first is None:
                    ns.mount("tmpfs", f"{r}/{p}", "tmpfs", ns.MS_RDONLY | nosuid_nodev_noexec, "size=0,mode=555")
                    first = f"{r}/{p}"
                else:
                    ns.mount(first, f"{r}/{p}", None, ns.MS_BIND)
                    ns.mount(None, f"{r}/{p}", None, ns.MS_BIND | ns.MS_REMOUNT | ns.MS_RDONLY | nosuid_nodev_noexec)
            except OSError:
                pass
    for p in READONLY:
        if os.path.exists(f"{r}/{p}"):
            _bind_ro(f"{r}/{p}")
    for p in WRITABLE_AGAIN:
        if os.path.isdir(f"{r}/{p}"):
            ns.mount(f"{r}/{p}", f"{r}/{p}", None, ns.MS_BIND)
            ns.mount(None, f"{r}/{p}", None, ns.MS_BIND | ns.MS_REMOUNT | nosuid_nodev_noexec)
    # into the VE
    ns.pivot_root(".", ".")
    ns.umount(".", ns.MNT_DETACH)
    os.chdir("/")
    ns.sethostname(spec.hostname)
    # only now, inside the VE's root: a symlink the VE planted resolves within the VE, never on the host
    _write_files(spec.files)
    try:
        ns.bring_up_loopback()
    except OSError:
        pass
    if spec.vzinit is not None and spec.init_path == "/run/vzinit":
        fd = os.open(spec.init_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o755)
        os.write(fd, spec.vzinit)
        os.close(fd)
    null = os.open("/dev/null", os.O_RDWR)
    for i in (0, 1, 2):
        os.dup2(null, i)
    if null > 2:
        os.close(null)
    # no host file descriptor survives into the VE (the status pipe is close-on-exec)
    os.closerange(3, up_w)
    os.closerange(up_w + 1, 1 << 20)
    _harden(spec.privileged)
    os.execve(spec.init_path, spec.init_argv, VE_ENV)


def exec_or_exit(argv: list[str], environ: dict[str, str]) -> None:
    """In a forked child: exec ARGV, or say why not on stderr and exit 127 (not found) or 126, as a shell does."""
    try:
        os.execvpe(argv[0], argv, environ)
    except FileNotFoundError:
        os.write(2, f"vzctl exec: {argv[0]}: command not found\n".encode())
        os._exit(127)
    except BaseException as e:
        os.write(2, f"vzctl exec: {argv[0]}: {e}\n".encode())
        os._exit(126)


def _harden(privileged: bool) -> None:
    if privileged:
        ns.drop_bounding_caps(PRIVILEGED_CAPS)
    ns.install_seccomp_denylist()


def _resolv_conf(conf):
    """/etc/resolv.conf's new text from its old one: NAMESERVER replaces the `nameserver` lines and SEARCHDOMAIN
    the `search`/`domain` line; what the config leaves unset, and every other line (options), stays as the VE
    had it (OpenVZ's set_dns did the same)."""
    servers = [f"nameserver {ns_}" for ns_ in (conf.get("NAMESERVER") or "").split()]
    search = conf.get("SEARCHDOMAIN") or ""

    def update(old: str) -> str:
        lines = list(servers)
        for line in old.splitlines():
            word = line.split()[0] if line.split() else ""
            if (word == "nameserver" and servers) or (word in ("search", "domain") and search):
                continue
            lines.append(line)
        if search:
            lines.append(f"search {search}")
        return "\n".join(lines) + "\n"

    return update


def _read_regular(path: str) -> str:
    """The text of PATH if it is a regular file (never through a symlink), else ""."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return os.read(fd, 1 << 16).decode(errors="replace")
    finally:
        os.close(fd)


def _write_files(files: dict) -> None:
    """Write FILES (paths relative to /; a value is the text, or a function of the old text) as the VE's root,
    from inside the VE's mount namespace: a symlink the VE planted resolves within the VE, never on the host;
    the last component is never followed (O_NOFOLLOW), a symlink there counts as no old text."""
    for rel, text in files.items():
        path = f"/{rel}"
        try:
            if callable(text):
                text = text(_read_regular(path))
            if os.path.islink(path):
                os.unlink(path)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError:
            pass

