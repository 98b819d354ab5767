"""Repository metadata kept between runs under `<cache_dir>/.metadata`.

    .metadata/<host_path>_InRelease               raw InRelease as downloaded (re-verified with gpgv on every use)
    .metadata/<host_path>_InRelease.etag          its ETag, when the server sent one
    .metadata/indices/<host_path>.<sha256>.json   a parsed Packages file: {name: [[version, arch], ...]}

An InRelease younger than `metadata_expire` seconds is used without asking the mirror (`refresh=True` always asks;
with an ETag the mirror may answer 304). A parsed Packages file is addressed by the sha256 the signed InRelease
lists for it, so it never expires: a changed index has a different sha256.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .apt import (
    AptRepository,
    IndexFile,
    ReleaseInfo,
    load_index,
    packages_indices,
    verified_release,
)
from .http import fetch

PackageIndex = dict[str, list[tuple[str, str]]]


def url_key(url: str) -> str:
    """apt's naming of list files: the URL without its scheme, '/' turned into '_'."""
    key = re.sub(r"^[a-z+]+://", "", url)
    key = re.sub(r"[^A-Za-z0-9.+~-]", "_", key.replace("/", "_"))
    return key.strip("_") or "_"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.rename(tmp, path)


def _cached_index(path: Path, build: Callable[[], dict[str, list[tuple[str, ...]]]]) -> Any:
    """A parsed index kept as <key>.<checksum>.json: read it if there, else BUILD it, store it and drop the
    entries of the same key with other checksums (older versions of that index)."""
    if path.is_file():
        try:
            return {k: [tuple(v) for v in vs] for k, vs in json.loads(path.read_text()).items()}
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
    index = build()
    prefix = path.name.rsplit(".", 2)[0] + "."
    for old in path.parent.glob(f"{prefix}*.json") if path.parent.is_dir() else []:
        if old != path and old.name.rsplit(".", 2)[0] + "." == prefix:
            old.unlink(missing_ok=True)
    _write_atomic(path, json.dumps(index, separators=(",", ":")).encode())
    return index


@dataclass
class MetadataCache:
    root: Path
    expire: int = 86400
    refresh: bool = False

    def _release_path(self, repo: AptRepository) -> Path:
        return self.root / url_key(repo.inrelease_url)

    def release(self, repo: AptRepository, keyring: Path, *, refresh: bool | None = None) -> ReleaseInfo:
        """The repository's InRelease, verified with gpgv and KEYRING (from the cache when fresh enough)."""
        from ..errors import SignatureError

        refresh = self.refresh if refresh is None else refresh
        path = self._release_path(repo)
        etag_path = path.with_name(path.name + ".etag")
        data: bytes | None = None
        fresh = False
        if path.is_file() and not refresh and time.time() - path.stat().st_mtime < self.expire:
            data = path.read_bytes()
        etag = None
        if data is None:
            headers = {}
            if path.is_file() and etag_path.is_file():
                headers["If-None-Match"] = etag_path.read_text().strip()
            resp = fetch(repo.inrelease_url, headers=headers)
            if resp.status_code == 304 and path.is_file():
                data = path.read_bytes()
                os.utime(path)
            else:
                data, fresh, etag = resp.content, True, resp.headers.get("ETag")
        try:
            info = verified_release(repo, data, keyring)
        except SignatureError:
            # Never keep what does not verify: the next run must ask the mirror again.
            if not fresh:
                path.unlink(missing_ok=True)
            raise
        if fresh:
            _write_atomic(path, data)
            if etag:
                _write_atomic(etag_path, etag.encode())
            else:
                etag_path.unlink(missing_ok=True)
        return info

    def _index_path(self, repo: AptRepository, entry: IndexFile) -> Path:
        return self.root / "indices" / f"{url_key(repo.uri + '/dists/' + repo.suite + '/' + entry.path)}.{entry.sha256}.json"

    def index(self, repo: AptRepository, entry: IndexFile) -> PackageIndex:
        """One Packages file, parsed; downloaded (and its sha256 checked) only when not cached yet."""
        return _cached_index(self._index_path(repo, entry),
                             lambda: load_index(repo, entry))

    def packages(self, repo: AptRepository, arch: str, release_text: str) -> PackageIndex:
        """Everything the repository offers for ARCH (all its components), merged."""
        merged: PackageIndex = {}
        for entry in packages_indices(release_text, repo.components, arch):
            for name, versions in self.index(repo, entry).items():
                merged.setdefault(name, []).extend(versions)
        return merged

    def size(self) -> int:
        total = 0
        if self.root.is_dir():
            for p in self.root.rglob("*"):
                if p.is_file():
                    total += p.stat().st_size
        return total

    def clear(self) -> int:
        """Remove everything; return the bytes freed."""
        freed = self.size()
        shutil.rmtree(self.root, ignore_errors=True)
        return freed


# ---- RPM repositories (dnf templates) ---------------------------------------------------------------------
#
#     .metadata/rpm/<source>_repomd.xml                 raw repomd.xml as downloaded (re-checked on every use)
#     .metadata/rpm/<source>_repomd.xml.asc             its detached signature (repo_gpgcheck repositories)
#     .metadata/rpm/<source>_repomd.json                {baseurl, etag}: where it came from
#     .metadata/indices/<baseurl>_primary.<checksum>.json   parsed primary: {name: [[epoch, ver, rel, arch], ...]}
#
# <source> is the repository's configured location (baseurl, or its mirrorlist/metalink URL), so a fresh entry
# is used without resolving a mirror list. The parsed primary is addressed by the checksum repomd.xml gives it.

RpmIndex = dict[str, list[tuple[str, str, str, str]]]


@dataclass
class RpmMetadataCache:
    root: Path
    expire: int = 86400
    refresh: bool = False

    def _repomd_path(self, source: str) -> Path:
        return self.root / "rpm" / f"{url_key(source)}_repomd.xml"

    def repomd(self, source: str, resolve, verify=None, *, refresh: bool | None = None):
        """The repository's repomd.xml (a RepoMD), from the cache when younger than `expire`.

        SOURCE names the cache entry; RESOLVE() gives the base URL to fetch from (resolving a mirror list);
        VERIFY(md, asc_bytes), when given, checks the detached signature (repo_gpgcheck) on every use. Nothing
        that does not parse or verify is kept."""
        from .rpm import parse_repomd

        refresh = self.refresh if refresh is None else refresh
        path = self._repomd_path(source)
        side = path.with_name(path.name[: -len(".xml")] + ".json")
        asc_path = path.with_name(path.name + ".asc")
        try:
            info = json.loads(side.read_text()) if side.is_file() else {}
        except (OSError, ValueError):
            info = {}
        data: bytes | None = None
        asc: bytes | None = None
        fresh = False
        baseurl = info.get("baseurl", "")
        if (path.is_file() and baseurl and not refresh and time.time() - path.stat().st_mtime < self.expire
                and (verify is None or asc_path.is_file())):
            data = path.read_bytes()
            asc = asc_path.read_bytes() if verify is not None else None
        if data is None:
            new_base = resolve()
            headers = {}
            if path.is_file() and new_base == baseurl and info.get("etag"):
                headers["If-None-Match"] = info["etag"]
            baseurl = new_base
            resp = fetch(f"{baseurl.rstrip('/')}/repodata/repomd.xml", headers=headers)
            if resp.status_code == 304 and path.is_file():
                data = path.read_bytes()
                os.utime(path)
            else:
                data, fresh = resp.content, True
                info = {"baseurl": baseurl, "etag": resp.headers.get("ETag")}
            if verify is not None:
                asc = fetch(f"{baseurl.rstrip('/')}/repodata/repomd.xml.asc").content
                fresh = True
        try:
            md = parse_repomd(data, baseurl)
            if verify is not None:
                verify(md, asc)
        except Exception:
            for p in (path, side, asc_path):  # never keep what does not parse or verify
                p.unlink(missing_ok=True)
            raise
        if fresh:
            _write_atomic(path, data)
            _write_atomic(side, json.dumps({"baseurl": baseurl, "etag": info.get("etag")}).encode())
            if asc is not None:
                _write_atomic(asc_path, asc)
            else:  # a signature of an earlier repomd.xml must not be paired with this one
                asc_path.unlink(missing_ok=True)
        return md

    def _primary_path(self, md) -> Path:
        entry = md.data["primary"]
        return self.root / "indices" / f"{url_key(md.baseurl.rstrip('/') + '/repodata/primary')}.{entry.checksum}.json"

    def primary(self, md) -> RpmIndex:
        """The repository's packages, {name: [(epoch, version, release, arch), ...]}: primary metadata
        downloaded (its checksum checked against repomd.xml) only when not cached yet."""
        from .rpm import fetch_primary

        def build() -> RpmIndex:
            index: RpmIndex = {}
            for pkg in fetch_primary(md):
                if pkg["arch"] in ("src", "nosrc") or not pkg["name"]:
                    continue
                index.setdefault(pkg["name"], []).append(
                    (pkg["epoch"] or "0", pkg["version"], pkg["release"], pkg["arch"]))
            return index

        return _cached_index(self._primary_path(md), build)
