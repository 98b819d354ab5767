"""cgroup v2 device filtering: a BPF_PROG_TYPE_CGROUP_DEVICE program, generated, loaded and attached with ctypes.

cgroup v2 has no devices controller. The kernel instead runs the BPF programs attached to a cgroup (and to its
ancestors) with ``BPF_CGROUP_DEVICE`` on every mknod and every open of a device node by a process in it; a
program returning 0 makes the access fail with EPERM. This module turns v1-style allow rules into such a
program, the way runc's ``libcontainer/cgroups/devices/devicefilter.go`` does:

    r2 = ctx->access_type & 0xffff      # device type: BPF_DEVCG_DEV_BLOCK 1, BPF_DEVCG_DEV_CHAR 2
    r3 = ctx->access_type >> 16         # requested access: MKNOD 1, READ 2, WRITE 4
    r4 = ctx->major; r5 = ctx->minor
    for each rule:                      # any failed check jumps to the next rule
        if r2 != type: next             # (no check for type 'a')
        if r3 & rule_access != r3: next # (no check when the rule allows rwm)
        if r4 != major: next            # (no check for -1 = '*')
        if r5 != minor: next
        return 1
    return 0

It is attached with BPF_F_ALLOW_MULTI (what runc and systemd use, so it composes with programs on the
ancestors: every one of them must allow an access), and the programs attached to the cgroup before are
detached after the new one is in place, so applying the rules again replaces them without a window in which
the cgroup is unfiltered.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

from vzpkg.errors import ConfigError, VEError

Rule = tuple[str, int, int, str]

# linux/bpf.h
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_PROG_QUERY = 16
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 2

BPF_DEVCG_ACC_MKNOD, BPF_DEVCG_ACC_READ, BPF_DEVCG_ACC_WRITE = 1, 2, 4
BPF_DEVCG_DEV_BLOCK, BPF_DEVCG_DEV_CHAR = 1, 2
ACCESS_BITS = {"m": BPF_DEVCG_ACC_MKNOD, "r": BPF_DEVCG_ACC_READ, "w": BPF_DEVCG_ACC_WRITE}
ACCESS_ALL = BPF_DEVCG_ACC_MKNOD | BPF_DEVCG_ACC_READ | BPF_DEVCG_ACC_WRITE
DEV_TYPES = {"b": BPF_DEVCG_DEV_BLOCK, "c": BPF_DEVCG_DEV_CHAR}

# instruction opcodes (class | op | source)
BPF_LDX_MEM_W = 0x61  # BPF_LDX | BPF_MEM | BPF_W: dst = *(u32 *)(src + off)
BPF_ALU_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K: dst32 &= imm
BPF_ALU_RSH_K = 0x74  # BPF_ALU | BPF_RSH | BPF_K: dst32 >>= imm
BPF_ALU_MOV_K = 0xB4  # BPF_ALU | BPF_MOV | BPF_K: dst32 = imm
BPF_ALU_MOV_X = 0xBC  # BPF_ALU | BPF_MOV | BPF_X: dst32 = src32
BPF_JMP_JNE_K = 0x55  # BPF_JMP | BPF_JNE | BPF_K: if dst != imm: pc += off
BPF_JMP_JNE_X = 0x5D  # BPF_JMP | BPF_JNE | BPF_X: if dst != src: pc += off
BPF_JMP_EXIT = 0x95  # BPF_JMP | BPF_EXIT: return r0
R0, R1, R2, R3, R4, R5 = range(6)

CGROUP2_SUPER_MAGIC = 0x63677270
PROG_NAME = b"vzpkg_devices"
_SYSCALL_NR = {"x86_64": 321, "aarch64": 280, "arm64": 280}
_LOG_SIZE = 1 << 16
_ATTR_SIZE = 128

Insn = tuple[int, int, int, int, int]  # (code, dst_reg, src_reg, off, imm)


# ---------------------------------------------------------------------------------------------------------
# program generation (pure, unit tested)


def check_rule(rule: Rule) -> Rule:
    try:
        kind, major, minor, access = rule
    except (TypeError, ValueError):
        raise ConfigError(f"device rule {rule!r}: must be (type, major, minor, access)") from None
    if (
        kind not in ("a", "b", "c")
        or not isinstance(access, str)
        or not access
        or set(access) - set("rwm")
        or not all(isinstance(n, int) and (n == -1 or 0 <= n < 1 << 31) for n in (major, minor))
    ):
        raise ConfigError(
            f"device rule {rule!r}: type must be a/b/c, major and minor numbers (-1 = any), access from 'rwm'"
        )
    return kind, major, minor, access


def rule_block(rule: Rule) -> list[Insn]:
    """The instructions for one allow rule: checks that skip past the block, then return 1."""
    kind, major, minor, access = check_rule(rule)
    block: list[Insn] = []
    if kind != "a":
        block.append((BPF_JMP_JNE_K, R2, 0, 0, DEV_TYPES[kind]))
    bits = 0
    for ch in access:
        bits |= ACCESS_BITS[ch]
    if bits != ACCESS_ALL:
        block.append((BPF_ALU_MOV_X, R1, R3, 0, 0))
        block.append((BPF_ALU_AND_K, R1, 0, 0, bits))
        block.append((BPF_JMP_JNE_X, R1, R3, 0, 0))
    if major != -1:
        block.append((BPF_JMP_JNE_K, R4, 0, 0, major))
    if minor != -1:
        block.append((BPF_JMP_JNE_K, R5, 0, 0, minor))
    block.append((BPF_ALU_MOV_K, R0, 0, 0, 1))
    block.append((BPF_JMP_EXIT, 0, 0, 0, 0))
    # every conditional jump lands on the first instruction after the block (the next rule, or the default)
    n = len(block)
    return [(c, d, s, n - i - 1 if c in (BPF_JMP_JNE_K, BPF_JMP_JNE_X) else o, imm)
            for i, (c, d, s, o, imm) in enumerate(block)]


PROLOGUE: list[Insn] = [
    (BPF_LDX_MEM_W, R2, R1, 0, 0),  # r2 = ctx->access_type
    (BPF_ALU_AND_K, R2, 0, 0, 0xFFFF),  # r2 = device type
    (BPF_LDX_MEM_W, R3, R1, 0, 0),  # r3 = ctx->access_type
    (BPF_ALU_RSH_K, R3, 0, 0, 16),  # r3 = requested access
    (BPF_LDX_MEM_W, R4, R1, 4, 0),  # r4 = ctx->major
    (BPF_LDX_MEM_W, R5, R1, 8, 0),  # r5 = ctx->minor
]
EPILOGUE: list[Insn] = [
    (BPF_ALU_MOV_K, R0, 0, 0, 0),  # no rule matched: deny
    (BPF_JMP_EXIT, 0, 0, 0, 0),
]


def program(rules: Iterable[Rule]) -> list[Insn]:
    """The whole filter for these allow rules; an empty list denies every device."""
    insns = list(PROLOGUE)
    for rule in rules:
        block = rule_block(rule)
        insns += block
        if len(block) == 2:
            # a rule with nothing to check (a *:* rwm) always allows: what follows is unreachable, and the
            # verifier refuses unreachable instructions
            return insns
    return insns + EPILOGUE


def assemble(insns: list[Insn]) -> bytes:
    """struct bpf_insn[]: u8 code, u8 dst_reg:4 / src_reg:4 (bit-field order follows the byte order), s16 off,
    s32 imm, in native byte order."""
    out = bytearray()
    for code, dst, src, off, imm in insns:
        regs = (src << 4) | dst if sys.byteorder == "little" else (dst << 4) | src
        out += struct.pack("=BBhi", code, regs, off, imm)
    return bytes(out)


# ---------------------------------------------------------------------------------------------------------
# the bpf(2) system call


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
    ]


class _ProgAttachAttr(ctypes.Structure):
    _fields_ = [
        ("target_fd", ctypes.c_uint32),
        ("attach_bpf_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("replace_bpf_fd", ctypes.c_uint32),
    ]


class _ProgQueryAttr(ctypes.Structure):
    _fields_ = [
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("query_flags", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("prog_ids", ctypes.c_uint64),
        ("prog_cnt", ctypes.c_uint32),
    ]


class _GetFdByIdAttr(ctypes.Structure):
    _fields_ = [
        ("prog_id", ctypes.c_uint32),
        ("next_id", ctypes.c_uint32),
        ("open_flags", ctypes.c_uint32),
    ]


class _Attr(ctypes.Union):
    """union bpf_attr, zero-padded (the kernel requires the bytes it does not know about to be zero)."""

    _fields_ = [
        ("load", _ProgLoadAttr),
        ("attach", _ProgAttachAttr),
        ("query", _ProgQueryAttr),
        ("by_id", _GetFdByIdAttr),
        ("_pad", ctypes.c_uint8 * _ATTR_SIZE),
    ]


for _s in (_ProgLoadAttr, _ProgAttachAttr, _ProgQueryAttr, _GetFdByIdAttr):
    assert ctypes.sizeof(_s) <= _ATTR_SIZE
assert _ProgLoadAttr.prog_name.offset == 48 and _ProgLoadAttr.expected_attach_type.offset == 68
assert _ProgQueryAttr.prog_ids.offset == 16 and _ProgQueryAttr.prog_cnt.offset == 24

_libc: ctypes.CDLL | None = None


def _syscall_nr() -> int:
    machine = platform.machine()
    if machine not in _SYSCALL_NR:
        raise VEError(f"cgroup v2 device filter: bpf(2) system call number unknown on {machine}")
    return _SYSCALL_NR[machine]


def _bpf(cmd: int, attr: _Attr) -> int:
    """bpf(cmd, &attr, sizeof attr); returns the result or -errno."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    ret = _libc.syscall(
        ctypes.c_long(_syscall_nr()), ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr))
    )
    return ret if ret >= 0 else -ctypes.get_errno()


def _errname(err: int) -> str:
    hint = "; needs root (CAP_SYS_ADMIN)" if err == errno.EPERM and os.geteuid() else ""
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)}{hint})"


def load(insns: list[Insn], where: str = "") -> int:
    """BPF_PROG_LOAD a device filter; returns the program fd. A verifier error names the log's last line."""
    code = ctypes.create_string_buffer(assemble(insns))
    license_ = ctypes.create_string_buffer(b"Apache-2.0")

    def attempt(log: ctypes.Array[ctypes.c_char] | None) -> int:
        attr = _Attr()
        attr.load.prog_type = BPF_PROG_TYPE_CGROUP_DEVICE
        attr.load.insn_cnt = len(insns)
        attr.load.insns = ctypes.addressof(code)
        attr.load.license = ctypes.addressof(license_)
        attr.load.prog_name = PROG_NAME
        if log is not None:
            attr.load.log_level = 1
            attr.load.log_size = len(log)
            attr.load.log_buf = ctypes.addressof(log)
        return _bpf(BPF_PROG_LOAD, attr)

    fd = attempt(None)
    if fd >= 0:
        return fd
    err = -fd
    detail = ""
    if err in (errno.EINVAL, errno.EACCES, errno.E2BIG, errno.ERANGE):
        # the verifier refused it: load again with a log to say why (libbpf does the same)
        log = ctypes.create_string_buffer(_LOG_SIZE)
        fd = attempt(log)
        if fd >= 0:  # cannot happen for a deterministic verifier, but never leak the fd
            return fd
        # the log ends with a statistics line ("processed N insns ..."); the reason is the line before it
        lines = [
            line
            for line in log.value.decode(errors="replace").splitlines()
            if line.strip() and not line.startswith("processed ")
        ]
        if lines:
            detail = f"; verifier: {lines[-1].strip()}"
    raise VEError(
        f"cgroup v2 device filter{' for ' + where if where else ''}: loading the BPF program "
        f"({len(insns)} instructions) failed: {_errname(err)}{detail}"
    )


def attached(cgroup: Path | str) -> tuple[list[int], int]:
    """(ids of the device programs attached to this cgroup itself, their attach flags)."""
    fd = _open_cgroup(cgroup)
    try:
        return _query(fd, str(cgroup))
    finally:
        os.close(fd)


def _open_cgroup(cgroup: Path | str) -> int:
    try:
        return os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise VEError(f"cgroup v2 device filter: cannot open cgroup {cgroup}: {e.strerror}") from None


def _query(cgfd: int, where: str) -> tuple[list[int], int]:
    ids = (ctypes.c_uint32 * 64)()
    attr = _Attr()
    attr.query.target_fd = cgfd
    attr.query.attach_type = BPF_CGROUP_DEVICE
    attr.query.prog_ids = ctypes.addressof(ids)
    attr.query.prog_cnt = len(ids)
    ret = _bpf(BPF_PROG_QUERY, attr)
    if ret < 0:
        raise VEError(f"cgroup v2 device filter: querying the programs of cgroup {where} failed: {_errname(-ret)}")
    return list(ids[: attr.query.prog_cnt]), attr.query.attach_flags


def _attach_cmd(cmd: int, cgfd: int, progfd: int, flags: int) -> int:
    attr = _Attr()
    attr.attach.target_fd = cgfd
    attr.attach.attach_bpf_fd = progfd
    attr.attach.attach_type = BPF_CGROUP_DEVICE
    attr.attach.attach_flags = flags
    return _bpf(cmd, attr)


def _detach_id(cgfd: int, prog_id: int) -> int:
    attr = _Attr()
    attr.by_id.prog_id = prog_id
    progfd = _bpf(BPF_PROG_GET_FD_BY_ID, attr)
    if progfd == -errno.ENOENT:
        return 0  # gone meanwhile
    if progfd < 0:
        return progfd
    try:
        ret = _attach_cmd(BPF_PROG_DETACH, cgfd, progfd, 0)
        return 0 if ret == -errno.ENOENT else ret
    finally:
        os.close(progfd)


def apply(cgroup: Path | str, rules: Iterable[Rule]) -> int:
    """Allow only these devices to the processes in this cgroup (a cgroup2 directory) and its descendants.

    Replaces the device programs attached to the cgroup before; returns the new program's id."""
    rules = [check_rule(r) for r in rules]
    where = str(cgroup)
    insns = program(rules)
    cgfd = _open_cgroup(cgroup)
    try:
        old, flags = _query(cgfd, where)
        if old and not flags & BPF_F_ALLOW_MULTI:
            # someone attached a program without ALLOW_MULTI; the kernel refuses mixing modes, so it has to go
            # first (a brief moment without a filter, on a cgroup that is being set up)
            for prog_id in old:
                _check_detach(_detach_id(cgfd, prog_id), where)
            old = []
        progfd = load(insns, where)
        try:
            ret = _attach_cmd(BPF_PROG_ATTACH, cgfd, progfd, BPF_F_ALLOW_MULTI)
            if ret < 0:
                hint = (
                    " (an ancestor cgroup has a device program attached without BPF_F_ALLOW_MULTI)"
                    if ret == -errno.EPERM and os.geteuid() == 0
                    else ""
                )
                raise VEError(
                    f"cgroup v2 device filter: attaching the BPF program to cgroup {where} failed: "
                    f"{_errname(-ret)}{hint}"
                )
        finally:
            os.close(progfd)  # the attachment holds its own reference
        new = [i for i in _query(cgfd, where)[0] if i not in old]
        for prog_id in old:
            _check_detach(_detach_id(cgfd, prog_id), where)
        return new[-1] if new else 0
    finally:
        os.close(cgfd)


def _check_detach(ret: int, where: str) -> None:
    if ret < 0:
        raise VEError(
            f"cgroup v2 device filter: detaching the previous BPF program from cgroup {where} failed: {_errname(-ret)}"
        )


# ---------------------------------------------------------------------------------------------------------
# filesystem check


class _Statfs(ctypes.Structure):
    # only f_type (a long on every 64-bit Linux ABI, first field) is read; the rest is room for the kernel
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_uint8 * 256)]


def is_cgroup2(path: Path | str) -> bool:
    """Whether path is a directory on a cgroup2 filesystem (statfs f_type)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return False
    return buf.f_type == CGROUP2_SUPER_MAGIC
