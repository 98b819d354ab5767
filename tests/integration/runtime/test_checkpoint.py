"""vzctl chkpnt / restore / clone with the real CRIU (`make criu`) on real VEs of the debian-12 cache.

The workload: a shell counter (its value lives in the shell's memory; the file only shows it) and a perl TCP
server holding 8 MB of memory with a marker written before any dump, answering each line with its pid inside
the VE, its request count (memory again) and the marker. The client runs in another VE on the same bridge
(VE to VE: nothing goes near the host's default route) and keeps one connection open across every dump.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from vzpkg.runtime import criu

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

SERVER = r"""use IO::Socket::INET;
my $big = "m" x (8 << 20); substr($big, 4_000_000, 6) = "MARKER";
my $s = IO::Socket::INET->new(LocalPort => 7000, Listen => 5, ReuseAddr => 1) or die "listen: $!";
my $n = 0;
while (my $c = $s->accept) { while (my $l = <$c>) { $n++; print $c "pid=$$ n=$n mem=" . substr($big, 4_000_000, 6) . "\n"; } }
"""
CLIENT = r"""use IO::Socket::INET;
my $c = IO::Socket::INET->new(PeerAddr => $ARGV[0], PeerPort => 7000) or die "connect: $!";
open my $o, ">>", "/root/replies" or die; $o->autoflush(1);
for my $i (1 .. 1000000) { print $c "hi $i\n"; my $r = <$c>; last unless defined $r; print $o $r; select(undef, undef, undef, 0.1); }
print $o "EOF\n";
"""
COUNTER = "sh -c 'i=0; while :; do i=$((i+1)); echo $i > /root/count; sleep 0.1; done' >/dev/null 2>&1 </dev/null &"


@pytest.fixture(scope="module")
def have_criu():
    try:
        return criu.find()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no CRIU >= 4.2 ({e}): run make criu")


@pytest.fixture
def net(rt):
    """A bridge of this test's own and a /24 on it; VEs talk to each other only."""
    n = os.getpid() % 200 + 20
    bridge = f"vzck{os.getpid() % 100000}"
    rt.env["VZ_BRIDGE"] = bridge
    yield f"10.214.{n}"
    rt.cleanup()
    subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def _write(rt, veid: str, path: str, text: str) -> None:
    p = rt.ve_root(veid) / path.lstrip("/")
    p.write_text(text)
    p.chmod(0o644)


def _count(rt, veid: str) -> int:
    for _ in range(50):  # (the file is empty for a moment while the counter rewrites it)
        text = rt.sh(veid, "cat /root/count", check=True).stdout.strip()
        if text:
            return int(text)
        time.sleep(0.02)
    raise AssertionError(f"VE {veid}: /root/count stays empty")


def _replies(rt, veid: str) -> list[str]:
    return rt.sh(veid, "cat /root/replies 2>/dev/null").stdout.splitlines()


def _wait(cond, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _server_ve(rt, addr: str, **kw) -> str:
    veid = rt.create("--layout", "overlay", "--hostname", "srv", **kw)
    rt.vzctl("set", veid, "--ipadd", f"{addr}/24", "--save")
    _write(rt, veid, "/root/srv.pl", SERVER)
    rt.sh(veid, COUNTER, check=True)
    rt.sh(veid, "perl /root/srv.pl >/root/srv.log 2>&1 </dev/null &", check=True)
    return veid


def _client_ve(rt, addr: str, server: str) -> str:
    veid = rt.create("--layout", "overlay")
    rt.vzctl("set", veid, "--ipadd", f"{addr}/24", "--save")
    _write(rt, veid, "/root/cli.pl", CLIENT)
    _wait(lambda: rt.sh(veid, f"perl -MIO::Socket::INET -e 'exit !IO::Socket::INET->new(PeerAddr => "
                              f"q({server}), PeerPort => 7000)'").returncode == 0, what="the server to listen")
    rt.sh(veid, f"perl /root/cli.pl {server} >/root/cli.log 2>&1 </dev/null &", check=True)
    return veid


def _parse(line: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in line.split())


def test_chkpnt_restore_ten_times_keeps_counter_tcp_and_memory(rt, net, have_criu):
    """The counter continues where it stopped, the server keeps its pid and answers the connection opened
    before the first dump, memory written before the dump reads back; ten times in a row. Status says
    suspended in between and start is refused then; the VE is back in its own cgroups with its limits."""
    srv = _server_ve(rt, f"{net}.1")
    cli = _client_ve(rt, f"{net}.2", f"{net}.1")
    first = _parse(_wait(lambda: _replies(rt, cli), what="a first reply")[0])
    assert first["mem"] == "MARKER"
    for round_ in range(10):
        before = _count(rt, srv)
        seen = len(_replies(rt, cli))
        out = rt.vzctl("chkpnt", srv)
        assert "suspended" in out.stdout
        assert rt.vzctl("status", srv).stdout.split()[-1] == "suspended"
        assert not rt.cgroup_dirs(srv)  # stopped: nothing of it left on the host
        if round_ == 0:
            p = rt.vzctl("start", srv, check=False)
            assert p.returncode == 32 and "vzctl restore" in p.stderr
        rt.vzctl("restore", srv)
        assert rt.vzctl("status", srv).stdout.strip().endswith("running")
        after = _count(rt, srv)
        assert before <= after < before + 50, (before, after)  # continued, not restarted from 1
        assert _wait(lambda a=after: _count(rt, srv) > a, what="the counter to go on")
        replies = _wait(lambda s=seen: (r := _replies(rt, cli)) and len(r) > s + 1 and r, what="replies")
        assert "EOF" not in replies, (round_, replies[-5:], rt.sh(cli, "cat /root/cli.log").stdout)
        last = _parse(replies[-1])
        assert last["pid"] == first["pid"] and last["mem"] == "MARKER"
        assert int(last["n"]) > seen  # the server's request count survived too
        assert "EOF" not in _replies(rt, cli)
    assert rt.cgroup_dirs(srv)
    mem = [d for d in rt.cgroup_dirs(srv) if (d / "memory.limit_in_bytes").exists()]
    assert mem and int((mem[0] / "memory.limit_in_bytes").read_text()) < 1 << 40  # its RAM limit again
    pids = [int(x) for d in mem for x in (d / "cgroup.procs").read_text().split()]
    assert rt.init_pid(srv) in pids


def test_failed_dump_names_the_cause_and_the_ve_keeps_running(rt, have_criu):
    veid = rt.create("--layout", "overlay")
    rt.sh(veid, COUNTER, check=True)
    rt.sh(veid, "perl -e '$p = qq(\\0) x 120; syscall(425, 4, $p) > 0 or die; sleep 1000' >/dev/null 2>&1 "
                "</dev/null &", check=True)
    _wait(lambda: "io_uring" in rt.sh(veid, "ls -l /proc/*/fd 2>/dev/null").stdout, what="the io_uring")
    p = rt.vzctl("chkpnt", veid, check=False)
    assert p.returncode == 60, p.stderr
    assert "io_uring" in p.stderr and "perl" in p.stderr and p.stderr.count("\n") == 1
    assert rt.vzctl("status", veid).stdout.strip().endswith("running")
    c = _count(rt, veid)
    assert _wait(lambda: _count(rt, veid) > c, what="the counter")
    assert "perl" in rt.sh(veid, "ps -e -o comm").stdout
    assert not list((rt.root / "dump").glob(f"*{veid}*"))  # nothing that looks like a checkpoint


def test_failed_restore_keeps_images_and_the_ve_restorable(rt, have_criu):
    veid = rt.create("--layout", "overlay")
    rt.sh(veid, COUNTER, check=True)
    rt.vzctl("chkpnt", veid)
    images = rt.root / "dump" / veid
    core = sorted(images.glob("core-*.img"))[0]
    core.rename(core.with_suffix(".hidden"))
    p = rt.vzctl("restore", veid, check=False)
    assert p.returncode == 61, p.stderr
    assert "full log: " in p.stderr and "kept" in p.stderr and p.stderr.count("\n") == 1
    log = p.stderr.rsplit("full log: ", 1)[1].rstrip(")\n")
    assert os.path.isfile(log)
    assert not rt.cgroup_dirs(veid)  # what restore set up was undone
    assert rt.vzctl("status", veid).stdout.split()[-1] == "suspended"
    core.with_suffix(".hidden").rename(core)
    rt.vzctl("restore", veid)
    c = _count(rt, veid)
    assert _wait(lambda: _count(rt, veid) > c, what="the counter")


def test_errors_have_their_codes(rt, have_criu, tmp_path):
    veid = rt.create("--layout", "overlay", start=False)
    assert rt.vzctl("chkpnt", veid, check=False).returncode == 32  # not running
    assert rt.vzctl("restore", veid, check=False).returncode == 62  # no checkpoint
    assert rt.vzctl("restore", "t-new", "--from", str(tmp_path), check=False).returncode == 62
    assert rt.vzctl("suspend", "nosuchve", check=False).returncode == 31
    env = {**rt.env, "VZ_CRIU": "/bin/true"}
    rt.vzctl("start", veid)
    p = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzctl", "chkpnt", veid], env=env, capture_output=True,
                       text=True, cwd=rt.env["PYTHONPATH"])
    assert p.returncode == 64 and "make criu" in p.stderr


def test_warm_checkpoint_five_clones_side_by_side(rt, net, have_criu, tmp_path):
    srv = _server_ve(rt, f"{net}.10")
    d = tmp_path / "warm"
    rt.vzctl("chkpnt", srv, "--leave-running", "--dumpdir", str(d))
    assert rt.vzctl("status", srv).stdout.strip().endswith("running")
    clones = []
    for i in range(5):
        new = rt.new_id()
        rt.created.append(new)
        rt.vzctl("restore", new, "--from", str(d), "--ipadd", f"{net}.{20 + i}/24")
        clones.append(new)
    cli = _client_ve(rt, f"{net}.30", f"{net}.10")
    for i in range(5):  # the host reaches each clone through the bridge (its host route), never the default route
        got = subprocess.run(["ip", "-j", "route", "get", f"{net}.{20 + i}"], capture_output=True, text=True, check=True)
        assert json.loads(got.stdout)[0].get("dev") == rt.env["VZ_BRIDGE"], got.stdout
    if not criu._is_tmpfs("/run"):  # CRIU's kernel probe, kept in vzctl's /run for CRIU (criu.kdat_preexec)...
        log = sorted((rt.root / "dump" / ".logs").glob(f"{clones[-1]}-restore-*.log"))[-1]
        assert "Loaded kdat cache" in log.read_text(errors="replace")
        with open("/proc/self/mountinfo") as f:  # ...in CRIU's own mount namespace: the host's /run is untouched
            assert not [ln for ln in f if ln.split()[4] == "/run" and "vzpkg-criu-run" in ln.split()[3]]
    for i, c in enumerate(clones):
        assert rt.sh(c, "hostname", check=True).stdout.strip() == c
        assert f"{net}.{20 + i}/24" in rt.sh(c, "ip -o addr show dev eth0", check=True).stdout
        assert rt.cgroup_dirs(c) and all(c in str(x) for x in rt.cgroup_dirs(c))
        n = _count(rt, c)
        assert _wait(lambda c=c, n=n: _count(rt, c) > n, what=f"clone {c}'s counter")
        # its server answers, with the memory it had before the dump
        out = rt.sh(cli, f"perl -MIO::Socket::INET -e '$c = IO::Socket::INET->new(PeerAddr => q({net}.{20 + i}), "
                         "PeerPort => 7000) or die; print $c qq(x\\n); print scalar <$c>'", check=True).stdout
        assert _parse(out)["mem"] == "MARKER"
    assert len({rt.init_pid(c) for c in clones}) == 5


def test_live_clone_runs_independently_and_can_itself_be_checkpointed(rt, net, have_criu):
    src = _server_ve(rt, f"{net}.40")
    dst = rt.new_id()
    rt.created.append(dst)
    rt.vzctl("clone", src, dst, "--live", "--hostname", "twin", "--ipadd", f"{net}.41/24")
    for v in (src, dst):
        n = _count(rt, v)
        assert _wait(lambda v=v, n=n: _count(rt, v) > n, what=f"{v}'s counter")
    assert rt.sh(dst, "hostname", check=True).stdout.strip() == "twin"
    assert rt.sh(src, "hostname", check=True).stdout.strip() == "srv"
    assert f"{net}.41/24" in rt.sh(dst, "ip -o addr show dev eth0", check=True).stdout
    assert {str(x) for x in rt.cgroup_dirs(src)}.isdisjoint({str(x) for x in rt.cgroup_dirs(dst)})
    rt.sh(src, "echo mine > /root/only-src", check=True)
    assert rt.sh(dst, "test -e /root/only-src").returncode == 1
    rt.vzctl("chkpnt", dst)
    rt.vzctl("restore", dst)
    n = _count(rt, dst)
    assert _wait(lambda: _count(rt, dst) > n, what="the clone's counter after its own restore")
    # a stopped clone: a copy that starts
    cold = rt.new_id()
    rt.created.append(cold)
    rt.vzctl("clone", src, cold)
    rt.vzctl("start", cold)
    assert rt.sh(cold, "cat /root/only-src", check=True).stdout.strip() == "mine"


@pytest.fixture
def second_root(tmp_path):
    root = tmp_path / "vz2"
    yield root
    from vzpkg.runtime import ve
    from vzpkg.runtime.layout import Layout

    if root.exists():
        for v in Layout(root).veids():
            ve.destroy(Layout(root), v, force=True)


def test_migrate_online_and_offline_to_another_vz_root(rt, have_criu, second_root):
    veid = rt.create("--layout", "overlay")
    rt.sh(veid, COUNTER, check=True)
    rt.sh(veid, "echo kept > /root/file", check=True)
    before = _count(rt, veid)
    p = rt.vzctl("migrate", veid, str(second_root), "--online", "-t")
    assert "frozen" in p.stdout and "memory change tracking" in p.stderr
    assert rt.vzctl("status", veid).stdout.split()[2] == "deleted" or "deleted" in rt.vzctl("status", veid).stdout
    there = {**rt.env, "VZ_ROOT": str(second_root)}

    def sh2(cmd: str) -> str:
        return subprocess.run([sys.executable, "-m", "vzpkg.cli.vzctl", "exec", veid, "/bin/sh", "-c", cmd],
                              env=there, capture_output=True, text=True, cwd=rt.env["PYTHONPATH"]).stdout.strip()

    after = int(sh2("cat /root/count") or 0)
    assert before <= after and sh2("cat /root/file") == "kept"
    assert _wait(lambda: int(sh2("cat /root/count") or 0) > after, what="the counter on the destination")
    assert not rt.cgroup_dirs(veid) and not (rt.root / "private" / veid).exists()
    # and back, offline
    back = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzctl", "migrate", veid, str(rt.root)], env=there,
                          capture_output=True, text=True, cwd=rt.env["PYTHONPATH"])
    assert back.returncode == 0, back.stderr
    assert rt.vzctl("status", veid).stdout.strip().endswith("running")
    assert rt.sh(veid, "cat /root/file", check=True).stdout.strip() == "kept"


def _criu_running(path: str) -> bool:
    """A criu process whose command line names PATH is alive."""
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"criu") for a in argv[:4]) and any(path.encode() in a for a in argv):
            return True
    return False


@pytest.mark.parametrize("point", ["copying", "dumping", "dumped", "restoring"])
def test_migration_killed_midway_leaves_the_ve_on_the_source(rt, have_criu, second_root, point):
    """SIGKILL at several points (seen on disk as they happen): the VE runs on the source, or is suspended there
    and `vzctl restore` brings it back; it never runs on both roots."""
    import signal

    veid = rt.create("--layout", "overlay")
    rt.sh(veid, COUNTER, check=True)
    d1 = rt.root / "dump"
    seen = {
        "copying": lambda: (second_root / "private").is_dir(),
        "dumping": lambda: d1.is_dir() and any(p.name.startswith(f".{veid}.tmp-") for p in d1.iterdir()),
        "dumped": lambda: (d1 / veid / "inventory.img").exists(),
        "restoring": lambda: (second_root / "conf" / f"{veid}.conf").exists(),
    }[point]
    proc = subprocess.Popen([sys.executable, "-m", "vzpkg.cli.vzctl", "migrate", veid, str(second_root), "--online"],
                            env=rt.env, cwd=rt.env["PYTHONPATH"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not seen() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # CRIU outlives the killed vzctl on purpose (its post-dump step records the outcome): until it exits, the VE
    # is still "running" (frozen) and becomes "suspended" a moment later, so look only once it is done
    # (its images go to the source's dump/ since migrations dump here and then send them)
    _wait(lambda: not _criu_running(str(second_root)) and not _criu_running(str(rt.root / "dump")), timeout=60,
          what="CRIU to finish")
    there = {**rt.env, "VZ_ROOT": str(second_root)}
    st_dst = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzctl", "status", veid], env=there,
                            capture_output=True, text=True, cwd=rt.env["PYTHONPATH"]).stdout
    st = rt.vzctl("status", veid).stdout
    if "running" in st_dst:  # it got through: then the source must not run
        assert "running" not in st
        return
    if "suspended" in st:
        rt.vzctl("restore", veid)
    assert rt.vzctl("status", veid).stdout.strip().endswith("running"), st
    n = _count(rt, veid)
    assert _wait(lambda: _count(rt, veid) > n, what="the counter on the source")


def test_processes_started_after_a_restore_share_its_time_namespace(rt, have_criu):
    """CRIU restores a VE into a time namespace of its own; a process `vzctl exec` starts afterwards must join it,
    or the VE's next dump cannot be restored ("Can't restore sub-task in NS")."""
    veid = rt.create("--layout", "overlay")
    rt.sh(veid, COUNTER, check=True)
    rt.vzctl("chkpnt", veid)
    rt.vzctl("restore", veid)
    init = _init_pid(rt, veid)
    init_time = os.readlink(f"/proc/{init}/ns/time")
    rt.sh(veid, "sleep 1000 >/dev/null 2>&1 </dev/null &", check=True)
    sleepers = _wait(lambda: _in_ve(init, "sleep"), what="the sleeper")
    assert [os.readlink(f"/proc/{p}/ns/time") for p in sleepers] == [init_time] * len(sleepers)
    assert init_time != os.readlink("/proc/self/ns/time")  # (else this test proves nothing)
    rt.vzctl("chkpnt", veid)
    rt.vzctl("restore", veid)
    c = _count(rt, veid)
    assert _wait(lambda: _count(rt, veid) > c, what="the counter")
    assert "sleep" in rt.sh(veid, "ps -e -o comm").stdout


def _init_pid(rt, veid: str) -> int:
    return json.loads(rt.vzctl("status", veid, "--json").stdout)["init_pid"]


def _in_ve(init: int, comm: str) -> list[int]:
    """Host pids of the processes named COMM in the pid namespace of the VE whose init is INIT."""
    pidns = os.readlink(f"/proc/{init}/ns/pid")
    found = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and os.readlink(f"/proc/{d}/ns/pid") == pidns and \
                    open(f"/proc/{d}/comm").read().strip() == comm:
                found.append(int(d))
        except OSError:
            pass
    return found
