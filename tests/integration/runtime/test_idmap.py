"""Per-VE id ranges through the real vzctl: each VE's ids are host ids of its own, the shared template is seen
through an idmapped mount (no second unpack), ranges are freed by destroy, and no mount is left behind."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from vzpkg.runtime.idrange import POOL_END, POOL_START
from vzpkg.runtime.layout import DEFAULT_ID_SHIFT, ID_RANGE

from .conftest import VZCTL, mounts_below

pytestmark = pytest.mark.root

# a setuid program of the template, running as an unprivileged user of the VE: its effective uid is the VE's
# root iff the setuid bit and the owner survive the idmapped mount (su waits for a password on the pipe)
SETUID_PROBE = """
(sleep 3 | setpriv --reuid 1 --regid 1 --clear-groups su root -c true >/dev/null 2>&1 &)
for i in $(seq 100); do
  for p in $(pgrep -x su); do grep '^Uid:' /proc/$p/status && exit 0; done
  sleep 0.02
done
echo 'no su process seen'; exit 1
"""


def conf_of(rt, veid: str) -> dict[str, str]:
    text = (rt.root / "conf" / f"{veid}.conf").read_text()
    return {k: v.strip('"') for k, _, v in (line.partition("=") for line in text.splitlines()) if v}


def host_uids(pid: int) -> list[int]:
    line = next(x for x in open(f"/proc/{pid}/status") if x.startswith("Uid:"))
    return [int(x) for x in line.split()[1:]]


def test_each_ve_gets_a_range_of_its_own(rt):
    a = rt.create()
    b = rt.create()
    shift_a, shift_b = int(conf_of(rt, a)["ID_SHIFT"]), int(conf_of(rt, b)["ID_SHIFT"])
    assert conf_of(rt, a)["IDMAP"] == conf_of(rt, b)["IDMAP"] == "private"
    assert shift_a != shift_b
    for veid, shift in ((a, shift_a), (b, shift_b)):
        assert POOL_START <= shift < POOL_END and (shift - POOL_START) % ID_RANGE == 0
        assert not DEFAULT_ID_SHIFT <= shift < DEFAULT_ID_SHIFT + ID_RANGE
        # the VE's init is its root, which is a host uid of its own range
        assert host_uids(rt.init_pid(veid)) == [shift] * 4
        assert rt.vzctl("exec", veid, "cat", "/proc/self/uid_map").stdout.split() == ["0", str(shift), "65536"]
    # the template's files belong to the VE's root and users inside, setuid bits included
    out = rt.sh(a, "stat -c '%u:%g %A' /etc/passwd /usr/bin/su /var/mail", check=True).stdout.split("\n")
    assert out[0] == "0:0 -rw-r--r--"
    assert out[1] == "0:0 -rwsr-xr-x"
    assert out[2].startswith("0:8 ")  # group mail
    p = rt.sh(a, SETUID_PROBE)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.split()[1:3] == ["1", "0"], f"su runs with real uid 1, effective uid 0: {p.stdout}"
    # what A's root writes is owned by A's range on the host, and B's root is another host user
    rt.sh(a, "touch /root/mine && mkdir /srv/d && chown 1000:1000 /srv/d", check=True)
    upper = rt.upper(a)
    st = os.stat(upper / "root/mine")
    assert (st.st_uid, st.st_gid) == (shift_a, shift_a)
    assert os.stat(upper / "srv/d").st_uid == shift_a + 1000
    assert os.stat(upper).st_uid == shift_a
    # the idmapped template is not left attached while the VE runs: only the overlay is mounted
    assert [m for m in mounts_below(rt.private(a)) if not m.endswith("/fs")] == []  # (fs: an image layout's)
    assert mounts_below(rt.ve_root(a)) == [str(rt.ve_root(a))]
    # one unpacked template generation serves both (no unpack per range)
    assert [p.name for p in (rt.root / "template").iterdir() if not p.name.startswith(".")
            and p.name.endswith(f"-{shift_a}")] == []


def test_destroy_frees_the_range_and_leaves_no_mount(rt):
    a = rt.create()
    b = rt.create()
    shift_a = int(conf_of(rt, a)["ID_SHIFT"])
    assert int(conf_of(rt, b)["ID_SHIFT"]) > shift_a
    rt.vzctl("stop", a)
    assert mounts_below(rt.ve_root(a)) == [] and mounts_below(rt.private(a)) == []
    rt.vzctl("mount", a)
    assert (rt.ve_root(a) / "etc/debian_version").is_file()
    assert os.stat(rt.ve_root(a) / "etc/passwd").st_uid == shift_a, "mount shows the VE's own host ids"
    rt.vzctl("umount", a)
    assert mounts_below(rt.ve_root(a)) == [] and mounts_below(rt.private(a)) == []
    rt.vzctl("destroy", a, "--force")
    c = rt.create(start=False)
    assert int(conf_of(rt, c)["ID_SHIFT"]) == shift_a, "the lowest free range is reused"


def test_parallel_creates_get_distinct_ranges(rt):
    ids = [rt.new_id() for _ in range(4)]
    rt.created.extend(ids)
    procs = [subprocess.Popen([*VZCTL, "create", v, "--ostemplate", rt.template, "-q"], env=rt.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in ids]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    shifts = {int(conf_of(rt, v)["ID_SHIFT"]) for v in ids}
    assert len(shifts) == 4
    assert list((rt.root / "lock" / "idrange").iterdir()) == [rt.root / "lock" / "idrange" / ".lock"]


def test_shared_option_keeps_the_old_range(rt):
    veid = rt.create("--idmap", "shared")
    conf = conf_of(rt, veid)
    assert (conf["ID_SHIFT"], conf["IDMAP"]) == (str(DEFAULT_ID_SHIFT), "shared")
    assert host_uids(rt.init_pid(veid)) == [DEFAULT_ID_SHIFT] * 4
    # its lower layer is the template itself, no idmapped mount
    line = next(x for x in open("/proc/self/mountinfo") if x.split()[4] == str(rt.ve_root(veid)))
    assert f"lowerdir={rt.root}/template/{conf['TEMPLATE_SHA256']}," in line
    # a config written before IDMAP existed (no key) is a shared VE and still starts
    path = rt.root / "conf" / f"{veid}.conf"
    path.write_text("".join(x for x in path.read_text().splitlines(True) if not x.startswith("IDMAP=")))
    rt.vzctl("restart", veid)
    assert host_uids(rt.init_pid(veid)) == [DEFAULT_ID_SHIFT] * 4


def test_chosen_shift_is_idmapped_without_an_unpack(rt):
    shift = POOL_END - 2 * ID_RANGE + 7  # any value: the user's choice, not a pool block
    veid = rt.create("--id-shift", str(shift))
    conf = conf_of(rt, veid)
    assert (conf["ID_SHIFT"], conf["IDMAP"]) == (str(shift), "private")
    assert host_uids(rt.init_pid(veid)) == [shift] * 4
    assert not (rt.root / "template" / f"{conf['TEMPLATE_SHA256']}-{shift}").exists()


def test_copy_layout_with_a_private_range(rt):
    veid = rt.create("--layout", "copy")
    shift = int(conf_of(rt, veid)["ID_SHIFT"])
    root = rt.private(veid) / "root"
    assert os.stat(root).st_uid == shift
    st = os.stat(root / "usr/bin/su")
    assert (st.st_uid, st.st_mode & 0o7777) == (shift, 0o4755), "copied through the idmap, setuid kept"
    assert os.stat(root / "var/mail").st_gid == shift + 8
    p = rt.sh(veid, SETUID_PROBE)
    assert p.returncode == 0 and p.stdout.split()[1:3] == ["1", "0"], p.stdout + p.stderr
    assert mounts_below(rt.private(veid)) == []


@pytest.mark.parametrize(("args", "message"), [
    (["--privileged", "--idmap", "private"], "no id range of its own"),
    (["--idmap", "private", "--id-shift", str(DEFAULT_ID_SHIFT)], "shared VEs have"),
    (["--idmap", "sideways"], "invalid choice"),
])
def test_bad_idmap_options(rt, args, message):
    veid = rt.new_id()
    start = time.monotonic()
    p = rt.vzctl("create", veid, "--ostemplate", rt.template, *args, check=False)
    assert p.returncode == 2 and message in p.stderr.splitlines()[-1], p.stderr
    assert "Traceback" not in p.stderr
    assert not (rt.root / "conf" / f"{veid}.conf").exists() and not rt.private(veid).exists()
    assert time.monotonic() - start < 30


def test_an_attachment_left_by_a_crash_is_removed(rt):
    """A start killed between attaching the idmapped template and detaching it leaves a mount on
    private/<id>/lower: start copes with it, and stop and destroy remove it (never deleting through it)."""
    veid = rt.create(start=False)
    lower = rt.private(veid) / "lower"
    lower.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "leftover", str(lower)], check=True)
    (lower / "precious").write_text("x")
    rt.vzctl("start", veid)
    assert rt.vzctl("exec", veid, "cat", "/etc/debian_version").stdout.startswith("12")
    rt.vzctl("stop", veid)
    assert mounts_below(rt.private(veid)) == [] and mounts_below(rt.ve_root(veid)) == []
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "leftover", str(lower)], check=True)
    rt.vzctl("destroy", veid)
    assert mounts_below(rt.root / "private") == [] and not rt.private(veid).exists()
