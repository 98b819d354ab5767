"""The resident vzctl server's pure parts (vzpkg/cli/server_protocol.py, server.py): decoding a request, reading one as it arrives
over a real socket pair, which clients it may serve, and what counts as a change of the code."""

from __future__ import annotations

import array
import os
import socket
import struct
import time
from pathlib import Path

import pytest

from vzpkg.cli import server_protocol
from vzpkg.cli.server import _code_stamp
from vzpkg.cli.server_protocol import MAGIC, Context, Pending, as_able, context_of, decode_request


def body(argv: list[bytes], env: list[bytes], umask: int = 0o22, ignored: int = 0, blocked: int = 0,
         magic: bytes = MAGIC) -> bytes:
    return magic + struct.pack("<IQQII", umask, ignored, blocked, len(argv), len(env)) + b"".join(x + b"\0" for x in argv + env)


def test_decode_request():
    r = decode_request(body([b"status", b"\xff1"], [b"A=1", b"NOEQ", b"=x", b"B=2=3"], ignored=1 << 12 | 1 << 8,
                            blocked=1 << 11 | 1 << 18))
    assert r.argv == ["status", "\udcff1"]  # bytes that are not UTF-8: as Python's own argv has them
    assert r.env == {"A": "1", "B": "2=3"}
    assert r.umask == 0o22 and r.ignored == [13]  # SIGPIPE; SIGKILL (9) cannot be ignored: dropped
    assert r.blocked == [12]  # SIGUSR2; SIGSTOP (19) cannot be blocked: dropped
    for bad in (body([b"x"], [], magic=b"VZC1"), body([b"x"], [], umask=0o1000), body([b"x"], [])[:-1],
                body([b"x"], [])[:28], body([b"x"], []) + b"y\0"):
        with pytest.raises(ValueError):
            decode_request(bad)


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.setblocking(False)
    return a, b


def test_a_request_is_read_as_it_arrives():
    client, conn = _pair()
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        data = body([b"status", b"1"], [b"A=1"])
        data = struct.pack("<I", len(data)) + data
        p = Pending(conn, 0)
        assert p.receive() is None  # nothing yet: no waiting
        client.sendmsg([data[:3]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd] * 4))])
        assert p.receive() is None
        client.sendall(data[3:-1])
        assert p.receive() is None
        client.sendall(data[-1:])
        req = p.receive()
        assert req is not None and req.argv == ["status", "1"] and len(p.fds) == 4
        assert all(os.get_inheritable(x) is False for x in p.fds)  # (received close-on-exec)
        p.close()
    finally:
        os.close(fd)
        client.close()


def test_bad_requests_as_they_arrive():
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        client, conn = _pair()
        client.close()
        with pytest.raises(EOFError):  # a probe
            Pending(conn, 0).receive()
        conn.close()
        cases = [
            ([struct.pack("<I", 8) + b"VZC2"], 4),  # closed half-way
            ([struct.pack("<I", server_protocol.MAX_REQUEST + 1)], 4),
            ([struct.pack("<I", 0)], 3),  # complete, but not its four descriptors
            ([struct.pack("<I", 0)], 5),
        ]
        for chunks, nfds in cases:
            client, conn = _pair()
            client.sendmsg(chunks, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd] * nfds))])
            client.close()
            p = Pending(conn, 0)
            with pytest.raises(ValueError):
                p.receive()
            p.close()
    finally:
        os.close(fd)


def test_who_is_served():
    me = context_of("self")
    assert as_able(me, me)
    assert as_able(me._replace(caps=tuple(c | 1 << 62 for c in me.caps)), me)
    less = Context(me.places, (me.caps[0], me.caps[1] & ~(1 << 21), me.caps[2]), me.confined)  # no CAP_SYS_ADMIN
    assert me.caps[1] >> 21 & 1 and not as_able(less, me)
    assert not as_able(me._replace(confined=(1, me.confined[1])), me)  # no_new_privs
    assert not as_able(me._replace(confined=(me.confined[0], 2)), me)  # a seccomp filter
    assert not as_able(me._replace(places=(None, *me.places[1:])), me)  # another mount namespace


def test_the_code_stamp_sees_code_not_caches(tmp_path: Path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub").mkdir()
    first = _code_stamp(tmp_path)
    time.sleep(0.01)
    (tmp_path / "__pycache__").mkdir()  # Python caching a module: the directory's mtime changes
    (tmp_path / "sub" / "__pycache__").mkdir()
    (tmp_path / "sub" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert _code_stamp(tmp_path) == first
    (tmp_path / "sub" / "b.py").write_text("")
    second = _code_stamp(tmp_path)
    assert second != first
    os.utime(tmp_path / "a.py", ns=(0, 1))
    assert _code_stamp(tmp_path) != second
