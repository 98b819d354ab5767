"""status.compare against a fake metadata cache; generations, rollback and clean on a fake cache store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vzpkg.build import status as status_mod
from vzpkg.build import update
from vzpkg.config import load_settings
from vzpkg.errors import CacheNotFoundError, VerifyError
from vzpkg.lock import locked
from vzpkg.manifest.model import Manifest, PackageEntry
from vzpkg.pkgmgr import apt_status
from vzpkg.pkgmgr.base import PackageChange
from vzpkg.repo.apt import ReleaseInfo
from vzpkg.store.cache import CacheStore
from vzpkg.template import TemplateRepository

PROJECT = Path(__file__).resolve().parents[2]
NAME = "debian-12-x86_64"


@pytest.fixture
def settings(tmp_path: Path):
    s = load_settings(cache_dir=tmp_path / "cache", mirror="http://mirror.invalid/debian", environ={})
    s.mirrors["debian-security"] = "http://mirror.invalid/debian-security"
    s.template_dirs = [PROJECT / "templates"]
    return s


class FakeMetadata:
    """Stands in for MetadataCache: InRelease sha256 and packages per suite; records what was read."""

    releases: dict[str, str] = {}
    offered: dict[str, dict[str, list[tuple[str, str]]]] = {}
    read: list[str] = []

    def __init__(self, *_args, **_kw) -> None:
        pass

    def release(self, repo, keyring):
        return ReleaseInfo(repo.uri, repo.suite, "today", self.releases[repo.suite], "")

    def packages(self, repo, arch, text):
        FakeMetadata.read.append(repo.suite)
        return self.offered.get(repo.suite, {})


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    FakeMetadata.releases = {"bookworm": "a", "bookworm-updates": "b", "bookworm-security": "c"}
    FakeMetadata.offered = {}
    FakeMetadata.read = []
    monkeypatch.setattr(apt_status, "MetadataCache", FakeMetadata)
    return FakeMetadata


def _manifest(template, **over) -> Manifest:
    repos = [{"uri": "http://mirror.invalid/debian", "suite": "bookworm", "inrelease_sha256": "a"},
             {"uri": "http://mirror.invalid/debian", "suite": "bookworm-updates", "inrelease_sha256": "b"},
             {"uri": "http://mirror.invalid/debian-security", "suite": "bookworm-security", "inrelease_sha256": "c"}]
    packages = [{"name": "openssl", "version": "3.0.11-1~deb12u2", "architecture": "amd64"},
                {"name": "tzdata", "version": "2024a-0+deb12u1", "architecture": "all"},
                {"name": "less", "version": "590-2.1~deb12u2", "architecture": "amd64"}]
    return Manifest.from_dict({"template_digest": template.digest(), "repositories": repos, "packages": packages,
                               "created": "then", "sha256": "0" * 64, **over})


def test_unchanged_repositories_are_not_read_and_cache_is_current(settings, fake) -> None:
    template = TemplateRepository(settings.template_dirs).load(NAME)
    report = status_mod.compare(template, _manifest(template), settings)
    assert report.current is True and report.updates == [] and fake.read == []
    assert [r["changed"] for r in report.repositories] == [False, False, False]


def test_newer_versions_in_changed_repositories_are_listed(settings, fake) -> None:
    template = TemplateRepository(settings.template_dirs).load(NAME)
    fake.releases["bookworm-security"] = "c2"
    fake.offered["bookworm-security"] = {
        "openssl": [("3.0.11-1~deb12u1", "amd64"), ("3.0.15-1~deb12u1", "amd64"), ("9.9", "arm64")],
        "tzdata": [("2024a-0+deb12u1", "all")],
    }
    report = status_mod.compare(template, _manifest(template), settings)
    assert fake.read == ["bookworm-security"]
    assert report.current is False
    assert report.updates == [PackageChange("openssl", "amd64", "3.0.11-1~deb12u2", "3.0.15-1~deb12u1",
                                            "http://mirror.invalid/debian-security bookworm-security")]
    assert report.to_dict()["updates"] == [{"name": "openssl", "architecture": "amd64", "cached": "3.0.11-1~deb12u2",
                                            "available": "3.0.15-1~deb12u1",
                                            "repository": "http://mirror.invalid/debian-security bookworm-security"}]


def test_changed_repository_without_newer_versions_is_current(settings, fake) -> None:
    template = TemplateRepository(settings.template_dirs).load(NAME)
    fake.releases["bookworm-updates"] = "b2"
    fake.offered["bookworm-updates"] = {"tzdata": [("2023c-5", "all")]}
    report = status_mod.compare(template, _manifest(template), settings)
    assert report.current is True and report.repositories[1]["changed"] is True


def test_definition_change_and_package_plan(settings, fake) -> None:
    template = TemplateRepository(settings.template_dirs).load(NAME)
    manifest = _manifest(template, template_digest="old", template_packages=["less", "openssl", "gone"])
    manifest.packages.append(PackageEntry("gone", "1", "amd64"))
    report = status_mod.compare(template, manifest, settings)
    assert report.template_changed is True and report.current is False
    assert set(report.install) == {"procps", "iproute2", "ca-certificates", "netbase"}
    assert report.remove == ["openssl", "gone"]


# ---- generations, rollback, clean ------------------------------------------------------------------


def _publish(store: CacheStore, name: str, content: bytes, created: str) -> dict:
    import hashlib

    tmp = store.temp_path(name, "archive")
    tmp.write_bytes(content)
    manifest = {"name": name, "created": created, "sha256": hashlib.sha256(content).hexdigest(),
                "package_count": 1, "archive": store.archive_path(name).name}
    store.publish(name, tmp, manifest)
    return manifest


def test_generations_are_numbered_pruned_and_rolled_back(settings) -> None:
    store = CacheStore(settings.cache_dir)
    _publish(store, NAME, b"one", "t1")
    assert update.save_generation(store, NAME) == 1
    _publish(store, NAME, b"two", "t2")
    assert update.save_generation(store, NAME) == 2
    _publish(store, NAME, b"three", "t3")
    gens = update.list_generations(store, NAME)
    assert [(g["generation"], g["created"]) for g in gens] == [(2, "t2"), (1, "t1")]
    assert update.prune_generations(store, NAME, keep=1) == [1]
    restored = update.rollback_cache(NAME, settings)
    assert restored["restored_generation"] == 2
    assert store.archive_path(NAME).read_bytes() == b"two" and store.read_manifest(NAME)["created"] == "t2"
    assert update.list_generations(store, NAME) == []
    assert not update.generations_dir(store, NAME).exists()
    with pytest.raises(CacheNotFoundError, match="no earlier generation"):
        update.rollback_cache(NAME, settings)
    assert not list(store.root.glob(".tmp-*"))


def test_rollback_refuses_a_damaged_generation(settings) -> None:
    store = CacheStore(settings.cache_dir)
    _publish(store, NAME, b"one", "t1")
    update.save_generation(store, NAME)
    _publish(store, NAME, b"two", "t2")
    archive = Path(update.list_generations(store, NAME)[0]["archive"])
    archive.unlink()
    archive.write_bytes(b"corrupted")
    with pytest.raises(VerifyError, match="does not match"):
        update.rollback_cache(NAME, settings)
    assert store.archive_path(NAME).read_bytes() == b"two"


def test_package_changes_record_from_and_to() -> None:
    old = [{"name": "a", "version": "1", "architecture": "all"}, {"name": "b", "version": "1", "architecture": "all"}]
    new = [{"name": "a", "version": "2", "architecture": "all"}, {"name": "c", "version": "1", "architecture": "all"}]
    assert update._package_changes(old, new) == [
        {"name": "a", "architecture": "all", "from": "1", "to": "2"},
        {"name": "b", "architecture": "all", "from": "1", "to": None},
        {"name": "c", "architecture": "all", "from": None, "to": "1"},
    ]


@pytest.mark.parametrize("entry,name", [
    (".tmp-debian-12-x86_64-build-123", "debian-12-x86_64"),
    (".tmp-debian-12-x86_64-devel-update-9", "debian-12-x86_64-devel"),
    (".tmp-debian-12-x86_64.json.77", "debian-12-x86_64"),
])
def test_leftover_names(entry: str, name: str) -> None:
    m = update._LEFTOVER_RE.match(entry)
    assert m and m.group("name") == name


def test_clean_removes_dead_leftovers_keeps_live_ones(settings) -> None:
    store = CacheStore(settings.cache_dir)
    _publish(store, NAME, b"one", "t1")
    update.save_generation(store, NAME)
    dead = store.root / f".tmp-{NAME}-build-99999"
    (dead / "root").mkdir(parents=True)
    live = store.root / ".tmp-other-1-x86_64-update-99998"
    live.mkdir()
    (settings.package_cache_dir / "x").mkdir(parents=True)
    (settings.package_cache_dir / "x" / "a.deb").write_bytes(b"0" * 1000)
    with locked(settings.lock_dir / "other-1-x86_64.lock", timeout=1, what="other"):
        report = update.clean(settings, packages=True, metadata=True, generations=False)
    assert not dead.exists() and live.exists() and report["skipped"] == ["other-1-x86_64"]
    assert not settings.package_cache_dir.exists() and report["freed"] >= 1000
    assert update.list_generations(store, NAME), "generations are kept unless asked"
    report = update.clean(settings, packages=False, metadata=False, generations=True)
    assert update.list_generations(store, NAME) == [] and not (store.root / ".generations").exists()
    assert store.archive_path(NAME).read_bytes() == b"one" and not live.exists()
    assert json.loads(store.manifest_path(NAME).read_text())["created"] == "t1"
    assert os.listdir(store.root / ".locks")


def test_a_broken_cache_is_not_kept_and_the_last_good_generation_survives(settings) -> None:
    """The current cache no longer matches its manifest: the update neither keeps it as a generation nor prunes
    the good generation 1 (which rollback-cache can still restore)."""
    import hashlib

    from vzpkg.build.pipeline import Reporter

    store = CacheStore(settings.cache_dir)
    _publish(store, NAME, b"one", "t1")
    update.save_generation(store, NAME)
    _publish(store, NAME, b"two", "t2")
    real = Path(os.path.realpath(store.archive_path(NAME)))
    real.write_bytes(b"damaged")
    tmp = store.temp_path(NAME, "archive")
    tmp.write_bytes(b"three")
    new = {"name": NAME, "created": "t3", "sha256": hashlib.sha256(b"three").hexdigest()}
    generation, pruned = update.publish_update(store, NAME, tmp, new, 1, Reporter())
    assert (generation, pruned) == (None, [])
    assert [g["created"] for g in update.list_generations(store, NAME)] == ["t1"]
    assert store.matches_manifest(NAME) and store.read_manifest(NAME)["created"] == "t3"
    # A sound cache is kept and pruning goes on as usual.
    tmp.write_bytes(b"four")
    generation, pruned = update.publish_update(store, NAME, tmp, {**new, "created": "t4",
                                               "sha256": hashlib.sha256(b"four").hexdigest()}, 1, Reporter())
    assert (generation, pruned) == (2, [1])
    assert update.rollback_cache(NAME, settings)["created"] == "t3"


def test_leftovers_are_exactly_the_templates_own(settings) -> None:
    """`.tmp-debian-12-x86_64-devel-build-1` belongs to another template: a run on debian-12-x86_64 leaves it."""
    store = CacheStore(settings.cache_dir)
    root = settings.cache_dir
    root.mkdir(parents=True, exist_ok=True)
    mine = [f".tmp-{NAME}-build-12", f".tmp-{NAME}-archive-12", f".tmp-{NAME}.json.77", f".tmp-{NAME}.json-link-5"]
    other = [f".tmp-{NAME}-devel-build-13", f".tmp-{NAME}-devel.json.4"]
    for n in mine + other:
        (root / n).write_text("")
    assert sorted(p.name for p in store.leftovers(NAME)) == sorted(mine)
    store.clean_leftovers(NAME)
    assert sorted(p.name for p in root.glob(".tmp-*")) == sorted(other)
