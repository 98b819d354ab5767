"""RPM repositories: repomd.xml and primary.xml metadata, mirror lists, and rpm's version ordering.

Used by the dnf backend (fail fast on a bad repository before dnf runs) and by `vzpkg status` (what a
repository offers now, compared with what a cache holds).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from .. import process
from ..errors import MirrorError
from .http import fetch

REPO_NS = "{http://linux.duke.edu/metadata/repo}"
COMMON_NS = "{http://linux.duke.edu/metadata/common}"
RPM_NS = "{http://linux.duke.edu/metadata/rpm}"
METALINK_NS = "{http://www.metalinker.org/}"


@dataclass
class RepoData:
    """One <data type="..."> entry of repomd.xml."""

    type: str
    location: str
    checksum: str
    checksum_type: str
    open_checksum: str = ""
    size: int | None = None
    open_size: int | None = None          # decompressed, when repomd.xml gives it
    timestamp: int | None = None


@dataclass
class RepoMD:
    baseurl: str
    revision: str
    sha256: str                           # of repomd.xml itself
    data: dict[str, RepoData] = field(default_factory=dict)
    raw: bytes = b""

    def url(self, what: str) -> str:
        return f"{self.baseurl.rstrip('/')}/{self.data[what].location}"

    def state(self) -> dict[str, Any]:
        """What the manifest records about a repository."""
        primary = self.data.get("primary")
        return {"baseurl": self.baseurl, "revision": self.revision, "repomd_sha256": self.sha256,
                "primary_checksum": f"{primary.checksum_type}:{primary.checksum}" if primary else None,
                "timestamp": max((d.timestamp or 0 for d in self.data.values()), default=0) or None}


def parse_repomd(data: bytes, baseurl: str = "") -> RepoMD:
    """Parse repomd.xml; raise MirrorError naming the URL when it is not valid repository metadata."""
    where = f"{baseurl.rstrip('/')}/repodata/repomd.xml" if baseurl else "repomd.xml"
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise MirrorError(f"{where}: not valid XML ({e}): the repository metadata is broken") from e
    if root.tag != f"{REPO_NS}repomd":
        raise MirrorError(f"{where}: not a repomd.xml document (root element {root.tag!r})")
    md = RepoMD(baseurl=baseurl, revision=(root.findtext(f"{REPO_NS}revision") or "").strip(),
                sha256=hashlib.sha256(data).hexdigest(), raw=data)
    for el in root.findall(f"{REPO_NS}data"):
        kind = el.get("type", "")
        loc = el.find(f"{REPO_NS}location")
        csum = el.find(f"{REPO_NS}checksum")
        if loc is None or csum is None or not loc.get("href") or not (csum.text or "").strip():
            raise MirrorError(f"{where}: entry {kind!r} has no location or checksum")
        size = el.findtext(f"{REPO_NS}size")
        open_size = el.findtext(f"{REPO_NS}open-size")
        ts = el.findtext(f"{REPO_NS}timestamp")
        md.data[kind] = RepoData(type=kind, location=loc.get("href", ""), checksum=(csum.text or "").strip(),
                                 checksum_type=csum.get("type", "sha256"),
                                 open_checksum=(el.findtext(f"{REPO_NS}open-checksum") or "").strip(),
                                 size=int(size) if size and size.isdigit() else None,
                                 open_size=int(open_size) if open_size and open_size.isdigit() else None,
                                 timestamp=int(float(ts)) if ts and re.fullmatch(r"[0-9.]+", ts) else None)
    if "primary" not in md.data:
        raise MirrorError(f"{where}: no primary metadata listed: the repository metadata is broken")
    return md


def fetch_repomd(baseurl: str) -> RepoMD:
    """Fetch and parse BASEURL/repodata/repomd.xml."""
    resp = fetch(f"{baseurl.rstrip('/')}/repodata/repomd.xml")
    return parse_repomd(resp.content, baseurl)


def decompress(data: bytes, name: str, limit: int | None = None, url: str = "") -> bytes:
    """Decompress metadata (by name or magic: gzip, xz, zstd, bzip2), never past LIMIT bytes (default: the
    max_index_size setting); what does not decompress or grows past LIMIT is a MirrorError naming URL."""
    from .apt import decompress_index

    if limit is None:
        from ..config import load_settings

        limit = load_settings().max_index_size
    where = url or name
    if name.endswith(".gz") or data[:2] == b"\x1f\x8b":
        return decompress_index("x.gz", data, limit, where)
    if name.endswith(".xz") or data[:6] == b"\xfd7zXZ\x00":
        return decompress_index("x.xz", data, limit, where)
    if name.endswith(".bz2"):
        return decompress_index("x.bz2", data, limit, where)
    if name.endswith(".zst") or data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        # zstd has no output bound per call: feed it small pieces (a block expands at most 128 KiB, so a piece
        # of 256 bytes, at most 64 blocks, yields at most 8 MiB) and check the size after each.
        dec = zstandard.ZstdDecompressor().decompressobj()
        out = bytearray()
        try:
            for i in range(0, len(data), 256):
                out += dec.decompress(data[i:i + 256])
                if len(out) > limit:
                    raise MirrorError(f"{where}: expands to more than {limit} bytes (a decompression bomb, or "
                                      f"metadata larger than repomd.xml says): refused; check the mirror")
                if dec.eof:
                    break
        except zstandard.ZstdError as e:
            raise MirrorError(f"{where}: not valid zstd data ({e}): the repository is broken; check the mirror") from e
        if not dec.eof:
            raise MirrorError(f"{where}: not valid zstd data (it ends early): the repository is broken; check the mirror")
        return bytes(out)
    return data


def fetch_primary(md: RepoMD) -> list[dict[str, Any]]:
    """Download primary metadata, check it against repomd.xml's checksum, and parse it."""
    entry = md.data["primary"]
    url = md.url("primary")
    # No more than repomd.xml says it has (read in chunks, refused once past it); 1 GiB when it says nothing.
    data = fetch(url, max_bytes=entry.size if entry.size else 1 << 30).content
    try:
        digest = hashlib.new("sha1" if entry.checksum_type == "sha" else entry.checksum_type, data).hexdigest()
    except ValueError as e:
        raise MirrorError(f"{url}: unknown checksum type {entry.checksum_type!r}") from e
    if digest != entry.checksum:
        raise MirrorError(f"{url}: checksum mismatch ({entry.checksum_type} {digest}, repomd.xml says "
                          f"{entry.checksum}): the mirror is inconsistent or being updated; retry later")
    return parse_primary(decompress(data, entry.location, entry.open_size, url))


def parse_primary(xml_bytes: bytes) -> list[dict[str, Any]]:
    """Every package of a primary.xml: name, epoch, version, release, arch, location, requires, provides."""
    packages: list[dict[str, Any]] = []
    try:
        for _event, el in ET.iterparse(_BytesReader(xml_bytes), events=("end",)):
            if el.tag != f"{COMMON_NS}package":
                continue
            if el.get("type", "rpm") != "rpm":
                el.clear()
                continue
            ver = el.find(f"{COMMON_NS}version")
            fmt = el.find(f"{COMMON_NS}format")
            loc = el.find(f"{COMMON_NS}location")
            csum = el.find(f"{COMMON_NS}checksum")
            pkg: dict[str, Any] = {
                "name": (el.findtext(f"{COMMON_NS}name") or "").strip(),
                "arch": (el.findtext(f"{COMMON_NS}arch") or "").strip(),
                "epoch": ver.get("epoch", "0") if ver is not None else "0",
                "version": ver.get("ver", "") if ver is not None else "",
                "release": ver.get("rel", "") if ver is not None else "",
                "location": loc.get("href", "") if loc is not None else "",
                "checksum": (csum.text or "").strip() if csum is not None else "",
                "checksum_type": csum.get("type", "") if csum is not None else "",
                "requires": [], "provides": [],
            }
            if fmt is not None:
                for kind in ("requires", "provides"):
                    group = fmt.find(f"{RPM_NS}{kind}")
                    if group is not None:
                        pkg[kind] = [e.get("name", "") for e in group.findall(f"{RPM_NS}entry")]
            packages.append(pkg)
            el.clear()
    except ET.ParseError as e:
        raise MirrorError(f"primary metadata is not valid XML ({e}): the repository metadata is broken") from e
    return packages


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        import io

        self._f = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)


def baseurl_from_mirrorlist(url: str, text: str) -> str:
    """The first http(s) base URL of a mirrorlist (plain list) or metalink (XML) answer."""
    stripped = text.lstrip()
    if stripped.startswith("<"):
        try:
            root = ET.fromstring(stripped.encode())
        except ET.ParseError as e:
            raise MirrorError(f"{url}: metalink is not valid XML ({e})") from e
        for el in root.iter(f"{METALINK_NS}url"):
            href = (el.text or "").strip()
            if href.startswith(("http://", "https://")) and href.endswith("/repodata/repomd.xml"):
                return href[: -len("/repodata/repomd.xml")]
        raise MirrorError(f"{url}: metalink lists no http(s) mirror")
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("http://", "https://")):
            return line.rstrip("/")
    raise MirrorError(f"{url}: mirror list names no http(s) mirror")


def resolve_baseurl(repo: dict[str, Any]) -> str:
    """The base URL dnf would start with: baseurl, else the first mirror of the mirrorlist or metalink."""
    base = repo.get("baseurl")
    if base:
        return (base if isinstance(base, str) else base[0]).split()[0]
    for key in ("metalink", "mirrorlist"):
        if repo.get(key):
            resp = fetch(repo[key])
            return baseurl_from_mirrorlist(repo[key], resp.text)
    raise MirrorError(f"repository {repo.get('id', '?')}: no baseurl, mirrorlist or metalink")


# ---- version ordering ---------------------------------------------------------------------------------

EVR = tuple[str | None, str, str | None]


def parse_evr(text: str) -> EVR:
    """'1:2.3-4' → ('1', '2.3', '4'); missing parts are None (an absent epoch counts as 0)."""
    epoch: str | None = None
    release: str | None = None
    if ":" in text:
        epoch, text = text.split(":", 1)
    if "-" in text:
        text, release = text.rsplit("-", 1)
    return (epoch, text, release)


def rpmvercmp(a: str, b: str) -> int:
    """rpm's segment comparison (rpmio/rpmvercmp.c), including '~' (sorts before) and '^' (sorts after)."""
    if a == b:
        return 0
    i = j = 0
    while i < len(a) or j < len(b):
        while i < len(a) and not a[i].isalnum() and a[i] not in "~^":
            i += 1
        while j < len(b) and not b[j].isalnum() and b[j] not in "~^":
            j += 1
        # tilde: sorts before everything, even the end of the string
        if (i < len(a) and a[i] == "~") or (j < len(b) and b[j] == "~"):
            if i >= len(a) or a[i] != "~":
                return 1
            if j >= len(b) or b[j] != "~":
                return -1
            i += 1
            j += 1
            continue
        # caret: sorts after the end of the string, before anything else
        if (i < len(a) and a[i] == "^") or (j < len(b) and b[j] == "^"):
            if i >= len(a):
                return -1
            if j >= len(b):
                return 1
            if a[i] != "^":
                return 1
            if b[j] != "^":
                return -1
            i += 1
            j += 1
            continue
        if not (i < len(a) and j < len(b)):
            break
        si, sj = i, j
        if a[i].isdigit():
            while i < len(a) and a[i].isdigit():
                i += 1
            while j < len(b) and b[j].isdigit():
                j += 1
            isnum = True
        else:
            while i < len(a) and a[i].isalpha() and a[i].isascii():
                i += 1
            while j < len(b) and b[j].isalpha() and b[j].isascii():
                j += 1
            isnum = False
        seg1, seg2 = a[si:i], b[sj:j]
        if not seg2:  # b's segment is of the other type: numeric is newer than alpha
            return 1 if isnum else -1
        if isnum:
            seg1, seg2 = seg1.lstrip("0"), seg2.lstrip("0")
            if len(seg1) != len(seg2):
                return 1 if len(seg1) > len(seg2) else -1
        if seg1 != seg2:
            return 1 if seg1 > seg2 else -1
    if i >= len(a) and j >= len(b):
        return 0
    return -1 if i >= len(a) else 1


def _own_label_compare(a: EVR, b: EVR) -> int:
    ea, eb = int(a[0] or 0), int(b[0] or 0)
    if ea != eb:
        return 1 if ea > eb else -1
    rc = rpmvercmp(a[1], b[1])
    if rc:
        return rc
    return rpmvercmp(a[2] or "", b[2] or "")  # as rpm.labelCompare: a missing release sorts first


_COMPARE_IMPL: str | None = None


def compare_impl() -> str:
    """Which implementation compare_evr uses: python-rpm (rpm.labelCompare), or vzpkg's own rpmvercmp."""
    global _COMPARE_IMPL
    if _COMPARE_IMPL is None:
        try:
            import rpm  # noqa: F401

            _COMPARE_IMPL = "python-rpm"
        except Exception:  # the PyPI shim fails in its own ways when python3-rpm is missing
            _COMPARE_IMPL = "builtin"
    return _COMPARE_IMPL


def compare_evr(a: EVR | str, b: EVR | str) -> int:
    """-1, 0 or 1 as rpm orders epoch:version-release A and B (strings or (epoch, version, release))."""
    ta = parse_evr(a) if isinstance(a, str) else a
    tb = parse_evr(b) if isinstance(b, str) else b
    if compare_impl() == "python-rpm":
        import rpm

        return int(rpm.labelCompare((ta[0] or "0", ta[1], ta[2]), (tb[0] or "0", tb[1], tb[2])))
    return _own_label_compare(ta, tb)


def vercmp_command(a: str, b: str) -> int | None:
    """rpmdev-vercmp's answer, when that tool is installed (for tests against rpm itself)."""
    tool = shutil.which("rpmdev-vercmp")
    if tool is None:
        return None
    proc = process.run([tool, a, b], capture=True, text=True, check=False)
    return {0: 0, 11: 1, 12: -1}.get(proc.returncode)
