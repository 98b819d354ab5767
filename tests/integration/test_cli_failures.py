"""Failures that used to end in a traceback or a silent death: SIGTERM while checking a mirror, manifests that
are valid JSON but not objects, a read-only cache directory, a full cache filesystem."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PROJECT, VZPKG, copy_cache, run_vzpkg

from vzpkg.errors import DiskFullError, NotWritableError, VerifyError
from vzpkg.store.archive import pack

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="mounts file systems: needs root")]
NAME = "debian-12-x86_64"


def one_line_error(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("vzpkg: error: "), stderr


@pytest.fixture
def silent_server():
    """A server on 127.0.0.1 that accepts connections and never answers: (its URL, its listening socket)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/debian", server
    finally:
        server.close()


def test_sigterm_while_checking_a_mirror(debian12_cache: tuple[Path, str], tmp_path: Path,
                                        silent_server: tuple[str, socket.socket]) -> None:
    url, server = silent_server
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    copy_cache(debian12_cache[0], cache_dir, NAME)
    env = {**os.environ, "VZPKG_MIRROR_DEBIAN_SECURITY": "", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    proc = subprocess.Popen([*VZPKG, "status", NAME, "--refresh", "--mirror", url, "--cache-dir",
                             str(cache_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=PROJECT)
    # The signal goes in once vzpkg waits for the mirror: its connection is queued on the listening socket. (A
    # fixed 1 s could end before a loaded machine had vzpkg past its imports, where SIGTERM kills it at once.)
    readable, _, _ = select.select([server], [], [], 60)
    assert readable, "vzpkg did not connect to the mirror within 60 s"
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    _out, err = proc.communicate(timeout=10)
    assert time.monotonic() - started < 3
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err, err


def _fake_cache(cache_dir: Path, manifest_text: str) -> None:
    root = cache_dir / "root"
    (root / "etc").mkdir(parents=True)
    pack(root, cache_dir / f"{NAME}.tar.zst")
    (cache_dir / f"{NAME}.json").write_text(manifest_text)


@pytest.mark.parametrize("text", ["[]", "3", '"x"', "null"])
@pytest.mark.parametrize("command", ["verify-cache", "info", "status"])
def test_manifest_that_is_not_an_object(tmp_path: Path, text: str, command: str) -> None:
    _fake_cache(tmp_path, text)
    proc = run_vzpkg(command, NAME, "--cache-dir", str(tmp_path))
    assert proc.returncode == VerifyError.exit_code, proc.stderr
    one_line_error(proc.stderr)
    assert "not a JSON object" in proc.stderr and f"{NAME}.json" in proc.stderr


@pytest.fixture
def readonly_cache(debian12_cache: tuple[Path, str], tmp_path: Path):
    """A cache directory holding a real cache, bind-mounted read-only (chmod does not stop root)."""
    src = tmp_path / "rw"
    src.mkdir()
    copy_cache(debian12_cache[0], src, NAME)
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(ro)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
    try:
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)


@pytest.mark.parametrize("args", [("create-cache", NAME, "--force"), ("remove-cache", NAME), ("status", NAME),
                                  ("update-cache", NAME), ("rollback-cache", NAME)],
                         ids=lambda a: a[0])
def test_read_only_cache_dir(readonly_cache: Path, args: tuple[str, ...]) -> None:
    env = {"VZPKG_MIRROR_DEBIAN_SECURITY": ""}
    proc = run_vzpkg(*args, "--cache-dir", str(readonly_cache), env=env, timeout=300)
    assert proc.returncode == NotWritableError.exit_code, proc.stderr
    one_line_error(proc.stderr)
    assert str(readonly_cache) in proc.stderr
    assert run_vzpkg("verify-cache", NAME, "--cache-dir", str(readonly_cache)).returncode == 0


@pytest.fixture
def small_cache_dir(tmp_path: Path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "vzpkg-small-cache", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_create_cache_on_a_full_filesystem(small_cache_dir: Path) -> None:
    """A 20 MB cache directory cannot hold a Debian cache: one line naming the filesystem, nothing left."""
    proc = run_vzpkg("create-cache", NAME, "-q", "--no-stage-cache", "--cache-dir", str(small_cache_dir),
                     env={"VZPKG_BUILD_IN_MEMORY": "yes"})
    assert proc.returncode == DiskFullError.exit_code, proc.stderr
    one_line_error(proc.stderr)
    assert f"filesystem at {small_cache_dir}" in proc.stderr
    left = [p.name for p in small_cache_dir.iterdir() if p.name.startswith(".tmp-")]
    assert left == [], left
    assert not (small_cache_dir / f"{NAME}.tar.zst").exists()


def test_update_cache_on_a_full_filesystem(debian12_cache: tuple[Path, str], tmp_path: Path) -> None:
    """The new archive does not fit beside the old one: exit 15, the old cache is still there and verifies."""
    archive = debian12_cache[0] / f"{NAME}.tar.zst"
    size_mb = archive.stat().st_size // (1 << 20) + 8
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "vzpkg-small-cache", str(mnt)], check=True)
    try:
        copy_cache(debian12_cache[0], mnt, NAME)
        manifest = json.loads((mnt / f"{NAME}.json").read_text())
        manifest["template_digest"] = "changed"  # the definition "changed": update-cache has work to do
        (mnt / f"{NAME}.json").write_text(json.dumps(manifest))
        proc = run_vzpkg("update-cache", NAME, "-q", "--cache-dir", str(mnt), env={"VZPKG_BUILD_IN_MEMORY": "yes"})
        assert proc.returncode == DiskFullError.exit_code, proc.stderr
        one_line_error(proc.stderr)
        assert f"filesystem at {mnt}" in proc.stderr
        assert [p.name for p in mnt.iterdir() if p.name.startswith(".tmp-")] == []
        assert run_vzpkg("verify-cache", NAME, "--cache-dir", str(mnt)).returncode == 0
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)
