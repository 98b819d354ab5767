"""vzpkg.manifest: manifests written by create-cache / update-cache (today's format) load as a typed Manifest
and save back byte for byte; the one reader serves the cache store and the runtime, each with its messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vzpkg import manifest as reader
from vzpkg.errors import CacheNotFoundError, VerifyError
from vzpkg.manifest import model as mf
from vzpkg.runtime.storage import cache_init, cache_sha256
from vzpkg.store.cache import CacheStore

SHA = "0834ce1e3ede0cce74ae4ef3b2e852312ce598cafb823f724ac3fd2fdb6f35e2"

#: what create-cache writes for an apt template (build/pipeline.py's keys, the backend's facts)
APT = {
    "architecture": "x86_64", "archive": "debian-12-x86_64.tar.zst", "bootstrapper": "mmdebstrap",
    "build_in_memory": True, "compression_level": 6, "created": "2026-11-30T02:12:41+00:00",
    "distribution": "debian", "durations": {"bootstrap": 12.65, "pack": 1.103, "total": 13.885}, "init": "minimal",
    "mirror": "http://mirror.invalid/debian",
    "mirrors": {"mirror": "http://mirror.invalid/debian", "security_mirror": "http://mirror.invalid/debian-security"},
    "name": "debian-12-x86_64", "package_count": 2, "package_manager": "apt",
    "packages": [{"architecture": "all", "name": "adduser", "version": "3.134"},
                 {"architecture": "amd64", "name": "apt", "version": "2.6.2"}],
    "packed_size": 43560746, "release": "12",
    "repositories": [{"components": ["main"], "date": "Sat, 11 Jul 2026 10:16:37 UTC", "inrelease_sha256": "77" * 32,
                      "suite": "bookworm", "uri": "http://mirror.invalid/debian"}],
    "sha256": SHA, "source_date_epoch": None, "stage": "saved", "suite": "bookworm", "template_digest": "9c" * 32,
    "template_packages": ["procps", "less"], "unpacked_size": 142120960, "vzpkg_version": "0.1.0",
}
#: a dnf template's cache after update-cache: rpm package entries, dnf facts, the changes and where it came from
RPM = {
    **APT, "name": "almalinux-9-x86_64", "distribution": "almalinux", "release": "9", "suite": None,
    "package_manager": "dnf", "bootstrapper": "dnf", "archive": "almalinux-9-x86_64.tar.zst",
    "packages": [{"name": "bash", "epoch": 0, "version": "5.1.8", "release": "9.el9", "arch": "x86_64",
                  "architecture": "x86_64", "evr": "5.1.8-9.el9"},
                 {"name": "vim-minimal", "epoch": 2, "version": "8.2", "release": "1.el9", "arch": "x86_64",
                  "architecture": "x86_64", "evr": "2:8.2-1.el9"}],
    "repositories": [{"id": "baseos", "baseurl": "http://mirror.invalid/9/BaseOS/x86_64/os/", "revision": "17",
                      "repomd_sha256": "ab" * 32, "gpgcheck": True}],
    "rpmdb_path": "/var/lib/rpm", "rpmdb_reader": "python-rpm", "releasever": "9", "unsigned_repositories": ["x"],
    "updated_from": {"sha256": "cd" * 32, "created": "2026-11-29T00:00:00+00:00"},
    "changes": [{"name": "bash", "architecture": "x86_64", "from": "5.1.8-8.el9", "to": "5.1.8-9.el9"}],
}
#: an older vzpkg's manifest: fewer keys (no init, suite, template_packages, stage, ...), nulls where it had none
OLD = {"name": "debian-11-x86_64", "archive": "debian-11-x86_64.tar.zst", "sha256": SHA, "created": None,
       "packages": [{"name": "bash", "version": "5.1-2", "architecture": "amd64", "section": "shells"}],
       "repositories": [], "packed_size": None, "durations": {}}


def _written(tmp_path: Path, data: dict) -> Path:
    """DATA as today's vzpkg writes a manifest (CacheStore.publish and write_json_atomic: indent 2, sorted)."""
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


@pytest.mark.parametrize("data", [APT, RPM, OLD], ids=["apt", "rpm-updated", "old"])
def test_manifest_round_trip_is_byte_identical(tmp_path: Path, data: dict) -> None:
    path = _written(tmp_path, data)
    before = path.read_bytes()
    m = mf.load(path)
    assert m.to_dict() == data
    mf.save(path, m)
    assert path.read_bytes() == before


def test_manifest_is_typed() -> None:
    m = mf.Manifest.from_dict(RPM)
    assert m.sha256 == SHA and m.package_manager == "dnf" and m.suite is None
    assert [type(p) for p in m.packages] == [mf.PackageEntry, mf.PackageEntry]
    assert m.packages[1].epoch == 2 and m.packages[1].evr == "2:8.2-1.el9" and m.package_names() == {"bash", "vim-minimal"}
    assert m.extra["rpmdb_reader"] == "python-rpm" and m.extra["changes"][0]["to"] == "5.1.8-9.el9"
    old = mf.Manifest.from_dict(OLD)
    assert old.init is None and old.template_packages == [] and "init" not in old.to_dict()
    assert old.packages[0].extra == {"section": "shells"}
    # a manifest made in code writes every modelled key (as the pipeline's dict always did)
    assert set(mf.Manifest(name="x").to_dict()) >= {"suite", "init", "source_date_epoch", "template_packages"}


def test_the_real_shared_cache_manifest_round_trips() -> None:
    shared = Path("/var/tmp/vzpkg-test-cache/debian-12-x86_64.json")
    if not shared.exists():
        pytest.skip("the shared integration test cache is not built yet")
    assert json.dumps(mf.load(shared).to_dict(), indent=2, sort_keys=True) + "\n" == shared.read_text()


@pytest.mark.parametrize(("content", "kind"), [
    (None, "missing"), ("{", "invalid"), ("[1]", "not-object"), (b"\xff", "invalid"), ("fifo", "not-regular"),
    ('{"packages": 3}', "bad-field"),
])
def test_reader_errors(tmp_path: Path, content: str | bytes | None, kind: str) -> None:
    path = tmp_path / "m.json"
    if content == "fifo":
        os.mkfifo(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(reader.ManifestReadError) as err:
        mf.load(path)
    assert err.value.kind == kind and err.value.path == path


def test_the_reader_loads_no_dataclasses() -> None:
    """`vzctl create` reads the manifest through vzpkg.manifest on its hot path: dataclasses (inspect, ast) stay
    unloaded there."""
    code = ("import sys, vzpkg.manifest, vzpkg.runtime.storage; "
            "sys.exit('dataclasses' in sys.modules or 'vzpkg.manifest.model' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_store_and_runtime_read_with_the_one_reader_and_keep_their_messages(tmp_path: Path) -> None:
    name = "debian-12-x86_64"
    (tmp_path / f"{name}.tar.zst").write_bytes(b"x")
    manifest = tmp_path / f"{name}.json"
    manifest.write_text("[1]")
    with pytest.raises(VerifyError, match=r"is not a JSON object \(it is list\): rebuild it with"):
        CacheStore(tmp_path).read_manifest(name)
    with pytest.raises(CacheNotFoundError, match="is not a JSON object: rebuild the cache"):
        cache_sha256(tmp_path, name)
    manifest.write_text("{")
    with pytest.raises(VerifyError, match="is not valid JSON"):
        CacheStore(tmp_path).read_manifest(name)
    with pytest.raises(CacheNotFoundError, match="cannot read cache manifest .*: Expecting property name"):
        cache_sha256(tmp_path, name)
    manifest.unlink()
    os.mkfifo(manifest)
    with pytest.raises(CacheNotFoundError, match="is not a regular file: rebuild the cache"):
        cache_init(tmp_path, name)
    manifest.unlink()
    with pytest.raises(CacheNotFoundError, match="no cache for template"):
        cache_sha256(tmp_path, name)
    _written(tmp_path, APT).rename(manifest)
    assert cache_sha256(tmp_path, name) == SHA and cache_init(tmp_path, name) == "minimal"
    assert CacheStore(tmp_path).load_manifest(name) == mf.Manifest.from_dict(APT)
