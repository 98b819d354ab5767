"""`vzpkg status` for dnf templates: rpm's order of updates, arch and exclude rules, the repomd/primary
metadata cache, and status.compare on the almalinux-9 template against a fake mirror (no network)."""

from __future__ import annotations

import gzip
import hashlib
import os
import time
from pathlib import Path

import pytest

from vzpkg.build import status as status_mod
from vzpkg.build.update import _package_changes
from vzpkg.config import load_settings
from vzpkg.errors import MirrorError, SignatureError
from vzpkg.manifest.model import Manifest, PackageEntry
from vzpkg.pkgmgr import dnf_status
from vzpkg.pkgmgr.dnf_repos import DnfRepo
from vzpkg.repo import metadata_cache as mc
from vzpkg.repo import rpm as rpmrepo
from vzpkg.template import TemplateRepository

PROJECT = Path(__file__).resolve().parents[2]
NAME = "almalinux-9-x86_64"
MIRROR = "http://mirror.invalid/almalinux"
BASEOS = f"{MIRROR}/9/BaseOS/x86_64/os/"
APPSTREAM = f"{MIRROR}/9/AppStream/x86_64/os/"


def _pkg(name: str, evr: str, arch: str = "x86_64") -> dict:
    epoch, version, release = rpmrepo.parse_evr(evr)
    return {"name": name, "epoch": int(epoch or 0), "version": version, "release": release, "arch": arch,
            "architecture": arch, "evr": evr}


def _entries(*pkgs: dict) -> list[PackageEntry]:
    return [PackageEntry.from_dict(p) for p in pkgs]


def _offer(evr: str, arch: str = "x86_64", label: str = "baseos") -> tuple[str, str, str, str, str]:
    epoch, version, release = rpmrepo.parse_evr(evr)
    return (epoch or "0", version, release or "", arch, label)


# ---- comparison ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cached", "offered", "expected"), [
    ("1.0-1", ["1.1-1"], "1.1-1"),                      # version bump
    ("1.0-1", ["1.0-2.el9"], "1.0-2.el9"),              # release bump
    ("1:1.5-1", ["2.0-1"], None),                       # a higher version without the epoch is older
    ("1:1.5-1", ["2:1.0-1", "1:1.6-1"], "2:1.0-1"),     # the Epoch bump wins over a higher version
    ("1.0-1", ["1.0-1"], None),                         # the same
    ("1.0-1", ["0.9-5"], None),                         # a downgrade is not an update
    ("1.0-1", ["1.0~rc1-1"], None),                     # ~ sorts before
    ("1.0-1", ["1.0^git1-1"], "1.0^git1-1"),            # ^ sorts after
    ("2.0-1.el9", ["2.0-1.el9_2", "2.0-1.el9_1"], "2.0-1.el9_2"),  # the highest of several
])
def test_find_updates_uses_rpm_order(cached, offered, expected) -> None:
    updates = dnf_status.find_updates(_entries(_pkg("p", cached)), {"p": [_offer(o) for o in offered]}, "x86_64")
    assert [(u.cached, u.available) for u in updates] == ([(cached, expected)] if expected else [])


def test_find_updates_architecture_rules() -> None:
    installed = [_pkg("lib", "1.0-1", "i686"), _pkg("lib", "1.0-1", "x86_64"), _pkg("data", "1.0-1", "noarch")]
    offered = {"lib": [_offer("1.1-1", "x86_64")], "data": [_offer("1.1-1", "x86_64"), _offer("1.2-1", "aarch64")]}
    updates = [u.to_dict() for u in dnf_status.find_updates(_entries(*installed), offered, "x86_64")]
    # the x86_64 build is no update of the i686 one (multilib); noarch → native arch is; aarch64 never
    assert [(u["name"], u["architecture"], u["available"], u["available_architecture"]) for u in updates] == [
        ("lib", "x86_64", "1.1-1", "x86_64"), ("data", "noarch", "1.1-1", "x86_64")]
    assert dnf_status.arch_matches("x86_64", "noarch", "x86_64")
    assert not dnf_status.arch_matches("x86_64", "i686", "x86_64")


def test_find_updates_without_evr_field_and_with_missing_packages() -> None:
    pkg = {"name": "p", "epoch": 3, "version": "1", "release": "2", "arch": "noarch"}
    updates = dnf_status.find_updates(_entries(pkg, _pkg("gone", "1-1")), {"p": [_offer("3:1-3", "noarch", "r")]},
                                      "x86_64")
    assert [u.to_dict() for u in updates] == [{"name": "p", "architecture": "noarch", "cached": "3:1-2", "available": "3:1-3",
                        "available_architecture": "noarch", "repository": "r"}]


def test_evr_string() -> None:
    assert dnf_status.evr_string("0", "1.0", "1") == "1.0-1"
    assert dnf_status.evr_string(None, "1.0", "1") == "1.0-1"
    assert dnf_status.evr_string(2, "1.0", "1.el9") == "2:1.0-1.el9"


def test_repo_filter_exclude_and_includepkgs() -> None:
    allowed = dnf_status.repo_filter(DnfRepo(exclude="kernel* glibc,foo"))
    assert not allowed("kernel-core") and not allowed("glibc") and not allowed("foo") and allowed("bash")
    allowed = dnf_status.repo_filter(DnfRepo(includepkgs=("vzt-*",), exclude=("vzt-b",)))
    assert allowed("vzt-a") and not allowed("vzt-b") and not allowed("bash")
    assert dnf_status.repo_filter(DnfRepo())("anything")


def test_package_changes_use_evr_for_rpm_and_version_for_apt() -> None:
    old = [_pkg("a", "1.0-1"), _pkg("e", "1:1.5-1", "noarch"), _pkg("gone", "1-1"), _pkg("k", "5.14-1")]
    new = [_pkg("a", "1.1-1"), _pkg("e", "2:1.0-1", "noarch"), _pkg("new", "1-1"), _pkg("k", "5.14-1"),
           _pkg("k", "5.14-2")]
    assert _package_changes(old, new) == [
        {"name": "a", "architecture": "x86_64", "from": "1.0-1", "to": "1.1-1"},
        {"name": "e", "architecture": "noarch", "from": "1:1.5-1", "to": "2:1.0-1"},
        {"name": "gone", "architecture": "x86_64", "from": "1-1", "to": None},
        {"name": "k", "architecture": "x86_64", "from": "5.14-1", "to": "5.14-1, 5.14-2"},  # installonly
        {"name": "new", "architecture": "x86_64", "from": None, "to": "1-1"},
    ]
    apt = [{"name": "hello", "version": "1", "architecture": "all"}]
    assert _package_changes(apt, [{**apt[0], "version": "2"}]) == [
        {"name": "hello", "architecture": "all", "from": "1", "to": "2"}]


def test_repository_label() -> None:
    assert status_mod.repository_label({"uri": "http://h/debian", "suite": "bookworm"}) == "http://h/debian bookworm"
    assert status_mod.repository_label({"id": "baseos", "baseurl": "http://h/os/"}) == "baseos http://h/os/"


# ---- the metadata cache ----------------------------------------------------------------------------------

PRIMARY = b"""<?xml version="1.0" encoding="UTF-8"?>
<metadata xmlns="http://linux.duke.edu/metadata/common" xmlns:rpm="http://linux.duke.edu/metadata/rpm" packages="3">
<package type="rpm"><name>bash</name><arch>x86_64</arch><version epoch="0" ver="5.1.8" rel="9.el9"/></package>
<package type="rpm"><name>bash</name><arch>src</arch><version epoch="0" ver="5.1.8" rel="9.el9"/></package>
<package type="rpm"><name>tzdata</name><arch>noarch</arch><version epoch="0" ver="2024b" rel="1.el9"/></package>
</metadata>
"""


def _repomd(primary_gz: bytes, revision: str = "1700000000") -> bytes:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<repomd xmlns="http://linux.duke.edu/metadata/repo"><revision>{revision}</revision>
<data type="primary"><checksum type="sha256">{hashlib.sha256(primary_gz).hexdigest()}</checksum>
<location href="repodata/{revision}-primary.xml.gz"/><timestamp>{revision}</timestamp></data></repomd>
""".encode()


class FakeResponse:
    def __init__(self, content: bytes, status: int = 200) -> None:
        self.content = content
        self.status_code = status
        self.headers: dict[str, str] = {}

    @property
    def text(self) -> str:
        return self.content.decode()


@pytest.fixture
def mirror(monkeypatch: pytest.MonkeyPatch):
    """fetch() for mc and repo.rpm served from a dict; calls recorded."""
    served: dict[str, bytes] = {}
    calls: list[str] = []

    def fetch(url: str, **_kw):
        calls.append(url)
        if url not in served:
            raise MirrorError(f"{url}: HTTP 404")
        return FakeResponse(served[url])

    monkeypatch.setattr(mc, "fetch", fetch)
    monkeypatch.setattr(rpmrepo, "fetch", fetch)
    return served, calls


def _publish(served: dict[str, bytes], base: str, primary: bytes = PRIMARY, revision: str = "1700000000") -> bytes:
    gz = gzip.compress(primary, mtime=0)
    repomd = _repomd(gz, revision)
    served[f"{base.rstrip('/')}/repodata/repomd.xml"] = repomd
    served[f"{base.rstrip('/')}/repodata/{revision}-primary.xml.gz"] = gz
    return repomd


def test_repomd_cached_until_it_expires_and_primary_by_checksum(tmp_path: Path, mirror) -> None:
    served, calls = mirror
    repomd = _publish(served, BASEOS)
    cache = mc.RpmMetadataCache(tmp_path, expire=3600)
    md = cache.repomd(BASEOS, lambda: BASEOS)
    assert md.sha256 == hashlib.sha256(repomd).hexdigest()
    assert cache.primary(md) == {"bash": [("0", "5.1.8", "9.el9", "x86_64")], "tzdata": [("0", "2024b", "1.el9", "noarch")]}
    assert len(calls) == 2
    # fresh: no request at all, not even to resolve the mirror; primary from the parsed copy
    md2 = cache.repomd(BASEOS, lambda: pytest.fail("resolved a fresh entry"))
    assert md2.sha256 == md.sha256 and md2.baseurl == BASEOS
    assert cache.primary(md2)["bash"] and len(calls) == 2
    # expired (or --refresh): asked again; a new primary replaces the old parsed one
    repomd_file = next((tmp_path / "rpm").glob("*_repomd.xml"))
    old = time.time() - 7200
    os.utime(repomd_file, (old, old))
    _publish(served, BASEOS, PRIMARY.replace(b"5.1.8", b"5.2.0"), revision="1700000100")
    md3 = cache.repomd(BASEOS, lambda: BASEOS)
    assert md3.revision == "1700000100" and cache.primary(md3)["bash"][0][1] == "5.2.0"
    assert len(list((tmp_path / "indices").glob("*primary*.json"))) == 1
    assert mc.RpmMetadataCache(tmp_path, expire=3600, refresh=True).repomd(BASEOS, lambda: BASEOS).revision == "1700000100"
    assert len(calls) == 5


def test_primary_checksum_mismatch_is_refused(tmp_path: Path, mirror) -> None:
    served, _ = mirror
    _publish(served, BASEOS)
    served[f"{BASEOS.rstrip('/')}/repodata/1700000000-primary.xml.gz"] += b"tampered"
    cache = mc.RpmMetadataCache(tmp_path)
    md = cache.repomd(BASEOS, lambda: BASEOS)
    with pytest.raises(MirrorError, match="checksum mismatch"):
        cache.primary(md)
    assert not (tmp_path / "indices").exists() or not list((tmp_path / "indices").iterdir())


def test_repomd_signature_checked_on_every_use_and_bad_one_not_kept(tmp_path: Path, mirror) -> None:
    served, calls = mirror
    _publish(served, BASEOS)
    served[f"{BASEOS.rstrip('/')}/repodata/repomd.xml.asc"] = b"GOOD"
    checked = []

    def verify(md, asc):
        checked.append(asc)
        if asc != b"GOOD":
            raise SignatureError("signature check failed")

    cache = mc.RpmMetadataCache(tmp_path, expire=3600)
    cache.repomd(BASEOS, lambda: BASEOS, verify)
    cache.repomd(BASEOS, lambda: BASEOS, verify)  # from the cache, verified again
    assert checked == [b"GOOD", b"GOOD"] and len(calls) == 2
    # a cache entry written without its signature is not trusted by a repo_gpgcheck repository
    cache.repomd(BASEOS, lambda: BASEOS, refresh=True)
    assert not list((tmp_path / "rpm").glob("*.asc"))
    served[f"{BASEOS.rstrip('/')}/repodata/repomd.xml.asc"] = b"BAD"
    with pytest.raises(SignatureError):
        cache.repomd(BASEOS, lambda: BASEOS, verify)
    assert not list((tmp_path / "rpm").iterdir())  # nothing kept that did not verify


def test_broken_repomd_is_not_kept(tmp_path: Path, mirror) -> None:
    served, _ = mirror
    served[f"{BASEOS.rstrip('/')}/repodata/repomd.xml"] = b"<repomd this is not xml"
    with pytest.raises(MirrorError, match="not valid XML"):
        mc.RpmMetadataCache(tmp_path).repomd(BASEOS, lambda: BASEOS)
    assert not (tmp_path / "rpm").exists() or not list((tmp_path / "rpm").iterdir())


# ---- status.compare on a dnf template ---------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path):
    s = load_settings(cache_dir=tmp_path / "cache", mirror=MIRROR, environ={})
    s.template_dirs = [PROJECT / "templates"]
    return s


def _manifest(template, served) -> Manifest:
    def state(base: str) -> dict:
        md = rpmrepo.parse_repomd(served[f"{base.rstrip('/')}/repodata/repomd.xml"], base)
        return {"id": "baseos" if "BaseOS" in base else "appstream", **md.state(), "gpgcheck": True}

    return Manifest.from_dict({"template_digest": template.digest(), "created": "then", "sha256": "0" * 64,
                               "template_packages": template.packages,
                               "repositories": [state(BASEOS), state(APPSTREAM)],
                               "packages": [_pkg("bash", "5.1.8-9.el9"), _pkg("tzdata", "2024a-1.el9", "noarch"),
                                            _pkg("vim-minimal", "2:8.2.2637-20.el9_1")]})


def test_compare_dnf_template(settings, mirror) -> None:
    served, calls = mirror
    _publish(served, BASEOS)
    _publish(served, APPSTREAM, PRIMARY.replace(b"bash", b"nano"))
    template = TemplateRepository(settings.template_dirs).load(NAME)
    manifest = _manifest(template, served)

    report = status_mod.compare(template, manifest, settings)
    assert report.current is True and report.updates == []
    assert [(r["id"], r["changed"]) for r in report.repositories] == [("baseos", False), ("appstream", False)]
    assert not any("primary" in c for c in calls)  # unchanged repositories: primary not read

    # BaseOS publishes tzdata 2024b and a vim-minimal with a lower epoch
    _publish(served, BASEOS, PRIMARY.replace(b"</metadata>", b'<package type="rpm"><name>vim-minimal</name>'
                                             b'<arch>x86_64</arch><version epoch="1" ver="9.0" rel="1.el9"/></package>'
                                             b"</metadata>"), revision="1700000200")
    report = status_mod.compare(template, manifest, settings, refresh=True)
    assert report.current is False
    assert [(r["id"], r["changed"]) for r in report.repositories] == [("baseos", True), ("appstream", False)]
    assert [(u["name"], u["cached"], u["available"], u["repository"]) for u in report.to_dict()["updates"]] == [
        ("tzdata", "2024a-1.el9", "2024b-1.el9", f"baseos {BASEOS}")]
    assert report.repositories[0]["revision"] == "1700000200"


def test_compare_dnf_template_change(settings, mirror) -> None:
    served, _ = mirror
    _publish(served, BASEOS)
    _publish(served, APPSTREAM)
    template = TemplateRepository(settings.template_dirs).load(NAME)
    manifest = _manifest(template, served)
    manifest.template_packages = [*template.packages, "nano"]
    manifest.packages += _entries(_pkg("nano", "5.6.1-5.el9"))
    manifest.template_digest = "changed"
    report = status_mod.compare(template, manifest, settings)
    assert report.template_changed is True and report.current is False
    assert report.remove == ["nano"] and "rpm" in report.install


def test_unreachable_repository_is_an_error(settings, mirror) -> None:
    template = TemplateRepository(settings.template_dirs).load(NAME)
    with pytest.raises(MirrorError, match="repomd.xml"):
        status_mod.compare(template, Manifest(), settings)


def test_compare_resolves_a_mirrorlist_only_when_the_cached_repomd_is_stale(tmp_path: Path, mirror) -> None:
    served, calls = mirror
    tdir = tmp_path / "templates" / "vzt-ml"
    tdir.mkdir(parents=True)
    (tdir / "template.toml").write_text(
        'summary = "s"\ndescription = "d"\ndistribution = "almalinux"\nrelease = "9"\narchitecture = "x86_64"\n'
        'package_manager = "dnf"\npackages = ["bash"]\ngpg_keys = ["/nonexistent/key"]\n'
        'repositories = [{ id = "ml", mirrorlist = "http://list.invalid/?release=$releasever&arch=$basearch", '
        'exclude = "tzdata" }]\n')
    served["http://list.invalid/?release=9&arch=x86_64"] = b"# mirrors\nhttp://m1.invalid/9/os/\nhttp://m2.invalid/\n"
    _publish(served, "http://m1.invalid/9/os")
    s = load_settings(cache_dir=tmp_path / "cache", mirror=MIRROR, environ={})
    s.template_dirs = [tmp_path / "templates"]
    template = TemplateRepository(s.template_dirs).load("vzt-ml")
    manifest = Manifest(template_digest=template.digest(),
                        packages=_entries(_pkg("bash", "5.1.0-1.el9"), _pkg("tzdata", "2020a-1.el9", "noarch")))
    report = status_mod.compare(template, manifest, s)
    [repo] = report.repositories
    assert repo["baseurl"] == "http://m1.invalid/9/os" and repo["changed"] is True
    assert [u["name"] for u in report.to_dict()["updates"]] == ["bash"]  # tzdata is excluded from this repository
    before = len(calls)
    status_mod.compare(template, manifest, s)  # fresh: neither the mirror list nor the mirror is asked
    assert len(calls) == before
