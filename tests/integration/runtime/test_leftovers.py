"""vzctl SIGKILLed half-way through create, destroy or set --save: the next command on the VE, or
`vzpkg clean --ves`, finds what was left and finishes or removes it. Commands on VEs that do not exist leave
no lock file."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import PROJECT, VZCTL, mounts_below

pytestmark = pytest.mark.root


def _leftovers(rt, veid: str) -> list[str]:
    """Everything of VEID in the VZ root except a lock file."""
    found = []
    for area in ("private", "conf", "root", "dump", "run"):
        for name in os.listdir(rt.root / area) if (rt.root / area).is_dir() else []:
            if name == veid or name.startswith((f"{veid}.", f".{veid}.", f".tmp-{veid}-")):
                found.append(f"{area}/{name}")
    return found


def _mounts_of(rt, veid: str) -> list[str]:
    """Mount points in the VZ root's private area that belong to VEID (its own or a temporary of its create)."""
    return [m for m in mounts_below(rt.root / "private")
            if m.split("/private/", 1)[1].split("/")[0] == veid or f"/.tmp-{veid}-" in m]


def _kill_when(rt, args: list[str], ready) -> None:
    """Run vzctl ARGS, SIGKILL it as soon as READY() is true (polled every ms), wait for it."""
    proc = subprocess.Popen([*VZCTL, *args], env=rt.env, cwd=PROJECT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ready():
            assert proc.poll() is None, f"vzctl {' '.join(args)} finished before the moment to kill it"
            assert time.monotonic() < deadline
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait()


def _private_tmp(rt, veid: str, word: str = ""):
    prefix = f".tmp-{veid}-{word}"

    def ready() -> bool:
        try:
            names = os.listdir(rt.root / "private")
        except FileNotFoundError:
            return False
        return any(n.startswith(prefix) and (word or n[len(prefix):].isdigit()) for n in names)

    return ready


def _clean_ves(rt) -> dict:
    from conftest import run_vzpkg

    p = run_vzpkg("clean", "--ves", "--root", str(rt.root), "--cache-dir", str(rt.cache_dir), "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.parametrize("moment", ["copying", "after-copy"])
def test_create_killed_is_undone_by_the_next_command(rt, moment):
    """A copy-layout create (seconds of cp -a) killed while copying, or after the private area was renamed into
    place but before the config was saved: the next create of the same VEID removes the leftovers and works."""
    veid = rt.new_id()
    rt.created.append(veid)
    if moment == "copying":
        ready = _private_tmp(rt, veid)
    else:
        def ready() -> bool:
            return (rt.private(veid) / "root").is_dir() and not (rt.root / "conf" / f"{veid}.conf").exists()
    _kill_when(rt, ["create", veid, "--ostemplate", rt.template, "--layout", "copy"], ready)
    assert _leftovers(rt, veid), "the kill left nothing: the test did not hit the moment it means"
    assert rt.vzctl("status", veid).stdout.split()[2] == "deleted"
    rt.vzctl("create", veid, "--ostemplate", rt.template, "--layout", "copy")
    assert sorted(_leftovers(rt, veid)) == sorted([f"private/{veid}", f"conf/{veid}.conf", f"root/{veid}"])
    rt.vzctl("start", veid)
    assert rt.vzctl("exec", veid, "true").returncode == 0
    rt.vzctl("destroy", veid, "--force")
    assert _leftovers(rt, veid) == [] and not (rt.root / "lock" / f"{veid}.lock").exists()
    assert not _mounts_of(rt, veid), "the idmapped template attached for the killed copy is still mounted"
    assert not [p for p in subprocess.run(["pgrep", "-f", f"tmp-{veid}-"], capture_output=True,
                                          text=True).stdout.split()], "a cp of the killed create still runs"


def test_create_killed_is_removed_by_clean(rt):
    veid = rt.new_id()
    rt.created.append(veid)
    def copying() -> bool:  # well into the copy, so that there is something to free
        return _private_tmp(rt, veid)() and any((rt.root / "private" / n / "root/usr").is_dir()
                                                for n in os.listdir(rt.root / "private"))

    _kill_when(rt, ["create", veid, "--ostemplate", rt.template, "--layout", "copy"], copying)
    assert _leftovers(rt, veid)
    report = _clean_ves(rt)
    assert any(f".tmp-{veid}-" in p for p in report["removed"]) and report["freed"] > 0
    assert _leftovers(rt, veid) == [] and not (rt.root / "lock" / f"{veid}.lock").exists()
    assert not _mounts_of(rt, veid), "the idmapped template attached for the killed copy is still mounted"


@pytest.mark.parametrize("finisher", ["next-command", "clean"])
def test_destroy_killed_is_finished(rt, finisher):
    """A destroy of a copy-layout VE killed while removing its private area (renamed to .tmp-<id>-destroy-*):
    the VE no longer exists, and the next command on it or `vzpkg clean --ves` removes the rest."""
    veid = rt.create("--layout", "copy")
    _kill_when(rt, ["destroy", veid, "--force"], _private_tmp(rt, veid, "destroy-"))
    left = _leftovers(rt, veid)
    assert any(n.startswith(f"private/.tmp-{veid}-destroy-") for n in left), left
    assert rt.vzctl("status", veid).stdout.strip() == f"VEID {veid} deleted unmounted down"
    assert rt.cgroup_dirs(veid) == [] and mounts_below(rt.ve_root(veid)) == []
    if finisher == "clean":
        report = _clean_ves(rt)
        assert any(f".tmp-{veid}-destroy-" in p for p in report["removed"])
    else:
        p = rt.vzctl("destroy", veid, check=False)
        assert p.returncode == 0, p.stderr  # it finished the destroy it was asked for
    assert _leftovers(rt, veid) == [] and not (rt.root / "lock" / f"{veid}.lock").exists()


def test_save_killed_leaves_no_temporary_config(rt):
    """A temporary config file of a killed `set --save` (simulated: the file and the journal entry a kill in
    VEConfig.save leaves) is removed by the next command on the VE."""
    veid = rt.create(start=False)
    tmp = rt.root / "conf" / f".{veid}.conf.abcd1234.tmp"
    tmp.write_text("half")
    with open(rt.root / "lock" / f"{veid}.lock", "w") as f:
        f.write("save 999999999\n")
    rt.vzctl("start", veid)
    assert not tmp.exists()
    assert (rt.root / "lock" / f"{veid}.lock").read_text() == ""


def test_commands_on_missing_ves_leave_no_lock_files(rt):
    lock_dir = rt.root / "lock"
    before = set(os.listdir(lock_dir)) if lock_dir.is_dir() else set()
    for args in (["start", "nosuch1"], ["stop", "nosuch1"], ["mount", "nosuch1"], ["umount", "nosuch1"],
                 ["set", "nosuch1", "--ram", "1G", "--save"], ["destroy", "nosuch1"], ["restart", "nosuch1"],
                 ["create", "nosuch1", "--ostemplate", "no-such-template-1"]):
        p = rt.vzctl(*args, check=False)
        assert p.returncode in (5, 31), (args, p.stderr)
    assert set(os.listdir(lock_dir)) == before
    # and old ones (from before this fix) go with `vzpkg clean --ves`
    Path(lock_dir / "nosuch2.lock").write_text("")
    report = _clean_ves(rt)
    assert str(lock_dir / "nosuch2.lock") in report["removed"]
    assert not (lock_dir / "nosuch2.lock").exists()
