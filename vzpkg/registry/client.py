"""The registry protocol (OCI distribution specification) for one repository.

Authentication is oras' (`oras.auth.TokenAuth`): given a 401 it parses the WWW-Authenticate challenge, asks the
realm for a bearer token with the user's credentials (or anonymously) and hands back the header to retry with.
The rest is plain requests on one session, because oras 0.2's `Registry` (oras.provider) falls short here:

- it retries every failed request five times with sleeps of 3 s to 83 s (`decorator.retry`), so an unreachable
  registry takes minutes to report; here a connect timeout, and one clear error at once;
- `put_upload` reads the whole blob into memory and `download_blob` writes without checking the digest; here
  blobs are streamed (constant memory, a progress callback) and every byte downloaded is hashed and compared;
- it keeps one token and reuses it after a 401, so a pull-scoped token from a HEAD is never upgraded to the push
  scope an upload needs; here a 401 with a token drops it and asks once more (the new challenge names the scope);
- importing it costs ~140 ms (jsonschema, http.cookiejar) on every command, a third of a whole push here.
Basic auth (htpasswd registries) is sent pre-emptively, so a streamed body is never sent twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import requests
from requests.adapters import HTTPAdapter

from ..errors import (
    RegistryAuthError,
    RegistryError,
    RegistryNotFoundError,
    RegistryTLSError,
    RegistryUnreachableError,
    VerifyError,
)
from .auth import Credentials, find_credentials
from .reference import Reference, Transport

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 120.0
CHUNK = 1 << 20
MANIFEST_ACCEPT = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])
MAX_SMALL_BLOB = 16 << 20  # manifests and config blobs are read into memory; refuse anything larger

Progress = Callable[[int, int], None]

# oras logs failures of its own; the errors raised here say everything once.
logging.getLogger("oras.logger").disabled = True


class _TimeoutAdapter(HTTPAdapter):
    """Every request of the session (including oras' token requests) gets a timeout."""

    def send(self, request, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = (CONNECT_TIMEOUT, READ_TIMEOUT)
        return super().send(request, **kwargs)


class _CountingReader:
    """A file-like body for requests: known length (so no chunked encoding), progress as it is read."""

    def __init__(self, f: IO[bytes], size: int, progress: Progress | None) -> None:
        self.f, self.size, self.progress, self.done = f, size, progress, 0

    def __len__(self) -> int:
        return self.size

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(CHUNK if n is None or n < 0 else max(n, CHUNK))  # http.client sends what it gets
        self.done += len(data)
        if self.progress:
            self.progress(self.done, self.size)
        return data


def _registry_message(response: requests.Response) -> str:
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


class RegistryClient:
    """One repository on one registry. Requests counted in `stats` (what was sent and received)."""

    def __init__(self, ref: Reference, *, insecure: bool = False, ca_file: str | None = None) -> None:
        self.ref = ref
        self.transport = Transport.for_host(ref.host, insecure=insecure, ca_file=ca_file)
        self.credentials: Credentials | None = find_credentials(ref.host)
        self.scheme = self.transport.schemes[0]
        self.session: requests.Session | None = None
        self._token_auth: Any = None  # oras.auth.TokenAuth when the registry answers with a Bearer challenge
        self._basic = False
        self.stats = {"bytes_uploaded": 0, "bytes_downloaded": 0, "blobs_uploaded": 0, "blobs_downloaded": 0}

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
            session = requests.Session()
            session.mount("https://", _TimeoutAdapter())
            session.mount("http://", _TimeoutAdapter())
            try:
                r = session.get(f"{scheme}://{self.ref.host}/v2/", verify=self.transport.verify)
            except requests.exceptions.SSLError as e:
                if "CERTIFICATE_VERIFY_FAILED" in str(e) or "hostname" in str(e).lower():
                    raise self._tls_error(e) from e
                if more:
                    continue
                raise RegistryTLSError(f"registry {self.ref.host} does not speak TLS ({str(e)[:120]}): pass "
                                       "--insecure if it is a plain-HTTP registry") from e
            except requests.exceptions.RequestException as e:
                if more:
                    continue
                raise self._unreachable(e) from e
            if more and r.status_code == 400:
                continue  # plain HTTP sent to a TLS port
            self.session = session
            challenge = r.headers.get("WWW-Authenticate", "") if r.status_code == 401 else ""
            self._basic = challenge.lower().startswith("basic")
            if challenge.lower().startswith("bearer"):
                from oras.auth import get_auth_backend

                self._token_auth = get_auth_backend("token", session, insecure=scheme == "http",
                                                    tls_verify=self.transport.verify)
                if self.credentials:
                    self._token_auth.set_basic_auth(self.credentials.username, self.credentials.password)
            if r.status_code not in (200, 401):
                hint = " (a TLS registry? drop --insecure)" if scheme == "http" and r.status_code == 400 else ""
                raise RegistryError(f"{self.ref.host} does not answer like an OCI registry at /v2/ "
                                    f"({_registry_message(r)}){hint}")
            return

    def _tls_error(self, e: Exception) -> RegistryTLSError:
        # requests wraps urllib3's error, which wraps ssl's: the innermost says why ("unable to get local issuer").
        reason = next((x.verify_message or str(x) for x in _chain(e) if isinstance(x, ssl.SSLCertVerificationError)),
                      str(e))
        return RegistryTLSError(f"TLS certificate of registry {self.ref.host} not trusted ({reason[:160]}): "
                                "give its CA with --ca-file, or use --insecure for a plain-HTTP registry")

    def _unreachable(self, e: Exception) -> RegistryUnreachableError:
        kind = "timed out" if isinstance(e, requests.exceptions.Timeout) else "refused or unreachable"
        return RegistryUnreachableError(f"registry {self.ref.host} {kind} ({self.scheme}): check the address and "
                                        "that the registry runs")

    def _auth_error(self, r: requests.Response) -> RegistryAuthError:
        if self.credentials is None:
            return RegistryAuthError(
                f"registry {self.ref.host} wants credentials for {self.ref.path} ({_registry_message(r)}): log in "
                "(~/.docker/config.json, $REGISTRY_AUTH_FILE) or set VZPKG_REGISTRY_USERNAME and VZPKG_REGISTRY_PASSWORD")
        return RegistryAuthError(f"registry {self.ref.host} refused the credentials from {self.credentials.source} "
                                 f"for {self.ref.path} ({_registry_message(r)}): check the user name and password")

    def request(self, method: str, url: str, *, headers: dict[str, str] | None = None, data: Any = None,
                stream: bool = False, ok: tuple[int, ...] = (200,)) -> requests.Response:
        """One request, authenticated (Basic, or a bearer token through oras' token dance), errors mapped."""
        if self.session is None:
            self.connect()
        assert self.session is not None
        headers = dict(headers or {})
        if self._basic and self.credentials:
            headers["Authorization"] = "Basic " + _basic(self.credentials)
        try:
            r = self._send(method, url, headers, data, stream)
        except requests.exceptions.SSLError as e:
            raise self._tls_error(e) from e
        except requests.exceptions.RequestException as e:
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

    def _send(self, method: str, url: str, headers: dict[str, str], data: Any, stream: bool) -> requests.Response:
        assert self.session is not None
        auth = self._token_auth
        if auth is not None and auth.token:
            headers = {**headers, **auth.get_auth_header()}
        # verify on every call: a session's own `verify` loses to $REQUESTS_CA_BUNDLE in requests' merge.
        verify = self.transport.verify
        r = self.session.request(method, url, headers=headers, data=data, stream=stream, verify=verify)
        if r.status_code != 401 or auth is None or not _rewindable(data):
            return r
        # The challenge names the scope this request needs (pull, or pull,push): a token for it, then once more.
        auth.token = None
        headers, changed = auth.authenticate_request(r, headers)
        if not changed:
            return r
        r.close()
        return self.session.request(method, url, headers=headers, data=data, stream=stream, verify=verify)

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
        return body, digest, r.headers.get("Content-Type", "").split(";")[0].strip()

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

    def upload_blob(self, digest: str, size: int, f: IO[bytes], progress: Progress | None = None) -> None:
        """Monolithic upload (POST a session, PUT the bytes); the registry checks the digest."""
        r = self.request("POST", self._url("blobs/uploads/"), headers={"Content-Length": "0"}, ok=(202,))
        location = r.headers.get("Location")
        if not location:
            raise RegistryError(f"registry {self.ref.host} started an upload without a Location header")
        if location.startswith("/"):
            location = f"{self.scheme}://{self.ref.host}{location}"
        sep = "&" if "?" in location else "?"
        reader = _CountingReader(f, size, progress)
        self.request("PUT", f"{location}{sep}digest={digest}", data=reader, ok=(201, 204),
                     headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
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

    def download_blob(self, digest: str, size: int, dest: Path, progress: Progress | None = None) -> None:
        """Stream blob DIGEST into DEST, hashing as it comes; VerifyError if digest or size differ."""
        h = hashlib.sha256()
        done = 0
        with self.request("GET", self._url(f"blobs/{digest}"), stream=True) as r, dest.open("wb") as out:
            try:
                for chunk in r.iter_content(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    done += len(chunk)
                    if done > size:
                        break
                    if progress:
                        progress(done, size)
            except requests.exceptions.RequestException as e:
                raise self._unreachable(e) from e
            out.flush()
            os.fsync(out.fileno())  # on disk before it can be renamed over the previous cache
        self.stats["bytes_downloaded"] += done
        self.stats["blobs_downloaded"] += 1
        got = "sha256:" + h.hexdigest()
        if done != size or got != digest:
            raise VerifyError(f"{self.ref}: blob {digest} does not match its digest (got {done} bytes, {got[:19]}...): "
                              "the registry's copy is corrupt or tampered with; nothing was published")


def _rewindable(data: Any) -> bool:
    """A body that can be sent twice (streamed uploads are authenticated before, by the POST that opens them)."""
    return data is None or isinstance(data, bytes)


def _basic(c: Credentials) -> str:
    import base64

    return base64.b64encode(f"{c.username}:{c.password}".encode()).decode()


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    """E, the exceptions in its args, and its causes (bounded: exception graphs can be cyclic)."""
    seen = 0
    while e is not None and seen < 10:
        yield e
        for arg in getattr(e, "args", ()):
            if isinstance(arg, BaseException):
                yield from _chain(arg)
        e = e.__cause__ or e.__context__
        seen += 1
