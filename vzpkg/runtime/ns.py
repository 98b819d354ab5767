"""Thin ctypes wrappers around the Linux system calls a VE runtime needs.

Python 3.11 has no os.unshare / os.setns, and spawning util-linux tools costs milliseconds per call, so the
hot paths (start, exec, stop) talk to the kernel directly through libc. Everything here raises OSError with
the errno and the operation, like the os module does.
"""

from __future__ import annotations

import _thread
import ctypes
import os

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19

MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# namespace file name (in /proc/PID/ns) -> clone flag, in the order `exec` enters them (user first, so the
# others are entered with the capabilities the VE's user namespace grants; mnt last, since it moves / and cwd).
NS_ORDER = (
    ("user", CLONE_NEWUSER),
    ("time", CLONE_NEWTIME),
    ("uts", CLONE_NEWUTS),
    ("ipc", CLONE_NEWIPC),
    ("net", CLONE_NEWNET),
    ("cgroup", CLONE_NEWCGROUP),
    ("pid", CLONE_NEWPID),
    ("mnt", CLONE_NEWNS),
)



def open_namespaces(pid: int, privileged: bool) -> list[tuple[int, int]]:
    """(fd, clone flag) of each namespace of PID to join, in NS_ORDER, for setns. A privileged VE shares the host's
    user namespace, so that one is left out. The time namespace only where it is not ours: a VE that CRIU restored
    lives in a time namespace of its own (its clocks continue from the dump), and a process started in it must
    share that one, or the VE's next dump cannot be restored ("Can't restore sub-task in NS")."""
    fds: list[tuple[int, int]] = []
    try:
        for name, flag in NS_ORDER:
            path = f"/proc/{pid}/ns/{name}"
            if name == "user" and privileged:
                continue
            if name == "time" and _same_namespace(path, "/proc/self/ns/time"):
                continue
            fds.append((os.open(path, os.O_RDONLY | os.O_CLOEXEC), flag))
    except BaseException:
        for fd, _ in fds:
            os.close(fd)
        raise
    return fds


def _same_namespace(a: str, b: str) -> bool:
    try:
        return os.stat(a).st_ino == os.stat(b).st_ino
    except FileNotFoundError:
        return True  # a kernel without time namespaces: nothing to join


_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}
# the new mount API: the same numbers on every architecture (added after the syscall tables were unified)
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442

OPEN_TREE_CLONE = 1
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_IDMAP = 0x00100000
CLONE_VM = 0x100

_libc = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _b(s: str | bytes | os.PathLike | None) -> bytes | None:
    if s is None:
        return None
    return os.fsencode(s)


def unshare(flags: int) -> None:
    _check(libc().unshare(ctypes.c_int(flags)), f"unshare(0x{flags:x})")


def setns(fd: int, nstype: int = 0) -> None:
    _check(libc().setns(ctypes.c_int(fd), ctypes.c_int(nstype)), f"setns({nstype:#x})")


def mount(source, target, fstype=None, flags: int = 0, data: str | None = None) -> None:
    ret = libc().mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data))
    _check(ret, f"mount {source} on {target} ({fstype or 'bind' if flags & MS_BIND else fstype})")


def umount(target, flags: int = 0) -> None:
    _check(libc().umount2(_b(target), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root, put_old) -> None:
    nr = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise OSError(38, f"pivot_root: unsupported architecture {os.uname().machine}")
    _check(libc().syscall(ctypes.c_long(nr), _b(new_root), _b(put_old)), f"pivot_root({new_root})")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(libc().sethostname(raw, ctypes.c_size_t(len(raw))), f"sethostname({name})")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(
        libc().prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(arg4),
                     ctypes.c_ulong(arg5)),
        f"prctl({option})",
    )


def set_pdeathsig(sig: int) -> None:
    prctl(PR_SET_PDEATHSIG, sig)


def drop_bounding_caps(keep: set[int]) -> None:
    """Remove every capability not in KEEP from the bounding set (inherited by everything exec'd later)."""
    last = int(open("/proc/sys/kernel/cap_last_cap").read())
    for cap in range(last + 1):
        if cap not in keep:
            prctl(PR_CAPBSET_DROP, cap)


# ---- seccomp: a small deny-list, defence in depth behind the user namespace ------------------------------

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# syscall numbers per architecture of calls a VE never needs: kernel modules, kexec, the kernel log,
# open_by_handle_at (the "shocker" escape), keyrings of the host, swap, accounting, reboot of the host
_DENY = {
    "x86_64": {
        "syslog": 103, "init_module": 175, "delete_module": 176, "finit_module": 313, "kexec_load": 246,
        "kexec_file_load": 320, "open_by_handle_at": 304, "swapon": 167, "swapoff": 168, "acct": 163,
        "iopl": 172, "ioperm": 173, "add_key": 248, "request_key": 249, "keyctl": 250, "bpf": 321,
        "perf_event_open": 298, "userfaultfd": 323, "settimeofday": 164, "clock_settime": 227,
        "clock_adjtime": 305, "adjtimex": 159, "lookup_dcookie": 212, "quotactl": 179,
    },
    "aarch64": {
        "syslog": 116, "init_module": 105, "delete_module": 106, "finit_module": 273, "kexec_load": 104,
        "kexec_file_load": 294, "open_by_handle_at": 265, "swapon": 224, "swapoff": 225, "acct": 89,
        "add_key": 217, "request_key": 218, "keyctl": 219, "bpf": 280, "perf_event_open": 241,
        "userfaultfd": 282, "settimeofday": 170, "clock_settime": 112, "clock_adjtime": 266, "adjtimex": 171,
        "quotactl": 60,
    },
}
# userfaultfd and keyctl are used by CRIU and some programs; keep them allowed unless asked otherwise.
_DENY_DEFAULT_SKIP = {"userfaultfd", "keyctl", "add_key", "request_key"}


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def install_seccomp_denylist() -> bool:
    """Make the denied syscalls fail with EPERM for this process and everything it runs.

    Returns False (and does nothing) on an architecture without a table. Needs CAP_SYS_ADMIN in the current
    user namespace, or no_new_privs.
    """
    machine = os.uname().machine
    arch = _AUDIT_ARCH.get(machine)
    table = _DENY.get(machine)
    if arch is None or table is None:
        return False
    nrs = sorted(nr for name, nr in table.items() if name not in _DENY_DEFAULT_SKIP)
    ld_w_abs, jeq_k, ret_k = 0x20, 0x15, 0x06
    ret_errno_eperm = 0x00050000 | 1
    ret_allow = 0x7FFF0000
    ret_kill = 0x80000000  # SECCOMP_RET_KILL_PROCESS: a foreign architecture is not expected
    prog = [(ld_w_abs, 0, 0, 4), (jeq_k, 1, 0, arch), (ret_k, 0, 0, ret_kill), (ld_w_abs, 0, 0, 0)]
    # x86_64: refuse the x32 ABI (nr | 0x40000000) so the table cannot be sidestepped
    if machine == "x86_64":
        prog.append((0x35, 0, 1, 0x40000000))  # jge k
        prog.append((ret_k, 0, 0, ret_errno_eperm))
    n = len(nrs)
    for i, nr in enumerate(nrs):
        # on match jump to the EPERM return placed after the remaining comparisons and the allow return
        prog.append((jeq_k, n - i, 0, nr))
    prog.append((ret_k, 0, 0, ret_allow))
    prog.append((ret_k, 0, 0, ret_errno_eperm))
    arr = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
    fprog = _SockFprog(len(prog), arr)
    _check(
        libc().prctl(ctypes.c_int(PR_SET_SECCOMP), ctypes.c_ulong(SECCOMP_MODE_FILTER),
                     ctypes.byref(fprog), ctypes.c_ulong(0), ctypes.c_ulong(0)),
        "prctl(PR_SET_SECCOMP)",
    )
    return True


def setresid(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def write_id_maps(pid: int, host_base: int, count: int = 65536) -> None:
    """Map uids and gids 0..count-1 of PID's user namespace to host_base.. (we are root, so no setgroups dance)."""
    line = f"0 {host_base} {count}\n"
    for name in ("uid_map", "gid_map"):
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


# ---- idmapped mounts -----------------------------------------------------------------------------------


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


# the clone children of idmap_userns not reaped yet, with the stacks they run on (kept alive until then)
_helpers: list[tuple[int, ctypes.Array]] = []
# Threads of one process (the Python API): a helper reaped by another thread's reap_helpers between its clone and
# the open of its namespace takes the namespace with it (ENOENT). _thread: no import cost on vzctl's path.
_helpers_lock = _thread.allocate_lock()


def reap_helpers(block: bool = True) -> None:
    """Reap idmap_userns's children (at exit, or before making another: they only exist until scheduled once)."""
    with _helpers_lock:
        _reap_helpers(block)


def _reap_helpers(block: bool) -> None:
    for item in list(_helpers):
        try:
            done, _ = os.waitpid(item[0], 0 if block else os.WNOHANG)
        except ChildProcessError:
            done = item[0]
        if done:
            _helpers.remove(item)


def idmap_userns(inside: int, outside: int, count: int) -> int:
    """An fd of a new user namespace whose uids and gids INSIDE.. map to host OUTSIDE.. (COUNT of each).

    The namespace needs a process only while its maps are written. That process is made with clone(CLONE_VM),
    so no page table is copied (a fork of vzctl costs 1.5-5 ms, this 0.1 ms); it runs libc's getpid on a stack
    of its own and exits, touching neither our stack nor our thread's TLS. Its maps can be written and its
    namespace opened before it runs or after it exits (a zombie's credentials, which hold the namespace, live
    until it is reaped). It is not waited for here: on a busy machine it may not be scheduled for milliseconds.
    It is reaped by the next call or at exit; its stack stays referenced until then.
    """
    with _helpers_lock:
        return _idmap_userns(inside, outside, count)


def _idmap_userns(inside: int, outside: int, count: int) -> int:
    if not _helpers:
        import atexit

        atexit.register(reap_helpers)
    _reap_helpers(block=False)
    lc = libc()
    clone = lc.clone
    clone.restype = ctypes.c_int
    clone.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    stack = ctypes.create_string_buffer(4096)
    top = (ctypes.addressof(stack) + len(stack) - 64) & ~15
    fn = ctypes.cast(lc.getpid, ctypes.c_void_p).value
    pid = _check(clone(fn, top, CLONE_NEWUSER | CLONE_VM | 17, None), "clone(CLONE_NEWUSER)")  # 17 = SIGCHLD
    _helpers.append((pid, stack))
    line = f"{inside} {outside} {count}\n".encode()
    for name in ("uid_map", "gid_map"):
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)


def open_tree_idmapped(source, userns_fd: int, *, readonly: bool = True) -> int:
    """A detached copy of the mount tree at SOURCE whose ids are seen through USERNS_FD's maps; returns its fd
    (attach it with move_mount_fd, or close it to drop it)."""
    lc = libc()
    tree = _check(lc.syscall(ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(AT_FDCWD), _b(source),
                             ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE)), f"open_tree({source})")
    try:
        attr = _MountAttr(MOUNT_ATTR_IDMAP | (MOUNT_ATTR_RDONLY if readonly else 0), 0, 0, userns_fd)
        _check(lc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(tree), b"",
                          ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE), ctypes.byref(attr),
                          ctypes.c_size_t(ctypes.sizeof(attr))), f"mount_setattr(MOUNT_ATTR_IDMAP) on {source}")
    except BaseException:
        os.close(tree)
        raise
    return tree


def move_mount_fd(tree_fd: int, target) -> None:
    """Attach the detached mount TREE_FD (from open_tree) at TARGET."""
    _check(libc().syscall(ctypes.c_long(_SYS_MOVE_MOUNT), ctypes.c_int(tree_fd), b"", ctypes.c_int(AT_FDCWD),
                          _b(target), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)), f"move_mount to {target}")


def bring_up_loopback() -> None:
    """ifconfig lo up, by ioctl, in the current network namespace (ctypes only: this runs after pivot_root,
    where the host's Python modules are out of reach)."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    lc = libc()
    fd = _check(lc.socket(2, 2 | 0o2000000, 0), "socket(AF_INET, SOCK_DGRAM)")  # SOCK_CLOEXEC
    try:
        ifreq = ctypes.create_string_buffer(40)
        ifreq[0:2] = b"lo"
        _check(lc.ioctl(fd, ctypes.c_ulong(siocgifflags), ifreq), "ioctl(SIOCGIFFLAGS)")
        flags = int.from_bytes(ifreq[16:18], "little") | iff_up
        ifreq[16:18] = flags.to_bytes(2, "little")
        _check(lc.ioctl(fd, ctypes.c_ulong(siocsifflags), ifreq), "ioctl(SIOCSIFFLAGS)")
    finally:
        os.close(fd)
