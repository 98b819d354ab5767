"""The minimal init (vzinit): start-up scripts, orphan reaping, orderly shutdown; and INIT=distro."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.root


def test_start_scripts_run_once(ve_factory):
    v = ve_factory(start=False)
    v.mount()
    root = v.path
    (root / "etc/vzpkg/start").mkdir(parents=True)
    script = root / "etc/vzpkg/start/10-hello"
    script.write_text("#!/bin/sh\necho started >> /root/start-log\n")
    script.chmod(0o755)
    rc_local = root / "etc/rc.local"
    rc_local.write_text("#!/bin/sh\necho rc.local >> /root/start-log\n")
    rc_local.chmod(0o755)
    v.umount()
    v.start()
    deadline = time.monotonic() + 10
    while v.exec("test $(wc -l < /root/start-log) -ge 2").returncode != 0:
        assert time.monotonic() < deadline, "start-up scripts did not run"
        time.sleep(0.05)
    assert v.exec(["cat", "/root/start-log"], check=True).stdout == "started\nrc.local\n"


def test_orphans_are_reaped(ve):
    # a double fork: the grandchild is orphaned to pid 1 and exits soon after
    ve.exec("(sh -c 'echo $$ > /root/orphan; sleep 0.2' &) ; true", check=True)
    # Polled, not a fixed sleep: on a loaded machine the orphan may still run, or have just exited and not yet
    # been reaped (a zombie for a moment is no bug; one that stays is). It must vanish, leaving no zombie.
    deadline = time.monotonic() + 10
    while True:
        pid = ve.exec(["cat", "/root/orphan"]).stdout.strip()
        states = ve.exec(["ps", "-eo", "pid=,stat=,comm="], check=True).stdout
        table = [line.split() for line in states.strip().splitlines()]
        if pid and all(row[0] != pid for row in table) and not any("Z" in row[1] for row in table):
            break
        assert time.monotonic() < deadline, f"the orphan ({pid or 'not started'}) was not reaped:\n{states}"
        time.sleep(0.05)


@pytest.mark.ve(fs_layout="overlay")  # (its upper dir is read after the stop)
def test_sigterm_reaches_every_process(ve):
    """stop sends SIGTERM through init to all processes, which can shut down cleanly before the kill."""
    ve.exec(["bash", "-c",
             "nohup bash -c 'trap \"echo bye > /root/term-seen; exit 0\" TERM; touch /root/trap-set; "
             "while :; do sleep 0.1; done' >/dev/null 2>&1 &"], check=True)
    # the stop must not come before the trap is set (a fixed sleep can be too short on a loaded machine)
    deadline = time.monotonic() + 10
    while ve.exec(["test", "-e", "/root/trap-set"]).returncode != 0:
        assert time.monotonic() < deadline, "the background shell did not start"
        time.sleep(0.05)
    assert ve.stop() is True
    assert (ve.root / "private" / ve.veid / "upper/root/term-seen").read_text() == "bye\n"


def test_distro_init_missing_is_a_clean_error(rt):
    """Debian's minbase has no /sbin/init: INIT=distro fails to start, naming it, and leaves nothing."""
    veid = rt.create(start=False)
    rt.vzctl("set", veid, "--init", "distro", "--save")
    p = rt.vzctl("start", veid, check=False)
    assert p.returncode == 30 and "/sbin/init" in p.stderr, p.stderr
    assert rt.vzctl("status", veid).stdout.strip().endswith("unmounted down")
    assert rt.cgroup_dirs(veid) == []


def test_template_with_distro_init(seeded_cache_dir, tmp_path):
    """A template set that installs sysvinit and says `init = "distro"`: its VEs boot the distribution's init."""
    from conftest import run_vzpkg

    from .conftest import Runtime

    templates = tmp_path / "templates" / "debian-12-x86_64-sysv"
    templates.mkdir(parents=True)
    (templates / "template.toml").write_text(
        'inherits = "debian-12-x86_64"\nsummary = "sysvinit"\ndescription = "sysvinit as pid 1"\n'
        'packages = ["sysvinit-core"]\ninit = "distro"\n')
    project_templates = Path(__file__).resolve().parents[3] / "templates"
    build = run_vzpkg("create-cache", "debian-12-x86_64-sysv", "--cache-dir", str(seeded_cache_dir), "-q",
                      env={"VZPKG_TEMPLATE_DIR": f"{templates.parent}:{project_templates}"})
    assert build.returncode == 0, build.stderr
    rt = Runtime(tmp_path / "vzroot", seeded_cache_dir, "debian-12-x86_64-sysv")
    try:
        veid = rt.create()
        assert 'INIT="distro"' in (rt.root / "conf" / f"{veid}.conf").read_text()
        deadline = time.monotonic() + 10
        while rt.sh(veid, "pgrep -x getty >/dev/null").returncode != 0:  # inittab ran: init is sysvinit
            assert time.monotonic() < deadline, rt.vzctl("exec", veid, "ps", "-ef").stdout
            time.sleep(0.1)
        assert rt.vzctl("exec", veid, "ps", "-o", "comm=", "-p", "1").stdout.strip() == "init"
        assert rt.vzctl("stop", veid).returncode == 0
    finally:
        rt.cleanup()
