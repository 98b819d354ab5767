"""Crafted inputs an attacker or a clumsy user could hand the runtime: each is one error line with its own exit
code, and nothing outside the VZ root (a sentinel in a temporary directory stands for a host file) is touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import PROJECT, VZCTL


def _crafted_cache(tmp_path: Path, rt, **fields) -> Path:
    """A cache directory of its own: the shared cache's archive (a symlink, never modified) beside a copy of its
    manifest with FIELDS changed."""
    cache = tmp_path / "cache"
    cache.mkdir()
    src = rt.cache_dir / f"{rt.template}.json"
    manifest = json.loads(src.read_text())
    manifest.update(fields)
    (cache / f"{rt.template}.json").write_text(json.dumps(manifest))
    os.symlink(os.path.realpath(rt.cache_dir / f"{rt.template}.tar.zst"), cache / f"{rt.template}.tar.zst")
    return cache


@pytest.fixture
def request_cleanup():
    todo: list = []
    yield todo
    for f in todo:
        f()


@pytest.mark.parametrize("layout", ["copy", "overlay"])
def test_manifest_sha256_is_not_a_path(rt, tmp_path, layout, request_cleanup):
    """A manifest whose "sha256" is 64 characters of path (leading '/', '..') must not make `vzctl create` use a
    host directory as the VE's template (copy layout: copied into the VE; overlay: mounted as its lower layer)."""
    import shutil
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="vzs", dir="/tmp"))  # pytest's tmp_path is longer than 64 characters
    request_cleanup.append(lambda: shutil.rmtree(short, ignore_errors=True))
    sentinel = short / "hostdir"
    sentinel.mkdir()
    (sentinel / "secret").write_text("host data\n")
    sha = str(sentinel)
    sha = "/" * (64 - len(sha)) + sha  # an absolute path: template/<sha> is the sentinel itself
    assert len(sha) == 64
    cache = _crafted_cache(tmp_path, rt, sha256=sha)
    veid = rt.new_id()
    rt.created.append(veid)
    env = {**rt.env, "VZPKG_CACHE_DIR": str(cache)}
    p = subprocess.run([*VZCTL, "create", veid, "--ostemplate", rt.template, "--layout", layout], env=env,
                       capture_output=True, text=True, timeout=60, cwd=PROJECT)
    assert p.returncode == 5, (p.returncode, p.stderr)
    assert p.stderr.startswith("vzctl: error: ") and "has no valid sha256" in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert sorted(os.listdir(sentinel)) == ["secret"]
    assert not (rt.root / "template" / f".{sentinel.name}.lock").exists()
    assert not rt.private(veid).exists() and not (rt.root / "conf" / f"{veid}.conf").exists()


@pytest.mark.parametrize("kind", ["fifo", "device", "huge"])
def test_manifest_not_a_regular_file(rt, tmp_path, kind):
    """A manifest name that is a FIFO (open(2) blocked forever), /dev/zero (read forever) or a file far larger
    than any manifest: `vzpkg info` exits 11 and `vzctl create` 5, at once, with one line."""
    cache = _crafted_cache(tmp_path, rt)
    manifest = cache / f"{rt.template}.json"
    manifest.unlink()
    if kind == "fifo":
        os.mkfifo(manifest)
    elif kind == "device":
        manifest.symlink_to("/dev/zero")
    else:
        with open(manifest, "wb") as f:
            f.truncate(65 << 20)  # sparse: 65 MiB of NULs, no disk used
    env = {**rt.env, "VZPKG_CACHE_DIR": str(cache)}
    veid = rt.new_id()
    rt.created.append(veid)
    for cmd, rc in (([sys.executable, "-m", "vzpkg.cli.vzpkg", "info", rt.template], 11),
                    ([*VZCTL, "create", veid, "--ostemplate", rt.template], 5)):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=20, cwd=PROJECT)
        assert p.returncode == rc, (cmd, p.returncode, p.stderr)
        what = "larger than" if kind == "huge" else "not a regular file"
        assert what in p.stderr and str(manifest) in p.stderr, p.stderr
        assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr and "Errno" not in p.stderr
    assert not (rt.root / "conf" / f"{veid}.conf").exists()


def test_id_shift_zero_without_privileged_is_refused(rt):
    """ID_SHIFT="0" in an unprivileged VE's config (vzctl create refuses --id-shift 0) would map the VE's root to
    host root: start and mount refuse it (exit 13) before anything is set up; destroy still works."""
    from .conftest import mounts_below

    veid = rt.create(start=False)
    conf = rt.root / "conf" / f"{veid}.conf"
    with conf.open("a") as f:
        f.write('ID_SHIFT="0"\n')
    for cmd in ("start", "mount"):
        p = rt.vzctl(cmd, veid, check=False)
        assert p.returncode == 13, (cmd, p.returncode, p.stderr)
        assert p.stderr.startswith(f"vzctl: error: {conf}: ID_SHIFT=\"0\" with PRIVILEGED=\"no\""), p.stderr
        assert p.stderr.count("\n") == 1
    assert not mounts_below(rt.ve_root(veid)) and not rt.cgroup_dirs(veid)
    assert not (rt.root / "run" / f"{veid}.state").exists()


def test_overlapping_private_ranges_are_refused(rt):
    """A private VE whose hand-edited ID_SHIFT overlaps another VE's range would share host ids with it: start
    refuses it (exit 13, naming the other VE) and starts it again once its own range is restored."""
    from .conftest import mounts_below

    a = rt.create(start=False)
    b = rt.create(start=False)
    conf_a, conf_b = (rt.root / "conf" / f"{v}.conf" for v in (a, b))

    def shift(conf):
        return int(next(ln for ln in reversed(conf.read_text().splitlines()) if ln.startswith("ID_SHIFT=")
                        ).split("=", 1)[1].strip('"'))

    own = shift(conf_b)
    assert own != shift(conf_a)
    with conf_b.open("a") as f:
        f.write(f'ID_SHIFT="{shift(conf_a) + 12}"\n')
    p = rt.vzctl("start", b, check=False)
    assert p.returncode == 13, (p.returncode, p.stderr)
    assert p.stderr.startswith(f"vzctl: error: {conf_b}: ID_SHIFT=") and f"VE {a} " in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1
    assert not mounts_below(rt.ve_root(b)) and not rt.cgroup_dirs(b)
    with conf_b.open("a") as f:
        f.write(f'ID_SHIFT="{own}"\n')
    rt.vzctl("start", b)
    rt.vzctl("start", a)


def test_create_refuses_an_id_shift_in_use(rt):
    """`vzctl create --id-shift N` (private) where N's range overlaps an existing VE's: exit 2, nothing made."""
    a = rt.create(start=False)
    used = int(next(ln for ln in reversed((rt.root / "conf" / f"{a}.conf").read_text().splitlines())
                    if ln.startswith("ID_SHIFT=")).split("=", 1)[1].strip('"'))
    b = rt.new_id()
    rt.created.append(b)
    p = rt.vzctl("create", b, "--ostemplate", rt.template, "--id-shift", str(used + 65535), check=False)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert p.stderr.startswith(f"vzctl: error: --id-shift {used + 65535} overlaps the id range of VE {a} "), p.stderr
    assert not (rt.root / "conf" / f"{b}.conf").exists() and not rt.private(b).exists()


def test_config_that_is_a_fifo(rt):
    """conf/<id>.conf replaced by a FIFO: nothing blocks on it (open(2) of a FIFO waits for a writer): vzlist
    lists it, start and set --save exit 13 naming it, create of another VE (which reads every config for the id
    ranges in use) works, destroy removes it."""
    veid = rt.new_id()
    rt.created.append(veid)
    (rt.root / "conf").mkdir(exist_ok=True)
    fifo = rt.root / "conf" / f"{veid}.conf"
    os.mkfifo(fifo)
    assert veid in rt_vzlist(rt)
    for args in (["start", veid], ["set", veid, "--ram", "1G", "--save"]):
        p = rt.vzctl(*args, check=False, timeout=20)
        assert p.returncode == 13, (args, p.returncode, p.stderr)
        assert p.stderr == (f"vzctl: error: {fifo}: cannot read config: it is not a regular file; a VE config is a "
                            'regular file of KEY="value" lines\n')
    other = rt.create(start=False)
    assert rt.vzctl("status", other).stdout.split()[2] == "exist"
    rt.vzctl("destroy", veid, timeout=20)
    assert not os.path.lexists(fifo)


def rt_vzlist(rt) -> str:
    p = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzlist", "-a", "-H", "-o", "veid"], env=rt.env,
                       capture_output=True, text=True, timeout=20, cwd=PROJECT)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_exec_and_enter_at_the_process_limit(rt):
    """`vzctl set --numproc 1` on a running VE (its init is the one process): exec and enter cannot fork into
    it. One line naming NUMPROC, exit 30 (it was a traceback: EAGAIN, then an import failing inside the VE's
    mount namespace). Raised again, exec works."""
    veid = rt.create()
    rt.vzctl("set", veid, "--numproc", "1")
    for args in (["exec", veid, "true"], ["enter", veid]):
        p = rt.vzctl(*args, check=False, input="")
        assert p.returncode == 30, (args, p.returncode, p.stderr)
        assert p.stderr.startswith(f"vzctl: error: VE {veid} is at its process limit (NUMPROC)"), p.stderr
        assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    rt.vzctl("set", veid, "--numproc", "64")
    assert rt.vzctl("exec", veid, "true").returncode == 0


@pytest.mark.parametrize("cmd", ["start", "mount"])
def test_mount_point_replaced_by_a_symlink(rt, tmp_path, cmd):
    """root/<id> replaced by a symlink to a host directory: the VE's root was mounted over that directory (and
    stop left it there). The link is replaced by the mount point it stands for; the host directory is untouched."""
    from .conftest import mounts_below

    host = tmp_path / "hostdir"
    host.mkdir()
    (host / "file").write_text("host\n")
    veid = rt.create(start=False)
    rt.ve_root(veid).rmdir()
    rt.ve_root(veid).symlink_to(host)
    rt.vzctl(cmd, veid)
    assert not mounts_below(host)
    assert not rt.ve_root(veid).is_symlink() and (rt.ve_root(veid) / "etc/os-release").exists()
    rt.vzctl("stop" if cmd == "start" else "umount", veid)
    assert not mounts_below(host) and sorted(os.listdir(host)) == ["file"]
