"""The start/exec hot path's shortcuts do what the slow ways did: every process of a VE is in all of its cgroups
(joined by writing "0" to cgroup v1's `tasks`, without an RCU grace period), and the image layout's loop device,
set up in-process, is the image's, cleared with the mount."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vzpkg.api import VE

pytestmark = pytest.mark.root


def _loops_of(image: Path) -> list[tuple[str, str]]:
    """[(loop device name, its autoclear flag)] whose backing file is IMAGE (from sysfs)."""
    out = []
    for name in os.listdir("/sys/block"):
        try:
            backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
            autoclear = Path(f"/sys/block/{name}/loop/autoclear").read_text().strip()
        except OSError:
            continue
        if backing == str(image):
            out.append((name, autoclear))
    return out


def _outside(cgroup_text: str) -> list[str]:
    """The lines of /proc/PID/cgroup read inside a VE whose cgroup is not the VE's own: the VE's cgroup namespace
    shows its root as "/", any other cgroup as a path with "..". Empty for a process in every VE cgroup."""
    return [line for line in cgroup_text.splitlines() if line and not line.endswith(":/")]


def test_vzctl_start_and_exec_join_every_cgroup(rt):
    veid = rt.create()  # vzctl start: its first process joined the cgroups itself
    out = rt.sh(veid, "cat /proc/1/cgroup; echo --; cat /proc/self/cgroup", check=True).stdout
    init, execd = out.split("--\n")
    assert init.count("\n") >= 2 and not _outside(init), init
    assert execd.count("\n") >= 2 and not _outside(execd), execd  # vzctl exec: joined through `tasks`


@pytest.mark.parametrize("exec_server", [True, False])
def test_api_exec_joins_every_cgroup(vz_root, debian12_cache, exec_server):
    cache_dir, name = debian12_cache
    with VE.create(template=name, root=vz_root, cache_dir=cache_dir, fs_layout="overlay") as v:
        v.start(exec_server=exec_server)
        for _ in range(2):  # the server's first request (it joins the namespaces then) and a later one
            r = v.exec(["cat", "/proc/self/cgroup", "/proc/1/cgroup"], check=True)
            assert r.stdout.count("\n") >= 4 and not _outside(r.stdout), r.stdout


def test_image_loop_device_is_the_images_and_goes_with_the_mount(rt):
    veid = rt.create("--layout", "image", "--diskspace", "100M")
    image = rt.private(veid) / "root.img"
    loops = _loops_of(image)
    assert len(loops) == 1 and loops[0][1] == "1", loops  # one device, autoclear: nothing to detach by hand
    assert rt.sh(veid, "echo data > /root/f; cat /root/f", check=True).stdout == "data\n"
    rt.vzctl("stop", veid)
    assert _loops_of(image) == []
    rt.vzctl("start", veid)  # mounted again (a new device), the file still there
    assert len(_loops_of(image)) == 1
    assert rt.sh(veid, "cat /root/f", check=True).stdout == "data\n"
    rt.vzctl("destroy", veid, "--force")
    assert _loops_of(image) == [] and not image.exists()
