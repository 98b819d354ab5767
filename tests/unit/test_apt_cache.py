"""The apt package cache moves .debs and index files in and out of a root (hard links on one filesystem)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vzpkg.pkgmgr import apt_cache


def test_round_trip(tmp_path: Path) -> None:
    cache, root = tmp_path / "cache", tmp_path / "root"
    (cache / "lists").mkdir(parents=True)
    (cache / "a_1_all.deb").write_bytes(b"a")
    (cache / "lists" / "old_Packages").write_text("old")
    (cache / "lists" / "kept_Packages").write_text("kept")
    apt_cache.sync_in(cache, root)
    archives, lists = root / apt_cache.ARCHIVES, root / apt_cache.LISTS
    assert (archives / "a_1_all.deb").stat().st_ino == (cache / "a_1_all.deb").stat().st_ino
    assert (lists / "partial").is_dir() and (archives / "partial").is_dir()
    # apt downloads a package, replaces one index and drops another
    (archives / "b_2_all.deb").write_bytes(b"b")
    (lists / "old_Packages").unlink()
    (lists / "kept_Packages").unlink()
    (lists / "kept_Packages").write_text("new")
    (lists / "lock").write_text("")
    apt_cache.sync_out(cache, root)
    assert sorted(p.name for p in cache.glob("*.deb")) == ["a_1_all.deb", "b_2_all.deb"]
    assert sorted(p.name for p in (cache / "lists").iterdir()) == ["kept_Packages"]
    assert (cache / "lists" / "kept_Packages").read_text() == "new"


def test_an_existing_package_is_not_replaced(tmp_path: Path) -> None:
    cache, root = tmp_path / "cache", tmp_path / "root"
    cache.mkdir()
    (cache / "a_1_all.deb").write_bytes(b"cached")
    (root / apt_cache.ARCHIVES).mkdir(parents=True)
    (root / apt_cache.ARCHIVES / "a_1_all.deb").write_bytes(b"other")
    apt_cache.sync_out(cache, root)
    assert (cache / "a_1_all.deb").read_bytes() == b"cached"


def test_hook_command_runs_as_mmdebstrap_would(tmp_path: Path) -> None:
    cache, root = tmp_path / "cache", tmp_path / "root"
    cache.mkdir()
    (cache / "a_1_all.deb").write_bytes(b"a")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(["sh", "-c", apt_cache.hook_command("in", cache), "hook", str(root)], check=True, env=env)
    assert (root / apt_cache.ARCHIVES / "a_1_all.deb").read_bytes() == b"a"
    bad = subprocess.run([sys.executable, "-m", "vzpkg.pkgmgr.apt_cache", "sideways"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_partial_copies_are_removed_by_the_next_run(tmp_path: Path) -> None:
    """A killed run's `.tmp-*` (and `.tmp-.tmp-*` copied from a root's lists) go at the next sync; a copy still
    being written (fresh mtime) stays; partial files in a root never join the cache."""
    cache, root = tmp_path / "cache", tmp_path / "root"
    (cache / "lists").mkdir(parents=True)
    stale = [cache / ".tmp-a_1_all.deb.123", cache / "lists" / ".tmp-.tmp-x_Packages.4.5", cache / ".tmp-.tmp-b.deb.1.2"]
    for p in stale:
        p.write_bytes(b"partial")
        os.utime(p, (1, 1))
    live = cache / ".tmp-c_1_all.deb.999"
    live.write_bytes(b"being copied")
    apt_cache.sync_in(cache, root)
    assert [p for p in stale if p.exists()] == []
    assert live.exists()
    assert not (root / apt_cache.ARCHIVES / live.name).exists()
    (root / apt_cache.LISTS / ".tmp-y_Packages.7").write_text("partial")
    (root / apt_cache.ARCHIVES / ".tmp-d_1_all.deb.8").write_text("partial")
    apt_cache.sync_out(cache, root)
    assert sorted(p.name for p in cache.rglob(".tmp-*")) == [live.name]
