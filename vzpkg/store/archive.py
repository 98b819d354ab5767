"""Cache archives: reproducible tar + zstandard packing and reading.

Packing streams GNU tar (fast, and it records xattrs, hard links and sparse files) into a multithreaded
zstandard compressor. Unpacking is vzpkg/store/extract.py's job (safe_unpack).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .. import process
from ..errors import BuildError, MissingToolError

DEFAULT_LEVEL = 6  # measured on a Debian minbase: level 9 is 3 % smaller and 35 % slower
_CHUNK = 1 << 20
# Long-distance matching over a 128 MiB window finds the many near-duplicate files of a root filesystem;
# decompressors must be told to accept such a window (see open_decompressed).
_WINDOW_LOG = 27
MAX_WINDOW_SIZE = 1 << _WINDOW_LOG


@dataclass
class PackResult:
    packed_size: int
    unpacked_size: int
    sha256: str


def _tar_command(root: Path, source_date_epoch: int | None) -> list[str]:
    if shutil.which("tar") is None:
        raise MissingToolError("GNU tar is not installed: apt-get install tar")
    cmd = [
        "tar", "--create", "--file=-", f"--directory={root}",
        "--sort=name", "--numeric-owner", "--format=posix", "--xattrs", "--xattrs-include=*",
        "--one-file-system",
        # Reproducibility: no atime/ctime, and extended-header names that do not contain the pid.
        "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
    ]
    if source_date_epoch is not None:
        cmd += [f"--mtime=@{source_date_epoch}", "--clamp-mtime"]
    cmd.append(".")
    return cmd


def pack(
    root: Path,
    dest: Path,
    *,
    source_date_epoch: int | None = None,
    level: int = DEFAULT_LEVEL,
    progress: Callable[[int], None] | None = None,
) -> PackResult:
    """Pack ROOT into DEST (.tar.zst), fsync it, and return sizes and the sha256 of DEST.

    `progress` is called with the number of uncompressed bytes read so far.
    """
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(
        level, threads=-1, enable_ldm=True, window_log=_WINDOW_LOG
    )
    compressor = zstandard.ZstdCompressor(compression_params=params)
    digest = hashlib.sha256()
    unpacked = 0
    packed = 0
    with process.spawn(_tar_command(root, source_date_epoch), stdout=process.PIPE, stderr=process.PIPE,
                       env={**os.environ, "LC_ALL": "C"}, what=f"packing {root}") as proc:
        assert proc.stdout is not None and proc.stderr is not None
        with _removed_when_full(dest, lambda: unpacked), dest.open("wb") as out:
            chunker = compressor.chunker(chunk_size=_CHUNK)
            while True:
                data = proc.stdout.read(_CHUNK)
                if not data:
                    break
                unpacked += len(data)
                for chunk in chunker.compress(data):
                    out.write(chunk)
                    digest.update(chunk)
                    packed += len(chunk)
                if progress is not None:
                    progress(unpacked)
            for chunk in chunker.finish():
                out.write(chunk)
                digest.update(chunk)
                packed += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        err = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise BuildError(f"packing {root} failed: tar: {err.strip().splitlines()[-1] if err.strip() else 'error'}")
    return PackResult(packed_size=packed, unpacked_size=unpacked, sha256=digest.hexdigest())


@contextmanager
def _removed_when_full(dest: Path, written: Callable[[], int]) -> Iterator[None]:
    """Out of space while packing: remove the partial archive and say which filesystem is full."""
    from ..space import disk_full_error, is_full

    try:
        yield
    except OSError as e:
        if not is_full(e):
            raise
        dest.unlink(missing_ok=True)
        err = disk_full_error(e, dest)
        err.message += f" (the root packed so far: {written() / 1e6:.1f} MB uncompressed)"
        raise err from e


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def open_decompressed(path: Path) -> IO[bytes]:
    """A readable stream of the tar inside a .tar.zst."""
    import zstandard

    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_SIZE)
    return dctx.stream_reader(path.open("rb"), read_size=_CHUNK, closefd=True)


def iter_members(path: Path):
    """Yield the TarInfo of every member (streaming; nothing is extracted)."""
    with open_decompressed(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tf:
        yield from tf
