"""status / update-cache / rollback-cache for a dnf template, against an RPM repository the tests build and change.

A repository of its own (rpmrepo.build_repository into this module's directory, not the one test_dnf_build
uses), served on 127.0.0.1; one create-cache of a test template, then the tests run in order on that cache:
current → a version bump (vzt-c 1.0-1 → 1.1-1) and an Epoch bump (vzt-epoch 1:1.5-1 → 2:1.0-1) published →
status lists them → update-cache installs them → a second update-cache does nothing → rollback-cache → an
unsigned new package and a tampered repomd.xml are refused with nothing published → template changes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import rpmrepo

from vzpkg.store.archive import open_decompressed

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (dnf --installroot, chroot, mounts)"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in rpmrepo.TOOLS) or not rpmrepo.BUSYBOX.is_file(),
                       reason="needs dnf, rpm, rpmbuild, rpmsign, createrepo_c, gpg and busybox-static"),
]

NAME = "vztest-1-x86_64-upd"
SIGNED = "vztest-1-x86_64-updsig"   # repo_gpgcheck = true: repomd.xml.asc checked by status and dnf
PACKAGES = ["vzt-filesystem", "vzt-busybox", "vzt-post", "vzt-a", "vzt-epoch"]
EXIT = {"mirror": 7, "signature": 8, "updates": 20}


def _template(packages: list[str], key: Path, baseurl: str, repo_gpgcheck: bool = False) -> str:
    return (
        'summary = "vzpkg dnf update test"\n'
        'description = "Built from a test RPM repository the update tests change."\n'
        'distribution = "almalinux"\nrelease = "9"\narchitecture = "x86_64"\npackage_manager = "dnf"\n'
        f"packages = {json.dumps(packages)}\n"
        f"gpg_keys = [{json.dumps(str(key))}]\n"
        f'repositories = [{{ id = "vzt", name = "vzpkg test", baseurl = "{baseurl}", gpgcheck = true, '
        f"repo_gpgcheck = {'true' if repo_gpgcheck else 'false'} }}]\n"
    )


class Env:
    def __init__(self, base: Path, repo: Path, server: rpmrepo.Server) -> None:
        self.base = base
        self.repo = repo
        self.server = server
        self.cache_dir = base / "cache"
        self.templates = base / "templates"

    def run(self, *args: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "VZPKG_TEMPLATE_DIR": str(self.templates), "VZPKG_CACHE_DIR": str(self.cache_dir),
               "VZPKG_CONFIG": str(self.base / "no-config.toml"), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
        env.pop("VZPKG_MIRROR", None)
        proc = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzpkg", *args], env=env, capture_output=True,
                              text=True, timeout=300)
        if check is not None:
            assert proc.returncode == check, f"vzpkg {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def write_template(self, name: str, packages: list[str], repo_gpgcheck: bool = False) -> Path:
        tdir = self.templates / name
        tdir.mkdir(parents=True, exist_ok=True)
        toml = tdir / "template.toml"
        toml.write_text(_template(packages, self.repo / "RPM-GPG-KEY-vzt", f"{self.server.url}/repo", repo_gpgcheck))
        return toml

    def archive(self, name: str = NAME) -> Path:
        return self.cache_dir / f"{name}.tar.zst"

    def manifest(self, name: str = NAME) -> dict:
        return json.loads((self.cache_dir / f"{name}.json").read_text())

    def evr(self, pkg: str, name: str = NAME) -> str | None:
        return next((p["evr"] for p in self.manifest(name)["packages"] if p["name"] == pkg), None)

    def file_in_cache(self, path: str, name: str = NAME) -> str:
        with open_decompressed(self.archive(name)) as stream, tarfile.open(fileobj=stream, mode="r|") as tf:
            for member in tf:
                if member.name.lstrip("./") == path:
                    f = tf.extractfile(member)
                    assert f is not None
                    return f.read().decode()
        raise AssertionError(f"{path} not in {self.archive(name)}")

    def rpm_q(self, *pkgs: str, name: str = NAME) -> dict[str, str]:
        """rpm -q --root in an unpacked copy of the cache: {name: E:V-R}."""
        root = self.base / "unpacked"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        subprocess.run(["tar", "--zstd", "-xpf", str(self.archive(name)), "-C", str(root)], check=True)
        proc = subprocess.run(["rpm", "--root", str(root), "--dbpath", "/var/lib/rpm", "-q", "--qf",
                               "%{NAME} %{EPOCHNUM}:%{VERSION}-%{RELEASE}\\n", *pkgs],
                              capture_output=True, text=True, check=True)
        shutil.rmtree(root)
        out = {}
        for line in proc.stdout.splitlines():
            n, evr = line.split()
            out[n] = evr[2:] if evr.startswith("0:") else evr
        return out

    def generations(self, name: str = NAME) -> list[str]:
        gdir = self.cache_dir / ".generations" / name
        return sorted(p.name for p in gdir.glob("*.tar.zst")) if gdir.is_dir() else []

    def nothing_left(self) -> None:
        assert not list(self.cache_dir.glob(".tmp-*")), "work files left behind"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("dnfupd")
    repo = rpmrepo.build_repository(base)
    rpmrepo.createrepo(repo, sign_base=base)  # repomd.xml.asc for the repo_gpgcheck template
    with rpmrepo.Server(base) as server:
        e = Env(base, repo, server)
        e.write_template(NAME, PACKAGES)
        e.write_template(SIGNED, ["vzt-filesystem", "vzt-c"], repo_gpgcheck=True)
        e.run("create-cache", NAME, "-q")
        e.run("create-cache", SIGNED, "-q")
        yield e


def test_status_current_after_build(env: Env) -> None:
    assert env.evr("vzt-c") == "1.0-1" and env.evr("vzt-epoch") == "1:1.5-1"
    report = json.loads(env.run("status", NAME, "--json").stdout)
    assert report["current"] is True and report["updates"] == [] and report["template_changed"] is False
    [repo] = report["repositories"]
    assert repo["id"] == "vzt" and repo["changed"] is False
    assert list((env.cache_dir / ".metadata" / "rpm").glob("*_repomd.xml"))
    assert "current" in env.run("status", NAME).stdout


def test_status_lists_version_and_epoch_bumps(env: Env) -> None:
    rpmrepo.add_packages(env.base, env.repo, [
        rpmrepo.versioned("vzt-c", "1.1", requires=("vzt-filesystem",)),
        rpmrepo.versioned("vzt-epoch", "1.0", epoch=2),
    ])
    rpmrepo.createrepo(env.repo, sign_base=env.base)
    # Within metadata_expire the cached repomd.xml is used: still current ...
    assert env.run("status", NAME).returncode == 0
    # ... --refresh asks the repository.
    report = json.loads(env.run("status", NAME, "--refresh", "--json", check=EXIT["updates"]).stdout)
    assert report["current"] is False and report["repositories"][0]["changed"] is True
    assert sorted((u["name"], u["cached"], u["available"]) for u in report["updates"]) == [
        ("vzt-c", "1.0-1", "1.1-1"), ("vzt-epoch", "1:1.5-1", "2:1.0-1")]
    text = env.run("status", NAME, check=EXIT["updates"]).stdout  # from the refreshed metadata cache
    assert "updates available" in text and "repository changed: vzt http://127.0.0.1:" in text
    assert "2:1.0-1" in text


def test_update_cache_installs_them(env: Env) -> None:
    before = env.manifest()
    result = json.loads(env.run("update-cache", NAME, "--json").stdout)
    assert result["updated"] is True and result["generation"] == 1
    manifest = env.manifest()
    assert env.evr("vzt-c") == "1.1-1" and env.evr("vzt-epoch") == "2:1.0-1"
    changes = {c["name"]: (c["from"], c["to"]) for c in manifest["changes"]}
    assert changes == {"vzt-c": ("1.0-1", "1.1-1"), "vzt-epoch": ("1:1.5-1", "2:1.0-1")}
    assert manifest["updated_from"]["sha256"] == before["sha256"]
    assert manifest["repositories"][0]["repomd_sha256"] != before["repositories"][0]["repomd_sha256"]
    assert manifest["rpmdb_path"] == "/var/lib/rpm" and manifest["package_count"] == before["package_count"]
    assert env.rpm_q("vzt-c", "vzt-epoch") == {"vzt-c": "1.1-1", "vzt-epoch": "2:1.0-1"}
    assert env.file_in_cache("usr/share/vzt/vzt-c").strip() == "vzt-c 0:1.1-1"
    with pytest.raises(AssertionError):
        env.file_in_cache("etc/apt/sources.list")  # no apt sources written into an rpm root
    assert env.generations() == ["1.tar.zst"]
    env.nothing_left()
    assert env.run("status", NAME).returncode == 0
    env.run("verify-cache", NAME)


def test_second_update_does_nothing_quickly(env: Env) -> None:
    before = env.manifest()
    mtime = env.archive().stat().st_mtime_ns
    start = time.monotonic()
    proc = env.run("update-cache", NAME)
    elapsed = time.monotonic() - start
    assert elapsed < 2.0, f"no-op update-cache took {elapsed:.2f} s"
    assert "nothing to do" in proc.stderr
    assert env.archive().stat().st_mtime_ns == mtime and env.manifest() == before


def test_rollback_restores_the_old_versions(env: Env) -> None:
    proc = env.run("rollback-cache", NAME)
    assert "restored generation 1" in proc.stdout
    assert env.evr("vzt-c") == "1.0-1" and env.evr("vzt-epoch") == "1:1.5-1"
    assert env.rpm_q("vzt-c", "vzt-epoch") == {"vzt-c": "1.0-1", "vzt-epoch": "1:1.5-1"}
    assert env.file_in_cache("usr/share/vzt/vzt-c").strip() == "vzt-c"
    assert env.generations() == []
    env.run("verify-cache", NAME)
    # the repository still offers the new versions
    assert env.run("status", NAME, check=EXIT["updates"]).returncode == EXIT["updates"]


def test_unsigned_new_package_is_refused(env: Env) -> None:
    before = env.manifest()
    [rpm] = rpmrepo.add_packages(env.base, env.repo, [
        rpmrepo.versioned("vzt-b", "1.1", sign=False, requires=("vzt-c",))])
    rpmrepo.createrepo(env.repo, sign_base=env.base)
    try:
        report = json.loads(env.run("status", NAME, "--refresh", "--json", check=EXIT["updates"]).stdout)
        assert ("vzt-b", "1.0-1", "1.1-1") in [(u["name"], u["cached"], u["available"]) for u in report["updates"]]
        proc = env.run("update-cache", NAME, check=EXIT["signature"])
        assert "signature" in proc.stderr and "vzt-b" in proc.stderr
        assert env.manifest() == before and env.generations() == []
        env.nothing_left()
    finally:
        rpm.unlink()
        rpmrepo.createrepo(env.repo, sign_base=env.base)


def test_tampered_repomd_is_refused(env: Env) -> None:
    before = env.manifest()
    repomd = env.repo / "repodata" / "repomd.xml"
    good = repomd.read_bytes()
    text = good.decode()
    start = text.index('<data type="primary">')
    csum_at = text.index('<checksum type="sha256">', start) + len('<checksum type="sha256">')
    bad = text[:csum_at] + ("0" if text[csum_at] != "0" else "1") + text[csum_at + 1:]
    repomd.write_text(bad)
    try:
        proc = env.run("status", NAME, "--refresh", check=EXIT["mirror"])
        assert "checksum mismatch" in proc.stderr
        proc = env.run("update-cache", NAME, check=EXIT["mirror"])
        assert "checksum mismatch" in proc.stderr
        assert env.manifest() == before and env.generations() == []
        env.nothing_left()
    finally:
        repomd.write_bytes(good)


def test_repo_gpgcheck_signed_repomd(env: Env) -> None:
    """repo_gpgcheck: status checks repomd.xml.asc; a repomd.xml changed after signing is refused (exit 8);
    signed again, it verifies and update-cache (dnf checking repomd.xml.asc too) installs the update."""
    assert env.evr("vzt-c", SIGNED) == "1.0-1"  # built in the fixture, before vzt-c 1.1-1 was published
    report = json.loads(env.run("status", SIGNED, "--refresh", "--json", check=EXIT["updates"]).stdout)
    assert [(u["name"], u["available"]) for u in report["updates"]] == [("vzt-c", "1.1-1")]
    repomd = env.repo / "repodata" / "repomd.xml"
    good = repomd.read_bytes()
    repomd.write_bytes(good.replace(b"<revision>", b"<revision>9"))
    try:
        before = env.manifest(SIGNED)
        proc = env.run("status", SIGNED, "--refresh", check=EXIT["signature"])
        assert "signature check failed" in proc.stderr and "repomd.xml" in proc.stderr
        assert not list((env.cache_dir / ".metadata" / "rpm").glob("*_repomd.xml.asc")), "kept what did not verify"
        env.run("status", SIGNED, check=EXIT["signature"])  # nothing cached: asks again, refused again
        env.run("update-cache", SIGNED, check=EXIT["signature"])
        assert env.manifest(SIGNED) == before and env.generations(SIGNED) == []
        env.nothing_left()
    finally:
        repomd.write_bytes(good)
    env.run("status", SIGNED, check=EXIT["updates"])
    env.run("update-cache", SIGNED)
    assert env.evr("vzt-c", SIGNED) == "1.1-1" and env.generations(SIGNED) == ["1.tar.zst"]
    assert env.run("status", SIGNED).returncode == 0


def test_template_change_installs_and_removes(env: Env) -> None:
    rpmrepo.add_packages(env.base, env.repo, [rpmrepo.versioned("vzt-extra", "1.0", requires=("vzt-filesystem",))])
    rpmrepo.createrepo(env.repo, sign_base=env.base)
    env.write_template(NAME, [p for p in PACKAGES if p != "vzt-post"] + ["vzt-extra"])
    report = json.loads(env.run("status", NAME, "--refresh", "--json", check=EXIT["updates"]).stdout)
    assert report["template_changed"] is True
    assert report["install"] == ["vzt-extra"] and report["remove"] == ["vzt-post"]
    env.run("update-cache", NAME, "--keep", "0")
    manifest = env.manifest()
    evrs = {p["name"]: p["evr"] for p in manifest["packages"]}
    assert evrs.get("vzt-extra") == "1.0-1" and "vzt-post" not in evrs
    assert evrs["vzt-c"] == "1.1-1" and evrs["vzt-epoch"] == "2:1.0-1"  # the upgrade ran too
    changes = {c["name"]: (c["from"], c["to"]) for c in manifest["changes"]}
    assert changes["vzt-extra"] == (None, "1.0-1") and changes["vzt-post"] == ("1.0-1", None)
    assert manifest["template_packages"] == [p for p in PACKAGES if p != "vzt-post"] + ["vzt-extra"]
    assert env.generations() == []  # --keep 0
    assert env.run("status", NAME).returncode == 0
