"""Repository metadata for `vzpkg status`: Release/Packages parsing, version order, the metadata cache."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import time
from pathlib import Path

import pytest

from vzpkg.errors import SignatureError
from vzpkg.repo import apt as repo_apt
from vzpkg.repo import metadata_cache as mc
from vzpkg.repo.apt import AptRepository, compare_versions, packages_indices, parse_packages

PACKAGES = b"""Package: hello
Version: 2.10-3
Architecture: amd64
Description: greets
 with a continuation line
 Package: not-a-package

Package: hello
Version: 2.10-3+deb12u1
Architecture: amd64

Package: tzdata
Version: 2024a-0+deb12u1
Architecture: all
"""


def _release(files: dict[str, bytes], extra: str = "") -> str:
    lines = "".join(f" {hashlib.sha256(d).hexdigest()} {len(d)} {p}\n" for p, d in files.items())
    return f"Suite: bookworm\nArchitectures: amd64 arm64\nComponents: main\n{extra}SHA256:\n{lines}"


class FakeResponse:
    def __init__(self, content: bytes, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.content = content
        self.status_code = status
        self.headers = headers or {}


def test_parse_packages_reads_name_version_arch() -> None:
    index = parse_packages(PACKAGES)
    assert index == {"hello": [("2.10-3", "amd64"), ("2.10-3+deb12u1", "amd64")],
                     "tzdata": [("2024a-0+deb12u1", "all")]}


@pytest.mark.parametrize("a,b,sign", [
    ("1", "2", -1), ("2.10-3+deb12u1", "2.10-3", 1), ("1:0.1", "9.9", 1), ("1.0~rc1", "1.0", -1), ("1.0", "1.0", 0),
])
def test_compare_versions_uses_dpkg_order(a: str, b: str, sign: int) -> None:
    assert compare_versions(a, b) == sign


def test_packages_indices_prefers_xz_and_lists_binary_all_when_separate() -> None:
    files = {"main/binary-amd64/Packages": b"a", "main/binary-amd64/Packages.xz": b"b",
             "main/binary-amd64/Packages.gz": b"c", "main/binary-all/Packages.gz": b"d"}
    text = _release(files).replace("amd64 arm64", "all amd64")
    assert [e.path for e in packages_indices(text, ("main",), "amd64")] == [
        "main/binary-amd64/Packages.xz", "main/binary-all/Packages.gz"]
    text = _release(files, "No-Support-for-Architecture-all: Packages\n").replace("amd64 arm64", "all amd64")
    assert [e.path for e in packages_indices(text, ("main",), "amd64")] == ["main/binary-amd64/Packages.xz"]


def test_fetch_index_refuses_a_file_that_does_not_match_the_release(monkeypatch: pytest.MonkeyPatch) -> None:
    good = lzma.compress(PACKAGES)
    text = _release({"main/binary-amd64/Packages.xz": good})
    entry = packages_indices(text, ("main",), "amd64")[0]
    repo = AptRepository("http://mirror.invalid/debian", "bookworm", ("main",))
    monkeypatch.setattr(repo_apt, "fetch", lambda url, **kw: FakeResponse(b"tampered"))
    with pytest.raises(SignatureError, match="does not match the signed Release"):
        repo_apt.fetch_index(repo, entry)
    monkeypatch.setattr(repo_apt, "fetch", lambda url, **kw: FakeResponse(good))
    assert repo_apt.fetch_packages(repo, "amd64", text)["tzdata"] == [("2024a-0+deb12u1", "all")]


def test_url_key_is_flat_and_readable() -> None:
    assert mc.url_key("http://deb.example/debian/dists/bookworm/InRelease") == "deb.example_debian_dists_bookworm_InRelease"
    assert "/" not in mc.url_key("http://127.0.0.1:8080/x/y")


@pytest.fixture
def fake_mirror(monkeypatch: pytest.MonkeyPatch):
    """fetch() served from a dict; every call recorded; 'signatures' valid unless they contain BAD."""
    served: dict[str, bytes] = {}
    calls: list[tuple[str, dict]] = []

    def fetch(url: str, **kw):
        calls.append((url, kw.get("headers") or {}))
        return FakeResponse(served[url])

    def verify(data: bytes, keyring: Path) -> str:
        if b"BAD" in data:
            raise SignatureError("signature check failed (BADSIG)")
        return data.decode()

    monkeypatch.setattr(mc, "fetch", fetch)
    monkeypatch.setattr(repo_apt, "fetch", fetch)
    monkeypatch.setattr(repo_apt, "verify_clearsigned", verify)  # verified_release looks it up there
    return served, calls


def test_release_is_cached_until_it_expires(tmp_path: Path, fake_mirror) -> None:
    served, calls = fake_mirror
    repo = AptRepository("http://mirror.invalid/debian", "bookworm", ("main",))
    served[repo.inrelease_url] = b"Date: Sat, 01 Jun 2024 10:00:00 UTC\n"
    cache = mc.MetadataCache(tmp_path / ".metadata", expire=3600)
    first = cache.release(repo, tmp_path / "keyring.gpg")
    assert first.date == "Sat, 01 Jun 2024 10:00:00 UTC" and len(calls) == 1
    cache.release(repo, tmp_path / "keyring.gpg")
    assert len(calls) == 1, "a fresh cached InRelease is used without asking the mirror"
    mc.MetadataCache(tmp_path / ".metadata", expire=3600, refresh=True).release(repo, tmp_path / "k")
    assert len(calls) == 2, "refresh asks the mirror"
    path = tmp_path / ".metadata" / mc.url_key(repo.inrelease_url)
    old = time.time() - 7200
    os.utime(path, (old, old))
    cache.release(repo, tmp_path / "keyring.gpg")
    assert len(calls) == 3, "an expired InRelease is fetched again"


def test_a_release_that_does_not_verify_is_refused_and_not_kept(tmp_path: Path, fake_mirror) -> None:
    served, _calls = fake_mirror
    repo = AptRepository("http://mirror.invalid/debian", "bookworm", ("main",))
    served[repo.inrelease_url] = b"Date: x\nBAD\n"
    cache = mc.MetadataCache(tmp_path / ".metadata")
    with pytest.raises(SignatureError, match="InRelease"):
        cache.release(repo, tmp_path / "keyring.gpg")
    assert not (tmp_path / ".metadata" / mc.url_key(repo.inrelease_url)).exists()


def test_parsed_index_is_reused_by_sha256(tmp_path: Path, fake_mirror) -> None:
    served, calls = fake_mirror
    repo = AptRepository("http://mirror.invalid/debian", "bookworm", ("main",))
    v1 = gzip.compress(PACKAGES)
    served[f"{repo.uri}/dists/bookworm/main/binary-amd64/Packages.gz"] = v1
    cache = mc.MetadataCache(tmp_path / ".metadata")
    text = _release({"main/binary-amd64/Packages.gz": v1})
    assert cache.packages(repo, "amd64", text)["hello"][-1] == ("2.10-3+deb12u1", "amd64")
    assert cache.packages(repo, "amd64", text)["tzdata"] == [("2024a-0+deb12u1", "all")]
    assert len(calls) == 1
    v2 = gzip.compress(PACKAGES.replace(b"2024a", b"2024b"))
    served[f"{repo.uri}/dists/bookworm/main/binary-amd64/Packages.gz"] = v2
    text2 = _release({"main/binary-amd64/Packages.gz": v2})
    assert cache.packages(repo, "amd64", text2)["tzdata"] == [("2024b-0+deb12u1", "all")]
    assert len(calls) == 2
    assert len(list((tmp_path / ".metadata" / "indices").glob("*.json"))) == 1, "the superseded index is removed"


# ---- bounded decompression (the servers' side is in tests/integration/test_bad_mirror.py) -------------------

@pytest.mark.parametrize("name,compress", [
    ("Packages.xz", lzma.compress), ("Packages.gz", lambda d: gzip.compress(d, mtime=0)),
    ("Packages.bz2", __import__("bz2").compress), ("Packages", lambda d: d),
])
def test_decompress_index_round_trips(name: str, compress) -> None:
    assert repo_apt.decompress_index(name, compress(PACKAGES), len(PACKAGES)) == PACKAGES


@pytest.mark.parametrize("name,compress", [
    ("Packages.xz", lzma.compress), ("Packages.gz", gzip.compress), ("Packages.bz2", __import__("bz2").compress),
])
def test_decompress_index_stops_at_its_limit(name: str, compress) -> None:
    from vzpkg.errors import MirrorError

    bomb = compress(bytes(8 << 20))
    with pytest.raises(MirrorError, match="expands to more than 1048576 bytes"):
        repo_apt.decompress_index(name, bomb, 1 << 20, "http://mirror.invalid/" + name)


@pytest.mark.parametrize("name,kind", [("Packages.xz", "xz"), ("Packages.gz", "gzip"), ("Packages.bz2", "bzip2")])
def test_corrupt_or_cut_index_is_a_mirror_error(name: str, kind: str) -> None:
    from vzpkg.errors import MirrorError

    good = {"xz": lzma.compress, "gzip": gzip.compress, "bzip2": __import__("bz2").compress}[kind](PACKAGES * 50)
    for data in (b"garbage" * 20, good[: len(good) // 2]):
        with pytest.raises(MirrorError, match=f"http://mirror.invalid/{name}: not valid {kind} data"):
            repo_apt.decompress_index(name, data, 1 << 20, f"http://mirror.invalid/{name}")


def test_index_limit_is_the_signed_uncompressed_size() -> None:
    files = {"main/binary-amd64/Packages.xz": lzma.compress(PACKAGES), "main/binary-amd64/Packages": PACKAGES}
    entry = packages_indices(_release(files), ("main",), "amd64")[0]
    assert entry.path.endswith(".xz") and entry.plain_size == len(PACKAGES)
    assert repo_apt.index_limit(entry, 1 << 30) == len(PACKAGES)
    alone = packages_indices(_release({"main/binary-amd64/Packages.xz": b"x"}), ("main",), "amd64")[0]
    assert alone.plain_size is None and repo_apt.index_limit(alone, 12345) == 12345
