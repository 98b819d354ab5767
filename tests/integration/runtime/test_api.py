"""The Python API (vzpkg.api) on real VEs: lifecycle, exec, errors, limits, threads, processes, owners."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from vzpkg.api import VE, ExecResult, owner_for
from vzpkg.errors import UsageError, VECommandError, VEError, VENotFoundError, VEStateError

from .conftest import PROJECT, cgroup_dirs, cgroup_name, mounts_below

pytestmark = pytest.mark.root


@pytest.fixture
def api(vz_root, debian12_cache):
    """kwargs for VE.create in the session's VZ root; every VE the test made with them is gone afterwards."""
    cache_dir, name = debian12_cache
    yield {"root": vz_root, "cache_dir": cache_dir, "template": name}
    from vzpkg.api import destroy_owned

    assert destroy_owned() == []


def _cgroup_file(root: Path, veid: str, name: str) -> str | None:
    for d in cgroup_dirs(cgroup_name(root, veid)):
        if (d / name).exists():
            return (d / name).read_text().strip()
    return None


def test_lifecycle_exec_and_context_manager(api):
    with VE.create(**api, ram="256M") as v:
        assert v.owned and v.veid.startswith(owner_for(v.layout).token + "-")
        st = v.status()
        assert (st.exist, st.mounted, st.running) == (True, False, False)
        pid = v.start()
        st = v.status()
        assert st.running and st.init_pid == pid
        assert st.line() == f"VEID {v.veid} exist mounted running"
        r = v.exec(["sh", "-c", "read x; echo out:$x; echo err >&2; exit 3"], input="hi\n")
        assert isinstance(r, ExecResult)
        assert (r.returncode, r.stdout, r.stderr, r.timed_out) == (3, "out:hi\n", "err\n", False)
        # in the VE: its pid namespace, its hostname, its root
        assert v.exec("echo $$; hostname; cat /etc/debian_version").stdout.split()[1:] == [
            v.veid, (Path(v.path) / "etc/debian_version").read_text().strip()]
        assert int(v.exec(["sh", "-c", "echo $$"]).stdout) < 100
        # bytes in, bytes out
        r = v.exec(["cat"], input=b"\x00\xff", text=False)
        assert r.stdout == b"\x00\xff"
        # the RAM limit given to create is the cgroup's
        assert _cgroup_file(v.root, v.veid, "memory.limit_in_bytes") in (str(256 << 20), None)
        # set on a running VE applies at once
        assert v.set(ram="192M")[0] is True
        assert _cgroup_file(v.root, v.veid, "memory.limit_in_bytes") in (str(192 << 20), None)
        assert v.stop() is True
        assert not v.status().running
        v.start()
        veid, root = v.veid, v.root
    # the context manager destroyed it, running
    assert not (root / "conf" / f"{veid}.conf").exists()
    assert not cgroup_dirs(cgroup_name(root, veid))
    assert not mounts_below(root / "root" / veid)


def test_exec_check_timeout_and_missing_command(ve):
    with pytest.raises(VECommandError) as info:
        ve.exec(["sh", "-c", "echo bad >&2; exit 4"], check=True)
    assert info.value.exit_code == 35 and info.value.result.returncode == 4
    assert "exited with status 4: bad" in str(info.value)
    t = time.monotonic()
    with pytest.raises(VECommandError) as info:
        ve.exec("echo started; sleep 30", timeout=0.5)
    assert time.monotonic() - t < 5
    assert info.value.result.timed_out and info.value.result.stdout == "started\n"
    # the timeout killed what the command started too: no sleep left in the VE
    assert "sleep" not in ve.exec(["ps", "-e", "-o", "comm="]).stdout
    r = ve.exec(["no-such-command"])
    assert r.returncode == 127 and "command not found" in r.stderr
    # the command runs with the VE's environment, not the caller's
    os.environ["VZPKG_API_TEST_SECRET"] = "x"
    try:
        assert "VZPKG_API_TEST_SECRET" not in ve.exec(["env"]).stdout
    finally:
        del os.environ["VZPKG_API_TEST_SECRET"]
    assert ve.exec(["sh", "-c", "echo $FOO"], env={"FOO": "bar"}).stdout == "bar\n"


def test_exec_leaves_the_caller_alone(ve_factory):
    """The caller's namespaces, cgroups, cwd and signal handlers are as before (exec runs in a helper)."""
    def ids():
        return ([os.readlink(f"/proc/self/ns/{n}") for n in ("mnt", "pid", "user", "net", "uts", "cgroup")],
                Path("/proc/self/cgroup").read_text(), os.getcwd())

    before = ids()
    v = ve_factory()
    v.exec(["true"], check=True)
    assert ids() == before
    # and the helper is not something the VE's root could ptrace: it never shows up as a VE process
    # that keeps running (it exits with the command)
    assert v.exec(["ps", "-e", "-o", "comm="]).stdout.split() == ["vzinit", "ps"]


def test_errors_are_vzctls(api):
    with pytest.raises(VENotFoundError):
        VE("apinone", root=api["root"]).start()
    with pytest.raises(VENotFoundError):
        VE("apinone", root=api["root"]).exec(["true"])
    with pytest.raises(UsageError):
        VE("0101", root=api["root"])
    with pytest.raises(UsageError):
        VE.create(**api, nosuchlimit=1)
    with VE.create(**api) as v:
        with pytest.raises(VEStateError):
            v.exec(["true"])  # not running
        with pytest.raises(UsageError):
            v.set(ram="128M")  # not running and not saved: would change nothing
        v.set(ram="128M", save=True)
        v.start()
        with pytest.raises(VEStateError):
            v.start()
        with pytest.raises(VEStateError):
            v.destroy()  # running, without force
        with pytest.raises(VEStateError):
            VE.create(v.veid, **api)  # exists
    # a refused parameter leaves no VE behind
    before = set(os.listdir(api["root"] / "conf"))
    with pytest.raises(Exception):  # noqa: B017 (the conf module's own validation error)
        VE.create(**api, ram="lots")
    assert set(os.listdir(api["root"] / "conf")) == before


def test_threads(api):
    """8 threads, 3 VEs each, create + start + exec + destroy at once: distinct ids, no errors, nothing left."""
    errors: list[str] = []
    seen: list[str] = []

    def work():
        try:
            for _ in range(3):
                with VE.create(**api) as v:
                    v.start()
                    r = v.exec(["cat", "/proc/1/comm"], check=True)
                    assert r.stdout == "vzinit\n"
                    seen.append(v.veid)
        except BaseException:
            import traceback

            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(seen) == len(set(seen)) == 24
    assert not any(n.startswith(owner_for(VE("x", root=api["root"]).layout).token)
                   for n in os.listdir(api["root"] / "conf"))


_WORKER = textwrap.dedent("""
    import os, sys
    from vzpkg.api import VE
    root, cache, template, n, mode = sys.argv[1:6]
    ves = []
    for _ in range(int(n)):
        v = VE.create(template=template, root=root, cache_dir=cache)
        v.start()
        assert v.exec(["true"]).returncode == 0
        ves.append(v)
    print(" ".join(v.veid for v in ves), flush=True)
    if mode == "kill":
        os.kill(os.getpid(), 9)
    if mode == "wait":
        sys.stdin.read()
""")


def _worker(api, n: int, mode: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WORKER, str(api["root"]), str(api["cache_dir"]), api["template"],
                             str(n), mode], stdout=subprocess.PIPE, text=True, cwd=PROJECT,
                            env={**os.environ, "PYTHONPATH": str(PROJECT)}, **kw)


def test_processes_and_sigkilled_owners(api):
    """Two processes at once get distinct ids; one that exits normally leaves nothing, one killed with SIGKILL
    leaves VEs that the next owner's sweep removes — while a live owner's VEs are left alone."""
    conf = api["root"] / "conf"
    live = _worker(api, 2, "wait", stdin=subprocess.PIPE)
    killed = _worker(api, 2, "kill")
    clean = _worker(api, 2, "exit")
    killed_ids = killed.stdout.readline().split()
    assert killed.wait(60) == -9
    assert clean.wait(60) == 0
    clean_ids = clean.stdout.read().split()
    live_ids = live.stdout.readline().split()
    try:
        assert len(set(killed_ids + clean_ids + live_ids)) == 6
        assert not any((conf / f"{i}.conf").exists() for i in clean_ids)  # destroyed at exit
        assert all((conf / f"{i}.conf").exists() for i in killed_ids + live_ids)
        assert VE(killed_ids[0], root=api["root"]).status().running
        # the sweep (vzpkg clean --ves) destroys the killed owner's VEs and leaves the live owner's
        p = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzpkg", "clean", "--ves", "--root", str(api["root"]),
                            "--cache-dir", str(api["cache_dir"])], capture_output=True, text=True, cwd=PROJECT)
        assert p.returncode == 0, p.stderr
        assert not any((conf / f"{i}.conf").exists() for i in killed_ids)
        for veid in killed_ids:
            assert not cgroup_dirs(cgroup_name(api["root"], veid))
            assert not mounts_below(api["root"] / "root" / veid)
        assert all(VE(i, root=api["root"]).status().running for i in live_ids)
    finally:
        live.stdin.close()
        assert live.wait(60) == 0
    assert not any((conf / f"{i}.conf").exists() for i in live_ids)
    # the owner files: released by the processes that exited, removed by the sweep for the killed one
    tokens = {i.rsplit("-", 1)[0] for i in killed_ids + clean_ids + live_ids}
    assert len(tokens) == 3
    assert not tokens & set(os.listdir(api["root"] / "lock" / "owners"))


def _server_pid(v: VE) -> int:
    from vzpkg.runtime import execserver

    with execserver._lock:
        srv = execserver._servers.get(execserver.key(v.layout, v.veid))
    return srv.pid if srv else 0


def _read_as_ve_root(init: int, path: str) -> str:
    """Open PATH from a process with the credentials of the VE's root (its user namespace, uid 0)."""
    from vzpkg.runtime import ns

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            ns.setns(os.open(f"/proc/{init}/ns/user", os.O_RDONLY), ns.CLONE_NEWUSER)
            ns.setresid(0, 0)
            try:
                os.close(os.open(path, os.O_RDONLY))
                os.write(w, b"ok")
            except OSError as e:
                os.write(w, type(e).__name__.encode())
        finally:
            os._exit(0)
    os.close(w)
    out = os.read(r, 100).decode()
    os.close(r)
    os.waitpid(pid, 0)
    return out


def test_exec_server(ve_factory, rt):
    """An API-started VE's commands come from its exec server: a process in the VE's cgroups and namespaces that
    the VE cannot see or read; gone with stop; replaced by the helper when it is gone."""
    v = ve_factory()
    assert v.exec(["true"]).returncode == 0
    pid = _server_pid(v)
    assert pid
    # in the VE's cgroups, user and mount namespaces ...
    assert f"/vzpkg/{cgroup_name(v.root, v.veid)}" in Path(f"/proc/{pid}/cgroup").read_text()
    init = v.status().init_pid
    for n in ("user", "mnt", "net", "uts", "ipc"):
        assert os.readlink(f"/proc/{pid}/ns/{n}") == os.readlink(f"/proc/{init}/ns/{n}")
    # ... its commands in the VE's pid namespace, while it is not: the VE sees only its own processes
    assert os.readlink(f"/proc/{pid}/ns/pid_for_children") == os.readlink(f"/proc/{init}/ns/pid")
    assert v.exec(["ps", "-e", "-o", "comm="]).stdout.split() == ["vzinit", "ps"]
    # not dumpable: with the VE root's credentials, its memory cannot be read (the VE's init's can)
    assert _read_as_ve_root(init, f"/proc/{init}/environ") == "ok"
    assert _read_as_ve_root(init, f"/proc/{pid}/environ") == "PermissionError"
    # many commands at once from threads
    results: list[ExecResult] = []
    ts = [threading.Thread(target=lambda i=i: results.append(v.exec(["echo", str(i)]))) for i in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(int(r.stdout) for r in results) == list(range(16))
    # the server killed: exec falls back to the helper
    os.kill(pid, 9)
    assert v.exec(["echo", "still"]).stdout == "still\n"
    assert _server_pid(v) == 0
    # a restart by vzctl (another process): exec works, the old server is dropped
    v.stop()
    v = ve_factory()
    pid = _server_pid(v)
    rt.vzctl("stop", v.veid)
    rt.vzctl("start", v.veid)
    assert v.exec(["echo", "again"]).stdout == "again\n"
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped: no zombie left
    # without a server: the helper, as before
    v = ve_factory(start=False)
    v.start(exec_server=False)
    assert _server_pid(v) == 0
    assert v.exec(["echo", "helper"]).stdout == "helper\n"


@pytest.mark.parametrize("exec_server", [True, False])
def test_exec_at_the_process_limit(ve_factory, rt, exec_server):
    """At NUMPROC the command cannot start: the error vzctl exec gives (VEError, exit 30), in its words."""
    v = ve_factory(start=False)
    v.start(exec_server=exec_server)
    busy = threading.Thread(target=lambda: v.exec("sleep 5 & wait", timeout=30))
    busy.start()
    try:
        deadline = time.monotonic() + 10
        while "sleep" not in v.exec(["ps", "-e", "-o", "comm="]).stdout and time.monotonic() < deadline:
            time.sleep(0.05)
        held = int(_cgroup_file(v.root, v.veid, "pids.current"))
        v.set(numproc=held)  # full now: init, (the exec server,) the shell and its sleep
        with pytest.raises(VEError) as info:
            v.exec(["true"])
        p = rt.vzctl("exec", v.veid, "true", check=False)
    finally:
        busy.join()
    err = info.value
    assert err.exit_code == 30 == p.returncode
    assert str(err) == f"VE {v.veid} is at its process limit (NUMPROC): cannot start 'true'; stop some of its " \
                       f"processes or raise it: vzctl set {v.veid} --numproc N [--save]"
    assert p.stderr.strip() == f"vzctl: error: {err}"
