"""Repository metadata kept between runs under `<cache_dir>/.metadata`.

    .metadata/<host_path>_InRelease               raw InRelease as downloaded (re-verified with gpgv on every use)
    .metadata/<host_path>_InRelease.etag          its ETag, when the server sent one
    .metadata/indices/<host_path>.<sha256>.json   a parsed Packages file: {name: [[version, arch], ...]}

An InRelease younger than `metadata_expire` seconds is used without asking the mirror (`refresh=True` always asks;
with an ETag the mirror may answer 304). A parsed Packages file is addressed by the sha256 the signed InRelease
lists for it, so it never expires: a changed index has a different sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .apt import (
    AptRepository,
    IndexFile,
    ReleaseInfo,
    decompress_index,
    fetch_index,
    packages_indices,
    parse_packages,
    verify_clearsigned,
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
            text = verify_clearsigned(data, keyring)
        except SignatureError as e:
            # Never keep what does not verify: the next run must ask the mirror again.
            if not fresh:
                path.unlink(missing_ok=True)
            raise SignatureError(f"{repo.inrelease_url}: {e}") from e
        if fresh:
            _write_atomic(path, data)
            if etag:
                _write_atomic(etag_path, etag.encode())
            else:
                etag_path.unlink(missing_ok=True)
        date = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Date:")), "")
        return ReleaseInfo(repo.uri, repo.suite, date, hashlib.sha256(data).hexdigest(), text)

    def _index_path(self, repo: AptRepository, entry: IndexFile) -> Path:
        return self.root / "indices" / f"{url_key(repo.uri + '/dists/' + repo.suite + '/' + entry.path)}.{entry.sha256}.json"

    def index(self, repo: AptRepository, entry: IndexFile) -> PackageIndex:
        """One Packages file, parsed; downloaded (and its sha256 checked) only when not cached yet."""
        path = self._index_path(repo, entry)
        if path.is_file():
            try:
                return {k: [tuple(v) for v in vs] for k, vs in json.loads(path.read_text()).items()}  # type: ignore[misc]
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
        index = parse_packages(decompress_index(entry.path, fetch_index(repo, entry)))
        prefix = path.name.rsplit(".", 2)[0] + "."
        for old in path.parent.glob(f"{prefix}*.json") if path.parent.is_dir() else []:
            if old != path and old.name.rsplit(".", 2)[0] + "." == prefix:
                old.unlink(missing_ok=True)
        _write_atomic(path, json.dumps(index, separators=(",", ":")).encode())
        return index

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
