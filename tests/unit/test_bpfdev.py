"""The cgroup v2 device filter's generated BPF program (no root, no kernel): encoding, jump targets, and what
it decides, checked by running the assembled bytes through a small interpreter for the instructions it uses."""

from __future__ import annotations

import struct
import sys

import pytest

from vzpkg.errors import ConfigError
from vzpkg.runtime import bpfdev
from vzpkg.runtime.bpfdev import (
    BPF_ALU_MOV_K,
    BPF_JMP_EXIT,
    BPF_JMP_JNE_K,
    BPF_JMP_JNE_X,
    EPILOGUE,
    PROLOGUE,
    assemble,
    program,
    rule_block,
)

MKNOD, READ, WRITE = 1, 2, 4
BLOCK, CHAR = 1, 2
JUMPS = (BPF_JMP_JNE_K, BPF_JMP_JNE_X)


def decode(code: bytes) -> list[tuple[int, int, int, int, int]]:
    assert len(code) % 8 == 0
    out = []
    for i in range(0, len(code), 8):
        op, regs, off, imm = struct.unpack("=BBhi", code[i : i + 8])
        dst, src = (regs & 0xF, regs >> 4) if sys.byteorder == "little" else (regs >> 4, regs & 0xF)
        out.append((op, dst, src, off, imm))
    return out


def run(code: bytes, dev_type: int, access: int, major: int, minor: int) -> int:
    """Execute the assembled program on a bpf_cgroup_dev_ctx, for the opcodes bpfdev emits."""
    ctx = struct.pack("=III", (access << 16) | dev_type, major, minor)
    regs = [0] * 11
    regs[1] = -1  # the context pointer: only ever used as the base of a load
    insns = decode(code)
    pc, steps = 0, 0
    while True:
        assert 0 <= pc < len(insns), f"fell off the program at {pc}"
        steps += 1
        assert steps <= len(insns), "a backward jump (the verifier forbids loops)"
        op, dst, src, off, imm = insns[pc]
        pc += 1
        u32 = imm & 0xFFFFFFFF
        if op == 0x61:  # ldx w
            assert regs[src] == -1, "load from something that is not the context"
            assert off in (0, 4, 8)
            regs[dst] = struct.unpack_from("=I", ctx, off)[0]
        elif op == 0x54:
            regs[dst] = regs[dst] & u32
        elif op == 0x74:
            regs[dst] = (regs[dst] & 0xFFFFFFFF) >> u32
        elif op == 0xB4:
            regs[dst] = u32
        elif op == 0xBC:
            regs[dst] = regs[src] & 0xFFFFFFFF
        elif op == 0x55:
            assert off >= 0
            if regs[dst] != imm:
                pc += off
        elif op == 0x5D:
            assert off >= 0
            if regs[dst] != regs[src]:
                pc += off
        elif op == 0x95:
            return regs[0]
        else:
            raise AssertionError(f"unexpected opcode {op:#x}")


RULES = [("c", 1, 3, "rwm"), ("c", 136, -1, "rw"), ("b", 7, 0, "r"), ("c", -1, 9, "m")]


def test_layout_and_default_deny() -> None:
    insns = program(RULES)
    assert insns[: len(PROLOGUE)] == PROLOGUE
    assert insns[-2:] == EPILOGUE == [(BPF_ALU_MOV_K, 0, 0, 0, 0), (BPF_JMP_EXIT, 0, 0, 0, 0)]
    # c 1:3 rwm: type, major, minor, return 1 (5); c 136:* rw: type, 3 for access, major, return (7);
    # b 7:0 r: type, access 3, major, minor, return (8); c *:9 m: type, access 3, minor, return (7)
    assert [len(rule_block(r)) for r in RULES] == [5, 7, 8, 7]
    assert len(insns) == 6 + 5 + 7 + 8 + 7 + 2
    assert len(assemble(insns)) == 8 * len(insns)


def test_jumps_land_on_the_next_rule() -> None:
    insns = program(RULES)
    starts, pc = [], len(PROLOGUE)
    for r in RULES:
        starts.append(pc)
        pc += len(rule_block(r))
    targets = set(starts[1:]) | {len(insns) - 2}  # the next rule's first instruction, or the default
    for pc, (op, _, _, off, _) in enumerate(insns):
        if op in JUMPS:
            assert off > 0 and pc + 1 + off in targets
            assert pc + 1 + off < len(insns)
    # every rule ends with return 1
    for s, r in zip(starts, RULES, strict=True):
        block = insns[s : s + len(rule_block(r))]
        assert block[-2:] == [(BPF_ALU_MOV_K, 0, 0, 0, 1), (BPF_JMP_EXIT, 0, 0, 0, 0)]


def test_encoding_of_one_instruction() -> None:
    # r2 = *(u32 *)(r1 + 0): code 0x61, dst 2, src 1 -> regs byte 0x12 on little-endian hosts
    raw = assemble([(0x61, 2, 1, 0, 0)])
    if sys.byteorder == "little":
        assert raw == bytes([0x61, 0x12, 0, 0, 0, 0, 0, 0])
    # jne r4, 136, +3
    assert decode(assemble([(BPF_JMP_JNE_K, 4, 0, 3, 136)])) == [(BPF_JMP_JNE_K, 4, 0, 3, 136)]


@pytest.mark.parametrize(
    ("dev", "access", "major", "minor", "allowed"),
    [
        (CHAR, READ | WRITE, 1, 3, 1),  # /dev/null rw
        (CHAR, MKNOD, 1, 3, 1),
        (CHAR, READ, 1, 7, 0),  # /dev/full: no rule
        (BLOCK, READ, 1, 3, 0),  # right numbers, wrong type
        (CHAR, READ | WRITE, 136, 4, 1),  # /dev/pts/4
        (CHAR, MKNOD, 136, 4, 0),  # the pts rule has no m
        (CHAR, READ | MKNOD, 136, 4, 0),  # part of it not allowed
        (BLOCK, READ, 7, 0, 1),  # loop0, read only
        (BLOCK, WRITE, 7, 0, 0),
        (BLOCK, READ, 7, 1, 0),
        (CHAR, MKNOD, 42, 9, 1),  # c *:9 m
        (CHAR, READ, 42, 9, 0),
        (BLOCK, MKNOD, 42, 9, 0),
    ],
)
def test_decisions(dev: int, access: int, major: int, minor: int, allowed: int) -> None:
    assert run(assemble(program(RULES)), dev, access, major, minor) == allowed


def test_no_rules_denies_everything_and_a_allows_everything() -> None:
    deny = assemble(program([]))
    assert len(deny) == 8 * 8
    allow = assemble(program([("a", -1, -1, "rwm")]))
    for dev in (BLOCK, CHAR):
        for access in (MKNOD, READ, WRITE, READ | WRITE | MKNOD):
            assert run(deny, dev, access, 8, 0) == 0
            assert run(allow, dev, access, 8, 0) == 1
    # nothing can follow an unconditional allow (the verifier refuses unreachable code)
    assert program([("a", -1, -1, "rwm"), ("c", 1, 3, "r")]) == PROLOGUE + [(BPF_ALU_MOV_K, 0, 0, 0, 1),
                                                                          (BPF_JMP_EXIT, 0, 0, 0, 0)]
    # 'a' with numbers and an access: both types, that device, that access
    a = assemble(program([("a", 5, -1, "r")]))
    assert run(a, BLOCK, READ, 5, 1) == run(a, CHAR, READ, 5, 2) == 1
    assert run(a, CHAR, WRITE, 5, 1) == run(a, CHAR, READ, 6, 1) == 0


def test_ve_device_rules_compile() -> None:
    from vzpkg.runtime.spawn import DEVICE_RULES

    code = assemble(program(DEVICE_RULES))
    assert run(code, CHAR, READ | WRITE, 1, 3) == 1  # /dev/null
    assert run(code, CHAR, READ | WRITE, 136, 0) == 1  # a pty
    assert run(code, BLOCK, READ, 8, 0) == 0  # sda
    assert run(code, CHAR, READ, 10, 237) == 0  # /dev/loop-control


@pytest.mark.parametrize(
    "bad",
    [("x", 1, 3, "rwm"), ("c", 1, 3, ""), ("c", 1, 3, "rx"), ("c", -2, 3, "r"), ("c", 1, 1 << 31, "r"),
     ("c", "1", 3, "r"), ("c", 1, 3)],
)
def test_bad_rules(bad: tuple) -> None:
    with pytest.raises(ConfigError, match="device rule"):
        program([bad])


def test_attr_layout() -> None:
    # offsets from linux/bpf.h's union bpf_attr
    load = bpfdev._ProgLoadAttr
    assert (load.insns.offset, load.license.offset, load.log_level.offset, load.log_buf.offset) == (8, 16, 24, 32)
    assert (load.kern_version.offset, load.prog_flags.offset, load.prog_name.offset) == (40, 44, 48)
    att = bpfdev._ProgAttachAttr
    assert (att.attach_bpf_fd.offset, att.attach_type.offset, att.attach_flags.offset) == (4, 8, 12)
    assert bpfdev._ProgQueryAttr.prog_cnt.offset == 24
    import ctypes

    assert ctypes.sizeof(bpfdev._Attr) == 128


def test_not_a_cgroup(tmp_path) -> None:
    assert not bpfdev.is_cgroup2(tmp_path)
    assert not bpfdev.is_cgroup2(tmp_path / "missing")
