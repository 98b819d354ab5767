"""apt's failures mapped to the documented exit codes, from output as apt 2.6 / mmdebstrap / debootstrap print it."""

from __future__ import annotations

import pytest

from vzpkg.errors import BuildError, MirrorError, SignatureError
from vzpkg.pkgmgr.apt_errors import TIMEOUT_EXIT, classify, last_download

URL = "http://127.0.0.1:40000"

HASH_MISMATCH = f"""Reading package lists...
Get:1 {URL} vzpkg-test/main amd64 vzpkg-hello all 3 [736 B]
Err:1 {URL} vzpkg-test/main amd64 vzpkg-hello all 3
  Hash Sum mismatch
  Hashes of expected file:
   - SHA256:7f9c0e1c9b1a [weak]
  Hashes of received file:
   - SHA256:00aa11bb22cc
  Last modification reported: Mon, 30 Nov 2026 02:00:00 +0000
Fetched 736 B in 0s (51.3 kB/s)
E: Failed to fetch {URL}/pool/main/vzpkg-hello_3_all.deb  Hash Sum mismatch
   Hashes of expected file:
    - SHA256:7f9c0e1c9b1a [weak]
E: Unable to fetch some archives, maybe run apt-get update or try with --fix-missing?
"""

NOT_FOUND = f"""Get:1 {URL} vzpkg-test/main amd64 vzpkg-hello all 3 [736 B]
Err:1 {URL} vzpkg-test/main amd64 vzpkg-hello all 3
  404  File not found [IP: 127.0.0.1 40000]
E: Failed to fetch {URL}/pool/main/vzpkg-hello_3_all.deb  404  File not found [IP: 127.0.0.1 40000]
E: Unable to fetch some archives, maybe run apt-get update or try with --fix-missing?
"""

NO_PUBKEY = f"""Get:1 {URL} vzpkg-test InRelease [1,234 B]
Err:1 {URL} vzpkg-test InRelease
  The following signatures couldn't be verified because the public key is not available: NO_PUBKEY 0123456789ABCDEF
Reading package lists...
W: GPG error: {URL} vzpkg-test InRelease: The following signatures couldn't be verified because the public key is \
not available: NO_PUBKEY 0123456789ABCDEF
E: The repository '{URL} vzpkg-test InRelease' is not signed.
"""

UNREACHABLE = """I: running apt-get update...
Ign:1 http://127.0.0.1:1 bookworm InRelease
Err:2 http://127.0.0.1:1 bookworm Release
  Could not connect to 127.0.0.1:1 (127.0.0.1). - connect (111: Connection refused)
E: The repository 'http://127.0.0.1:1 bookworm Release' does not have a Release file.
W: Failed to fetch http://127.0.0.1:1/dists/bookworm/Release  Could not connect to 127.0.0.1:1 (127.0.0.1). \
- connect (111: Connection refused)
E: apt-get update -oAPT::Status-Fd=<$fd> -oDpkg::Use-Pty=false failed
"""

DEBOOTSTRAP_UNKNOWN_KEY = """I: Retrieving InRelease
I: Checking Release signature
E: Release signed by unknown key (key id 6ED0E7B82643E131)
   The specified keyring /tmp/k.gpg may be incorrect or out of date.
"""

NO_RELEASE = f"""Err:1 {URL} vzpkg-test InRelease
  404  File not found [IP: 127.0.0.1 40000]
E: The repository '{URL} vzpkg-test Release' does not have a Release file.
N: Updating from such a repository can't be done securely, and is therefore disabled by default.
"""

GARBAGE_INRELEASE = f"""Get:1 {URL} vzpkg-test InRelease [512 B]
Err:1 {URL} vzpkg-test InRelease
  Clearsigned file isn't valid, got 'NOSPLIT' (does the network require authentication?)
E: Failed to fetch {URL}/dists/vzpkg-test/InRelease  Clearsigned file isn't valid, got 'NOSPLIT'
"""

NO_SUCH_PACKAGE = """Reading package lists...
Building dependency tree...
E: Unable to locate package vzpkg-nonexistent
"""

DPKG_FAILED = """Setting up vzpkg-hello (3) ...
dpkg: error processing package vzpkg-hello (--configure):
 installed vzpkg-hello package post-installation script subprocess returned error exit status 1
E: Sub-process /usr/bin/dpkg returned an error code (1)
"""

TRICKLE = f"""Hit:1 {URL} vzpkg-test InRelease
Reading package lists...
Get:1 {URL} vzpkg-test/main amd64 vzpkg-hello all 3 [736 B]
"""


def lines(text: str) -> list[str]:
    return text.splitlines()


@pytest.mark.parametrize("output,error,quoted", [
    (HASH_MISMATCH, SignatureError, f"E: Failed to fetch {URL}/pool/main/vzpkg-hello_3_all.deb  Hash Sum mismatch"),
    (NO_PUBKEY, SignatureError, "W: GPG error:"),
    (DEBOOTSTRAP_UNKNOWN_KEY, SignatureError, "E: Release signed by unknown key (key id 6ED0E7B82643E131)"),
    (NOT_FOUND, MirrorError, "404  File not found"),
    (NO_RELEASE, MirrorError, f"Err:1 {URL} vzpkg-test InRelease: 404  File not found"),
    (GARBAGE_INRELEASE, SignatureError, "E: Failed to fetch"),
    (UNREACHABLE, MirrorError, "Connection refused"),
    (NO_SUCH_PACKAGE, BuildError, "E: Unable to locate package vzpkg-nonexistent"),
    (DPKG_FAILED, BuildError, "E: Sub-process /usr/bin/dpkg returned an error code (1)"),
])
def test_output_decides_the_exit_code(output: str, error: type[Exception], quoted: str) -> None:
    e = classify("apt-get dist-upgrade", 100, lines(output), deadline=60, log="/tmp/build.log")
    assert type(e) is error
    assert quoted in str(e) and str(e).startswith("apt-get dist-upgrade")
    assert "\n" not in str(e)


def test_summary_counts_when_nothing_else_says_why() -> None:
    e = classify("apt-get update", 100, [f"E: The repository '{URL} s Release' does not have a Release file."])
    assert isinstance(e, MirrorError) and "does not have a Release file" in str(e)


def test_exit_codes_are_the_documented_ones() -> None:
    assert (SignatureError.exit_code, MirrorError.exit_code, BuildError.exit_code) == (8, 7, 9)


def test_deadline_during_a_download_names_it() -> None:
    e = classify("apt-get dist-upgrade", TIMEOUT_EXIT, lines(TRICKLE), deadline=15)
    assert isinstance(e, MirrorError)
    assert "not finished within 15 s (build_timeout)" in str(e) and "vzpkg-hello all 3" in str(e)


def test_deadline_without_a_download_is_a_build_error() -> None:
    e = classify("apt-get dist-upgrade", TIMEOUT_EXIT, lines(DPKG_FAILED.replace("dpkg: error", "still")), deadline=15)
    assert type(e) is BuildError and "build_timeout" in str(e)


def test_last_download_forgets_finished_ones() -> None:
    assert last_download(lines(TRICKLE)) is not None
    assert last_download(lines(HASH_MISMATCH)) is None  # "Fetched ..." came after it


def test_long_lines_are_shortened() -> None:
    e = classify("mmdebstrap", 1, [f"E: Failed to fetch {URL}/{'x' * 1000}  404  Not Found"])
    assert isinstance(e, MirrorError) and len(str(e)) < 400
