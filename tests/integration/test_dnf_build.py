"""create-cache with the dnf backend against an RPM repository the tests build, sign and serve on 127.0.0.1.

The repository is built once per session (rpmrepo.py, a few seconds); each build runs the real CLI in a
subprocess and asserts on its exit code (vzpkg/errors.py), its stderr and what is left in the cache directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import rpmrepo

from vzpkg.pkgmgr.rpmdb import find_rpmdb, read_rpmdb

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (dnf --installroot, chroot, mounts)"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in rpmrepo.TOOLS) or not rpmrepo.BUSYBOX.is_file(),
                       reason="needs dnf, rpm, rpmbuild, rpmsign, createrepo_c, gpg and busybox-static"),
]

BASE_PACKAGES = ["vzt-filesystem", "vzt-busybox", "vzt-post", "vzt-a", "vzt-epoch"]
EXIT = {"mirror": 7, "signature": 8, "build": 9}


def _template(packages: list[str], key: Path, baseurl: str = "{{ mirror }}/repo", gpgcheck: bool = True,
              repo_gpgcheck: bool = False) -> str:
    return (
        'summary = "vzpkg dnf test"\n'
        'description = "Built from the test RPM repository."\n'
        'distribution = "almalinux"\nrelease = "9"\narchitecture = "x86_64"\npackage_manager = "dnf"\n'
        f"packages = {json.dumps(packages)}\n"
        f"gpg_keys = [{json.dumps(str(key))}]\n"
        f'repositories = [{{ id = "vzt", name = "vzpkg test", baseurl = "{baseurl}", '
        f"gpgcheck = {'true' if gpgcheck else 'false'}, repo_gpgcheck = {'true' if repo_gpgcheck else 'false'} }}]\n"
    )


@dataclass
class Env:
    repo: Path
    server: rpmrepo.Server
    templates: Path
    tmp: Path

    def run(self, *args: str, cache: Path, mirror: str | None = None, extra_env: dict[str, str] | None = None):
        env = {**os.environ, "VZPKG_TEMPLATE_DIR": str(self.templates), "VZPKG_CACHE_DIR": str(cache),
               "VZPKG_CONFIG": str(self.tmp / "no-config.toml"), **(extra_env or {})}
        env.pop("VZPKG_MIRROR", None)
        cmd = [sys.executable, "-m", "vzpkg.cli.vzpkg", *args]
        if mirror is not None:
            cmd += ["--mirror", mirror]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def rpmenv(tmp_path_factory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("rpmrepo")
    repo = rpmrepo.build_repository(tmp)
    rpmrepo.createrepo(repo, sign_base=tmp)  # repodata/repomd.xml.asc, for the repo_gpgcheck template
    key = repo / "RPM-GPG-KEY-vzt"
    templates = tmp / "templates"
    port = rpmrepo.closed_port()
    cases = {
        "vztest-1-x86_64": _template(BASE_PACKAGES, key),
        "vztest-1-x86_64-unsigned": _template(BASE_PACKAGES + ["vzt-unsigned"], key),
        "vztest-1-x86_64-tampered": _template(BASE_PACKAGES + ["vzt-tampered"], key),
        "vztest-1-x86_64-missing": _template(BASE_PACKAGES + ["vzt-no-such-package"], key),
        "vztest-1-x86_64-brokenmd": _template(BASE_PACKAGES, key, baseurl="{{ mirror }}/broken"),
        "vztest-1-x86_64-unreachable": _template(BASE_PACKAGES, key, baseurl=f"http://127.0.0.1:{port}/repo"),
        "vztest-1-x86_64-badpre": _template(BASE_PACKAGES + ["vzt-badpre"], key),
        "vztest-1-x86_64-slow": _template(BASE_PACKAGES + ["vzt-slow"], key),
        "vztest-1-x86_64-nogpg": _template(BASE_PACKAGES + ["vzt-unsigned"], key, gpgcheck=False),
        "vztest-1-x86_64-repogpg": _template(BASE_PACKAGES, key, repo_gpgcheck=True),
    }
    for name, text in cases.items():
        (templates / name).mkdir(parents=True)
        (templates / name / "template.toml").write_text(text)
    with rpmrepo.Server(tmp) as server:
        yield Env(repo=repo, server=server, templates=templates, tmp=tmp)


@pytest.fixture(scope="session")
def built(rpmenv, tmp_path_factory) -> dict:
    """The good template, built once: the CLI's result, the manifest and the unpacked root."""
    cache = tmp_path_factory.mktemp("dnfcache")
    proc = rpmenv.run("create-cache", "--verbose", "vztest-1-x86_64", cache=cache, mirror=rpmenv.server.url)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((cache / "vztest-1-x86_64.json").read_text())
    root = tmp_path_factory.mktemp("dnfroot")
    subprocess.run(["tar", "--zstd", "-xpf", str(cache / "vztest-1-x86_64.tar.zst"), "-C", str(root)], check=True)
    return {"proc": proc, "cache": cache, "manifest": manifest, "root": root}


def _nothing_published(cache: Path, name: str) -> None:
    left = sorted(p.name for p in cache.iterdir())
    assert not (cache / f"{name}.tar.zst").exists() and not (cache / f"{name}.json").exists(), left
    assert not [n for n in left if n.startswith(".tmp-")], left
    assert not [n for n in left if n.startswith(name)], left


def test_create_cache_succeeds(built):
    proc = built["proc"]
    assert "published" in proc.stderr
    assert "rpmdb /var/lib/rpm read with the rpm Python bindings" in proc.stderr  # the verbose note
    m = built["manifest"]
    assert m["package_manager"] == "dnf"
    assert m["bootstrapper"] in ("dnf", "yum")
    assert m["rpmdb_reader"] == "python-rpm"
    assert m["rpmdb_path"] == "/var/lib/rpm"
    assert m["mirror"] == built["manifest"]["mirrors"]["mirror"]
    [repo] = m["repositories"]
    assert repo["id"] == "vzt" and repo["gpgcheck"] is True and repo["revision"]
    assert repo["baseurl"].startswith("http://127.0.0.1:")


def test_manifest_lists_packages_with_epoch_version_release(built):
    pkgs = {p["name"]: p for p in built["manifest"]["packages"]}
    assert set(pkgs) == {"vzt-filesystem", "vzt-busybox", "vzt-post", "vzt-a", "vzt-b", "vzt-c", "vzt-epoch"}
    assert "gpg-pubkey" not in pkgs
    epoch = pkgs["vzt-epoch"]  # 1:1.5-1 is newer than 2.0-1: the Epoch bump wins
    assert (epoch["epoch"], epoch["version"], epoch["release"], epoch["arch"]) == (1, "1.5", "1", "noarch")
    assert epoch["evr"] == "1:1.5-1"
    bb = pkgs["vzt-busybox"]
    assert (bb["epoch"], bb["version"], bb["release"], bb["arch"]) == (0, "1.35.0", "1", "x86_64")
    assert built["manifest"]["package_count"] == 7


def test_root_runs_a_shell(built):
    proc = subprocess.run(["chroot", str(built["root"]), "/bin/sh", "-c", "echo ok"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_post_scriptlet_ran(built):
    marker = built["root"] / "var/lib/vzt-post.marker"
    assert marker.read_text().strip() == "post ran: 1"


def test_root_is_clean(built):
    root = built["root"]
    assert (root / "var/lib/rpm/rpmdb.sqlite").is_file()
    leftovers = [p for pat in ("var/lib/rpm/.rpm.lock", "var/lib/rpm/__db.*", "var/lib/rpm/*-wal", "var/lib/rpm/*-shm",
                               "var/lib/dnf/*-wal", "var/cache/dnf/*", "var/log/dnf*", "root/.rpmdb")
                 for p in root.glob(pat)]
    assert leftovers == []
    assert not (root / "etc/yum.repos.d").exists() or not list((root / "etc/yum.repos.d").iterdir())


def test_package_cache_kept_outside_the_root(built):
    cached = list((built["cache"] / ".packages" / "almalinux-9-x86_64").rglob("*.rpm"))
    assert {p.name for p in cached} >= {"vzt-busybox-1.35.0-1.x86_64.rpm", "vzt-epoch-1.5-1.noarch.rpm"}


def test_rpm_command_reader_agrees(built):
    root = built["root"]
    dbpath = find_rpmdb(root)
    by_bindings, reader = read_rpmdb(root, dbpath)
    by_command, reader2 = read_rpmdb(root, dbpath, force_command=True)
    assert (reader, reader2) == ("python-rpm", "rpm-command")
    assert by_bindings == by_command == built["manifest"]["packages"]


def test_rpm_command_used_when_bindings_cannot_load(built, monkeypatch):
    monkeypatch.setitem(sys.modules, "rpm", None)  # `import rpm` now raises ImportError
    packages, reader = read_rpmdb(built["root"], "/var/lib/rpm")
    assert reader == "rpm-command"
    assert packages == built["manifest"]["packages"]


def test_rebuild_uses_the_package_cache_and_the_rpm_command_fallback(rpmenv, built):
    proc = rpmenv.run("create-cache", "--force", "--verbose", "vztest-1-x86_64", cache=built["cache"],
                      mirror=rpmenv.server.url, extra_env={"VZPKG_RPMDB_READER": "rpm-command", "VZPKG_STAGE_CACHE": "0"})
    assert proc.returncode == 0, proc.stderr
    assert "read with the rpm command" in proc.stderr
    m = json.loads((built["cache"] / "vztest-1-x86_64.json").read_text())
    assert m["rpmdb_reader"] == "rpm-command"
    assert m["packages"] == built["manifest"]["packages"]
    assert "[SKIPPED] vzt-busybox-1.35.0-1.x86_64.rpm: Already downloaded" in proc.stderr


@pytest.mark.parametrize("name", ["vztest-1-x86_64-unsigned", "vztest-1-x86_64-tampered"])
def test_bad_signature_fails_and_publishes_nothing(rpmenv, tmp_path, name):
    cache = tmp_path / "cache"
    proc = rpmenv.run("create-cache", name, cache=cache, mirror=rpmenv.server.url)
    assert proc.returncode == EXIT["signature"], proc.stderr
    assert "signature" in proc.stderr or "digest" in proc.stderr
    assert ("vzt-unsigned" if "unsigned" in name else "vzt-tampered") in proc.stderr
    _nothing_published(cache, name)


def test_gpgcheck_off_is_recorded(rpmenv, tmp_path):
    cache = tmp_path / "cache"
    proc = rpmenv.run("create-cache", "--verbose", "vztest-1-x86_64-nogpg", cache=cache, mirror=rpmenv.server.url)
    assert proc.returncode == 0, proc.stderr
    assert "NOT checked" in proc.stderr
    m = json.loads((cache / "vztest-1-x86_64-nogpg.json").read_text())
    assert m["unsigned_repositories"] == ["vzt"]
    assert "vzt-unsigned" in {p["name"] for p in m["packages"]}


def test_missing_package(rpmenv, tmp_path):
    cache = tmp_path / "cache"
    proc = rpmenv.run("create-cache", "vztest-1-x86_64-missing", cache=cache, mirror=rpmenv.server.url)
    assert proc.returncode == EXIT["build"], proc.stderr
    assert "vzt-no-such-package" in proc.stderr and "not found" in proc.stderr
    _nothing_published(cache, "vztest-1-x86_64-missing")


def _one_error_line(stderr: str) -> str:
    """The single `vzpkg: error:` line of STDERR (no traceback, no second error line)."""
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("vzpkg: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_failing_scriptlet_is_one_line_with_dnfs_words(rpmenv, tmp_path):
    """dnf itself fails (a %pre scriptlet exits 3): exit 9, one line quoting the scriptlet's failure."""
    cache = tmp_path / "cache"
    proc = rpmenv.run("create-cache", "vztest-1-x86_64-badpre", cache=cache, mirror=rpmenv.server.url)
    assert proc.returncode == EXIT["build"], proc.stderr
    line = _one_error_line(proc.stderr)
    assert "exit status 1" in line and "%prein(vzt-badpre-1.0-1.noarch) scriptlet failed, exit status 3" in line, line
    _nothing_published(cache, "vztest-1-x86_64-badpre")


def test_failing_mount_is_a_build_error_not_a_traceback(rpmenv, tmp_path):
    """The bind mount of the package cache fails (a host `mount` that refuses --bind, as without CAP_SYS_ADMIN):
    exit 9 and one line naming the mount, its status and mount's message; before, a CalledProcessError
    escaped as an internal error (exit 1)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real_mount = shutil.which("mount")
    (bin_dir / "mount").write_text(f'#!/bin/sh\nif [ "$1" = --bind ]; then echo "mount: $3: permission denied" >&2; '
                                   f'exit 32; fi\nexec {real_mount} "$@"\n')
    (bin_dir / "mount").chmod(0o755)
    cache = tmp_path / "cache"
    proc = rpmenv.run("create-cache", "vztest-1-x86_64", cache=cache, mirror=rpmenv.server.url,
                      extra_env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert proc.returncode == EXIT["build"], proc.stderr
    line = _one_error_line(proc.stderr)
    assert "mounting the package cache" in line and "exit status 32" in line and "permission denied" in line, line
    assert str(cache) not in open("/proc/self/mountinfo").read()
    _nothing_published(cache, "vztest-1-x86_64")


def test_trickling_package_ends_at_build_timeout(rpmenv, tmp_path):
    """dnf's own limits stop a repository that stalls (timeout 15 s below minrate, 1000 B/s), not one that trickles
    just above it (here ~2.5 kB/s: the 2 MB busybox package would take 13 minutes): build_timeout around the dnf
    run does, as around apt's (exit 7, one line, nothing published, no dnf process left)."""
    from badmirror import BadMirror

    rpm = next(rpmenv.repo.rglob("vzt-busybox-*.rpm"))
    mirror = BadMirror(rpmenv.tmp)
    rpm_path = "/" + str(rpm.relative_to(rpmenv.tmp))
    mirror.set(rpm_path, "trickle", delay=0.05, size=128)
    cache = tmp_path / "cache"
    start = time.monotonic()
    try:
        proc = rpmenv.run("create-cache", "vztest-1-x86_64", cache=cache, mirror=mirror.start(),
                          extra_env={"VZPKG_BUILD_TIMEOUT": "15"})
    finally:
        mirror.stop()
    took = time.monotonic() - start
    assert proc.returncode == EXIT["mirror"], proc.stderr
    [line] = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith("vzpkg: error: dnf install ") and "not finished within 15 s (build_timeout)" in line, line
    assert "still downloading" in line and "Traceback" not in proc.stderr, line
    assert rpm_path in mirror.requests  # the trickle is what it waited for
    assert took < 60, f"create-cache took {took:.0f} s with build_timeout 15"
    _nothing_published(cache, "vztest-1-x86_64")
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, str(tmp_path))]


def _cmdline_has(proc: Path, text: str) -> bool:
    try:
        return text.encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def test_unreachable_repository(rpmenv, tmp_path):
    cache = tmp_path / "cache"
    proc = rpmenv.run("create-cache", "vztest-1-x86_64-unreachable", cache=cache, mirror=rpmenv.server.url)
    assert proc.returncode == EXIT["mirror"], proc.stderr
    assert "127.0.0.1" in proc.stderr and "cannot connect" in proc.stderr
    _nothing_published(cache, "vztest-1-x86_64-unreachable")


def test_unreachable_mirror_override(rpmenv, tmp_path):
    cache = tmp_path / "cache"
    proc = rpmenv.run("create-cache", "vztest-1-x86_64", cache=cache, mirror=f"http://127.0.0.1:{rpmrepo.closed_port()}")
    assert proc.returncode == EXIT["mirror"], proc.stderr
    _nothing_published(cache, "vztest-1-x86_64")


def test_broken_repomd(rpmenv, tmp_path):
    cache = tmp_path / "cache"
    proc = rpmenv.run("create-cache", "vztest-1-x86_64-brokenmd", cache=cache, mirror=rpmenv.server.url)
    assert proc.returncode == EXIT["mirror"], proc.stderr
    assert "repomd.xml" in proc.stderr and "broken" in proc.stderr
    _nothing_published(cache, "vztest-1-x86_64-brokenmd")


def test_missing_key_file(rpmenv, tmp_path):
    tdir = tmp_path / "templates" / "vztest-1-x86_64-nokey"
    tdir.mkdir(parents=True)
    (tdir / "template.toml").write_text(_template(BASE_PACKAGES, tmp_path / "no-such-key"))
    cache = tmp_path / "cache"
    env = Env(repo=rpmenv.repo, server=rpmenv.server, templates=tmp_path / "templates", tmp=tmp_path)
    proc = env.run("create-cache", "vztest-1-x86_64-nokey", cache=cache, mirror=rpmenv.server.url)
    assert proc.returncode == EXIT["signature"], proc.stderr
    assert "no-such-key" in proc.stderr
    _nothing_published(cache, "vztest-1-x86_64-nokey")


def test_stage_restore_keeps_the_manifest(rpmenv, built):
    proc = rpmenv.run("create-cache", "--force", "vztest-1-x86_64", cache=built["cache"], mirror=rpmenv.server.url)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((built["cache"] / "vztest-1-x86_64.json").read_text())
    assert m["packages"] == built["manifest"]["packages"]
    assert m["rpmdb_path"] == "/var/lib/rpm" and m["rpmdb_reader"] == "python-rpm"


def _processes_below(path: Path) -> list[int]:
    real = os.path.realpath(path) + "/"
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if (os.readlink(f"/proc/{pid}/root") + "/").startswith(real):
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_interrupted_during_a_scriptlet(rpmenv, tmp_path):
    """SIGTERM while a %post runs: dnf and the scriptlet are stopped, mounts undone, nothing published."""
    cache = tmp_path / "cache"
    env = {**os.environ, "VZPKG_TEMPLATE_DIR": str(rpmenv.templates), "VZPKG_CACHE_DIR": str(cache),
           "VZPKG_CONFIG": str(rpmenv.tmp / "no-config.toml")}
    proc = subprocess.Popen([sys.executable, "-m", "vzpkg.cli.vzpkg", "create-cache", "vztest-1-x86_64-slow",
                             "--mirror", rpmenv.server.url], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(cache.glob(".tmp-*/root/var/lib/vzt-slow.started")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the slow scriptlet never started"
            time.sleep(0.1)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert time.monotonic() - start < 15
    assert _processes_below(cache) == []
    with open("/proc/self/mountinfo") as f:
        assert str(cache) not in f.read()
    _nothing_published(cache, "vztest-1-x86_64-slow")


def _gpg_agents_mentioning(path: Path) -> set[int]:
    """gpg-agent processes whose command line, working directory or environment names PATH (or below)."""
    needle = os.fsencode(os.path.realpath(path))
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            if os.path.basename(cmdline.split(b"\0")[0]) != b"gpg-agent":
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
            cwd = os.fsencode(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            continue
        if any(needle in text for text in (cmdline, environ, cwd)):
            found.add(int(pid))
    return found


@pytest.mark.skipif(shutil.which("unshare") is None or not Path("/run/user").is_dir(),
                    reason="needs unshare and /run/user")
def test_repo_gpgcheck_build_leaves_no_gpg_agent_or_socket_dir(rpmenv, tmp_path):
    """repo_gpgcheck makes dnf (librepo, gpgme) start a gpg-agent for the keyring it keeps in the package cache;
    nothing of a build may outlive it: no process, no socket directory in /run/user/0/gnupg.

    The build runs in a mount namespace of its own with a fresh tmpfs on /run/user holding 0/ (as on a host where
    root has a login session), so gnupg puts its socket directories there and the test sees every one."""
    name = "vztest-1-x86_64-repogpg"
    cache = tmp_path / "cache"
    listing = tmp_path / "run-user-0-gnupg.txt"
    assert _gpg_agents_mentioning(tmp_path) == set()
    script = ('mount -t tmpfs -o mode=0755 vzpkg-test /run/user && mkdir -m 0700 /run/user/0 && "$@"; rc=$?; '
              'ls -A /run/user/0/gnupg > "$LISTING" 2>/dev/null; exit $rc')
    env = {**os.environ, "VZPKG_TEMPLATE_DIR": str(rpmenv.templates), "VZPKG_CACHE_DIR": str(cache),
           "VZPKG_CONFIG": str(rpmenv.tmp / "no-config.toml"), "LISTING": str(listing)}
    env.pop("VZPKG_MIRROR", None)
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                           sys.executable, "-m", "vzpkg.cli.vzpkg", "create-cache", "--verbose", name,
                           "--mirror", rpmenv.server.url], env=env, capture_output=True, text=True, timeout=300)
    left = _gpg_agents_mentioning(tmp_path)
    for pid in left:  # the test's own leftovers: do not let them outlive the test either
        os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, proc.stderr
    assert "repository vzt" in proc.stderr
    m = json.loads((cache / f"{name}.json").read_text())
    assert {p["name"] for p in m["packages"]} >= set(BASE_PACKAGES)
    assert left == set(), f"gpg-agent processes left by the build: {sorted(left)}"
    socket_dirs = listing.read_text().split() if listing.exists() else []
    assert socket_dirs == [], f"socket directories left in /run/user/0/gnupg: {socket_dirs}"
