"""status / update-cache / rollback-cache against a signed apt repository the tests build and change.

One Debian build (module fixture, ~15 s) of a test template that inherits debian-12-x86_64 and adds the package
`vzpkg-hello` from a repository served on 127.0.0.1; the tests then run in order on that cache.
Needs root, the Debian mirror of the host's apt sources, dpkg-deb, apt-ftparchive and gpg.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aptrepo import DEBIAN_KEYRING, AptTestRepo, missing_tools
from badmirror import BadMirror

from vzpkg.store.archive import open_decompressed

NAME = "debian-12-x86_64-u5test"
PKG = "vzpkg-hello"
REPO_TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
SEED_PACKAGES = Path(os.environ.get("VZPKG_TEST_PACKAGE_CACHE", "/var/tmp/vzpkg-test-cache/.packages"))

pytestmark = [
    pytest.mark.root, pytest.mark.network, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="builds need root"),
    pytest.mark.skipif(bool(missing_tools()) or shutil.which("mmdebstrap") is None,
                       reason=f"missing tools: {missing_tools() or ['mmdebstrap']}"),
    pytest.mark.skipif(not DEBIAN_KEYRING.is_file(), reason="debian-archive-keyring is not installed"),
]


class Env:
    def __init__(self, base: Path, repo: AptTestRepo) -> None:
        self.base = base
        self.repo = repo
        self.cache_dir = base / "cache"
        self.templates = base / "templates"

    def run(self, *args: str, check: int | None = 0, extra_env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "VZPKG_TEMPLATE_DIR": f"{self.templates}:{REPO_TEMPLATES}",
               "VZPKG_CACHE_DIR": str(self.cache_dir),
               "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1", **(extra_env or {})}
        proc = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzpkg", *args], env=env, capture_output=True,
                              text=True, timeout=600)
        if check is not None:
            assert proc.returncode == check, f"vzpkg {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    @property
    def archive(self) -> Path:
        return self.cache_dir / f"{NAME}.tar.zst"

    def manifest(self) -> dict:
        return json.loads((self.cache_dir / f"{NAME}.json").read_text())

    def installed_version(self) -> str | None:
        return next((p["version"] for p in self.manifest()["packages"] if p["name"] == PKG), None)

    def file_in_cache(self, path: str) -> str:
        """A file's content read from the packed cache (streaming, nothing unpacked)."""
        import tarfile

        with open_decompressed(self.archive) as stream, tarfile.open(fileobj=stream, mode="r|") as tf:
            for member in tf:
                if member.name.lstrip("./") == path:
                    f = tf.extractfile(member)
                    assert f is not None
                    return f.read().decode()
        raise AssertionError(f"{path} not in {self.archive}")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("u5")
    repo = AptTestRepo(base)
    repo.add_package(PKG, "1")
    repo.publish()
    repo.serve()
    e = Env(base, repo)
    if SEED_PACKAGES.is_dir():  # hard-link a warm package cache: saves the downloads, not the build
        shutil.copytree(SEED_PACKAGES, e.cache_dir / ".packages", copy_function=os.link)
    tdir = e.templates / NAME
    (tdir / "files/etc/apt/trusted.gpg.d").mkdir(parents=True)
    repo.export_key(tdir / "files/etc/apt/trusted.gpg.d/vzpkg-test.gpg")
    keyring = repo.keyring_with(DEBIAN_KEYRING)
    (tdir / "template.toml").write_text(
        f'inherits = "debian-12-x86_64"\n'
        f'summary = "update-cache test template"\n'
        f'description = "debian-12-x86_64 plus {PKG} from a repository the tests serve on 127.0.0.1"\n'
        f'keyring = "{keyring}"\n'
        f'packages = ["{PKG}"]\n'
        f'repositories = ["{repo.line}"]\n'
    )
    e.run("create-cache", NAME, "-q")
    yield e
    repo.stop()


def test_status_current_after_build(env: Env) -> None:
    assert env.installed_version() == "1"
    proc = env.run("status", NAME, "--json")
    report = json.loads(proc.stdout)
    assert report["current"] is True and report["updates"] == [] and report["template_changed"] is False
    assert (env.cache_dir / ".metadata").is_dir()


def test_status_lists_new_version(env: Env) -> None:
    env.repo.add_package(PKG, "2")
    env.repo.publish()
    # Within metadata_expire the cached InRelease is used: still "current" ...
    assert env.run("status", NAME).returncode == 0
    # ... --refresh asks the repository.
    proc = env.run("status", NAME, "--refresh", "--json", check=20)
    report = json.loads(proc.stdout)
    assert report["current"] is False
    assert [(u["name"], u["cached"], u["available"]) for u in report["updates"]] == [(PKG, "1", "2")]
    text = env.run("status", NAME, check=20).stdout  # now from the refreshed metadata cache
    assert "updates available" in text and PKG in text


def test_update_cache_installs_new_version(env: Env) -> None:
    before = env.manifest()
    proc = env.run("update-cache", NAME, "--json")
    result = json.loads(proc.stdout)
    assert result["updated"] is True
    manifest = env.manifest()
    assert env.installed_version() == "2"
    assert {"name": PKG, "architecture": "all", "from": "1", "to": "2"} in manifest["changes"]
    assert manifest["updated_from"]["sha256"] == before["sha256"]
    assert env.file_in_cache(f"usr/share/{PKG}/version").strip() == "2"
    gens = list((env.cache_dir / ".generations" / NAME).glob("*.tar.zst"))
    assert [g.name for g in gens] == ["1.tar.zst"]
    assert json.loads((env.cache_dir / ".generations" / NAME / "1.json").read_text())["sha256"] == before["sha256"]
    assert not list(env.cache_dir.glob(".tmp-*")), "work files left behind"
    assert env.run("status", NAME).returncode == 0
    env.run("verify-cache", NAME)


def test_second_update_does_nothing_quickly(env: Env) -> None:
    before = env.manifest()
    mtime = env.archive.stat().st_mtime_ns
    start = time.monotonic()
    proc = env.run("update-cache", NAME)
    elapsed = time.monotonic() - start
    assert elapsed < 2.0, f"no-op update-cache took {elapsed:.2f} s"
    assert "nothing to do" in proc.stderr
    assert env.archive.stat().st_mtime_ns == mtime
    assert env.manifest() == before


def test_rollback_restores_version_1(env: Env) -> None:
    proc = env.run("rollback-cache", NAME)
    assert "restored generation 1" in proc.stdout
    assert env.installed_version() == "1"
    assert env.file_in_cache(f"usr/share/{PKG}/version").strip() == "1"
    assert not (env.cache_dir / ".generations" / NAME).exists()
    env.run("verify-cache", NAME)
    # Nothing left to roll back to: a clear error, exit 5.
    assert "no earlier generation" in env.run("rollback-cache", NAME, check=5).stderr


def test_bad_signature_is_refused(env: Env) -> None:
    before = env.manifest()
    stranger = env.repo.new_key("someone else")
    env.repo.publish(sign_with=stranger)
    try:
        proc = env.run("status", NAME, "--refresh", check=8)
        assert "signature" in proc.stderr and "InRelease" in proc.stderr
        proc = env.run("update-cache", NAME, check=8)
        assert "signature" in proc.stderr
        assert env.manifest() == before
        assert not list(env.cache_dir.glob(".tmp-*"))
    finally:
        env.repo.publish()


def test_clean_frees_space_and_keeps_the_cache(env: Env) -> None:
    leftover = env.cache_dir / f".tmp-{NAME}-update-999999"
    (leftover / "root").mkdir(parents=True)
    proc = env.run("clean", "--metadata", "--json")
    report = json.loads(proc.stdout)
    assert str(leftover) in report["removed"] and not leftover.exists()
    assert not (env.cache_dir / ".metadata").exists()
    assert (env.cache_dir / ".packages").exists() and env.archive.exists()


def test_template_change_installs_added_package(env: Env) -> None:
    env.repo.add_package("vzpkg-extra", "1")
    env.repo.publish()
    toml = env.templates / NAME / "template.toml"
    toml.write_text(toml.read_text().replace(f'packages = ["{PKG}"]', f'packages = ["{PKG}", "vzpkg-extra"]'))
    report = json.loads(env.run("status", NAME, "--json", check=20).stdout)
    assert report["template_changed"] is True and report["install"] == ["vzpkg-extra"]
    env.run("update-cache", NAME, "--keep", "0")
    manifest = env.manifest()
    names = {p["name"]: p["version"] for p in manifest["packages"]}
    assert names.get("vzpkg-extra") == "1" and names.get(PKG) == "2"  # the upgrade ran too
    assert manifest["template_packages"][-2:] == [PKG, "vzpkg-extra"]
    assert not (env.cache_dir / ".generations" / NAME).exists()  # --keep 0
    assert env.run("status", NAME).returncode == 0


# ---- a broken mirror while apt runs: apt's own errors, mapped to the documented exit codes -----------------------

@pytest.fixture
def version_3(env: Env):
    """Version 3 of the package published (its .deb yielded); afterwards gone again, and the cache, untouched by
    the failed update, still verifies."""
    before = env.manifest()
    deb = env.repo.add_package(PKG, "3")
    env.repo.publish()
    yield deb
    for old in env.repo.pool.glob(f"{PKG}_3_*.deb"):
        old.unlink()
    env.repo.publish()
    assert env.manifest() == before
    assert not list(env.cache_dir.glob(".tmp-*")), "work files left behind"
    env.run("verify-cache", NAME)


def one_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The one error line (after the step timings update-cache prints as it goes); no traceback."""
    lines = proc.stderr.strip().splitlines()
    errors = [ln for ln in lines if "error" in ln.lower() or "Traceback" in ln]
    assert errors == lines[-1:] and lines[-1].startswith("vzpkg: error: "), proc.stderr
    return lines[-1]


def test_deb_not_matching_its_hash_is_a_signature_error(env: Env, version_3: Path) -> None:
    data = bytearray(version_3.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content: only the hash tells
    version_3.write_bytes(bytes(data))
    line = one_error(env.run("update-cache", NAME, check=8))
    assert "Hash Sum mismatch" in line and version_3.name in line


def test_missing_deb_is_a_mirror_error(env: Env, version_3: Path) -> None:
    version_3.unlink()
    line = one_error(env.run("update-cache", NAME, check=7))
    assert "404" in line and version_3.name in line


@pytest.fixture
def bad_mirror(env: Env):
    """A BadMirror in the repository's place (same port, same files) for one test."""
    assert env.repo.server is not None
    port = env.repo.server.server_address[1]
    env.repo.stop()
    bad = BadMirror(env.repo.root, port=port)
    bad.start()
    yield bad
    bad.stop()
    env.repo.serve(port=port)


def test_hanging_deb_download_fails_within_apt_timeout(env: Env, version_3: Path, bad_mirror: BadMirror) -> None:
    bad_mirror.set(f"/pool/main/{version_3.name}", "hang")
    start = time.monotonic()
    proc = env.run("update-cache", NAME, check=7, extra_env={"VZPKG_APT_TIMEOUT": "3", "VZPKG_APT_RETRIES": "0"})
    took = time.monotonic() - start
    line = one_error(proc)
    assert version_3.name in line
    assert took < 60, f"update-cache took {took:.0f} s with apt_timeout 3"


def test_trickling_deb_download_ends_at_build_timeout(env: Env, version_3: Path, bad_mirror: BadMirror) -> None:
    bad_mirror.set(f"/pool/main/{version_3.name}", "trickle", delay=0.5)
    start = time.monotonic()
    proc = env.run("update-cache", NAME, check=7, extra_env={"VZPKG_BUILD_TIMEOUT": "15"})
    took = time.monotonic() - start
    line = one_error(proc)
    assert "not finished within 15 s (build_timeout)" in line and f"{PKG} all 3" in line
    assert took < 75, f"update-cache took {took:.0f} s with build_timeout 15"


def _processes_below(path: Path) -> list[tuple[int, str, int]]:
    real = os.path.realpath(path).rstrip("/") + "/"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            uid = os.stat(f"/proc/{entry}").st_uid
            links = [os.readlink(f"/proc/{entry}/{link}").rstrip("/") + "/" for link in ("root", "cwd")]
        except OSError:
            continue
        if any(t.startswith(real) for t in links):
            found.append((int(entry), comm, uid))
    return found


def test_sigkill_during_apt_get_in_the_root(env: Env) -> None:
    """kill -9 of update-cache while apt-get runs chrooted in the root: apt-get and its download methods (which
    run as _apt, out of reach of a parent-death signal) die at once, no mount stays in the root, and the next
    update-cache cleans up and publishes."""
    env.repo.add_package(PKG, "3")
    env.repo.publish()
    run_env = {**os.environ, "VZPKG_TEMPLATE_DIR": f"{env.templates}:{REPO_TEMPLATES}",
               "VZPKG_CACHE_DIR": str(env.cache_dir), "VZPKG_BUILD_IN_MEMORY": "no",
               "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "vzpkg.cli.vzpkg", "update-cache", NAME, "-q"], env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[tuple[int, str, int]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        seen = _processes_below(env.cache_dir)
        if any(comm in ("apt-get", "http") for _p, comm, _u in seen):
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    proc.kill()
    proc.wait()
    work = next(env.cache_dir.glob(f".tmp-{NAME}-update-*"))
    deadline = time.monotonic() + 5
    while (left := _processes_below(env.cache_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], f"still running 5 s after update-cache was killed: {left} (were: {seen})"
    assert [m for m in Path("/proc/self/mountinfo").read_text().splitlines() if str(work) in m] == []
    env.run("update-cache", NAME, "-q")
    assert env.installed_version() == "3"
    assert not list(env.cache_dir.glob(".tmp-*"))
    env.run("verify-cache", NAME)
