"""The resident vzctl server and its C front end (vzpkg/cli/server.py, client/vzctl.c): commands through them
behave exactly as the Python vzctl run directly (output, errors, exit codes, standard input, signals), a killed
client or server leaves nothing running that should not, bad requests do not stop it, code changes are picked up.

Each test gets its own server on a socket in a temporary directory ($VZCTL_SERVER_SOCKET), and the front end is
built from client/vzctl.c for the session, so neither a server the user runs nor an old build is tested."""

from __future__ import annotations

import array
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vzpkg.cli.server_protocol import MAGIC

from .conftest import PROJECT, VZCTL, Runtime

TAKEN = b"R" + bytes(4)  # the server's first answer: it takes the command

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc builds the vzctl front end")
ACCEPT_TIMEOUT = 3  # the front end's wait for a server to take its command (10 s as installed)


@pytest.fixture(scope="session")
def front_end(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("client") / "vzctl"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(PROJECT / "client/vzctl.c"),
                    '-DVZCTL_SOCKET="/nonexistent/vzctl.sock"', f'-DVZCTL_PYTHON="{sys.executable}"',
                    f"-DACCEPT_TIMEOUT={ACCEPT_TIMEOUT}"],
                   check=True, capture_output=True, text=True)
    return out


class Server:
    def __init__(self, sock: Path, env: dict[str, str]) -> None:
        self.sock = sock
        self.log = sock.with_suffix(".test-log")
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "vzpkg.cli.server", "run", "--socket", str(self.sock)],
                                         env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/")
        deadline = time.monotonic() + 20
        while "serving" not in self.log_text():
            assert self.proc.poll() is None, self.log_text()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def children(self) -> list[int]:
        """The server's children that run commands (not the idle worker waiting for the next one)."""
        assert self.proc is not None
        text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return [int(x) for x in text.split() if _comm(int(x)) == "vzctl"]  # (not a worker still starting either)

    def stop(self) -> int:
        """Stop it; the number of commands it served (since its last re-execution)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        m = re.findall(r"stopped after (\d+) commands", self.log_text())
        assert m, self.log_text()
        return int(m[-1])


@pytest.fixture
def server(tmp_path, rt: Runtime):
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    srv = Server(run_dir / "vzctl.sock", rt.env)
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc and srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()


def through(front_end: Path, server: Server, rt: Runtime, *args: str, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**(env or rt.env), "VZCTL_SERVER_SOCKET": str(server.sock)}
    return subprocess.run([str(front_end), *args], env=env, capture_output=True, text=True, input=input,
                          timeout=60, cwd=PROJECT)


def direct(rt: Runtime, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VZCTL, *args], env=rt.env, capture_output=True, text=True, input=input, timeout=60,
                          cwd=PROJECT)


def same(a: subprocess.CompletedProcess[str], b: subprocess.CompletedProcess[str]) -> tuple:
    """What must agree: exit status, standard output and error (pids, which differ, masked)."""
    def norm(t: str) -> str:
        return re.sub(r"pid \d+", "pid N", t)

    return (a.returncode, norm(a.stdout), norm(a.stderr)), (b.returncode, norm(b.stdout), norm(b.stderr))


def test_commands_through_the_server_behave_as_the_python_vzctl(front_end, server, rt):
    one, two = rt.new_id(), rt.new_id()
    rt.created += [one, two]
    steps = [
        ("create", "{v}", "--ostemplate", rt.template, "--layout", "overlay"),
        ("create", "{v}", "--ostemplate", rt.template),  # exists: an error and its code
        ("create", "{v}x", "--ostemplate", "no-such-template"),
        ("start", "{v}"),
        ("start", "{v}"),
        ("exec", "{v}", "echo out; echo err >&2; exit 3"),
        ("exec", "{v}", "/bin/cat"),  # standard input reaches the command
        ("exec", "{v}", "pwd"),
        ("status", "{v}"),
        ("set", "{v}", "--ram", "256M", "--save"),
        ("set", "{v}", "--ram", "lots"),
        ("set", "{v}"),
        ("frobnicate", "{v}"),
        ("status", "bad/id"),
        ("stop", "{v}"),
        ("stop", "{v}"),
        ("exec", "{v}", "true"),
        ("destroy", "{v}"),
        ("destroy", "{v}"),
    ]
    served = 0
    for step in steps:
        a = through(front_end, server, rt, *(x.format(v=one) for x in step), input="piped\n")
        served += 1
        b = direct(rt, *(x.format(v=two) for x in step), input="piped\n")
        ta, tb = same(a, b)
        assert ta == (tb[0], tb[1].replace(two, one), tb[2].replace(two, one)), step
    assert served == server.stop()  # every command above ran in the server, none fell back


def test_interrupt_reaches_the_command_and_a_killed_client_takes_it_along(front_end, server, rt):
    veid = rt.create("--layout", "overlay")
    # through a shell: the interrupt must reach the shell's child too (the command's process group)
    p = subprocess.Popen([str(front_end), "exec", veid, "sleep 60"], env={**rt.env, "VZCTL_SERVER_SOCKET":
                         str(server.sock)}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    _wait_for(lambda: server.children())
    time.sleep(0.3)  # the command is running in the VE
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 130, err  # as `vzctl exec` run directly: the command died of SIGINT
    _wait_for(lambda: not server.children())

    p = subprocess.Popen([str(front_end), "exec", veid, "sleep 60"], env={**rt.env, "VZCTL_SERVER_SOCKET":
                         str(server.sock)}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    _wait_for(lambda: server.children())
    handler = server.children()[0]
    p.kill()
    p.wait()
    _wait_for(lambda: not Path(f"/proc/{handler}").exists())  # the command's vzctl went with its client
    assert server.proc.poll() is None
    rt.vzctl("exec", veid, "pkill sleep || true")


def test_ignored_signals_are_inherited_as_from_a_shell(front_end, server, rt):
    """A command started with signals ignored (`cmd &` in a script, nohup) or blocked passes that on to what it
    runs."""
    veid = rt.create("--layout", "overlay")

    def ignore() -> None:
        for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2, signal.SIGTERM})

    cmd = ["exec", veid, "grep", "-E", "SigIgn|SigBlk", "/proc/self/status"]
    a = subprocess.run([str(front_end), *cmd], env={**rt.env, "VZCTL_SERVER_SOCKET": str(server.sock)},
                       preexec_fn=ignore, capture_output=True, text=True, timeout=60)
    b = subprocess.run([*VZCTL, *cmd], env=rt.env, preexec_fn=ignore, capture_output=True, text=True, timeout=60)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout, (a, b)
    blocked, ignored = (int(line.split()[1], 16) for line in a.stdout.splitlines())
    assert ignored & (1 << (signal.SIGUSR1 - 1)) and blocked & (1 << (signal.SIGUSR2 - 1))
    assert server.stop() == 1


def test_a_server_killed_under_a_command(front_end, server, rt):
    """The command goes on and reports its own end to its client (exit status and output as without the
    server); with the server gone, the same front end runs commands itself."""
    veid = rt.create("--layout", "overlay")
    p = subprocess.Popen([str(front_end), "exec", veid, "sleep 2; echo finished; exit 3"],
                         env={**rt.env, "VZCTL_SERVER_SOCKET": str(server.sock)}, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # running: a session of its own, which it makes once it has its go-ahead (before, the server's death leaves
    # nothing running, and the client runs the command itself)
    _wait_for(lambda: any(_state(c, 3) == str(c) for c in server.children()))
    server.proc.kill()
    out, err = p.communicate(timeout=20)
    assert (p.returncode, out, err) == (3, "finished\n", "")
    again = through(front_end, server, rt, "status", veid)
    assert again.returncode == 0 and "running" in again.stdout


def test_a_command_killed_with_its_server_is_one_line_and_exit_68(front_end, server, rt, tmp_path):
    """Both the server and the command's process killed: nobody can say how the command ended; the client says
    so in one line, exit 68, once ACCEPT_TIMEOUT has passed after the command's process ended."""
    veid = rt.create("--layout", "overlay")
    errors = tmp_path / "stderr"
    with open(errors, "w") as f:  # (a file: the sleep in the VE keeps the client's outputs open)
        p = subprocess.Popen([str(front_end), "exec", veid, "sleep 60"],
                             env={**rt.env, "VZCTL_SERVER_SOCKET": str(server.sock)}, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=f)
    _wait_for(lambda: any(_state(c, 3) == str(c) for c in server.children()))
    worker = next(c for c in server.children() if _state(c, 3) == str(c))
    server.proc.kill()
    os.kill(worker, signal.SIGKILL)
    p.wait(timeout=ACCEPT_TIMEOUT + 20)
    err = errors.read_text()
    assert p.returncode == 68
    assert err.count("\n") == 1 and "vzctl server stopped while it ran this command" in err, err
    rt.vzctl("exec", veid, "pkill sleep || true")


def test_a_code_change_is_picked_up(front_end, server, rt):
    first = through(front_end, server, rt, "status", "4711")
    assert first.returncode == 0
    module = PROJECT / "vzpkg/cli/server_control.py"
    st = module.stat()
    try:
        os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        time.sleep(0.6)  # the server looks at the code at most twice a second
        fallback = through(front_end, server, rt, "status", "4711")  # run by the Python vzctl, not the old code
        assert fallback.returncode == 0 and fallback.stdout == first.stdout
        _wait_for(lambda: "re-executed" in server.log_text())
        served = through(front_end, server, rt, "status", "4711")
        assert served.returncode == 0 and served.stdout == first.stdout
    finally:
        os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert server.stop() >= 1  # the new image served the last one (a restored mtime is a change too: >= 1)


def _request(argv: list[bytes], env: list[bytes], magic: bytes = MAGIC) -> bytes:
    body = magic + struct.pack("<IQQII", 0o22, 0, 0, len(argv), len(env)) + b"".join(x + b"\0" for x in argv + env)
    return struct.pack("<I", len(body)) + body


def test_bad_requests_do_not_stop_the_server(front_end, server, rt):
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        fds = array.array("i", [devnull, devnull, devnull, os.open("/", os.O_PATH)])
        bad = [
            (b"", None),  # connect and say nothing
            (b"garbage", None),  # no descriptors
            (_request([b"status", b"1"], [], magic=b"XXXX"), fds),
            (struct.pack("<I", 1 << 30), fds),  # a length past the bound
            (struct.pack("<I", 100) + MAGIC, fds),  # truncated
            (_request([b"status", b"4711"], [], magic=b"VZC1"), fds),  # the old protocol (fds before R)
            (_request([b"status"], [b"A=1"])[:-1] + b"x", fds),  # not NUL-terminated
        ]
        for data, passed in bad:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(str(server.sock))
                if passed is not None:
                    s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, passed)])
                elif data:
                    s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                assert _all_of(s) == TAKEN  # taken, then closed: nothing run
        os.close(fds[3])
    finally:
        os.close(devnull)
    ok = through(front_end, server, rt, "status", "4711")
    assert ok.returncode == 0 and "deleted" in ok.stdout
    assert server.stop() == 1


def test_parallel_commands(front_end, server, rt):
    ids = [rt.new_id() for _ in range(6)]
    rt.created += ids
    env = {**rt.env, "VZCTL_SERVER_SOCKET": str(server.sock)}
    procs = [subprocess.Popen([str(front_end), "create", v, "--ostemplate", rt.template, "--layout", "overlay", "-q"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in ids]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in results), results
    procs = [subprocess.Popen([str(front_end), "start", v, "-q"], env=env, stderr=subprocess.PIPE, text=True)
             for v in ids]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    for v in ids:
        assert through(front_end, server, rt, "exec", v, "true").returncode == 0
    assert server.stop() == 18


def test_a_hundred_clients_at_once(front_end, server, rt):
    """100 commands at once: each served (none fell back), each with its own output and status."""
    env = {**rt.env, "VZCTL_SERVER_SOCKET": str(server.sock)}
    procs = [subprocess.Popen([str(front_end), "status", str(4000 + i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(100)]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    assert [r[:2] for r in results] == [(0, f"VEID {4000 + i} deleted unmounted down\n") for i in range(100)]
    assert server.stop() == 100


def test_server_stop_while_a_command_runs(front_end, server, rt):
    """`vzctl server stop` lets the running command finish (and waits for it); commands started meanwhile run
    without the server."""
    env = {**rt.env, "VZCTL_SERVER_SOCKET": str(server.sock)}
    r, w = _full_pipe()
    try:
        p = subprocess.Popen([str(front_end), "status", "4711"], stdout=w, stderr=subprocess.PIPE, text=True,
                             env=env)
        _wait_for(lambda: server.children())
        stop = subprocess.Popen([str(front_end), "server", "stop"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)  # the server has its SIGTERM: it takes no more commands
        meanwhile = through(front_end, server, rt, "status", "4712")
        assert meanwhile.returncode == 0 and "4712 deleted" in meanwhile.stdout
        assert stop.poll() is None and p.poll() is None  # both wait for the command
    finally:
        os.close(w)
        while os.read(r, 1 << 16):
            pass
        os.close(r)
    assert p.wait(timeout=30) == 0
    out, err = stop.communicate(timeout=30)
    assert stop.returncode == 0 and "stopped" in out, err
    assert server.proc.wait(timeout=30) == 0
    assert re.findall(r"stopped after (\d+) commands", server.log_text()) == ["1"]


EVIL_JSON = """
import os, sys
open(os.environ["MARK"], "a").write(f"imported by pid {os.getpid()}\\n")
del sys.modules["json"]
sys.path = [p for p in sys.path if p not in ("", os.path.dirname(__file__))]
import json as _json
globals().update(_json.__dict__)
"""


def test_the_server_runs_no_code_from_where_it_was_started(front_end, rt, tmp_path):
    """`vzctl server start` run by root in a directory someone else controls (a json.py there; $PYTHONPATH
    naming another) must not run that code as root (before: `python -m` put the directory first on sys.path)."""
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "json.py").write_text(EVIL_JSON)
    mark = tmp_path / "imported"
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    env = {**rt.env, "VZCTL_SERVER_SOCKET": str(run_dir / "s.sock"), "MARK": str(mark),
           "PYTHONPATH": f"{evil}:{rt.env.get('PYTHONPATH', '')}"}
    started = subprocess.run([str(front_end), "server", "start"], env=env, cwd=evil, capture_output=True, text=True,
                             timeout=60)
    try:
        assert started.returncode == 0, started.stderr
        ok = subprocess.run([str(front_end), "status", "4711"], env=env, capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0 and "deleted" in ok.stdout
    finally:
        subprocess.run([str(front_end), "server", "stop"], env=env, capture_output=True, timeout=60)
    assert not mark.exists(), mark.read_text()


def test_server_management_commands(front_end, rt, tmp_path):
    run_dir = tmp_path / "srv"
    run_dir.mkdir(mode=0o700)
    env = {**rt.env, "VZCTL_SERVER_SOCKET": str(run_dir / "s.sock")}

    def vz(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(front_end), "server", *args], env=env, capture_output=True, text=True, timeout=60)

    import json

    assert json.loads(vz("status", "--json").stdout)["running"] is False
    started = vz("start")
    assert started.returncode == 0 and "started" in started.stdout, started.stderr
    try:
        st = json.loads(vz("status", "--json").stdout)
        assert st["running"] and st["pid"] > 0
        again = vz("start")
        assert again.returncode == 0 and "already running" in again.stdout
        served = subprocess.run([str(front_end), "status", "4711"], env=env, capture_output=True, text=True)
        assert served.returncode == 0
        assert Path(f"/proc/{st['pid']}").exists()
    finally:
        stopped = vz("stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not (run_dir / "s.sock").exists()
    assert vz("stop").stdout.strip() == "vzctl server was not running"
    _wait_for(lambda: _gone(st["pid"]))

    # a socket directory others may write to: refused, one line, nothing started
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    bad = subprocess.run([str(front_end), "server", "start"], env={**env, "VZCTL_SERVER_SOCKET":
                         str(open_dir / "s.sock")}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 30 and bad.stderr.count("\n") == 1 and "writable by root only" in bad.stderr
    assert list(open_dir.iterdir()) == []

    # a root-only directory inside one a user owns (who could swap it for a symlink), or reached by a symlink
    users = tmp_path / "users"
    (users / "sub").mkdir(parents=True, mode=0o700)
    os.chown(users, 65534, 65534)
    (tmp_path / "real" / "sub").mkdir(parents=True, mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for sock in (users / "sub" / "s.sock", tmp_path / "link" / "sub" / "s.sock"):
        bad = subprocess.run([str(front_end), "server", "start"], env={**env, "VZCTL_SERVER_SOCKET": str(sock)},
                             capture_output=True, text=True, timeout=60)
        if bad.returncode == 0:  # (started: stopped again, the test fails below)
            subprocess.run([str(front_end), "server", "stop"], env={**env, "VZCTL_SERVER_SOCKET": str(sock)})
        assert bad.returncode == 30 and bad.stderr.count("\n") == 1 and "above the socket's" in bad.stderr, bad
    assert list((users / "sub").iterdir()) == list((tmp_path / "real" / "sub").iterdir()) == []


def test_terminal_commands_and_unserved_users_fall_back(front_end, server, rt):
    """`enter` and `server` are never handed to the server; neither is anything with VZCTL_SERVER=0."""
    off = through(front_end, server, rt, "status", "4711", env={**rt.env, "VZCTL_SERVER": "0"})
    assert off.returncode == 0
    missing = through(front_end, server, rt, "enter", "4711")
    assert missing.returncode == direct(rt, "enter", "4711").returncode == 31
    assert server.stop() == 0


def test_a_client_that_sends_slowly_holds_up_no_one(front_end, server, rt):
    """A connection that sends nothing, or half a request and then nothing (a stopped or hung client), neither
    delays the commands of others nor stays open forever."""
    silent = socket.socket(socket.AF_UNIX)
    half = socket.socket(socket.AF_UNIX)
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        silent.connect(str(server.sock))
        half.connect(str(server.sock))
        half.sendmsg([_request([b"status", b"4711"], [])[:10]],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [devnull] * 4))])
        time.sleep(0.2)
        t0 = time.monotonic()
        for _ in range(3):
            ok = through(front_end, server, rt, "status", "4711")
            assert ok.returncode == 0 and "deleted" in ok.stdout
        assert time.monotonic() - t0 < 3  # (5 s each before: the server read each request with a 5 s timeout)
        for s in (silent, half):
            s.settimeout(15)
            assert _all_of(s) == TAKEN  # dropped after its 5 s: its client would run the command itself
    finally:
        silent.close()
        half.close()
        os.close(devnull)
    assert server.stop() == 3


# A server that root's front end must not talk to: bound by root (in root's temporary directory), listening as
# nobody, as a user's own socket named by $VZCTL_SERVER_SOCKET would be. It reports what it received.
FAKE_SERVER = """
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o777)
os.setgid(65534); os.setuid(65534)
s.listen()
print("listening", flush=True)
s.settimeout(30)
c, _ = s.accept()
c.settimeout(10)
try:
    data, anc, _, _ = c.recvmsg(1 << 20, socket.CMSG_SPACE(64))
except OSError:
    data, anc = b"", []
print(len(data), "bytes", sum(len(a[2]) // 4 for a in anc), "descriptors", flush=True)
try:
    c.sendall(b"P" + (0xFFFFFFFF).to_bytes(4, "little"))  # pid -1: kill(-1, SIG) signals every process
except OSError:
    pass
"""


def test_a_socket_root_does_not_own_gets_nothing_from_root(front_end, rt, tmp_path):
    """$VZCTL_SERVER_SOCKET kept from a user's environment (su, sudo -E) must not hand root's command (its
    descriptors, arguments, environment) to that user's server, nor let it name a pid for root to signal."""
    sock = tmp_path / "user.sock"
    fake = subprocess.Popen([sys.executable, "-c", FAKE_SERVER, str(sock)], stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout.readline() == "listening\n"
        r = through(front_end, Server(sock, rt.env), rt, "status", "4711", env={**rt.env, "SECRET": "s3cret"})
        assert r.returncode == 0 and "deleted" in r.stdout, r  # run by the Python vzctl: nothing served it
        assert fake.communicate(timeout=30)[0] == "0 bytes 0 descriptors\n"
    finally:
        fake.kill()
        fake.wait()


def test_a_root_with_less_is_not_served(front_end, server, rt):
    """Root without every capability (a dropped bounding set: a sandboxed service), in another mount namespace,
    or whose children start in another pid namespace must not have its command run by the server with what
    the server has: the Python vzctl runs it."""
    for wrap in (["setpriv", "--bounding-set=-all"], ["unshare", "--mount"], ["unshare", "--pid"]):
        if shutil.which(wrap[0]) is None:
            continue
        env = {**rt.env, "VZCTL_SERVER_SOCKET": str(server.sock)}
        r = subprocess.run([*wrap, str(front_end), "status", "4711"], env=env, capture_output=True, text=True,
                           timeout=60, cwd=PROJECT)
        assert r.returncode == 0 and "deleted" in r.stdout, r
    assert server.stop() == 0


def test_the_command_has_the_clients_limits_and_priority(front_end, server, rt):
    """`ulimit -n`, `nice`, `taskset`, an OOM score adjustment before vzctl: as without a server."""
    veid = rt.create("--layout", "overlay")
    script = ("grep 'open files' /proc/self/limits | tr -s ' '; cut -d' ' -f19 /proc/self/stat;"
              "grep Cpus_allowed_list /proc/self/status; cat /proc/self/oom_score_adj")

    def limited() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (77, 99))
        os.nice(3)
        os.sched_setaffinity(0, {0})
        Path("/proc/self/oom_score_adj").write_text("123")

    a = subprocess.run([str(front_end), "exec", veid, script], env={**rt.env, "VZCTL_SERVER_SOCKET":
                       str(server.sock)}, preexec_fn=limited, capture_output=True, text=True, timeout=60)
    b = subprocess.run([*VZCTL, "exec", veid, script], env=rt.env, preexec_fn=limited, capture_output=True,
                       text=True, timeout=60)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout, (a, b)
    assert "77 99" in a.stdout and "\n123\n" in a.stdout
    assert server.stop() == 1


def test_a_stopped_server_is_waited_for_only_a_while(front_end, server, rt):
    """A server stopped (SIGSTOP, ^Z on `vzctl server run`) or hung: the front end runs the command itself after
    ACCEPT_TIMEOUT; the server, continued, does not run it a second time."""
    server.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = through(front_end, server, rt, "status", "4711")
        assert r.returncode == 0 and r.stdout.count("deleted") == 1, r
        assert ACCEPT_TIMEOUT <= time.monotonic() - t0 < ACCEPT_TIMEOUT + 10
    finally:
        server.proc.send_signal(signal.SIGCONT)
    ok = through(front_end, server, rt, "status", "4711")
    assert ok.returncode == 0 and ok.stdout.count("deleted") == 1
    assert server.stop() == 1


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace kills the server at the instant tested")
def test_a_server_killed_before_its_client_has_the_pid_runs_nothing(front_end, server, rt):
    """Killed between its fork of the command and its answer (the pid): the client runs the command itself,
    so the server's child must not have run it too (before: the status line twice)."""
    tracer = subprocess.Popen(["strace", "-q", "-o", os.devnull, "-p", str(server.proc.pid), "-e", "trace=sendto",
                               "-e", "inject=sendto:signal=KILL:when=1"], stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: "TracerPid:\t0" not in Path(f"/proc/{server.proc.pid}/status").read_text())
        r = through(front_end, server, rt, "status", "4711")  # (its output: until every writer closed it)
        assert r.returncode == 0 and r.stdout.count("deleted") == 1, r
        assert server.proc.wait(timeout=20) == -signal.SIGKILL
    finally:
        tracer.kill()
        tracer.wait()


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace holds the command at its start")
def test_a_signal_as_the_command_starts_ends_it(front_end, server, rt):
    """A SIGTERM the client forwards as soon as it has the pid, before the command runs vzctl's code (held there
    by delaying the server's go-ahead), ends it as it ends a Python vzctl killed as it starts (before: the
    server's own handler, still in place in the child, took it, and the command ran to its end)."""
    # the go-ahead is the server's first sendmsg (to the worker): held for 3 s
    tracer = subprocess.Popen(["strace", "-q", "-o", os.devnull, "-p", str(server.proc.pid), "-e", "trace=sendmsg",
                               "-e", "inject=sendmsg:delay_enter=3000000:when=1"], stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: "TracerPid:\t0" not in Path(f"/proc/{server.proc.pid}/status").read_text())
        p = subprocess.Popen([str(front_end), "status", "4711"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**rt.env, "VZCTL_SERVER_SOCKET": str(server.sock)})
        time.sleep(1.0)  # the client has the pid; the command waits for its go-ahead
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        tracer.kill()
        tracer.wait()
    assert p.returncode == -signal.SIGTERM and out == "", (p.returncode, out, err)
    assert server.stop() == 1


def test_a_client_that_says_more_than_its_request_does_not_make_the_server_spin(front_end, server, rt):
    """Bytes after the request (a buggy client) are read and dropped while the command runs (before: the
    connection stayed readable and the server's loop spun at full CPU until the command ended)."""
    r, w = _full_pipe()
    devnull = os.open(os.devnull, os.O_RDWR)
    root = os.open("/", os.O_PATH)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.settimeout(10)
        s.connect(str(server.sock))
        assert s.recv(5) == TAKEN
        s.sendmsg([_request([b"status", b"4711"], [])], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                          array.array("i", [devnull, w, devnull, root]))])
        assert s.recv(1) == b"P"
        s.sendall(b"more")
        time.sleep(0.2)
        before = _cpu_of(server.proc.pid)
        time.sleep(1)  # the command waits for the test to read its output
        assert _cpu_of(server.proc.pid) - before < 0.3, "the server spins"
    finally:
        os.close(w)
        while os.read(r, 1 << 16):
            pass
        os.close(r)
        os.close(devnull)
        os.close(root)
    assert _all_of(s)[4:] == b"X" + bytes(4)  # (the rest of the pid, then the end: exit 0)
    s.close()
    assert server.stop() == 1


def _cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_clients_killed_at_any_instant(front_end, server, rt):
    """Clients killed at random instants (before the server took the command, while it was sent, while it
    ran): the server logs no internal error, keeps no descriptor and no child, and serves on."""
    import random

    base = len(os.listdir(f"/proc/{server.proc.pid}/fd"))
    env = {**rt.env, "VZCTL_SERVER_SOCKET": str(server.sock)}
    rng = random.Random(1)
    for i in range(100):
        p = subprocess.Popen([str(front_end), "status", str(i + 1)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(rng.random() * 0.004)
        p.kill()
        p.wait()
    _wait_for(lambda: not server.children() and len(os.listdir(f"/proc/{server.proc.pid}/fd")) == base)
    ok = through(front_end, server, rt, "status", "4711")
    assert ok.returncode == 0 and "deleted" in ok.stdout
    server.stop()
    assert "internal error" not in server.log_text()


def test_a_client_gone_as_its_command_ends(front_end, server, rt):
    """The command's exit and its client's hang-up seen in the same turn of the server's loop (here: the server
    stopped while both happen): handled once, no internal error."""
    r, w = _full_pipe()
    try:
        p = subprocess.Popen([str(front_end), "status", "4711"], stdout=w, stderr=subprocess.DEVNULL,
                             env={**rt.env, "VZCTL_SERVER_SOCKET": str(server.sock)})
        _wait_for(lambda: server.children())
        child = server.children()[0]
        time.sleep(0.3)  # it is blocked writing its line to the full pipe
        server.proc.send_signal(signal.SIGSTOP)
        _read_until_gone(r, child)  # it finishes and exits; the stopped server has not seen it yet
        p.kill()
        p.wait()
        server.proc.send_signal(signal.SIGCONT)
        _wait_for(lambda: not server.children())
    finally:
        server.proc.send_signal(signal.SIGCONT)
        os.close(r)
        os.close(w)
    assert through(front_end, server, rt, "status", "4711").returncode == 0
    server.stop()
    assert "internal error" not in server.log_text(), server.log_text()


def test_code_that_does_not_import_does_not_stop_the_server(front_end, rt, tmp_path):
    """The code changed to something that does not import (an edit half-way, a checkout in progress): the
    re-executed server stays up, and serves again once the code is whole. The server runs a copy of the
    package here, so that the worktree is never broken."""
    shutil.copytree(PROJECT / "vzpkg", tmp_path / "code" / "vzpkg", ignore=shutil.ignore_patterns("__pycache__"))
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    srv = Server(run_dir / "vzctl.sock", {**rt.env, "PYTHONPATH": str(tmp_path / "code")})
    srv.start()
    module = tmp_path / "code/vzpkg/cli/vzctl_more.py"
    good = module.read_text()
    try:
        module.write_text(good + "\ndef half_written(:\n")
        time.sleep(0.6)  # the server looks at the code at most twice a second
        assert through(front_end, srv, rt, "status", "4711").returncode == 0  # (the Python vzctl ran it)
        _wait_for(lambda: "re-executed" in srv.log_text() or srv.proc.poll() is not None)
        assert srv.proc.poll() is None, srv.log_text()
        assert "not preloaded: vzpkg.cli.vzctl_more: SyntaxError" in srv.log_text()
        module.write_text(good)
        time.sleep(0.6)
        assert through(front_end, srv, rt, "status", "4711").returncode == 0
        _wait_for(lambda: srv.log_text().count("re-executed") == 2)
        ok = through(front_end, srv, rt, "status", "4711")
        assert ok.returncode == 0 and "deleted" in ok.stdout
        assert srv.stop() == 1
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()


def test_a_server_stopped_as_the_command_ends(front_end, server, rt):
    """The server stopped (SIGSTOP) while the command runs, and the command ends: the client does not wait for
    the server, the command reports its end itself."""
    r, w = _full_pipe()
    try:
        p = subprocess.Popen([str(front_end), "status", "4711"], stdout=w, stderr=subprocess.PIPE, text=True,
                             env={**rt.env, "VZCTL_SERVER_SOCKET": str(server.sock)})
        _wait_for(lambda: server.children())
        child = server.children()[0]
        time.sleep(0.3)  # it is blocked writing its line
        server.proc.send_signal(signal.SIGSTOP)
        _read_until_gone(r, child)
        _, err = p.communicate(timeout=ACCEPT_TIMEOUT + 20)
        assert p.returncode == 0 and err == "", err  # the command reported its end itself
    finally:
        server.proc.send_signal(signal.SIGCONT)
        os.close(r)
        os.close(w)
    ok = through(front_end, server, rt, "status", "4711")
    assert ok.returncode == 0 and "deleted" in ok.stdout
    assert server.stop() == 2


def test_ctrl_z_stops_the_command_too(front_end, server, rt):
    """^Z (SIGTSTP to the client) stops the command's process group with the client, as it stops a Python
    vzctl and its children; SIGCONT (fg, bg) continues both."""
    r, w = _full_pipe()
    try:
        # a process group of its own in pytest's session, as a shell's job: the kernel discards ^Z sent to an
        # orphaned group (pytest's own is one when CI starts it in the background)
        p = subprocess.Popen([str(front_end), "status", "4711"], stdout=w, stderr=subprocess.PIPE, text=True,
                             env={**rt.env, "VZCTL_SERVER_SOCKET": str(server.sock)}, process_group=0)
        _wait_for(lambda: server.children())
        child = server.children()[0]
        time.sleep(0.3)  # it is blocked writing its line
        p.send_signal(signal.SIGTSTP)
        _wait_for(lambda: _state(p.pid) == "T" and _state(child) == "T")
        p.send_signal(signal.SIGCONT)
        _wait_for(lambda: _state(child) != "T" and _state(p.pid) != "T")
        os.close(w)
        w = -1
        while os.read(r, 1 << 16):
            pass
        assert p.wait(timeout=30) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(r)
        if w >= 0:
            os.close(w)
    assert server.stop() == 1


def _state(pid: int, field: int = 0) -> str:
    """A field of /proc/PID/stat after the command name: 0 its state, 3 its session."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[field]
    except FileNotFoundError:
        return ""


def _read_until_gone(r: int, pid: int) -> None:
    """Read the pipe R until PID has exited (a zombie its stopped parent has not collected)."""
    import fcntl

    fcntl.fcntl(r, fcntl.F_SETFL, os.O_NONBLOCK)
    while Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        try:
            os.read(r, 1 << 16)
        except BlockingIOError:
            time.sleep(0.01)


def _full_pipe() -> tuple[int, int]:
    """A pipe whose buffer is full: a command writing to it waits until the test reads."""
    import fcntl

    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETFL, os.O_NONBLOCK)
    try:
        while True:
            os.write(w, b"x" * 4096)
    except BlockingIOError:
        pass
    fcntl.fcntl(w, fcntl.F_SETFL, 0)
    return r, w


def test_the_command_is_in_its_clients_cgroups(front_end, server, rt):
    """A client in a cgroup of its own (a service's, with its limits) has its command run in it."""
    pids = next((Path(line.split()[4]) for line in Path("/proc/self/mountinfo").read_text().splitlines()
                 if line.partition(" - ")[2].split()[:1] == ["cgroup"] and "pids" in line.split()[-1].split(",")
                 and line.split()[3] == "/"), None)
    if pids is None:
        pytest.skip("no cgroup v1 pids hierarchy")
    group = pids / f"vzpkg-server-test-{os.getpid()}"
    group.mkdir()
    r, w = _full_pipe()
    try:
        p = subprocess.Popen([str(front_end), "status", "4711"], stdout=w, stderr=subprocess.DEVNULL,
                             env={**rt.env, "VZCTL_SERVER_SOCKET": str(server.sock)},
                             preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        _wait_for(lambda: server.children())
        child = server.children()[0]
        time.sleep(0.3)  # it is blocked writing its line
        assert f"pids:/{group.name}\n" in Path(f"/proc/{child}/cgroup").read_text()
    finally:
        os.close(w)
        while os.read(r, 1 << 16):
            pass
        os.close(r)
        p.wait(timeout=30)
        _wait_for(lambda: not (group / "cgroup.procs").read_text().strip())
        group.rmdir()
    assert p.returncode == 0 and server.stop() == 1


def _all_of(s: socket.socket) -> bytes:
    """What the server says on S until it closes the connection."""
    data = b""
    while True:
        try:
            chunk = s.recv(64)
        except ConnectionResetError:  # closed with our bytes unread: the same
            return data
        if not chunk:
            return data
        data += chunk


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return ""


def _gone(pid: int) -> bool:
    """PID has exited (gone, or a zombie its new parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_for(cond, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
