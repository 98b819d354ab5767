"""Deltas between generations of a cache: fetch less than the whole archive when the puller has the previous one.

    push --delta:  tar(previous generation) + tar(cache) --zstd --patch-from--> patch      (an extra blob)
                   pushed as its own small artifact, tag `<TAG>.delta`, and named in the image's annotations
    pull:          the local cache is that previous generation → fetch the patch →
                   zstd -d --patch-from=tar(local) → tar → compress as vzpkg packs → sha256 must be the layer's

The last step only reproduces the layer when the compression is deterministic (same zstd parameters as
archive.pack, the same library); the sha256 decides, and on any difference the pull downloads the whole layer.
The patch is `zstd --patch-from` (the CLI: python-zstandard has no reference-prefix API) between uncompressed
tars, where a changed package changes a few files and the rest matches.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .. import process
from ..errors import MissingToolError, VerifyError

PATCH_MEDIA_TYPE = "application/vnd.vzpkg.patch.v1+zstd"
PATCH_CONFIG_MEDIA_TYPE = "application/vnd.vzpkg.patch.config.v1+json"
ANNOTATION_FROM = "io.vzpkg.delta.from-sha256"
ANNOTATION_TAG = "io.vzpkg.delta.tag"
_CHUNK = 1 << 20


def _zstd() -> str:
    path = shutil.which("zstd")
    if path is None:
        raise MissingToolError("zstd is not installed (apt-get install zstd): needed for --delta")
    return path


def _window_log(size: int) -> int:
    # --patch-from needs a window that covers the reference; both sides must agree on it.
    return min(max(27, math.ceil(math.log2(max(size, 2))) + 1), 31)


def decompress(archive: Path, dest: Path) -> int:
    import zstandard

    from ..store.archive import MAX_WINDOW_SIZE

    size = 0
    dobj = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_SIZE).decompressobj()
    with archive.open("rb") as f, dest.open("wb") as out:
        while chunk := f.read(_CHUNK):
            data = dobj.decompress(chunk)
            out.write(data)
            size += len(data)
    return size


def compress_like_pack(tar: Path, dest: Path, level: int) -> str:
    """Compress TAR with archive.pack's parameters; return the sha256 of DEST."""
    import zstandard

    from ..store.archive import _WINDOW_LOG

    params = zstandard.ZstdCompressionParameters.from_level(level, threads=-1, enable_ldm=True, window_log=_WINDOW_LOG)
    chunker = zstandard.ZstdCompressor(compression_params=params).chunker(chunk_size=_CHUNK)
    digest = hashlib.sha256()
    with tar.open("rb") as f, dest.open("wb") as out:
        while data := f.read(_CHUNK):
            for chunk in chunker.compress(data):
                out.write(chunk)
                digest.update(chunk)
        for chunk in chunker.finish():
            out.write(chunk)
            digest.update(chunk)
        out.flush()
        os.fsync(out.fileno())  # on disk before it can be renamed over the previous cache
    return digest.hexdigest()


@dataclass(frozen=True)
class Patch:
    path: Path
    from_sha256: str
    to_sha256: str
    window_log: int

    def config(self) -> bytes:
        return json.dumps({"from_sha256": self.from_sha256, "to_sha256": self.to_sha256,
                           "window_log": self.window_log, "tool": "zstd --patch-from"}, sort_keys=True).encode()


def make_patch(old_archive: Path, old_sha: str, new_archive: Path, new_sha: str, work: Path) -> Patch:
    work.mkdir(parents=True, exist_ok=True)
    old_tar, new_tar, patch = work / "old.tar", work / "new.tar", work / "patch.zst"
    old_size = decompress(old_archive, old_tar)
    new_size = decompress(new_archive, new_tar)
    wlog = _window_log(max(old_size, new_size))
    process.run([_zstd(), "-q", "-f", "-T0", "-3", f"--long={wlog}", f"--patch-from={old_tar}", str(new_tar),
                 "-o", str(patch)], capture=True, error=VerifyError, what="zstd --patch-from")
    old_tar.unlink()
    new_tar.unlink()
    return Patch(patch, old_sha, new_sha, wlog)


def apply_patch(old_archive: Path, patch: Path, window_log: int, level: int, dest: Path, work: Path) -> str:
    """Rebuild the new archive into DEST from the local OLD_ARCHIVE and PATCH; return DEST's sha256."""
    work.mkdir(parents=True, exist_ok=True)
    old_tar, new_tar = work / "old.tar", work / "new.tar"
    try:
        decompress(old_archive, old_tar)
        process.run([_zstd(), "-q", "-d", "-f", f"--long={window_log}", f"--patch-from={old_tar}", str(patch),
                     "-o", str(new_tar)], capture=True, error=VerifyError, what="zstd --patch-from -d")
        old_tar.unlink()
        return compress_like_pack(new_tar, dest, level)
    finally:
        old_tar.unlink(missing_ok=True)
        new_tar.unlink(missing_ok=True)
