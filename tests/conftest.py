"""Shared fixtures: the Debian 12 cache that integration tests build once and share."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

PROJECT = Path(__file__).resolve().parent.parent

# Hypothesis draws the same examples on every run (derandomize): CI runs the suite once and one failure blocks a
# submission, so a property test must not fail now and then on a rare random draw in somebody else's change (a
# real bug in extract.py showed up that way). Nothing here is timed (deadline=None): a loaded machine is slow,
# not wrong. To look for new counterexamples on purpose: HYPOTHESIS_PROFILE=explore (fresh random examples on
# every run, as hypothesis's default does).
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
VZPKG = [sys.executable, "-m", "vzpkg.cli.vzpkg"]
TEST_CACHE_DIR = Path(os.environ.get("VZPKG_TEST_CACHE_DIR", "/var/tmp/vzpkg-test-cache"))


def default_sigint() -> None:
    """preexec_fn for a child a test interrupts with SIGINT: SIGINT back to its default disposition.

    A test run started in the background (`pytest &` in a non-interactive shell, some CI runners) has SIGINT
    ignored, and an ignored signal stays ignored across fork and exec: the child would never see the test's
    SIGINT. vzpkg itself rightly keeps an inherited SIG_IGN (the POSIX convention for background jobs); it is
    the test that wants a child as an interactive shell would start it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def is_root() -> bool:
    return os.geteuid() == 0


def pytest_collection_modifyitems(config, items):
    if is_root():
        return
    skip = pytest.mark.skip(reason="needs root")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def run_vzpkg(*args: str, env: dict[str, str] | None = None, timeout: float = 900,
              check: bool = False) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([*VZPKG, *args], env=full_env, capture_output=True, text=True, timeout=timeout,
                          cwd=PROJECT)
    if check and proc.returncode != 0:
        raise AssertionError(f"vzpkg {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def _cache_is_usable(cache_dir: Path, name: str) -> bool:
    manifest = cache_dir / f"{name}.json"
    if not (cache_dir / f"{name}.tar.zst").is_file() or not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    # A cache made by hand (without the fields create-cache writes) is rebuilt.
    if "template_digest" not in data:
        return False
    return run_vzpkg("verify-cache", name, "--cache-dir", str(cache_dir)).returncode == 0


@pytest.fixture(scope="session")
def debian12_cache() -> tuple[Path, str]:
    """(cache_dir, name) of a real debian-12-x86_64 cache, built once and shared by every test."""
    if not is_root():
        pytest.skip("needs root")
    name = "debian-12-x86_64"
    if not _cache_is_usable(TEST_CACHE_DIR, name):
        run_vzpkg("create-cache", name, "--force", "--cache-dir", str(TEST_CACHE_DIR), "-q", check=True)
    return TEST_CACHE_DIR, name


@pytest.fixture
def seeded_cache_dir(tmp_path: Path, debian12_cache: tuple[Path, str]) -> Path:
    """An empty cache directory whose package download cache is pre-filled (hard links) from the shared one."""
    shared, _ = debian12_cache
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    if (shared / ".packages").is_dir():
        subprocess.run(["cp", "-al", str(shared / ".packages"), str(cache_dir / ".packages")], check=True)
    return cache_dir


def copy_cache(src_dir: Path, dest_dir: Path, name: str) -> None:
    for suffix in (".tar.zst", ".json"):
        shutil.copy2(src_dir / f"{name}{suffix}", dest_dir / f"{name}{suffix}")
