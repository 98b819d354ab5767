"""apt repositories: InRelease (signature checked with gpgv), Packages indices."""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingToolError, SignatureError
from .http import fetch


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
    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        proc = subprocess.run(
            ["gpgv", "--keyring", str(keyring), "--status-fd", "1", "--output", out.name, "-"],
            input=data, capture_output=True,
        )
        status = proc.stdout.decode(errors="replace")
        if proc.returncode != 0 or "[GNUPG:] VALIDSIG" not in status:
            reason = next((ln.split(" ", 2)[1] for ln in status.splitlines() if ln.startswith("[GNUPG:] ")
                           and any(k in ln for k in ("BADSIG", "NO_PUBKEY", "ERRSIG", "EXPKEYSIG", "NODATA"))), "")
            raise SignatureError(f"signature check failed ({reason or 'no valid signature'}) with keyring {keyring}")
        return Path(out.name).read_text(errors="replace")


def fetch_release(repo: AptRepository, keyring: Path) -> ReleaseInfo:
    """Fetch and verify dists/SUITE/InRelease."""
    resp = fetch(repo.inrelease_url)
    data = resp.content
    try:
        text = verify_clearsigned(data, keyring)
    except SignatureError as e:
        raise SignatureError(f"{repo.inrelease_url}: {e}") from e
    date = ""
    for line in text.splitlines():
        if line.startswith("Date:"):
            date = line.split(":", 1)[1].strip()
            break
    return ReleaseInfo(repo.uri, repo.suite, date, hashlib.sha256(data).hexdigest(), text)
