"""apt repositories: InRelease (signature checked with gpgv), Packages indices."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import process
from ..errors import DiskFullError, MirrorError, MissingToolError, SignatureError
from .http import TooLargeError, fetch


@dataclass
class AptRepository:
    """One `deb URI SUITE COMPONENT...` line."""

    uri: str
    suite: str
    components: tuple[str, ...]

    @classmethod
    def parse(cls, line: str) -> AptRepository:
        words = line.split()
        if len(words) < 3 or words[0] != "deb":
            raise ValueError(f"not a 'deb URI SUITE [COMPONENT...]' line: {line!r}")
        return cls(words[1].rstrip("/"), words[2], tuple(words[3:]))

    @property
    def inrelease_url(self) -> str:
        return f"{self.uri}/dists/{self.suite}/InRelease"

    def packages_url(self, component: str, arch: str, compression: str = ".xz") -> str:
        return f"{self.uri}/dists/{self.suite}/{component}/binary-{arch}/Packages{compression}"


@dataclass
class ReleaseInfo:
    uri: str
    suite: str
    date: str
    sha256: str
    text: str


def verify_clearsigned(data: bytes, keyring: Path) -> str:
    """Check a clear-signed file against the keyring; return the signed text."""
    import shutil

    if shutil.which("gpgv") is None:
        raise MissingToolError("gpgv is not installed: apt-get install gpgv")
    if not keyring.is_file():
        raise SignatureError(f"keyring {keyring} does not exist: install the distribution's keyring package")
    # The signed text comes back on stdout and the status lines on stderr: no temporary file, so a full TMPDIR
    # cannot turn a valid InRelease into "no signature" (gpgv reports a failed write as NODATA).
    proc = process.run(["gpgv", "--keyring", str(keyring), "--status-fd", "2", "--output", "-", "-"],
                       input=data, capture=True, check=False, error=SignatureError)
    status = proc.stderr.decode(errors="replace")
    if "No space left on device" in status:
        raise DiskFullError(f"gpgv: no space left on device in {tempfile.gettempdir()} (TMPDIR) while checking a "
                            f"signature: free space there or point TMPDIR elsewhere")
    if proc.returncode != 0 or "[GNUPG:] VALIDSIG" not in status:
        reported = {ln.split(" ", 2)[1] for ln in status.splitlines() if ln.startswith("[GNUPG:] ") and " " in ln}
        # The most telling first: gpgv reports a missing key as ERRSIG and NO_PUBKEY.
        reason = next((k for k in ("NO_PUBKEY", "BADSIG", "EXPKEYSIG", "REVKEYSIG", "ERRSIG", "NODATA")
                       if k in reported), "")
        raise SignatureError(f"signature check failed ({reason or 'no valid signature'}) with keyring {keyring}")
    return proc.stdout.decode(errors="replace")


def verified_release(repo: AptRepository, data: bytes, keyring: Path) -> ReleaseInfo:
    """Check an InRelease file of REPO against the keyring; raise SignatureError naming its URL."""
    try:
        text = verify_clearsigned(data, keyring)
    except SignatureError as e:
        raise SignatureError(f"{repo.inrelease_url}: {e}") from e
    date = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Date:")), "")
    return ReleaseInfo(repo.uri, repo.suite, date, hashlib.sha256(data).hexdigest(), text)


def fetch_release(repo: AptRepository, keyring: Path) -> ReleaseInfo:
    """Fetch and verify dists/SUITE/InRelease."""
    return verified_release(repo, fetch(repo.inrelease_url).content, keyring)


# ---- Packages indices (added for `vzpkg status` / `update-cache`) --------------------------------

_COMPRESSIONS = (".xz", ".gz", ".bz2", "")


@dataclass
class IndexFile:
    """One Packages file listed in a verified Release: its path below dists/SUITE/, sha256 and size."""

    path: str
    sha256: str
    size: int
    plain_size: int | None = None      # the uncompressed file's size and sha256, when the Release lists it
    plain_sha256: str | None = None


def release_sha256_entries(release_text: str) -> dict[str, IndexFile]:
    """The SHA256 section of a (verified) Release text, by path."""
    from debian.deb822 import Release

    release = Release(release_text)
    entries = {}
    for item in release.get("SHA256", []):
        entries[item["name"]] = IndexFile(item["name"], item["sha256"].lower(), int(item["size"]))
    return entries


def packages_indices(release_text: str, components: tuple[str, ...] | list[str], arch: str) -> list[IndexFile]:
    """For each component, the best-compressed Packages file the Release lists for ARCH (and binary-all when
    the repository keeps architecture-independent packages apart)."""
    from debian.deb822 import Release

    entries = release_sha256_entries(release_text)
    release = Release(release_text)
    archs = [arch]
    if "all" in release.get("Architectures", "").split() and release.get("No-Support-for-Architecture-all") != "Packages":
        archs.append("all")
    picked = []
    for component in components or ("main",):
        for a in archs:
            for compression in _COMPRESSIONS:
                entry = entries.get(f"{component}/binary-{a}/Packages{compression}")
                if entry is not None:
                    plain = entries.get(f"{component}/binary-{a}/Packages")
                    if plain is not None and compression:
                        entry = IndexFile(entry.path, entry.sha256, entry.size, plain.size, plain.sha256)
                    picked.append(entry)
                    break
    return picked


DECOMPRESS_CHUNK = 1 << 20


def index_limit(entry: IndexFile, max_index_size: int | None = None) -> int:
    """How large the decompressed index may grow: the size the signed Release gives the uncompressed file, or
    the max_index_size setting when it gives none (the bound against a decompression bomb)."""
    if entry.plain_size is not None:
        return entry.plain_size
    if max_index_size is None:
        from ..config import load_settings

        max_index_size = load_settings().max_index_size
    return max_index_size


def decompress_index(path: str, data: bytes, limit: int, url: str = "") -> bytes:
    """Decompress an index (by its name: .xz, .gz, .bz2 or plain), never past LIMIT bytes.

    The data already matches the signed Release; what does not decompress, or expands beyond LIMIT, is a
    broken or hostile repository: MirrorError naming the URL."""
    import bz2
    import lzma
    import zlib

    where = url or path
    if path.endswith(".xz"):
        kind, make = "xz", lzma.LZMADecompressor
    elif path.endswith(".gz"):
        kind, make = "gzip", lambda: zlib.decompressobj(wbits=31)
    elif path.endswith(".bz2"):
        kind, make = "bzip2", bz2.BZ2Decompressor
    else:
        return data
    out = bytearray()
    pending = data
    dec = make()
    try:
        while True:
            if kind == "gzip":
                chunk = dec.decompress(pending, DECOMPRESS_CHUNK)
                pending = dec.unconsumed_tail
            else:
                chunk = dec.decompress(pending, max_length=DECOMPRESS_CHUNK)
                pending = b""
            out += chunk
            if len(out) > limit:
                raise MirrorError(f"{where}: expands to more than {limit} bytes (a decompression bomb, or an index "
                                  f"larger than its signed size): refused; check the mirror")
            if dec.eof:
                rest = dec.unused_data
                if not rest.strip(b"\0"):
                    break
                dec, pending = make(), rest  # concatenated streams
                continue
            if not chunk and not pending and (kind == "gzip" or dec.needs_input):
                raise EOFError("the compressed data ends early")
    except (lzma.LZMAError, zlib.error, OSError, EOFError, ValueError) as e:
        raise MirrorError(f"{where}: not valid {kind} data ({e}) although it matches the signed Release: the "
                          f"repository is broken; check the mirror") from e
    return bytes(out)


def fetch_index(repo: AptRepository, entry: IndexFile) -> bytes:
    """Download one index file listed in the verified Release and check its sha256; return it as downloaded.
    Nothing larger than the Release's size for it is read."""
    url = f"{repo.uri}/dists/{repo.suite}/{entry.path}"
    try:
        data = fetch(url, max_bytes=entry.size).content
    except TooLargeError as e:
        raise SignatureError(f"{url}: larger than the {entry.size} bytes the signed Release gives it") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise SignatureError(f"{url}: sha256 {digest[:16]}... does not match the signed Release ({entry.sha256[:16]}...)")
    return data


def load_index(repo: AptRepository, entry: IndexFile) -> dict[str, list[tuple[str, str]]]:
    """One Packages file: downloaded and checked, decompressed within its bound, checked again when the Release
    gives the uncompressed file's hash, parsed."""
    url = f"{repo.uri}/dists/{repo.suite}/{entry.path}"
    data = decompress_index(entry.path, fetch_index(repo, entry), index_limit(entry), url)
    if entry.plain_sha256 is not None and hashlib.sha256(data).hexdigest() != entry.plain_sha256:
        raise SignatureError(f"{url}: decompressed, it does not match the sha256 the signed Release gives "
                             f"{entry.path.rsplit('.', 1)[0]}")
    return parse_packages(data)


def parse_packages(data: bytes) -> dict[str, list[tuple[str, str]]]:
    """Packages text → {name: [(version, architecture), ...]} (python-debian's deb822 parser, no apt_pkg)."""
    import io

    from debian.deb822 import Packages

    index: dict[str, list[tuple[str, str]]] = {}
    stream = io.BytesIO(data)  # bytes lines, decoded one at a time: no second, wider copy of a large index
    for para in Packages.iter_paragraphs(stream, use_apt_pkg=False, fields=["Package", "Version", "Architecture"]):
        name = para.get("Package")
        version = para.get("Version")
        if name and version:
            index.setdefault(name, []).append((version, para.get("Architecture", "")))
    return index


def fetch_packages(repo: AptRepository, arch: str, release_text: str) -> dict[str, list[tuple[str, str]]]:
    """Every package the repository offers for ARCH, from its Packages files (checked against the Release)."""
    merged: dict[str, list[tuple[str, str]]] = {}
    for entry in packages_indices(release_text, repo.components, arch):
        for name, versions in load_index(repo, entry).items():
            merged.setdefault(name, []).extend(versions)
    return merged


def compare_versions(a: str, b: str) -> int:
    """dpkg's version order: negative, zero or positive like cmp (pure python, no apt_pkg)."""
    from debian.debian_support import Version

    va, vb = Version(a), Version(b)
    return (va > vb) - (va < vb)
