"""The registry protocol (OCI distribution specification) for one repository.

HTTP is the standard library's `http.client`, one keep-alive connection per registry: `requests` (with urllib3,
charset_normalizer, idna) costs ~40 ms to import, a third of a push that finds everything present, and a blob
upload here is a file sent with sendfile(2), which requests cannot do. Redirects of GET and HEAD (a registry
that serves blobs from object storage) are followed, without the credentials when the host changes.

Authentication: Basic (htpasswd registries) is sent pre-emptively, so a streamed body is never sent twice. A
Bearer challenge is oras' (`oras.auth.TokenAuth`, imported then, with a requests session for the token server):
given a 401 it parses the WWW-Authenticate challenge, asks the realm for a token with the user's credentials
(or anonymously) and hands back the header to retry with. oras 0.2's `Registry` (oras.provider) falls short for
the rest:

- it retries every failed request five times with sleeps of 3 s to 83 s (`decorator.retry`), so an unreachable
  registry takes minutes to report; here a connect timeout, and one clear error at once;
- `put_upload` reads the whole blob into memory and `download_blob` writes without checking the digest; here
  blobs are streamed (constant memory, a progress callback) and every byte downloaded is hashed and compared;
- it keeps one token and reuses it after a 401, so a pull-scoped token from a HEAD is never upgraded to the push
  scope an upload needs; here a 401 with a token drops it and asks once more (the new challenge names the scope);
- importing it costs ~140 ms (jsonschema, http.cookiejar) on every command.
"""

from __future__ import annotations

import copy
import hashlib
import http.client
import json
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from urllib.parse import urljoin, urlsplit

from ..errors import (
    RegistryAuthError,
    RegistryError,
    RegistryNotFoundError,
    RegistryTLSError,
    RegistryUnreachableError,
    VerifyError,
)
from .auth import Credentials, find_credentials
from .netutil import _basic, _chain, _has_fileno, _proxy_for
from .reference import Reference, Transport

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 120.0
CHUNK = 1 << 20
SENDFILE_SLICE = 8 << 20  # bytes per sendfile(2) call: a progress update between calls
MAX_REDIRECTS = 5
USER_AGENT = "vzpkg"
MANIFEST_ACCEPT = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])
MAX_SMALL_BLOB = 16 << 20  # manifests and config blobs are read into memory; refuse anything larger

Progress = Callable[[int, int], None]
Body = bytes | tuple[IO[bytes], int, "Progress | None"] | None  # in memory, or (file at its start, size, progress)


class Response:
    """Status, headers (case-insensitive `get`, as oras' token dance reads them) and, unless streamed, the body."""

    def __init__(self, raw: http.client.HTTPResponse, content: bytes | None) -> None:
        self.raw = raw
        self.status_code = raw.status
        self.reason = raw.reason
        self.headers = raw.msg
        self.content = content if content is not None else b""

    def json(self) -> Any:
        return json.loads(self.content)


def _registry_message(response: Response) -> str:
    try:
        errors = response.json().get("errors") or []
        parts = [f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict)]
        if parts:
            return "; ".join(parts)
    except (ValueError, AttributeError):
        pass
    return f"HTTP {response.status_code} {response.reason}"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _TokenChallenge:
    """What oras' TokenAuth reads from a 401: its headers."""

    def __init__(self, headers: Any) -> None:
        self.headers = headers


class RegistryClient:
    """One repository on one registry. Requests counted in `stats` (what was sent and received)."""

    def __init__(self, ref: Reference, *, insecure: bool = False, ca_file: str | None = None) -> None:
        self.ref = ref
        self.transport = Transport.for_host(ref.host, insecure=insecure, ca_file=ca_file)
        self._credentials: Credentials | None = None
        self._credentials_looked_up = False
        self.scheme = self.transport.schemes[0]
        self.connected = False
        self._conns: dict[tuple[str, str], http.client.HTTPConnection] = {}
        self._forward: dict[tuple[str, str], dict[str, str]] = {}  # plain-HTTP connections through a proxy
        self._ssl: ssl.SSLContext | None = None
        self._token_auth: Any = None  # oras.auth.TokenAuth when the registry answers with a Bearer challenge
        self._basic = False
        self.stats = {"bytes_uploaded": 0, "bytes_downloaded": 0, "blobs_uploaded": 0, "blobs_downloaded": 0}

    @property
    def credentials(self) -> Credentials | None:
        """Looked up when the registry asks for them: a credential helper is a program to run."""
        if not self._credentials_looked_up:
            self._credentials = find_credentials(self.ref.host)
            self._credentials_looked_up = True
        return self._credentials

    # --- connections -----------------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            verify = self.transport.verify
            self._ssl = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
        return self._ssl

    def _connection(self, scheme: str, netloc: str) -> tuple[http.client.HTTPConnection, bool]:
        """The open connection to SCHEME://NETLOC (opened now if needed), and whether it served a request before."""
        conn = self._conns.get((scheme, netloc))
        if conn is not None and conn.sock is not None:
            return conn, True
        if conn is None:
            proxy = _proxy_for(scheme, netloc)
            if proxy is None and scheme == "https":
                conn = http.client.HTTPSConnection(netloc, timeout=CONNECT_TIMEOUT, context=self._ssl_context())
            elif proxy is None:
                conn = http.client.HTTPConnection(netloc, timeout=CONNECT_TIMEOUT)
            elif scheme == "https":  # a CONNECT tunnel through the proxy; TLS (and its host name check) end to end
                conn = http.client.HTTPSConnection(proxy[0], timeout=CONNECT_TIMEOUT, context=self._ssl_context())
                conn.set_tunnel(netloc, headers={"Proxy-Authorization": proxy[1]} if proxy[1] else None)
            else:  # plain HTTP: absolute URLs to the proxy
                conn = http.client.HTTPConnection(proxy[0], timeout=CONNECT_TIMEOUT)
                self._forward[(scheme, netloc)] = {"Proxy-Authorization": proxy[1]} if proxy[1] else {}
            self._conns[(scheme, netloc)] = conn
        try:
            conn.connect()
        except BaseException:
            self._drop(scheme, netloc)
            raise
        assert conn.sock is not None
        conn.sock.settimeout(READ_TIMEOUT)  # the connect timeout is short; a busy registry may think longer
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, False

    def _drop(self, scheme: str, netloc: str) -> None:
        self._forward.pop((scheme, netloc), None)
        conn = self._conns.pop((scheme, netloc), None)
        if conn is not None:
            conn.close()

    def fork(self) -> RegistryClient | None:
        """The same client on a connection of its own, for requests at the same time as this one's (its `stats`
        are its own); None with a bearer token, whose renewal one thread would do under the other's feet."""
        if not self.connected or self._token_auth is not None:
            return None
        other = copy.copy(self)
        other._conns, other._forward = {}, {}
        other.stats = dict.fromkeys(self.stats, 0)
        return other

    def close(self) -> None:
        for key in list(self._conns):
            self._drop(*key)

    def _exchange(self, method: str, url: str, headers: dict[str, str], body: Body, stream: bool) -> Response:
        """One request and its response on the keep-alive connection (a fresh one if a reused one was closed)."""
        parts = urlsplit(url)
        scheme, netloc = parts.scheme, parts.netloc
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        for attempt in (1, 2):
            conn, reused = self._connection(scheme, netloc)
            forward = self._forward.get((scheme, netloc))
            try:
                conn.putrequest(method, url if forward is not None else target, skip_accept_encoding=True)
                for k, v in {"User-Agent": USER_AGENT, **headers, **(forward or {})}.items():
                    conn.putheader(k, v)
                if isinstance(body, tuple):
                    conn.putheader("Content-Length", str(body[1]))
                    conn.endheaders()
                    self._send_file(conn, *body)
                else:
                    if body is not None or method in ("POST", "PUT", "PATCH"):
                        conn.putheader("Content-Length", str(len(body or b"")))
                    conn.endheaders(body or None)
                raw = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._drop(scheme, netloc)
                # The registry closed an idle connection before this request reached it: send it again, once.
                if reused and attempt == 1 and not isinstance(body, tuple):
                    continue
                raise
            except BaseException:
                self._drop(scheme, netloc)
                raise
            try:
                content = None if stream and raw.status < 300 else raw.read()
            except BaseException:
                self._drop(scheme, netloc)
                raise
            return Response(raw, content)
        raise AssertionError("unreachable")

    def _send_file(self, conn: http.client.HTTPConnection, f: IO[bytes], size: int, progress: Progress | None) -> None:
        """SIZE bytes of F from its current offset: sendfile(2) on plain TCP, 1 MiB writes through TLS."""
        sock = conn.sock
        assert sock is not None
        start, sent = f.tell(), 0
        use_sendfile = not isinstance(sock, ssl.SSLSocket) and _has_fileno(f)
        buf = None if use_sendfile else bytearray(CHUNK)
        while sent < size:
            if use_sendfile:
                n = sock.sendfile(f, start + sent, min(SENDFILE_SLICE, size - sent))
            else:
                assert buf is not None
                n = f.readinto(memoryview(buf)[:min(CHUNK, size - sent)])  # type: ignore[attr-defined]
                if n:
                    sock.sendall(memoryview(buf)[:n])
            if not n:
                raise RegistryError(f"the file being uploaded ended after {sent} of {size} bytes (changed meanwhile?)")
            sent += n
            if progress:
                progress(sent, size)

    # --- connection and authentication ---------------------------------------------------------------------

    def connect(self) -> None:
        """Find the scheme the registry speaks and the kind of auth it wants (GET /v2/, no credentials sent).

        On loopback, plain HTTP is asked first (no TLS set-up, ~40 ms less): a TLS registry answers it with
        400 or drops it, and then TLS is used.
        """
        schemes = self.transport.schemes
        for i, scheme in enumerate(schemes):
            more = i + 1 < len(schemes)
            self.scheme = scheme
            try:
                r = self._exchange("GET", f"{scheme}://{self.ref.host}/v2/", {}, None, False)
            except ssl.SSLCertVerificationError as e:
                raise self._tls_error(e) from e
            except ssl.SSLError as e:
                if more:
                    continue
                raise RegistryTLSError(f"registry {self.ref.host} does not speak TLS ({str(e)[:120]}): pass "
                                       "--insecure if it is a plain-HTTP registry") from e
            except (OSError, http.client.HTTPException) as e:
                if more:
                    continue
                raise self._unreachable(e) from e
            if more and r.status_code == 400:
                self._drop(scheme, self.ref.host)
                continue  # plain HTTP sent to a TLS port
            self.connected = True
            challenge = r.headers.get("WWW-Authenticate", "") if r.status_code == 401 else ""
            self._basic = challenge.lower().startswith("basic")
            if challenge.lower().startswith("bearer"):
                self._token_auth = self._oras_token_auth()
            if r.status_code not in (200, 401):
                hint = " (a TLS registry? drop --insecure)" if scheme == "http" and r.status_code == 400 else ""
                raise RegistryError(f"{self.ref.host} does not answer like an OCI registry at /v2/ "
                                    f"({_registry_message(r)}){hint}")
            return

    def _oras_token_auth(self) -> Any:
        """oras' bearer-token backend; its token requests go through requests (imported only for such registries)."""
        import logging

        import requests
        from oras.auth import get_auth_backend
        from requests.adapters import HTTPAdapter

        logging.getLogger("oras.logger").disabled = True  # oras logs failures; the errors raised here say it once

        class TimeoutAdapter(HTTPAdapter):
            def send(self, request, **kwargs):  # type: ignore[no-untyped-def]
                if kwargs.get("timeout") is None:
                    kwargs["timeout"] = (CONNECT_TIMEOUT, READ_TIMEOUT)
                return super().send(request, **kwargs)

        session = requests.Session()
        session.mount("https://", TimeoutAdapter())
        session.mount("http://", TimeoutAdapter())
        auth = get_auth_backend("token", session, insecure=self.scheme == "http", tls_verify=self.transport.verify)
        if self.credentials:
            auth.set_basic_auth(self.credentials.username, self.credentials.password)
        return auth

    def _tls_error(self, e: Exception) -> RegistryTLSError:
        reason = next((x.verify_message or str(x) for x in _chain(e) if isinstance(x, ssl.SSLCertVerificationError)),
                      str(e))
        return RegistryTLSError(f"TLS certificate of registry {self.ref.host} not trusted ({reason[:160]}): "
                                "give its CA with --ca-file, or use --insecure for a plain-HTTP registry")

    def _unreachable(self, e: BaseException) -> RegistryUnreachableError:
        timed_out = any(isinstance(x, TimeoutError) or "timed out" in str(x).lower() for x in _chain(e))
        kind = "timed out" if timed_out else "refused or unreachable"
        return RegistryUnreachableError(f"registry {self.ref.host} {kind} ({self.scheme}): check the address and "
                                        "that the registry runs")

    def _auth_error(self, r: Response) -> RegistryAuthError:
        if self.credentials is None:
            return RegistryAuthError(
                f"registry {self.ref.host} wants credentials for {self.ref.path} ({_registry_message(r)}): log in "
                "(~/.docker/config.json, $REGISTRY_AUTH_FILE) or set VZPKG_REGISTRY_USERNAME and VZPKG_REGISTRY_PASSWORD")
        return RegistryAuthError(f"registry {self.ref.host} refused the credentials from {self.credentials.source} "
                                 f"for {self.ref.path} ({_registry_message(r)}): check the user name and password")

    def request(self, method: str, url: str, *, headers: dict[str, str] | None = None, data: Body = None,
                stream: bool = False, ok: tuple[int, ...] = (200,)) -> Response:
        """One request, authenticated (Basic, or a bearer token through oras' token dance), errors mapped."""
        if not self.connected:
            self.connect()
        headers = dict(headers or {})
        if self._basic and self.credentials:
            headers["Authorization"] = "Basic " + _basic(self.credentials)
        try:
            r = self._send(method, url, headers, data, stream)
        except ssl.SSLCertVerificationError as e:
            raise self._tls_error(e) from e
        except ssl.SSLError as e:
            raise RegistryTLSError(f"TLS with registry {self.ref.host} failed ({str(e)[:120]})") from e
        except (OSError, http.client.HTTPException) as e:
            raise self._unreachable(e) from e
        if r.status_code in ok:
            return r
        if r.status_code in (401, 403):
            raise self._auth_error(r)
        if r.status_code == 404:
            raise RegistryNotFoundError(f"{self.ref}: not found in the registry ({_registry_message(r)}): "
                                        "check the repository and tag")
        raise RegistryError(f"registry {self.ref.host}: {method} {url.split('/v2/', 1)[-1]} failed: "
                            f"{_registry_message(r)}")

    def _send(self, method: str, url: str, headers: dict[str, str], data: Body, stream: bool) -> Response:
        auth = self._token_auth
        if auth is not None and auth.token:
            headers = {**headers, **auth.get_auth_header()}
        r = self._follow(method, url, headers, data, stream)
        if r.status_code != 401 or auth is None or isinstance(data, tuple):
            return r  # a streamed upload is authenticated before, by the POST that opens it
        # The challenge names the scope this request needs (pull, or pull,push): a token for it, then once more.
        auth.token = None
        headers, changed = auth.authenticate_request(_TokenChallenge(r.headers), headers)
        if not changed:
            return r
        return self._follow(method, url, headers, data, stream)

    def _follow(self, method: str, url: str, headers: dict[str, str], data: Body, stream: bool) -> Response:
        """The request, following redirects of GET and HEAD; credentials go only to the registry itself."""
        own = urlsplit(url).netloc
        for _ in range(MAX_REDIRECTS):
            r = self._exchange(method, url, headers, data, stream)
            location = r.headers.get("Location")
            if method not in ("GET", "HEAD") or r.status_code not in (301, 302, 303, 307, 308) or not location:
                return r
            url = urljoin(url, location)
            if urlsplit(url).netloc != own:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        raise RegistryError(f"registry {self.ref.host}: more than {MAX_REDIRECTS} redirects for {method} "
                            f"{url.split('/v2/', 1)[-1]}")

    def _url(self, path: str) -> str:
        return f"{self.scheme}://{self.ref.host}/v2/{self.ref.path}/{path}"

    # --- manifests --------------------------------------------------------------------------------------

    def get_manifest(self, target: str) -> tuple[bytes, str, str]:
        """(bytes, digest, media type) of the manifest TARGET (a tag or digest); the digest is checked."""
        r = self.request("GET", self._url(f"manifests/{target}"), headers={"Accept": MANIFEST_ACCEPT})
        body = r.content
        if len(body) > MAX_SMALL_BLOB:
            raise RegistryError(f"{self.ref}: manifest of {len(body)} bytes is too large")
        digest = sha256_digest(body)
        expected = target if target.startswith("sha256:") else r.headers.get("Docker-Content-Digest")
        if expected and expected.startswith("sha256:") and expected != digest:
            raise VerifyError(f"{self.ref}: the manifest's digest is {digest}, not {expected}: the registry's copy is "
                              "corrupt or tampered with; nothing was published")
        return body, digest, (r.headers.get("Content-Type") or "").split(";")[0].strip()

    def manifest_digest(self, target: str) -> str | None:
        """The digest the registry gives for manifest TARGET (HEAD: no body), None if it has none."""
        try:
            r = self.request("HEAD", self._url(f"manifests/{target}"), headers={"Accept": MANIFEST_ACCEPT})
        except RegistryNotFoundError:
            return None
        return r.headers.get("Docker-Content-Digest") or (target if target.startswith("sha256:") else None)

    def put_manifest(self, tag: str, body: bytes, media_type: str) -> str:
        r = self.request("PUT", self._url(f"manifests/{tag}"), headers={"Content-Type": media_type},
                         data=body, ok=(200, 201))
        digest = sha256_digest(body)
        answered = r.headers.get("Docker-Content-Digest")
        if answered and answered != digest:
            raise RegistryError(f"registry {self.ref.host} stored the manifest as {answered}, expected {digest}")
        return digest

    # --- blobs ------------------------------------------------------------------------------------------

    def blob_exists(self, digest: str) -> bool:
        try:
            self.request("HEAD", self._url(f"blobs/{digest}"))
        except RegistryNotFoundError:
            return False
        return True

    def upload_blob(self, digest: str, size: int, f: IO[bytes] | bytes, progress: Progress | None = None) -> None:
        """Monolithic upload (POST a session, PUT the bytes); the registry checks the digest."""
        r = self.request("POST", self._url("blobs/uploads/"), ok=(202,))
        location = r.headers.get("Location")
        if not location:
            raise RegistryError(f"registry {self.ref.host} started an upload without a Location header")
        location = urljoin(f"{self.scheme}://{self.ref.host}/", location)
        sep = "&" if "?" in location else "?"
        body: Body = f if isinstance(f, bytes) else (f, size, progress)
        self.request("PUT", f"{location}{sep}digest={digest}", data=body, ok=(201, 204),
                     headers={"Content-Type": "application/octet-stream"})
        if isinstance(f, bytes) and progress:
            progress(size, size)
        self.stats["bytes_uploaded"] += size
        self.stats["blobs_uploaded"] += 1

    def get_small_blob(self, digest: str, size: int) -> bytes:
        if size > MAX_SMALL_BLOB:
            raise RegistryError(f"{self.ref}: blob {digest} of {size} bytes is too large for a config")
        data = self.request("GET", self._url(f"blobs/{digest}")).content
        self.stats["bytes_downloaded"] += len(data)
        self.stats["blobs_downloaded"] += 1
        if sha256_digest(data) != digest or len(data) != size:
            raise VerifyError(f"{self.ref}: blob {digest} does not match its digest: the registry's copy is corrupt "
                              "or tampered with; nothing was published")
        return data

    def _read_into(self, r: Response, buf: memoryview) -> int:
        """The next bytes of a streamed response; a broken connection is the registry's error, not a local one."""
        try:
            return r.raw.readinto(buf)
        except (OSError, http.client.HTTPException) as e:
            raise self._unreachable(e) from e

    def download_blob(self, digest: str, size: int, dest: Path, progress: Progress | None = None) -> None:
        """Stream blob DIGEST into DEST, hashing as it comes; VerifyError if digest or size differ."""
        h = hashlib.sha256()
        done = 0
        r = self.request("GET", self._url(f"blobs/{digest}"), stream=True)
        buf = memoryview(bytearray(CHUNK))
        complete = False
        try:
            with dest.open("wb") as out:
                while n := self._read_into(r, buf):
                    chunk = buf[:n]
                    h.update(chunk)
                    out.write(chunk)
                    done += n
                    if done > size:
                        break
                    if progress:
                        progress(done, size)
                else:
                    complete = True
                out.flush()
                os.fsync(out.fileno())  # on disk before it can be renamed over the previous cache
        finally:
            if not complete:
                self.close()  # the rest of the response is unread: the connection cannot carry another request
        self.stats["bytes_downloaded"] += done
        self.stats["blobs_downloaded"] += 1
        got = "sha256:" + h.hexdigest()
        if done != size or got != digest:
            raise VerifyError(f"{self.ref}: blob {digest} does not match its digest (got {done} bytes, {got[:19]}...): "
                              "the registry's copy is corrupt or tampered with; nothing was published")
