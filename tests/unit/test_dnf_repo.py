"""RPM repository metadata (repomd.xml, primary.xml, mirror lists) and rpm's version ordering."""

from __future__ import annotations

import gzip
import hashlib
import itertools

import pytest

from vzpkg.errors import MirrorError
from vzpkg.repo import rpm as rpmrepo

PRIMARY = b"""<?xml version="1.0" encoding="UTF-8"?>
<metadata xmlns="http://linux.duke.edu/metadata/common" xmlns:rpm="http://linux.duke.edu/metadata/rpm" packages="2">
<package type="rpm">
  <name>vzt-epoch</name><arch>noarch</arch>
  <version epoch="1" ver="1.5" rel="1"/>
  <checksum type="sha256" pkgid="YES">abc</checksum>
  <location href="vzt-epoch-1.5-1.noarch.rpm"/>
  <format>
    <rpm:provides><rpm:entry name="vzt-epoch" flags="EQ" epoch="1" ver="1.5" rel="1"/></rpm:provides>
    <rpm:requires><rpm:entry name="vzt-filesystem"/><rpm:entry name="/bin/sh" pre="1"/></rpm:requires>
  </format>
</package>
<package type="rpm">
  <name>vzt-c</name><arch>x86_64</arch>
  <version epoch="0" ver="1.0" rel="2.el9"/>
  <location href="Packages/v/vzt-c-1.0-2.el9.x86_64.rpm"/>
</package>
</metadata>
"""


def _repomd(primary: bytes) -> bytes:
    gz = gzip.compress(primary)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<repomd xmlns="http://linux.duke.edu/metadata/repo" xmlns:rpm="http://linux.duke.edu/metadata/rpm">
  <revision>1700000000</revision>
  <data type="primary">
    <checksum type="sha256">{hashlib.sha256(gz).hexdigest()}</checksum>
    <open-checksum type="sha256">{hashlib.sha256(primary).hexdigest()}</open-checksum>
    <location href="repodata/x-primary.xml.gz"/>
    <timestamp>1700000001</timestamp>
    <size>{len(gz)}</size>
  </data>
  <data type="filelists">
    <checksum type="sha256">00</checksum>
    <location href="repodata/x-filelists.xml.gz"/>
    <timestamp>1700000000</timestamp>
  </data>
</repomd>
""".encode()


def test_parse_repomd():
    md = rpmrepo.parse_repomd(_repomd(PRIMARY), "http://h/repo/")
    assert md.revision == "1700000000"
    assert set(md.data) == {"primary", "filelists"}
    assert md.url("primary") == "http://h/repo/repodata/x-primary.xml.gz"
    state = md.state()
    assert state["timestamp"] == 1700000001
    assert state["primary_checksum"].startswith("sha256:")


@pytest.mark.parametrize("data, match", [
    (b"<repomd this is not xml", "not valid XML"),
    (b"<html><body>404</body></html>", "not a repomd.xml"),
    (b'<repomd xmlns="http://linux.duke.edu/metadata/repo"><revision>1</revision></repomd>', "no primary"),
])
def test_broken_repomd(data, match):
    with pytest.raises(MirrorError, match=match) as e:
        rpmrepo.parse_repomd(data, "http://h/repo")
    assert "http://h/repo/repodata/repomd.xml" in str(e.value)


def test_parse_primary():
    pkgs = rpmrepo.parse_primary(PRIMARY)
    assert [(p["name"], p["epoch"], p["version"], p["release"], p["arch"]) for p in pkgs] == [
        ("vzt-epoch", "1", "1.5", "1", "noarch"), ("vzt-c", "0", "1.0", "2.el9", "x86_64")]
    assert pkgs[0]["requires"] == ["vzt-filesystem", "/bin/sh"]
    assert pkgs[0]["provides"] == ["vzt-epoch"]
    assert pkgs[1]["location"] == "Packages/v/vzt-c-1.0-2.el9.x86_64.rpm"
    with pytest.raises(MirrorError):
        rpmrepo.parse_primary(b"<metadata><package>")


def test_fetch_primary_checks_digest(monkeypatch):
    gz = gzip.compress(PRIMARY)
    md = rpmrepo.parse_repomd(_repomd(PRIMARY), "http://h/repo")

    class Resp:
        def __init__(self, content):
            self.content = content

    monkeypatch.setattr(rpmrepo, "fetch", lambda url, **kw: Resp(gz))
    assert len(rpmrepo.fetch_primary(md)) == 2
    monkeypatch.setattr(rpmrepo, "fetch", lambda url, **kw: Resp(gz + b"x"))
    with pytest.raises(MirrorError, match="checksum mismatch"):
        rpmrepo.fetch_primary(md)


def test_mirrorlist_and_metalink():
    assert rpmrepo.baseurl_from_mirrorlist("u", "# comment\nhttp://a/os/\nhttp://b/os/\n") == "http://a/os"
    metalink = """<?xml version="1.0"?><metalink xmlns="http://www.metalinker.org/"><files><file name="repomd.xml">
    <resources><url protocol="rsync">rsync://x/repodata/repomd.xml</url>
    <url protocol="https">https://m.test/f/41/repodata/repomd.xml</url></resources></file></files></metalink>"""
    assert rpmrepo.baseurl_from_mirrorlist("u", metalink) == "https://m.test/f/41"
    with pytest.raises(MirrorError):
        rpmrepo.baseurl_from_mirrorlist("u", "nothing here")


# ---- version comparison: vzpkg's own rpmvercmp against rpm's (python-rpm) ------------------------------------

CASES = [
    ("1.0", "1.0", 0), ("1.0", "2.0", -1), ("2.0.1", "2.0", 1), ("2.0", "2.0.1", -1), ("1.0a", "1.0", 1),
    ("1.0", "1.0a", -1), ("1.10", "1.9", 1), ("1.001", "1.1", 0), ("1.0~rc1", "1.0", -1), ("1.0~rc1", "1.0~rc2", -1),
    ("1.0~~", "1.0~", -1), ("1.0^", "1.0", 1), ("1.0^git1", "1.0", 1), ("1.0^git1", "1.0.1", -1),
    ("1.0^git1", "1.0~rc1", 1), ("1.0^git1", "1.0^git2", -1), ("1.0~rc1^git1", "1.0~rc1", 1), ("a", "1", -1),
    ("1", "a", 1), ("1.0.a", "1.0.1", -1), ("1_0", "1.0", 0), ("5.5p1", "5.5p10", -1), ("xyz10", "xyz10.1", -1),
    ("20101121", "20101122", -1), ("1.0+", "1.0", 0), ("", "1", -1), ("abc", "ABC", 1),
]


@pytest.mark.parametrize("a, b, expected", CASES)
def test_own_rpmvercmp(a, b, expected):
    assert rpmrepo.rpmvercmp(a, b) == expected
    assert rpmrepo.rpmvercmp(b, a) == -expected


EVRS = ["0:1.0-1", "1.0-1", "1:0.5-1", "1:1.5-1", "2.0-1", "1.0-1.el9", "1.0-1.el9_2", "1.0~rc1-1", "1.0^git1-1",
        "1.0-1~beta", "2:0.1-0", "1.0", "1.0-2"]


@pytest.mark.parametrize("a, b", list(itertools.combinations(EVRS, 2)))
def test_own_compare_matches_rpm(a, b):
    rpm = pytest.importorskip("rpm")
    ta, tb = rpmrepo.parse_evr(a), rpmrepo.parse_evr(b)
    expected = rpm.labelCompare((ta[0] or "0", ta[1], ta[2]), (tb[0] or "0", tb[1], tb[2]))
    assert rpmrepo._own_label_compare(ta, tb) == expected
    assert rpmrepo.compare_evr(a, b) == expected


@pytest.mark.parametrize("a, b, expected", [c for c in CASES if c[0] and c[1]])  # rpm refuses empty versions
def test_vercmp_cases_match_rpm(a, b, expected):
    rpm = pytest.importorskip("rpm")
    assert rpm.labelCompare(("0", a, "1"), ("0", b, "1")) == expected


def test_epoch_wins():
    assert rpmrepo.compare_evr("1:1.5-1", "2.0-1") == 1
    assert rpmrepo.compare_evr(("1", "1.5", "1"), (None, "2.0", "1")) == 1
    assert rpmrepo.compare_evr("0:2.0-1", "2.0-1") == 0


def test_compare_impl_uses_bindings_when_present():
    try:
        import rpm  # noqa: F401
    except ImportError:
        assert rpmrepo.compare_impl() == "builtin"
    else:
        assert rpmrepo.compare_impl() == "python-rpm"


PIECES = ["1", "1.0", "1.0a", "1.0~rc1", "1.0^git", "1.0.1", "a1", "1_2", "10", "01", "1.0~", "1.0^", "2~a^b",
          "1.a.2", "1.0~rc1^1", "1..0", "1.0.", "0.9.9z", "1.0^~", "R2", "r2"]


def test_own_rpmvercmp_matches_rpm_on_all_pairs():
    rpm = pytest.importorskip("rpm")
    for a, b in itertools.product(PIECES, repeat=2):
        assert rpmrepo.rpmvercmp(a, b) == rpm.labelCompare(("0", a, "1"), ("0", b, "1")), (a, b)


@pytest.mark.parametrize("name,compress", [
    ("primary.xml.gz", gzip.compress),
    ("primary.xml.zst", lambda d: __import__("zstandard").ZstdCompressor().compress(d)),
    ("primary.xml.xz", lambda d: __import__("lzma").compress(d)),
])
def test_primary_decompression_is_bounded(name: str, compress) -> None:
    assert rpmrepo.decompress(compress(PRIMARY), name, len(PRIMARY)) == PRIMARY
    bomb = compress(bytes(8 << 20))
    with pytest.raises(MirrorError, match=f"http://mirror.invalid/{name}: expands to more than 1048576 bytes"):
        rpmrepo.decompress(bomb, name, 1 << 20, f"http://mirror.invalid/{name}")
    with pytest.raises(MirrorError, match="not valid"):
        rpmrepo.decompress(compress(PRIMARY)[:20] + b"garbage" * 10, name, 1 << 20)
