"""A signed apt repository the tests build, change and serve on 127.0.0.1.

    repo = AptTestRepo(tmp_path)              # throwaway gpg key in a private GNUPGHOME
    repo.add_package("vzpkg-hello", "1")      # dpkg-deb --build; a file /usr/share/<name>/version holds the version
    repo.publish()                            # apt-ftparchive packages + release, gpg --clearsign → InRelease
    url = repo.serve()                        # http.server thread bound to 127.0.0.1
    repo.keyring_with(DEBIAN_KEYRING)         # one gpgv keyring file for the template: Debian's keys + ours

Needs dpkg-deb, apt-ftparchive (apt-utils) and gpg.
"""

from __future__ import annotations

import atexit
import functools
import gzip
import http.server
import lzma
import os
import shutil
import subprocess
import threading
from pathlib import Path

ARCH = "amd64"
SUITE = "vzpkg-test"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
TOOLS = ("dpkg-deb", "apt-ftparchive", "gpg", "gpgv")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
        pass


class AptTestRepo:
    def __init__(self, base: Path, suite: str = SUITE) -> None:
        self.base = base
        self.suite = suite
        self.root = base / "repo"
        self.pool = self.root / "pool" / "main"
        self.pool.mkdir(parents=True, exist_ok=True)
        self.gnupghome = base / "gnupg"
        self.gnupghome.mkdir(mode=0o700, exist_ok=True)
        # gpg starts an agent for this home that outlives the test run unless stopped
        atexit.register(subprocess.run, ["gpgconf", "--homedir", str(self.gnupghome), "--kill", "gpg-agent"],
                        capture_output=True)
        self.keys: dict[str, str] = {}
        self.signing_key = self.new_key("vzpkg test repository")
        self.server: http.server.ThreadingHTTPServer | None = None

    # ---- keys -----------------------------------------------------------------------------------

    def _gpg(self, *args: str, input: bytes | None = None) -> bytes:
        env = {**os.environ, "GNUPGHOME": str(self.gnupghome)}
        proc = subprocess.run(["gpg", "--batch", "--quiet", "--no-tty", *args], env=env, input=input,
                              capture_output=True)
        if proc.returncode != 0:
            raise RuntimeError(f"gpg {' '.join(args)}: {proc.stderr.decode(errors='replace')}")
        return proc.stdout

    def new_key(self, uid: str) -> str:
        """Generate a throwaway signing key; return its fingerprint."""
        self._gpg("--passphrase", "", "--quick-gen-key", f"{uid} <tests@vzpkg.invalid>", "ed25519", "sign", "never")
        listing = self._gpg("--with-colons", "--list-secret-keys", uid).decode()
        fpr = [ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("fpr:")][0]
        self.keys[uid] = fpr
        return fpr

    def export_key(self, dest: Path, fpr: str | None = None) -> Path:
        """The public key, binary (a gpgv keyring and an apt trusted.gpg.d file at once)."""
        dest.write_bytes(self._gpg("--export", fpr or self.signing_key))
        return dest

    def keyring_with(self, *others: Path, dest: Path | None = None) -> Path:
        """One keyring file holding OTHERS' keys and ours (binary keyrings concatenate)."""
        dest = dest or self.base / "combined-keyring.gpg"
        data = b"".join(p.read_bytes() for p in others) + self._gpg("--export", self.signing_key)
        dest.write_bytes(data)
        return dest

    # ---- packages and indices ---------------------------------------------------------------------

    def add_package(self, name: str, version: str, *, remove_older: bool = False) -> Path:
        """Build NAME_VERSION_all.deb with /usr/share/NAME/version containing VERSION."""
        if remove_older:
            for old in self.pool.glob(f"{name}_*.deb"):
                old.unlink()
        src = self.base / "build" / f"{name}-{version}"
        shutil.rmtree(src, ignore_errors=True)
        (src / "DEBIAN").mkdir(parents=True)
        (src / "DEBIAN" / "control").write_text(
            f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: vzpkg tests <tests@vzpkg.invalid>\n"
            f"Priority: optional\nSection: misc\nDescription: vzpkg test package\n a package the update tests change\n"
        )
        data = src / "usr" / "share" / name
        data.mkdir(parents=True)
        (data / "version").write_text(f"{version}\n")
        deb = self.pool / f"{name}_{version}_all.deb"
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(src), str(deb)], check=True,
                       capture_output=True)
        return deb

    def publish(self, *, sign_with: str | None = None) -> None:
        """Regenerate Packages (plain, .gz, .xz), Release and the clear-signed InRelease."""
        dists = self.root / "dists" / self.suite
        binary = dists / "main" / f"binary-{ARCH}"
        binary.mkdir(parents=True, exist_ok=True)
        packages = subprocess.run(["apt-ftparchive", "packages", "pool"], cwd=self.root, check=True,
                                  capture_output=True).stdout
        (binary / "Packages").write_bytes(packages)
        (binary / "Packages.gz").write_bytes(gzip.compress(packages, mtime=0))
        (binary / "Packages.xz").write_bytes(lzma.compress(packages))
        opts = [f"-oAPT::FTPArchive::Release::{k}={v}" for k, v in
                (("Origin", "vzpkg-tests"), ("Label", "vzpkg-tests"), ("Suite", self.suite),
                 ("Codename", self.suite), ("Architectures", ARCH), ("Components", "main"))]
        (dists / "Release").unlink(missing_ok=True)
        (dists / "InRelease").unlink(missing_ok=True)
        release = subprocess.run(["apt-ftparchive", *opts, "release", "."], cwd=dists, check=True,
                                 capture_output=True).stdout
        (dists / "Release").write_bytes(release)
        signed = self._gpg("--local-user", sign_with or self.signing_key, "--digest-algo", "SHA256",
                           "--clearsign", "--output", "-", str(dists / "Release"))
        (dists / "InRelease").write_bytes(signed)

    # ---- serving ------------------------------------------------------------------------------------

    def serve(self, port: int = 0) -> str:
        """Serve the repository on 127.0.0.1 (a free port, or PORT) from a daemon thread; return its URL."""
        handler = functools.partial(_QuietHandler, directory=str(self.root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.url

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def line(self) -> str:
        """The sources.list line for this repository."""
        return f"deb {self.url} {self.suite} main"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
