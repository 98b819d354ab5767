"""`vzpkg status` against broken and hostile mirrors (tests/integration/badmirror.py, on 127.0.0.0/8).

Each case runs `vzpkg status --refresh` in a subprocess with a 3 s fetch_timeout and checks: one error line, the
documented exit code, an end within the deadline, a peak RSS (os.wait4, this child only) under 300 MB, and that
the next run against a sound mirror works (nothing broken was kept). The cache is a manifest and an empty archive
(status never unpacks); the repository is built and signed by aptrepo.py. No root needed, except the full-TMPDIR
case (a tmpfs).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aptrepo import ARCH, AptTestRepo, missing_tools
from badmirror import BadMirror, loopback_alias_works, self_signed_cert, wait_rss

NAME = "badmirror-test"
SUITE = "vzpkg-test"
PKG = "vzpkg-hello"
DEADLINE = 3
RSS_LIMIT_KIB = 300 * 1024
INRELEASE = f"/dists/{SUITE}/InRelease"
PACKAGES_XZ = f"/dists/{SUITE}/main/binary-{ARCH}/Packages.xz"

pytestmark = pytest.mark.skipif(bool(missing_tools()), reason=f"missing tools: {missing_tools()}")


class Setup:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.repo = AptTestRepo(base)
        self.repo.add_package(PKG, "1")
        self.repo.publish()
        self.mirror = BadMirror(self.repo.root)
        self.url = self.mirror.start()
        self.keyring = self.repo.export_key(base / "keyring.gpg")
        self.cache_dir = base / "cache"
        self.cache_dir.mkdir()
        (self.cache_dir / f"{NAME}.tar.zst").write_bytes(b"")
        (self.cache_dir / f"{NAME}.json").write_text(json.dumps({
            "name": NAME, "packages": [{"name": PKG, "version": "1", "architecture": "all"}],
            "template_packages": [PKG], "repositories": []}))
        tdir = base / "templates" / NAME
        tdir.mkdir(parents=True)
        (tdir / "template.toml").write_text(
            'summary = "bad mirror tests"\ndescription = "a repository served by tests/integration/badmirror.py"\n'
            'distribution = "debian"\nrelease = "12"\nsuite = "bookworm"\narchitecture = "x86_64"\n'
            f'package_manager = "apt"\nkeyring = "{self.keyring}"\npackages = ["{PKG}"]\n'
            f'repositories = ["deb {{{{ mirror }}}} {SUITE} main"]\n')
        from vzpkg.template import TemplateRepository

        manifest = json.loads((self.cache_dir / f"{NAME}.json").read_text())
        manifest["template_digest"] = TemplateRepository([base / "templates"]).load(NAME).digest()
        (self.cache_dir / f"{NAME}.json").write_text(json.dumps(manifest))

    def env(self, mirror: str | None = None, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update({"VZPKG_TEMPLATE_DIR": str(self.base / "templates"), "VZPKG_CACHE_DIR": str(self.cache_dir),
                    "VZPKG_CONFIG": str(self.base / "no-config.toml"), "VZPKG_MIRROR": mirror or self.url,
                    "VZPKG_FETCH_TIMEOUT": str(DEADLINE), "no_proxy": "127.0.0.1,127.0.0.2"})
        env.update(extra)
        return env

    def status(self, mirror: str | None = None, *, timeout: float = 60, **extra: str) -> tuple[int, str, str, int, float]:
        return wait_rss([sys.executable, "-m", "vzpkg.cli.vzpkg", "status", NAME, "--refresh"],
                        self.env(mirror, **extra), timeout)

    def sign_release(self, files: dict[str, bytes]) -> None:
        """Serve FILES (paths below dists/SUITE/) under a Release that lists exactly them, signed with our key:
        whatever they hold, their hashes check out."""
        dists = self.repo.root / "dists" / SUITE
        for rel, data in files.items():
            (dists / rel).parent.mkdir(parents=True, exist_ok=True)
            (dists / rel).write_bytes(data)
        entries = "".join(f" {hashlib.sha256(d).hexdigest()} {len(d)} {p}\n" for p, d in files.items())
        (dists / "Release").write_text(f"Origin: vzpkg-tests\nSuite: {SUITE}\nCodename: {SUITE}\n"
                                       f"Date: Mon, 30 Nov 2026 00:00:00 UTC\nArchitectures: {ARCH}\n"
                                       f"Components: main\nSHA256:\n{entries}")
        (dists / "InRelease").unlink()
        self.repo._gpg("--local-user", self.repo.signing_key, "--clearsign", "--output", str(dists / "InRelease"),
                       str(dists / "Release"))

    def forget_indices(self) -> None:
        """Drop the parsed indices kept from earlier runs, so that the next status downloads them."""
        shutil.rmtree(self.cache_dir / ".metadata" / "indices", ignore_errors=True)

    def restore(self) -> None:
        self.mirror.reset()
        self.repo.publish()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    s = Setup(tmp_path_factory.mktemp("badmirror"))
    yield s
    s.mirror.stop()


@pytest.fixture
def bad(setup: Setup) -> Iterator[Setup]:
    """The setup; afterwards the mirror is sound again and status must work (nothing broken was kept)."""
    setup.mirror.reset()
    yield setup
    setup.restore()
    code, out, err, _rss, _t = setup.status()
    assert code in (0, 20), f"status after the bad mirror: exit {code}\n{out}\n{err}"


def one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vzpkg: error: "), f"not one error line:\n{err}"
    return lines[0]


def check(result: tuple[int, str, str, int, float], code: int, *needles: str) -> str:
    rc, out, err, rss, took = result
    assert rc == code, f"exit {rc}, expected {code}\n{out}\n{err}"
    line = one_error(err)
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert rss < RSS_LIMIT_KIB, f"peak RSS {rss // 1024} MB"
    assert took < DEADLINE + 12, f"took {took:.1f} s with a {DEADLINE} s deadline"
    return line


def test_sound_mirror_works(bad: Setup) -> None:
    code, out, err, rss, took = bad.status()
    assert code == 0, err
    assert rss < RSS_LIMIT_KIB and took < 20


# ---- time --------------------------------------------------------------------------------------------------

def test_trickling_inrelease_hits_the_deadline(bad: Setup) -> None:
    bad.mirror.set(INRELEASE, "trickle", delay=0.2)
    line = check(bad.status(), 7, bad.url + INRELEASE, "fetch_timeout")
    assert "not complete within 3 s" in line


def test_trickling_index_hits_the_deadline(bad: Setup) -> None:
    bad.forget_indices()
    bad.mirror.set(PACKAGES_XZ, "trickle", delay=0.2)
    check(bad.status(), 7, bad.url + PACKAGES_XZ, "fetch_timeout")


def test_hanging_mirror_hits_the_deadline(bad: Setup) -> None:
    bad.mirror.set(INRELEASE, "hang")
    check(bad.status(), 7, bad.url + INRELEASE, "3 s")


# ---- size --------------------------------------------------------------------------------------------------

def test_endless_inrelease_is_cut_off_in_bounded_memory(bad: Setup) -> None:
    bad.mirror.set(INRELEASE, "huge")
    check(bad.status(VZPKG_FETCH_TIMEOUT="30"), 7,
          bad.url + INRELEASE, f"{64 << 20} bytes")


def test_index_larger_than_its_signed_size_is_refused(bad: Setup) -> None:
    bad.forget_indices()
    bad.mirror.set(PACKAGES_XZ, "huge")
    check(bad.status(VZPKG_FETCH_TIMEOUT="30"), 8, bad.url + PACKAGES_XZ, "bytes the signed Release gives")


@pytest.fixture(scope="module")
def xz_bomb() -> bytes:
    """512 MiB of zeros, xz-compressed to about 80 KB."""
    comp = lzma.LZMACompressor(preset=1)
    zeros = bytes(16 << 20)
    return b"".join(comp.compress(zeros) for _ in range(32)) + comp.flush()


def test_signed_xz_bomb_is_refused_in_bounded_memory(bad: Setup, xz_bomb: bytes) -> None:
    bad.sign_release({f"main/binary-{ARCH}/Packages.xz": xz_bomb})
    check(bad.status(VZPKG_FETCH_TIMEOUT="30"), 7, bad.url + PACKAGES_XZ, "expands to more than")


def test_xz_larger_than_the_signed_uncompressed_size_is_refused(bad: Setup) -> None:
    plain = b"Package: a\nVersion: 1\nArchitecture: all\n\n"
    big = plain * 1000
    bad.sign_release({f"main/binary-{ARCH}/Packages.xz": lzma.compress(big), f"main/binary-{ARCH}/Packages": plain})
    bad.mirror.set(f"/dists/{SUITE}/main/binary-{ARCH}/Packages", "hang")  # never needed: the .xz is preferred
    check(bad.status(), 7, bad.url + PACKAGES_XZ, f"more than {len(plain)} bytes")


# ---- corrupt data that the signature vouches for ----------------------------------------------------------

@pytest.mark.parametrize("suffix,kind", [(".xz", "xz"), (".gz", "gzip"), (".bz2", "bzip2")])
def test_corrupt_compressed_index_is_one_line(bad: Setup, suffix: str, kind: str) -> None:
    path = f"main/binary-{ARCH}/Packages{suffix}"
    bad.sign_release({path: b"this is not compressed data" * 10})
    check(bad.status(), 7, f"{bad.url}/dists/{SUITE}/{path}", f"not valid {kind} data")


def test_cut_compressed_index_is_one_line(bad: Setup) -> None:
    data = lzma.compress(b"Package: a\nVersion: 1\n\n" * 1000)
    bad.sign_release({f"main/binary-{ARCH}/Packages.xz": data[: len(data) // 2]})
    check(bad.status(), 7, bad.url + PACKAGES_XZ, "not valid xz data")


# ---- signatures ----------------------------------------------------------------------------------------------

def test_truncated_inrelease_file_is_a_signature_error(bad: Setup) -> None:
    inrelease = bad.repo.root / "dists" / SUITE / "InRelease"
    data = inrelease.read_bytes()
    bad.mirror.set(INRELEASE, "bytes", body=data[: len(data) * 2 // 3])
    check(bad.status(), 8, bad.url + INRELEASE, "signature check failed")


def test_transfer_cut_short_is_a_mirror_error(bad: Setup) -> None:
    bad.mirror.set(INRELEASE, "truncate")
    check(bad.status(), 7, bad.url + INRELEASE, "transfer broken off")


def test_inrelease_signed_by_a_foreign_key_is_a_signature_error(bad: Setup) -> None:
    stranger = bad.repo.new_key("a stranger")
    bad.repo.publish(sign_with=stranger)
    check(bad.status(), 8, bad.url + INRELEASE, "NO_PUBKEY")


# ---- redirects -------------------------------------------------------------------------------------------------

def test_redirect_loop_is_one_line(bad: Setup) -> None:
    bad.mirror.set(INRELEASE, "redirect", location=INRELEASE)
    check(bad.status(), 7, bad.url + INRELEASE, "more than 5 redirects")
    assert len(bad.mirror.requests) == 6, bad.mirror.requests  # the first request and 5 redirects, no retry


@pytest.mark.skipif(not loopback_alias_works(), reason="127.0.0.2 is not routed to lo")
def test_redirect_to_another_host_is_followed_and_checked(bad: Setup, tmp_path: Path) -> None:
    other = BadMirror(bad.repo.root, host="127.0.0.2")
    other_url = other.start()
    try:
        front = BadMirror(tmp_path)  # serves nothing itself: every path goes to 127.0.0.2
        front_url = front.start()
        for path in (INRELEASE, PACKAGES_XZ):
            front.set(path, "redirect", location=other_url + path)
        shutil.rmtree(bad.cache_dir / ".metadata", ignore_errors=True)
        bad.repo.add_package(PKG, "2")
        bad.repo.publish()
        code, out, err, _rss, _t = bad.status(front_url)
        assert code == 20 and f"{PKG}" in out, err
        assert other.requests == [INRELEASE, PACKAGES_XZ]
        # What the other host serves is checked against the signed metadata all the same.
        other.set(PACKAGES_XZ, "bytes", body=lzma.compress(b"Package: evil\nVersion: 9\n\n"))
        shutil.rmtree(bad.cache_dir / ".metadata")
        check(bad.status(front_url), 8, front_url + PACKAGES_XZ, "does not match the signed Release")
        front.stop()
    finally:
        other.stop()
        for deb in bad.repo.pool.glob(f"{PKG}_2_*.deb"):
            deb.unlink()


@pytest.mark.skipif(shutil.which("openssl") is None or not loopback_alias_works(), reason="needs openssl, 127.0.0.2")
def test_https_to_http_redirect_is_refused(bad: Setup, tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    plain = BadMirror(bad.repo.root, host="127.0.0.2")
    plain_url = plain.start()
    tls = BadMirror(bad.repo.root, tls=(cert, key))
    tls_url = tls.start()
    try:
        # The TLS mirror itself is trusted and works ...
        code, _out, err, _rss, _t = bad.status(tls_url, REQUESTS_CA_BUNDLE=str(cert))
        assert code in (0, 20), err
        # ... but it may not send us to plain http.
        tls.set(INRELEASE, "redirect", location=plain_url + INRELEASE)
        check(bad.status(tls_url, REQUESTS_CA_BUNDLE=str(cert)), 7, tls_url + INRELEASE,
              f"redirected from https to {plain_url}{INRELEASE}: refused")
        assert plain.requests == []
    finally:
        tls.stop()
        plain.stop()


# ---- a full TMPDIR -----------------------------------------------------------------------------------------

@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_full_tmpdir_does_not_fail_a_valid_signature(bad: Setup, tmp_path: Path) -> None:
    # An InRelease of about 50 KB (padded with entries nothing asks for), a TMPDIR with 8 KB free: Python's
    # tempfile still picks it (its probe fits), the signed text would not.
    binary = bad.repo.root / "dists" / SUITE / "main" / f"binary-{ARCH}"
    files = {f"main/binary-{ARCH}/{p.name}": p.read_bytes() for p in binary.glob("Packages*")}
    files.update({f"main/padding/file-{i:04d}": b"%d" % i for i in range(500)})
    bad.sign_release(files)
    assert (bad.repo.root / "dists" / SUITE / "InRelease").stat().st_size > 40_000
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tiny)], check=True)
    try:
        (tiny / "fill").write_bytes(b"\0" * (56 << 10))
        code, out, err, _rss, _t = bad.status(TMPDIR=str(tiny))
        assert code == 0, f"exit {code}\n{out}\n{err}"
    finally:
        subprocess.run(["umount", str(tiny)], check=True)
