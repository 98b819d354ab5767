"""VE lifecycle through the real vzctl: create, start, status, exec, stop, restart, mount, destroy."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from .conftest import Runtime, mounts_below

pytestmark = pytest.mark.root


def test_create_start_exec_stop_destroy(rt):
    veid = rt.create(start=False)
    conf = (rt.root / "conf" / f"{veid}.conf").read_text()
    assert f'OSTEMPLATE="{rt.template}"' in conf
    assert "TEMPLATE_SHA256=" in conf
    assert rt.vzctl("status", veid).stdout.strip() == f"VEID {veid} exist unmounted down"

    rt.vzctl("start", veid)
    assert rt.vzctl("status", veid).stdout.strip() == f"VEID {veid} exist mounted running"
    st = json.loads(rt.vzctl("status", veid, "--json").stdout)
    assert st["running"] and st["mounted"] and st["exist"] and st["init_pid"] > 1

    p = rt.vzctl("exec", veid, "cat", "/etc/debian_version")
    assert p.stdout.strip().startswith("12")
    # exit status and stdin/stdout/stderr are passed through
    p = rt.sh(veid, "read x; echo out:$x; echo err >&2; exit 7")
    assert p.returncode == 7
    p = rt.vzctl("exec", veid, "/bin/sh", "-c", "read x; echo out:$x; echo err >&2; exit 7", input="hello\n",
                 check=False)
    assert (p.returncode, p.stdout, p.stderr) == (7, "out:hello\n", "err\n")
    assert rt.vzctl("exec", veid, "no-such-command", check=False).returncode == 127
    # a single argument with spaces is a shell command line, as in OpenVZ
    assert rt.vzctl("exec", veid, "echo a b | wc -w").stdout.strip() == "2"

    rt.vzctl("stop", veid)
    assert rt.vzctl("status", veid).stdout.strip() == f"VEID {veid} exist unmounted down"
    assert rt.vzctl("exec", veid, "true", check=False).returncode == 32  # VEStateError

    rt.vzctl("destroy", veid)
    assert rt.vzctl("status", veid).stdout.strip() == f"VEID {veid} deleted unmounted down"
    assert not rt.private(veid).exists()
    assert not (rt.root / "conf" / f"{veid}.conf").exists()


def test_restart_and_destroy_refuses_running(rt):
    veid = rt.create()
    pid1 = rt.init_pid(veid)
    p = rt.vzctl("destroy", veid, check=False)
    assert p.returncode == 32 and "--force" in p.stderr
    rt.vzctl("restart", veid)
    assert rt.init_pid(veid) != pid1
    assert rt.vzctl("exec", veid, "true").returncode == 0
    rt.vzctl("destroy", veid, "--force")
    assert not rt.cgroup_dirs(veid)


def test_start_twice_and_unknown_ve(rt):
    veid = rt.create()
    p = rt.vzctl("start", veid, check=False)
    assert p.returncode == 32 and "already running" in p.stderr
    p = rt.vzctl("start", "nosuchve", check=False)
    assert p.returncode == 31 and "does not exist" in p.stderr


def test_mount_umount(rt):
    veid = rt.create(start=False)
    rt.vzctl("mount", veid)
    assert (rt.ve_root(veid) / "etc/debian_version").is_file()
    assert rt.vzctl("status", veid).stdout.split()[3] == "mounted"
    rt.vzctl("umount", veid)
    assert mounts_below(rt.ve_root(veid)) == []


def test_failed_create_leaves_nothing(rt, tmp_path):
    veid = rt.new_id()
    p = rt.vzctl("create", veid, "--ostemplate", "no-such-template-1", check=False)
    assert p.returncode != 0 and "no-such-template-1" in p.stderr
    assert not (rt.root / "conf" / f"{veid}.conf").exists()
    assert not rt.private(veid).exists()
    assert not [x for x in (rt.root / "private").iterdir() if veid in x.name]
    p = rt.vzctl("create", veid, "--ostemplate", rt.template, "--hostname", "bad_host!", check=False)
    assert p.returncode == 13 and "HOSTNAME" in p.stderr
    assert not rt.private(veid).exists()
    # a VEID that would escape the layout
    assert rt.vzctl("create", "../x", "--ostemplate", rt.template, check=False).returncode == 2


def test_create_failing_after_its_private_area_removes_it(rt):
    """A failure between making the private area and saving the config (here root/<id> is a file, so the mount
    point cannot be made) undoes the private area and the id range reservation; the next create succeeds."""
    veid = rt.new_id()
    rt.ve_root(veid).parent.mkdir(parents=True, exist_ok=True)
    rt.ve_root(veid).write_text("in the way\n")
    p = rt.vzctl("create", veid, "--ostemplate", rt.template, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and str(rt.ve_root(veid)) in p.stderr, p.stderr
    assert not (rt.root / "conf" / f"{veid}.conf").exists()
    assert not rt.private(veid).exists() and not [x for x in (rt.root / "private").iterdir() if veid in x.name]
    assert not (rt.root / "lock" / "idrange" / veid).exists()
    assert rt.ve_root(veid).read_text() == "in the way\n"  # not ours: left alone
    rt.ve_root(veid).unlink()
    rt.create(veid=veid, start=False)


def test_create_existing_refused(rt):
    veid = rt.create(start=False)
    p = rt.vzctl("create", veid, "--ostemplate", rt.template, check=False)
    assert p.returncode == 32 and "already exists" in p.stderr


def test_overlay_shares_the_template(rt):
    a = rt.create(start=False)
    b = rt.create(start=False)
    conf_a = (rt.root / "conf" / f"{a}.conf").read_text()
    conf_b = (rt.root / "conf" / f"{b}.conf").read_text()
    sha = [line for line in conf_a.splitlines() if line.startswith("TEMPLATE_SHA256=")][0]
    assert sha in conf_b
    # the private area of a fresh overlay VE is (nearly) empty
    assert sum(1 for _ in rt.private(a).rglob("*")) <= 3
    # the unpacked template is shifted into the unprivileged range
    tdir = rt.root / "template" / sha.split('"')[1]
    assert os.stat(tdir / "etc/passwd").st_uid == 100000
    assert os.stat(tdir / "usr/bin/passwd").st_mode & 0o4000, "setuid bits survive the shift"


def test_copy_layout(rt):
    veid = rt.create("--layout", "copy")
    assert (rt.private(veid) / "root" / "etc/debian_version").is_file()
    rt.sh(veid, "echo copy > /etc/copy-marker", check=True)
    assert (rt.private(veid) / "root/etc/copy-marker").read_text() == "copy\n"


def test_template_generation_is_kept(rt, tmp_path):
    """A VE keeps the unpacked generation it was made from after the cache is rebuilt."""
    from vzpkg.runtime.layout import Layout, templates_in_use

    cache2 = tmp_path / "cache"
    cache2.mkdir()
    shutil.copy2(rt.cache_dir / f"{rt.template}.tar.zst", cache2 / f"{rt.template}.tar.zst")
    manifest = json.loads((rt.cache_dir / f"{rt.template}.json").read_text())
    env_old = rt.env
    rt.env = {**env_old, "VZPKG_CACHE_DIR": str(cache2)}
    try:
        (cache2 / f"{rt.template}.json").write_text(json.dumps(manifest))
        a = rt.create()
        # "rebuild" the cache: a zstd skippable frame appended changes the digest, not the content
        with open(cache2 / f"{rt.template}.tar.zst", "ab") as f:
            f.write(b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"gen2")
        from vzpkg.store.archive import sha256_file

        manifest["sha256"] = sha256_file(cache2 / f"{rt.template}.tar.zst")
        (cache2 / f"{rt.template}.json").write_text(json.dumps(manifest))
        b = rt.create()
    finally:
        rt.env = env_old
    conf_a = (rt.root / "conf" / f"{a}.conf").read_text()
    conf_b = (rt.root / "conf" / f"{b}.conf").read_text()
    assert manifest["sha256"] in conf_b and manifest["sha256"] not in conf_a
    in_use = templates_in_use(Layout(rt.root))
    assert manifest["sha256"] in in_use and len(in_use) >= 2
    rt.vzctl("restart", a)
    assert rt.vzctl("exec", a, "true").returncode == 0


def test_privileged_ve(rt):
    veid = rt.new_id()
    rt.created.append(veid)
    p = rt.vzctl("create", veid, "--ostemplate", rt.template, "--privileged")
    assert "WARNING" in p.stderr and "take the host over" in p.stderr
    rt.vzctl("start", veid)
    uid_map = rt.vzctl("exec", veid, "cat", "/proc/self/uid_map").stdout.split()
    assert uid_map == ["0", "0", "4294967295"], "no user namespace"
    capbnd = [line for line in rt.vzctl("exec", veid, "cat", "/proc/self/status").stdout.splitlines()
              if line.startswith("CapBnd")][0]
    caps = int(capbnd.split()[1], 16)
    assert not caps & (1 << 21), "CAP_SYS_ADMIN is dropped"
    assert not caps & (1 << 16), "CAP_SYS_MODULE is dropped"
    assert rt.sh(veid, "mount -t tmpfs none /mnt").returncode != 0


def _vzlist(rt, *args):
    import subprocess
    import sys

    from .conftest import PROJECT

    p = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzlist", *args], env=rt.env, capture_output=True,
                       text=True, cwd=PROJECT)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_vzlist(rt):
    running = rt.create("--hostname", "listed")
    stopped = rt.create(start=False)
    rows = {r["veid"]: r for r in json.loads(_vzlist(rt, "-a", "--json"))}
    assert rows[running]["status"] == "running" and rows[stopped]["status"] == "stopped"
    assert rows[running]["hostname"] == "listed"
    assert rows[running]["numproc"] >= 1 and rows[running]["memory"] > 0
    assert rows[running]["ostemplate"] == rt.template and rows[running]["disk"] >= 0
    plain = _vzlist(rt, "-H", "-o", "veid,status")
    assert running in plain and stopped not in plain  # without -a only running VEs
    assert _vzlist(rt, "-a", "-H", "-o", "veid", stopped).split() == [stopped]
    header = _vzlist(rt, "-a", "-o", "veid,hostname,ip,numproc,memory,disk,ostemplate").splitlines()[0].split()
    assert header == ["VEID", "HOSTNAME", "IP_ADDR", "NPROC", "MEMORY", "DISK", "OSTEMPLATE"]


def test_enter_gives_a_pty_shell(rt):
    import pty
    import select
    import time

    from .conftest import PROJECT, VZCTL

    veid = rt.create()
    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.chdir(PROJECT)
            os.execve(VZCTL[0], [*VZCTL, "enter", veid], rt.env)
        finally:
            os._exit(127)
    out = b""
    sent = False
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.5)
            if r:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            if not sent and b"# " in out:  # the prompt: the shell is ready for input
                os.write(fd, b"tty; echo MARK$((6*7)); hostname; exit 3\n")
                sent = True
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = out.decode(errors="replace")
    assert "MARK42" in text, text
    assert "/dev/pts/0" in text, "the shell runs on a pty of the VE's own devpts"
    assert veid in text
    assert os.waitstatus_to_exitcode(status) == 3


def test_id_range_of_its_own(rt):
    veid = rt.create("--id-shift", "300000")
    rt.sh(veid, "touch /root/mine", check=True)
    assert os.stat(rt.upper(veid) / "root/mine").st_uid == 300000
    assert rt.vzctl("exec", veid, "cat", "/proc/self/uid_map").stdout.split() == ["0", "300000", "65536"]


def test_start_refuses_a_bad_hand_edited_config(rt):
    veid = rt.create(start=False)
    conf = rt.root / "conf" / f"{veid}.conf"
    conf.write_text(conf.read_text() + 'HOSTNAME="bad host!"\n')
    p = rt.vzctl("start", veid, check=False)
    assert p.returncode == 13 and "HOSTNAME" in p.stderr and str(conf) in p.stderr
    assert rt.vzctl("status", veid).stdout.strip().endswith("unmounted down")


def test_config_edits_are_seen_by_the_next_start(rt):
    """start caches the validated config; an edit of the file (even by hand) invalidates the cache."""
    veid = rt.create()
    rt.vzctl("stop", veid)
    conf = rt.root / "conf" / f"{veid}.conf"
    with open(conf, "a") as f:  # in place: same inode
        f.write('HOSTNAME="edited-by-hand"\n')
    rt.vzctl("start", veid)
    assert rt.vzctl("exec", veid, "hostname").stdout.strip() == "edited-by-hand"
    rt.vzctl("stop", veid)
    rt.vzctl("set", veid, "--ram", "96M", "--save")
    rt.vzctl("start", veid)
    bc = json.loads(rt.vzctl("status", veid, "--json", "--beancounters").stdout)["beancounters"]
    assert bc["memory"]["limit"] == 96 << 20


def test_clean_removes_only_unused_template_generations(debian12_cache, tmp_path):
    """`vzpkg clean --templates` removes an unpacked generation once no VE uses it, and no other."""
    from conftest import run_vzpkg

    from vzpkg.store.archive import sha256_file

    cache_dir, name = debian12_cache
    cache2 = tmp_path / "cache"
    cache2.mkdir()
    shutil.copy2(cache_dir / f"{name}.tar.zst", cache2 / f"{name}.tar.zst")
    manifest = json.loads((cache_dir / f"{name}.json").read_text())
    (cache2 / f"{name}.json").write_text(json.dumps(manifest))
    root = tmp_path / "vzroot"
    rt2 = Runtime(root, cache2, name)
    try:
        a = rt2.create(start=False)
        with open(cache2 / f"{name}.tar.zst", "ab") as f:  # a new generation: same content, new digest
            f.write(b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"gen2")
        manifest["sha256"] = sha256_file(cache2 / f"{name}.tar.zst")
        (cache2 / f"{name}.json").write_text(json.dumps(manifest))
        b = rt2.create(start=False)
        generations = sorted(p.name for p in (root / "template").iterdir() if not p.name.startswith("."))
        assert len(generations) == 2
        clean = run_vzpkg("clean", "--templates", "--root", str(root), "--cache-dir", str(cache2), "--json")
        assert clean.returncode == 0, clean.stderr
        assert not [p for p in json.loads(clean.stdout)["removed"] if "/template/" in p]
        rt2.vzctl("destroy", a)
        clean = run_vzpkg("clean", "--templates", "--root", str(root), "--cache-dir", str(cache2), "--json")
        removed = [p for p in json.loads(clean.stdout)["removed"] if "/template/" in p]
        left = sorted(p.name for p in (root / "template").iterdir() if not p.name.startswith("."))
        assert len(removed) == 1 and left == [manifest["sha256"] + left[0][64:]]
        rt2.vzctl("start", b)
        assert rt2.vzctl("exec", b, "true").returncode == 0
    finally:
        rt2.cleanup()
