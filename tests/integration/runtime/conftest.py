"""Fixtures for the VE runtime tests: a temporary VZ root per session, and a helper that creates VEs with
unique ids (cgroup names are host-wide) and always stops and destroys them afterwards."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[3]
VZCTL = [sys.executable, "-m", "vzpkg.cli.vzctl"]
PROBE_SRC = Path(__file__).with_name("probe.c")
_counter = itertools.count(1)


def cgroup_name(root: Path, veid: str) -> str:
    """A VE's cgroup name below vzpkg/: <crc32 of the VZ root's real path>-<VEID> (computed here independently of
    the runtime's layout.cgroup_name, so that a change of the scheme shows up in the tests)."""
    import zlib

    return f"{zlib.crc32(os.fsencode(os.path.realpath(root))):08x}-{veid}"


def cgroup_dirs(name: str) -> list[Path]:
    """Every cgroup directory named vzpkg/<name> in any mounted hierarchy (NAME: see cgroup_name)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            if post.split()[:1] in (["cgroup"], ["cgroup2"]):
                d = Path(pre.split()[4]) / "vzpkg" / name
                if d.is_dir():
                    found.append(d)
    return found


def mounts_below(path: Path) -> list[str]:
    prefix = str(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            if point == prefix or point.startswith(prefix + "/"):
                out.append(point)
    return out


class Runtime:
    def __init__(self, root: Path, cache_dir: Path, template: str) -> None:
        self.root = root
        self.cache_dir = cache_dir
        self.template = template
        self.env = {**os.environ, "VZ_ROOT": str(root), "VZPKG_CACHE_DIR": str(cache_dir),
                    "PYTHONPATH": str(PROJECT)}
        self.created: list[str] = []

    def new_id(self) -> str:
        return f"t{os.getpid()}n{next(_counter)}"

    def vzctl(self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60,
              ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*VZCTL, *args], env=self.env, capture_output=True, text=True, input=input,
                              timeout=timeout, cwd=PROJECT)
        if check and proc.returncode != 0:
            raise AssertionError(f"vzctl {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def create(self, *opts: str, veid: str | None = None, start: bool = True) -> str:
        veid = veid or self.new_id()
        self.created.append(veid)
        self.vzctl("create", veid, "--ostemplate", self.template, *opts)
        if start:
            self.vzctl("start", veid)
        return veid

    def sh(self, veid: str, script: str, *, check: bool = False, timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
        return self.vzctl("exec", veid, "/bin/sh", "-c", script, check=check, timeout=timeout)

    def cgroup_dirs(self, veid: str) -> list[Path]:
        return cgroup_dirs(cgroup_name(self.root, veid))

    def id_shift(self, veid: str) -> int:
        """The host uid of the VE's root (its ID_SHIFT: a range of its own unless created with --idmap shared)."""
        conf = (self.root / "conf" / f"{veid}.conf").read_text()
        return int(next(x for x in conf.splitlines() if x.startswith("ID_SHIFT=")).split('"')[1])

    def private(self, veid: str) -> Path:
        return self.root / "private" / veid

    def upper(self, veid: str) -> Path:
        """The VE's overlay upper dir: private/<id>/upper, or in its mounted image (image layout, while mounted)."""
        in_image = self.private(veid) / "fs" / "upper"
        return in_image if in_image.is_dir() else self.private(veid) / "upper"

    def ve_root(self, veid: str) -> Path:
        return self.root / "root" / veid

    def init_pid(self, veid: str) -> int:
        text = (self.root / "run" / f"{veid}.state").read_text()
        return int(dict(line.split("=", 1) for line in text.splitlines())["pid"])

    def cleanup(self) -> None:
        problems = []
        for veid in self.created:
            if (self.root / "conf" / f"{veid}.conf").exists():
                p = self.vzctl("destroy", veid, "--force", check=False)
                if p.returncode != 0:
                    problems.append(f"destroy {veid}: {p.stderr}")
            left = self.cgroup_dirs(veid) + [Path(m) for m in mounts_below(self.ve_root(veid))]
            if left:
                problems.append(f"{veid} left {left}")
        self.created.clear()
        assert not problems, problems


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def vz_root(tmp_path_factory, debian12_cache):
    root = tmp_path_factory.mktemp("vzroot")
    # `timeout` and CI runners stop a run with SIGTERM, which would skip every teardown and leave VEs
    # running: turn it into an interrupt so the fixtures below still stop and destroy them.
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        yield root
    finally:
        signal.signal(signal.SIGTERM, previous)
    # safety net for VEs a crashed test left behind
    from vzpkg.runtime import ve
    from vzpkg.runtime.layout import Layout

    layout = Layout(root)
    for veid in layout.veids():
        try:
            ve.destroy(layout, veid, force=True)
        except Exception:
            pass
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def rt(vz_root, debian12_cache):
    cache_dir, name = debian12_cache
    runtime = Runtime(vz_root, cache_dir, name)
    try:
        yield runtime
    finally:
        runtime.cleanup()


@pytest.fixture(scope="session")
def ve_template(vz_root, debian12_cache):
    """The session template of vzpkg's own pytest plugin (the `ve` and `ve_factory` fixtures,
    vzpkg/pytest_plugin.py), pointed at this session's VZ root and the shared test cache."""
    from vzpkg.pytest_plugin import VETemplate

    cache_dir, name = debian12_cache
    return VETemplate(name, cache_dir, vz_root)


@pytest.fixture
def ve_factory(ve_factory, vz_root):
    """The plugin's ve_factory, with the check `rt` makes after a test: each VE destroyed leaves no cgroup and
    no mount (the plugin's own teardown then finds nothing left to do)."""
    yield ve_factory
    veids = [v.veid for v in ve_factory.made]
    problems = ve_factory.destroy_all()
    for veid in veids:
        left = cgroup_dirs(cgroup_name(vz_root, veid)) + mounts_below(vz_root / "root" / veid)
        if left:
            problems.append(f"{veid} left {left}")
    assert not problems, problems


@pytest.fixture(scope="session")
def open_root(debian12_cache):
    """A second VZ root that other host users could reach if the runtime let them: under /var/tmp with mode 0755
    all the way (pytest's own temporary directories are 0700, which would hide everything)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="vzpkg-open-root-", dir="/var/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        from vzpkg.runtime import ve
        from vzpkg.runtime.layout import Layout

        for veid in Layout(root).veids():
            try:
                ve.destroy(Layout(root), veid, force=True)
            except Exception:
                pass
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def open_rt(open_root, debian12_cache):
    cache_dir, name = debian12_cache
    runtime = Runtime(open_root, cache_dir, name)
    try:
        yield runtime
    finally:
        runtime.cleanup()


@pytest.fixture(scope="session")
def probe_binary(tmp_path_factory) -> Path:
    """A static helper that tries one privileged system call (see probe.c)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the probe")
    out = tmp_path_factory.mktemp("probe") / "probe"
    subprocess.run(["gcc", "-static", "-O1", "-o", str(out), str(PROBE_SRC)], check=True, capture_output=True)
    return out


def install_probe(rt: Runtime, veid: str, probe: Path) -> str:
    dest = rt.ve_root(veid) / "usr/local/bin/probe"
    shutil.copy2(probe, dest)
    return "/usr/local/bin/probe"
