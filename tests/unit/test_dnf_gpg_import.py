"""A GPG key the template names that gpg cannot import fails there, with gpg's reason (repo_gpgcheck)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vzpkg.errors import SignatureError
from vzpkg.pkgmgr.dnf_keys import gpg_reason, verify_repomd_signature
from vzpkg.pkgmgr.dnf_repos import DnfRepo

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None, reason="needs gpg")


@pytest.mark.parametrize("key_text, reason", [
    ("not a key at all\n", "no valid OpenPGP data found."),
    ("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQINBGBAD\n-----END PGP PUBLIC KEY BLOCK-----\n",
     "contains no user ID - skipped"),
])
def test_corrupt_key_file_is_a_signature_error_with_gpgs_reason(tmp_path: Path, key_text: str, reason: str) -> None:
    key = tmp_path / "RPM-GPG-KEY-corrupt"
    key.write_text(key_text)
    repo = DnfRepo(id="vzt", gpgkey=(key.as_uri(),))
    with pytest.raises(SignatureError) as e:
        verify_repomd_signature(repo, "http://127.0.0.1:1/repo", b"<repomd/>", b"", tmp_path / "work")
    msg = str(e.value)
    assert "\n" not in msg
    assert f"repository vzt: GPG key {key} cannot be imported: gpg: " in msg and reason in msg, msg
    assert "Total number processed" not in msg
    assert list((tmp_path / "work").iterdir()) == []  # the throw-away GnuPG home is gone


def test_gpg_reason_skips_the_counters() -> None:
    assert gpg_reason(["gpg: keybox 'x' created", "gpg: no valid OpenPGP data found.",
                       "gpg: Total number processed: 0", "gpg:           w/o user IDs: 1"]) \
        == "no valid OpenPGP data found."
    assert gpg_reason([]) == ""
