"""Each isolation claim, proved by trying to break it from inside a VE as the VE's root."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from .conftest import install_probe

pytestmark = pytest.mark.root


@pytest.fixture
def ve(rt):
    return rt.create()


def test_only_own_processes_visible(rt, ve):
    marker = subprocess.Popen(["sleep", "1234.5678"])  # a host process the VE must not see
    try:
        ps = rt.vzctl("exec", ve, "ps", "-eo", "pid,args").stdout
        assert "1234.5678" not in ps
        lines = ps.strip().splitlines()[1:]
        assert lines[0].split()[0] == "1" and "vzinit" in lines[0]
        assert len(lines) == 2, ps  # init and ps itself
        # signalling a host pid fails: it does not exist in the VE's pid namespace
        p = rt.sh(ve, f"kill -0 {marker.pid}")
        assert p.returncode != 0 or marker.pid < 10
        # /proc shows only the VE's processes
        pids = rt.sh(ve, "ls /proc | grep -c '^[0-9]'").stdout.strip()
        assert int(pids) <= 4
    finally:
        marker.kill()
        marker.wait()


def test_pid1_is_session_leader_without_host_fds(rt, ve):
    pid = rt.init_pid(ve)
    stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    assert int(stat[3]) == pid, "pid 1 leads its own session (sid == pid)"
    fds = os.listdir(f"/proc/{pid}/fd")
    assert sorted(fds) == ["0", "1", "2"]
    for fd in fds:
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/exe") == "/run/vzinit"


def test_hostname_is_private(rt):
    host_before = socket.gethostname()
    ve = rt.create("--hostname", "isolated-ve.example")
    assert rt.vzctl("exec", ve, "hostname").stdout.strip() == "isolated-ve.example"
    assert rt.sh(ve, "hostname changed-inside && hostname").stdout.strip() == "changed-inside"
    assert socket.gethostname() == host_before


def test_mounts_do_not_leak(rt, ve):
    p = rt.sh(ve, "mkdir -p /mnt/x && mount -t tmpfs leaktest /mnt/x && grep -c leaktest /proc/self/mountinfo")
    assert p.returncode == 0 and p.stdout.strip() == "1", p.stderr
    assert "leaktest" not in open("/proc/self/mountinfo").read()
    # and host mounts are not visible inside: no /proc/1/root escape, only the VE's own tree
    inside = rt.vzctl("exec", ve, "cat", "/proc/self/mountinfo").stdout
    assert str(rt.root) not in inside.replace(str(rt.root / "template"), "").replace(str(rt.private(ve)), "")
    assert " /sys/fs/cgroup " not in inside


def test_host_files_unreachable(rt, ve, tmp_path):
    secret = tmp_path / "host-secret"
    secret.write_text("s3cret")
    assert rt.vzctl("exec", ve, "cat", str(secret), check=False).returncode != 0
    # /proc/1/root of the VE is the VE's root; nothing of the host's root file system is visible
    assert rt.sh(ve, "ls /proc/1/root/ | grep -c vzroot").stdout.strip() == "0"


def test_network_is_private(rt, ve):
    links = rt.vzctl("exec", ve, "ip", "-o", "link").stdout.strip().splitlines()
    assert len(links) == 1 and ": lo:" in links[0] and "UP" in links[0]
    # a TCP server on the host's loopback is not reachable from the VE's loopback
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    try:
        p = rt.vzctl("exec", ve, "bash", "-c", f"echo hi > /dev/tcp/127.0.0.1/{port}", check=False)
        assert p.returncode != 0
    finally:
        srv.close()
    # the VE's own loopback is up: a closed port refuses (a down loopback would be "unreachable")
    p = rt.vzctl("exec", ve, "bash", "-c", "(exec 3<>/dev/tcp/127.0.0.1/1) 2>&1", check=False)
    assert "refused" in p.stdout


def test_files_created_by_ve_root_are_unprivileged_on_host(rt, ve):
    rt.sh(ve, "touch /root/owned-by-ve && mkdir /srv/d && chown 1000:1000 /srv/d", check=True)
    upper = rt.upper(ve)
    conf = (rt.root / "conf" / f"{ve}.conf").read_text()
    shift = int(next(x for x in conf.splitlines() if x.startswith("ID_SHIFT=")).split('"')[1])
    assert shift >= 100000, "the VE's root is not a low host uid"
    st = os.stat(upper / "root/owned-by-ve")
    assert (st.st_uid, st.st_gid) == (shift, shift)
    assert os.stat(upper / "srv/d").st_uid == shift + 1000
    assert rt.vzctl("exec", ve, "stat", "-c", "%u", "/root/owned-by-ve").stdout.strip() == "0"


# ---- the must-fail list ---------------------------------------------------------------------------------


@pytest.fixture
def probe_ve(rt, ve, probe_binary):
    return ve, install_probe(rt, ve, probe_binary)


@pytest.mark.parametrize("op", [
    "finit_module", "init_module",  # load a kernel module
    "settimeofday", "clock_settime",  # set the clock
    "syslog",  # read the kernel log
    "mknod_disk 254 0", "mknod_disk 8 0",  # make a disk node (and read the host disk)
    "mount /dev/vda ext4", "mount /dev/sda ext4",  # mount the host disk
    "open_by_handle_at",  # the 'shocker' escape
])
def test_privileged_syscalls_fail(rt, probe_ve, op):
    ve, probe = probe_ve
    p = rt.vzctl("exec", ve, probe, *op.split(), check=False)
    assert p.returncode == 1, f"{op}: {p.stdout}{p.stderr}"
    assert "failed" in p.stdout


@pytest.mark.parametrize("script", [
    "modprobe dummy || insmod /lib/modules/x.ko",
    "date -s '2001-01-01 00:00'",
    "hwclock --set --date '2001-01-01'",
    "dmesg",
    "cat /proc/kmsg | head -c1 | grep -q .",
    "mknod /tmp/disk b 254 0 && head -c 512 /tmp/disk",
    "mount /dev/vda /mnt",
    "echo 1 > /sys/kernel/mm/ksm/run",
    "mount -o remount,rw /sys && echo 1 > /sys/kernel/mm/ksm/run",
    "echo 1 > /proc/sysrq-trigger",
    "echo 0 > /proc/sys/kernel/panic",
    "echo /tmp/evil > /proc/sys/kernel/core_pattern",
    "echo /tmp/evil > /proc/sys/kernel/modprobe",
    "head -c 16 /proc/kcore | grep -q .",
])
def test_must_fail_as_ve_root(rt, ve, script):
    before = {p: open(p).read() for p in ("/proc/sys/kernel/panic", "/proc/sys/kernel/core_pattern",
                                          "/proc/sys/kernel/modprobe", "/sys/kernel/mm/ksm/run")
              if os.path.exists(p)}
    p = rt.sh(ve, script)
    assert p.returncode != 0, f"{script!r} succeeded: {p.stdout}{p.stderr}"
    after = {p: open(p).read() for p in before}
    assert before == after


def test_fresh_proc_mount_does_not_open_sysctls(rt, ve):
    """Even through a procfs the VE mounts itself, host-wide sysctls stay read-only for it."""
    p = rt.sh(ve, "mkdir -p /mnt/p && mount -t proc proc /mnt/p && echo mounted")
    mounted = p.stdout.strip() == "mounted"
    before = open("/proc/sys/kernel/panic").read()
    for path in ("kernel/panic", "kernel/core_pattern", "kernel/modprobe", "vm/drop_caches"):
        target = f"/mnt/p/sys/{path}" if mounted else f"/proc/sys/{path}"
        w = rt.sh(ve, f"echo 3 > {target}")
        assert w.returncode != 0, f"writing {target} from the VE succeeded"
    assert open("/proc/sys/kernel/panic").read() == before
    # what the VE's own namespaces own stays writable: its hostname and its network sysctls
    assert rt.sh(ve, "echo 1 > /proc/sys/net/ipv4/ip_forward && cat /proc/sys/net/ipv4/ip_forward"
                 ).stdout.strip() == "1"
    assert open("/proc/sys/net/ipv4/ip_forward").read().strip() in ("0", "1")


def test_dev_holds_only_allowed_devices(rt, ve):
    names = set(rt.vzctl("exec", ve, "ls", "/dev").stdout.split())
    assert names <= {"null", "zero", "full", "random", "urandom", "tty", "console", "ptmx", "pts", "shm",
                     "mqueue", "fd", "stdin", "stdout", "stderr"}
    assert rt.sh(ve, "head -c 8 /dev/urandom | wc -c").stdout.strip() == "8"
    assert rt.sh(ve, "echo x > /dev/null && echo x > /dev/full").returncode != 0  # full: ENOSPC
    # the device cgroup refuses other devices even if a node appears
    assert rt.sh(ve, "test -e /dev/kmsg || test -e /dev/mem || test -e /dev/vda").returncode != 0


def test_sys_is_read_only(rt, ve):
    p = rt.sh(ve, "touch /sys/x 2>&1; grep ' /sys ' /proc/self/mountinfo")
    assert " ro," in p.stdout or p.stdout.split()[5].startswith("ro")
