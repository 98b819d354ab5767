"""The template's GPG keys for dnf: downloaded to local files before dnf runs, and repomd.xml signatures.

Used by the build (check_repositories) and by `vzpkg status` (dnf_status), which both check repo_gpgcheck
repositories' repomd.xml themselves, before dnf is ever started."""

from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path

from .. import process
from ..errors import SignatureError
from .dnf_repos import DnfRepo, substitute


def fetch_keys(repos: list[DnfRepo], variables: dict[str, str], keydir: Path, definition: Path) -> list[DnfRepo]:
    """REPOS with every gpgkey a local file:// reference: remote keys are downloaded into KEYDIR (a key that
    cannot be had fails here, not inside dnf); DEFINITION (the template's file) is named in messages."""
    from ..repo.http import fetch

    cache: dict[str, str] = {}
    out = []
    for repo in repos:
        local = []
        for ref in repo.gpgkey:
            ref = substitute(ref, variables)
            if ref.startswith("file://"):
                path = Path(ref[len("file://"):])
                if not path.is_file():
                    raise SignatureError(f"repository {repo.id}: GPG key {path} does not exist "
                                         f"(gpg_keys in {definition})")
                local.append(ref)
            elif ref.startswith(("http://", "https://")):
                if ref not in cache:
                    keydir.mkdir(parents=True, exist_ok=True)
                    data = fetch(ref).content
                    if b"PGP PUBLIC KEY" not in data:
                        raise SignatureError(f"{ref}: not an armored OpenPGP public key")
                    dest = keydir / f"{len(cache)}-{Path(ref).name or 'key'}"
                    dest.write_bytes(data)
                    cache[ref] = dest.as_uri()
                local.append(cache[ref])
            else:
                raise SignatureError(f"repository {repo.id}: unsupported GPG key location {ref!r}")
        out.append(dataclasses.replace(repo, gpgkey=tuple(local)))
    return out


_GPG_COUNT = re.compile(r"^(gpg: )?\s*(Total number processed|[\w /-]+): \d+$")


def gpg_reason(lines: list[str]) -> str:
    """gpg's last line that says something: not the import counters (`Total number processed: 0`, ...) it ends
    with, and without its `gpg: ` prefix."""
    said = [ln for ln in lines if ln.strip() and not _GPG_COUNT.match(ln.strip()) and not ln.startswith("[GNUPG:]")]
    return said[-1].strip().removeprefix("gpg: ") if said else ""


def verify_repomd_signature(repo: DnfRepo, baseurl: str, data: bytes, asc: bytes, tmp_parent: Path) -> None:
    """Check repomd.xml DATA against its detached signature ASC with the repository's keys (local file:// refs,
    as fetch_keys leaves them) in a throwaway GnuPG home; raise SignatureError when it does not verify."""
    tmp_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp_parent) as home:
        try:
            for ref in repo.gpgkey:
                key = ref[len("file://"):]
                # a key gpg cannot import must fail here, naming it: ignored, it surfaced as "signature check
                # failed" with no hint that the key file is the problem
                # judged by gpg's status lines, not its exit status: without a usable agent socket (a host
                # without /run/user/0) gpg imports a public key fine and still exits 2 ("can't connect to the
                # agent")
                imported = process.run(["gpg", "--batch", "--homedir", home, "--status-fd", "1", "--import", key],
                                       capture=True, text=True, check=False)
                if "[GNUPG:] IMPORT_OK" not in (imported.stdout or ""):
                    raise SignatureError(f"repository {repo.id}: GPG key {key} cannot be imported: gpg: "
                                         f"{gpg_reason(imported.tail) or process.status_text(imported.returncode)}")
            (Path(home) / "repomd.xml").write_bytes(data)
            (Path(home) / "repomd.xml.asc").write_bytes(asc)
            proc = process.run(["gpg", "--batch", "--homedir", home, "--status-fd", "1", "--verify",
                                str(Path(home) / "repomd.xml.asc"), str(Path(home) / "repomd.xml")],
                               capture=True, text=True, check=False)
        finally:
            process.run(["gpgconf", "--homedir", home, "--kill", "all"], capture=True, check=False)
            # the home's socket directory (/run/user/0/gnupg/d.*, where /run/user/0 exists) goes with the home
            process.run(["gpgconf", "--homedir", home, "--remove-socketdir"], capture=True, check=False)
    if proc.returncode != 0 or "[GNUPG:] VALIDSIG" not in proc.stdout:
        raise SignatureError(f"{baseurl.rstrip('/')}/repodata/repomd.xml: signature check failed with the template's "
                             f"keys (repo_gpgcheck on repository {repo.id})")
