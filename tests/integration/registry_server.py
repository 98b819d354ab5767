"""A real OCI registry for tests: Debian's docker-registry (Distribution 2.8) on 127.0.0.1, a random free port,
storage in a temporary directory; optionally TLS from a throw-away CA and htpasswd (bcrypt) auth."""

from __future__ import annotations

import base64
import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import requests

REGISTRY_BIN = "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bcrypt(password: str) -> str:
    """bcrypt through libcrypt (Python 3.13 has no crypt module; no extra dependency)."""
    lib = ctypes.CDLL("libcrypt.so.1")
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt.restype = ctypes.c_char_p
    salt = lib.crypt_gensalt(b"$2b$", 5, None, 0)
    return lib.crypt(password.encode(), salt).decode()


def make_ca_and_cert(d: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key): a CA and a certificate for 127.0.0.1 and localhost it signed."""
    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    # keyUsage on the CA and the key identifiers on the leaf: Python 3.13 verifies with VERIFY_X509_STRICT
    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=vzpkg test CA",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-keyout", "ca.key", "-out", "ca.pem")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                               "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
                               "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    ossl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
         "-extfile", "san.ext", "-out", "server.pem")
    return d / "ca.pem", d / "server.pem", d / "server.key"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A bearer-token server as in the distribution token-auth specification: Basic credentials in, a JWT out
    (RS256, signed with openssl, the certificate in the x5c header) granting the actions the scope asks for."""

    SERVICE = "vzpkg-test-registry"
    ISSUER = "vzpkg-test-issuer"

    def __init__(self, work: Path, users: dict[str, str]) -> None:
        self.work, self.users = work, users
        self.key, self.cert = work / "token.key", work / "token.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                        "/CN=vzpkg test token issuer", "-keyout", str(self.key), "-out", str(self.cert)],
                       check=True, capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True,
                             capture_output=True).stdout
        self.x5c = base64.b64encode(der).decode()
        self.issued: list[str] = []  # scopes of the tokens handed out
        self.refused = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlparse(self.path).query)
                user = server.check(self.headers.get("Authorization", ""))
                if user is None:
                    server.refused += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                scope = query.get("scope", [""])[0]
                token = server.token(user, scope)
                body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def check(self, header: str) -> str | None:
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user if self.users.get(user) == password else None

    def token(self, user: str, scope: str) -> str:
        self.issued.append(scope)
        access = []
        if scope.startswith("repository:"):
            _, name, actions = scope.split(":", 2)
            access.append({"type": "repository", "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": self.ISSUER, "sub": user, "aud": self.SERVICE, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signing_input.encode(),
                             check=True, capture_output=True).stdout
        return f"{signing_input}.{_b64url(sig)}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class Registry:
    work: Path
    tls: bool = False
    users: dict[str, str] = field(default_factory=dict)
    port: int = 0
    token_auth: bool = False  # users authenticate at a TokenServer instead of with htpasswd
    proc: subprocess.Popen[bytes] | None = None
    ca: Path | None = None
    token_server: TokenServer | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.work / "storage"

    @property
    def log(self) -> Path:
        return self.work / "registry.log"

    def blob_file(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def start(self) -> Registry:
        self.work.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        self.port = free_port()
        lines = ["version: 0.1", "log:", "  level: info", "  accesslog:", "    disabled: false",
                 "storage:", "  filesystem:", f"    rootdirectory: {self.storage}", "  delete:", "    enabled: true",
                 "  maintenance:", "    uploadpurging:", "      enabled: false",
                 "http:", f"  addr: 127.0.0.1:{self.port}", "  secret: vzpkg-test-secret"]
        if self.tls:
            self.ca, cert, key = make_ca_and_cert(self.work)
            lines += ["  tls:", f"    certificate: {cert}", f"    key: {key}"]
        if self.users and self.token_auth:
            self.token_server = TokenServer(self.work, self.users)
            ts = self.token_server
            lines += ["auth:", "  token:", f"    realm: {ts.realm}", f"    service: {ts.SERVICE}",
                      f"    issuer: {ts.ISSUER}", f"    rootcertbundle: {ts.cert}"]
        elif self.users:
            htpasswd = self.work / "htpasswd"
            htpasswd.write_text("".join(f"{u}:{bcrypt(p)}\n" for u, p in self.users.items()))
            lines += ["auth:", "  htpasswd:", "    realm: vzpkg-test", f"    path: {htpasswd}"]
        config = self.work / "config.yml"
        config.write_text("\n".join(lines) + "\n")
        log = self.log.open("ab")
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        url = f"{'https' if self.tls else 'http'}://{self.host}/v2/"
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(url, verify=str(self.ca) if self.ca else True, timeout=2)
                return self
            except requests.RequestException:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"docker-registry did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.token_server:
            self.token_server.stop()
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def requests_logged(self, method: str, uri_part: str) -> int:
        """How many requests the registry's access log shows with METHOD and URI_PART."""
        count = 0
        for line in self.log.read_text(errors="replace").splitlines():
            if f'"{method} ' in line and uri_part in line:
                count += 1
        return count
