"""Publishing a cache is atomic: killed at any fsync or rename, or out of space at any write, the cache NAME is
a consistent (archive, manifest) pair, the old one or the new one, and the next run removes what was left.

A publish needs no mirror: a tiny packed root and a manifest, published by publish_driver.py under strace
(`-e inject=...:signal=SIGKILL:when=N` for every N until the publish completes) or on a small tmpfs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_vzpkg

from vzpkg.errors import DiskFullError
from vzpkg.runtime.storage import cache_sha256
from vzpkg.store.archive import pack
from vzpkg.store.cache import PUBLISHED_DIR, CacheStore

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")]

NAME = "debian-12-x86_64"
DRIVER = Path(__file__).resolve().parent / "publish_driver.py"
PROJECT = Path(__file__).resolve().parents[2]
KILL_AT = "rename,renameat,renameat2,fsync,fdatasync"


def make_archive(tmp: Path, label: str) -> tuple[Path, dict]:
    root = tmp / f"root-{label}"
    (root / "etc").mkdir(parents=True)
    (root / "etc/label").write_text(label + "\n")
    archive = tmp / f"{label}.tar.zst"
    result = pack(root, archive, source_date_epoch=0)
    manifest = {"name": NAME, "created": label, "sha256": result.sha256, "packed_size": result.packed_size,
                "unpacked_size": result.unpacked_size, "archive": f"{NAME}.tar.zst", "packages": []}
    return archive, manifest


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    tmp = tmp_path_factory.mktemp("publish-archives")
    return {label: make_archive(tmp, label) for label in ("old", "new")}


def seed_old(cache_dir: Path, archives, layout: str) -> None:
    """The old cache: published by this vzpkg (symlinks), or two regular files as an older vzpkg left them."""
    archive, manifest = archives["old"]
    cache_dir.mkdir(parents=True, exist_ok=True)
    if layout == "regular":
        shutil.copyfile(archive, cache_dir / f"{NAME}.tar.zst")
        (cache_dir / f"{NAME}.json").write_text(json.dumps(manifest))
    else:
        tmp = cache_dir / f".tmp-{NAME}-archive-1"
        shutil.copyfile(archive, tmp)
        CacheStore(cache_dir).publish(NAME, tmp, manifest)


def driver(cache_dir: Path, archive: Path, manifest: dict, strace: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(DRIVER), str(cache_dir), NAME, str(archive), json.dumps(manifest)]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(PROJECT)}
    if strace:
        cmd = ["strace", "-f", "-qq", "-o", "/dev/null", *strace, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def state(cache_dir: Path, archives) -> str:
    """'old' or 'new' when NAME is that consistent pair (else the assertion fails)."""
    store = CacheStore(cache_dir)
    result = store.verify(NAME)  # the manifest read through NAME.json, the archive through NAME.tar.zst
    # What `vzctl create` reads: plain open() of <cache_dir>/<name>.json.
    assert cache_sha256(cache_dir, NAME) == result["sha256"]
    labels = [label for label, (_a, m) in archives.items() if m["sha256"] == result["sha256"]]
    assert len(labels) == 1, result
    assert store.read_manifest(NAME)["created"] == labels[0]
    return labels[0]


def assert_next_run_cleans(cache_dir: Path) -> None:
    store = CacheStore(cache_dir)
    store.clean_leftovers(NAME)
    assert store.leftovers(NAME) == []
    assert not [p.name for p in cache_dir.iterdir() if p.name.startswith(".tmp-")]
    pdir = cache_dir / PUBLISHED_DIR / NAME
    if (pdir / "current").is_symlink():
        assert sorted(p.name for p in pdir.iterdir()) == sorted(["current", os.readlink(pdir / "current")])
    else:  # killed while adopting regular files: they are still the cache
        assert not (cache_dir / f"{NAME}.json").is_symlink()
        assert not pdir.exists() or not any(pdir.iterdir())


def ensure_strace() -> None:
    if shutil.which("strace") is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "strace"], check=True, capture_output=True)


@pytest.mark.parametrize("layout", ["published", "regular"])
def test_killed_at_every_fsync_and_rename(tmp_path: Path, archives, layout: str) -> None:
    ensure_strace()
    outcomes = []
    for n in range(1, 60):
        cache_dir = tmp_path / f"kill-{n}"
        seed_old(cache_dir, archives, layout)
        proc = driver(cache_dir, archives["new"][0], archives["new"][1],
                      strace=["-e", f"inject={KILL_AT}:signal=SIGKILL:when={n}"])
        killed = proc.returncode != 0
        assert proc.returncode in (0, -9, 128 + 9, 137), proc.stderr
        outcome = state(cache_dir, archives)
        outcomes.append((n, killed, outcome))
        # The CLI agrees, and the next run on the template finds and removes what was left.
        verify = run_vzpkg("verify-cache", NAME, "--cache-dir", str(cache_dir)) if n % 4 == 1 or not killed else None
        assert verify is None or verify.returncode == 0, verify.stderr
        assert_next_run_cleans(cache_dir)
        assert state(cache_dir, archives) == outcome
        if not killed:
            assert outcome == "new"
            break
        shutil.rmtree(cache_dir)
    else:
        raise AssertionError("the publish never completed under strace")
    kills = [o for o in outcomes if o[1]]
    assert len(kills) >= 4, outcomes  # mkdir, write, fsyncs, the switch, the links: many points to die at
    assert {o[2] for o in kills} == {"old", "new"}, outcomes  # killed before and after the switch


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=64", "vzpkg-test", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def _fill(mnt: Path, free_inodes: int | None, free_bytes: int | None) -> None:
    """Use up the tmpfs's inodes until FREE_INODES are left, and its space until about FREE_BYTES are."""
    fill = mnt / "fill"
    fill.mkdir(exist_ok=True)
    if free_bytes is not None:
        fd = os.open(fill / "bytes", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        os.truncate(fill / "bytes", max(os.path.getsize(fill / "bytes") - free_bytes, 0))
    if free_inodes is not None:
        i = 0
        while os.statvfs(mnt).f_ffree > free_inodes:
            (fill / f"i{i}").touch()
            i += 1
        assert os.statvfs(mnt).f_ffree == free_inodes


@pytest.mark.parametrize("layout", ["published", "regular"])
@pytest.mark.parametrize("free", [(0, None), (1, None), (2, None), (3, None), (4, None), (None, 0)],
                         ids=["0-inodes", "1-inode", "2-inodes", "3-inodes", "4-inodes", "0-bytes"])
def test_out_of_space_at_each_write(small_tmpfs: Path, archives, layout: str, free) -> None:
    cache_dir = small_tmpfs / "cache"
    seed_old(cache_dir, archives, layout)
    work = cache_dir / f".tmp-{NAME}-archive-99999"
    shutil.copyfile(archives["new"][0], work)
    _fill(small_tmpfs, *free)
    proc = driver(cache_dir, work, archives["new"][1])
    assert proc.returncode in (0, DiskFullError.exit_code), proc.stderr
    if free in ((0, None), (1, None), (None, 0)):  # no directory, no manifest file, no page for the manifest
        assert proc.returncode == DiskFullError.exit_code, proc.stderr
    outcome = state(cache_dir, archives)
    if proc.returncode == DiskFullError.exit_code:
        assert outcome == "old"
        assert f"at {small_tmpfs}" in proc.stderr, proc.stderr  # names the full filesystem
        assert CacheStore(cache_dir).leftovers(NAME) == [], "a failed publish left its half-written pair"
    else:
        assert outcome == "new"
    shutil.rmtree(small_tmpfs / "fill")
    assert_next_run_cleans(cache_dir)
    assert run_vzpkg("verify-cache", NAME, "--cache-dir", str(cache_dir)).returncode == 0


def test_remove_cache_and_publish_again(tmp_path: Path, archives) -> None:
    """remove-cache takes the names and the published pair; list/info/verify work through the symlinks."""
    cache_dir = tmp_path / "cache"
    seed_old(cache_dir, archives, "published")
    assert (cache_dir / f"{NAME}.json").is_symlink() and (cache_dir / f"{NAME}.tar.zst").is_symlink()
    listing = json.loads(run_vzpkg("list", "--json", "--cache-dir", str(cache_dir), check=True).stdout)
    row = next(r for r in listing if r["name"] == NAME)
    assert row["cached"] and row["size"] == archives["old"][1]["packed_size"]
    assert run_vzpkg("remove-cache", NAME, "--cache-dir", str(cache_dir)).returncode == 0
    assert sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith(".locks")) == []
    assert driver(cache_dir, archives["new"][0], archives["new"][1]).returncode == 0
    assert state(cache_dir, archives) == "new"
