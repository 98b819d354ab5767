"""`vzpkg push` / `vzpkg pull` against a real registry (Debian's docker-registry, Distribution 2.8) on 127.0.0.1:
plain HTTP, and TLS from a throw-away CA with htpasswd auth. Small synthetic caches keep it fast; the real
debian-12 cache is used once, by the vzctl test in runtime/test_registry_create.py."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest
import requests
import zstandard
from conftest import PROJECT, VZPKG, run_vzpkg
from registry_server import REGISTRY_BIN, Registry

from vzpkg.registry.delta import compress_like_pack
from vzpkg.store.cache import CacheStore

pytestmark = pytest.mark.skipif(not Path(REGISTRY_BIN).exists(), reason="docker-registry is not installed (make setup)")

NAME = "debian-12-x86_64"


def make_cache(cache_dir: Path, name: str = NAME, *, noise: int = 4096, seed: str = "a", like_pack: bool = False,
               extra: bytes = b"") -> dict:
    """A small real cache (tar+zstd of a few files, one of NOISE random bytes) published through CacheStore.
    LIKE_PACK: compressed with archive.pack's parameters (as a delta pull rebuilds it)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        files = {"etc/os-release": f"ID=debian\nVERSION_ID=12\nSEED={seed}\n".encode(),
                 "usr/bin/hello": b"#!/bin/sh\necho hello\n",
                 "var/lib/noise": hashlib.shake_256(seed.encode()).digest(noise), "var/lib/extra": extra}
        for d in ("etc", "usr", "usr/bin", "var", "var/lib"):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1700000000
            tar.addfile(info)
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o755 if "bin" in path else 0o644, 1700000000
            tar.addfile(info, io.BytesIO(data))
    store = CacheStore(cache_dir)
    tmp = store.temp_path(name, "test")
    if like_pack:
        tar = store.temp_path(name, "tar")
        tar.write_bytes(buf.getvalue())
        compress_like_pack(tar, tmp, 3)
        tar.unlink()
        packed = tmp.read_bytes()
    else:
        packed = zstandard.ZstdCompressor(level=1).compress(buf.getvalue())
        tmp.write_bytes(packed)
    manifest = {"name": name, "archive": f"{name}.tar.zst", "sha256": hashlib.sha256(packed).hexdigest(),
                "packed_size": len(packed), "unpacked_size": len(buf.getvalue()), "created": "2026-11-30T00:00:00+00:00",
                "distribution": "debian", "release": "12", "architecture": "x86_64", "package_count": 0,
                "packages": [], "seed": seed, "compression_level": 3}
    store.publish(name, tmp, manifest)
    return manifest


def vzpkg(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_vzpkg(*args, env=env, timeout=timeout)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr}"
    return proc


def one_error_line(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, f"exit {proc.returncode} (wanted {code}): {proc.stderr}"
    assert len(lines) == 1 and lines[0].startswith("vzpkg: error: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def plain_registry(tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("registry-plain")).start()
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("registry-tls"), tls=True, users={"alice": "s3cret"}).start()
    yield reg
    reg.stop()


def test_push_pull_roundtrip_and_dedup(plain_registry, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    manifest = make_cache(src)
    ref = f"{plain_registry.host}/templates/{NAME}:2026-11-30"
    pushed = json.loads(ok(vzpkg("push", NAME, ref, "--cache-dir", str(src), "--json")).stdout)
    assert pushed["blobs_uploaded"] == 2 and pushed["layer"] == f"sha256:{manifest['sha256']}"
    uploads = plain_registry.requests_logged("PUT", "/blobs/uploads/")
    assert uploads == 2

    pulled = json.loads(ok(vzpkg("pull", ref, "--cache-dir", str(dst), "--json")).stdout)
    assert pulled["name"] == NAME and not pulled["up_to_date"] and pulled["digest"] == pushed["digest"]
    assert (dst / f"{NAME}.tar.zst").read_bytes() == (src / f"{NAME}.tar.zst").read_bytes()
    got = json.loads((dst / f"{NAME}.json").read_text())
    assert got["sha256"] == manifest["sha256"] and got["packages"] == [] and got["seed"] == "a"
    assert got["pulled_from"] == ref and got["image_digest"] == pushed["digest"]
    ok(vzpkg("verify-cache", NAME, "--cache-dir", str(dst)))
    assert [p.name for p in dst.iterdir() if p.name.startswith(".tmp-")] == []

    # By digest; a digest the repository does not have is "not found".
    by_digest = f"{plain_registry.host}/templates/{NAME}@{pushed['digest']}"
    ok(vzpkg("pull", by_digest, "--cache-dir", str(tmp_path / "d2")))
    assert (tmp_path / "d2" / f"{NAME}.tar.zst").read_bytes() == (src / f"{NAME}.tar.zst").read_bytes()
    one_error_line(vzpkg("pull", f"{plain_registry.host}/templates/{NAME}@sha256:{'0' * 64}", "--cache-dir",
                         str(tmp_path / "d3")), 42, "not found")
    # A temporary file a killed pull left behind is removed by the next pull that downloads.
    leftover = dst / f".tmp-{NAME}-pull-999999"
    leftover.write_bytes(b"partial")
    (dst / f"{NAME}.json").write_text(json.dumps({**got, "sha256": "0" * 64}))  # so the next pull downloads
    ok(vzpkg("pull", ref, "--cache-dir", str(dst)))
    assert not leftover.exists()
    assert json.loads((dst / f"{NAME}.json").read_text())["sha256"] == manifest["sha256"]

    # A second push uploads no blob again (HEAD finds both); only the manifest is put.
    again = json.loads(ok(vzpkg("push", NAME, ref, "--cache-dir", str(src), "--json")).stdout)
    assert (again["blobs_uploaded"], again["blobs_skipped"], again["digest"]) == (0, 2, pushed["digest"])
    assert plain_registry.requests_logged("PUT", "/blobs/uploads/") == uploads
    # A pull into a cache that has the digest downloads no blob.
    blob_gets = plain_registry.requests_logged("GET", "/blobs/sha256:")
    again = json.loads(ok(vzpkg("pull", ref, "--cache-dir", str(dst), "--json")).stdout)
    assert again["up_to_date"] and again["bytes_downloaded"] == 0
    assert plain_registry.requests_logged("GET", "/blobs/sha256:") == blob_gets


def test_push_with_known_diff_id(plain_registry, tmp_path):
    """After a first push the tar's digest is remembered: a push to another repository knows its manifest before
    sending anything (config uploaded beside the layer), one to a new tag finds the blobs by HEAD, and one that
    finds its manifest under the tag sends no blob and no manifest."""
    src = tmp_path / "src"
    manifest = make_cache(src, seed="known")
    first = json.loads(ok(vzpkg("push", NAME, f"{plain_registry.host}/known-a/{NAME}:1", "--cache-dir", str(src),
                                "--json")).stdout)
    assert list((src / ".registry").glob(f"{manifest['sha256']}.diff_id"))
    ref = f"{plain_registry.host}/known-b/{NAME}:1"
    other = json.loads(ok(vzpkg("push", NAME, ref, "--cache-dir", str(src), "--json")).stdout)
    assert (other["blobs_uploaded"], other["blobs_skipped"], other["digest"]) == (2, 0, first["digest"])
    assert plain_registry.requests_logged("PUT", "/v2/known-b/") == 3  # layer, config, manifest
    dst = tmp_path / "dst"
    ok(vzpkg("pull", ref, "--cache-dir", str(dst)))
    assert (dst / f"{NAME}.tar.zst").read_bytes() == (src / f"{NAME}.tar.zst").read_bytes()
    ok(vzpkg("verify-cache", NAME, "--cache-dir", str(dst)))

    retag = json.loads(ok(vzpkg("push", NAME, f"{plain_registry.host}/known-b/{NAME}:2", "--cache-dir", str(src),
                                "--json")).stdout)
    assert (retag["blobs_uploaded"], retag["blobs_skipped"]) == (0, 2) and retag["digest"] != first["digest"]
    assert plain_registry.requests_logged("PUT", "/v2/known-b/") == 4  # the manifest of tag 2 only
    again = json.loads(ok(vzpkg("push", NAME, ref, "--cache-dir", str(src), "--json")).stdout)
    assert (again["blobs_uploaded"], again["blobs_skipped"], again["digest"]) == (0, 2, first["digest"])
    assert plain_registry.requests_logged("PUT", "/v2/known-b/") == 4
    assert plain_registry.requests_logged("HEAD", "/v2/known-b/") == 9  # 4 + 4 + 1: the last push asked only the tag


def test_push_all_and_pull_with_name(plain_registry, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_cache(src, "debian-12-x86_64", seed="b")
    make_cache(src, "debian-13-x86_64", seed="c")
    prefix = f"{plain_registry.host}/fleet:v1"
    results = json.loads(ok(vzpkg("push", "--all", prefix, "--cache-dir", str(src), "--json")).stdout)
    assert sorted(r["reference"] for r in results) == [f"{plain_registry.host}/fleet/debian-12-x86_64:v1",
                                                        f"{plain_registry.host}/fleet/debian-13-x86_64:v1"]
    ok(vzpkg("pull", f"{plain_registry.host}/fleet/debian-13-x86_64:v1", "--name", "mine-13-x86_64",
             "--cache-dir", str(dst)))
    assert json.loads((dst / "mine-13-x86_64.json").read_text())["seed"] == "c"
    ok(vzpkg("verify-cache", "mine-13-x86_64", "--cache-dir", str(dst)))
    # `info` works on a pulled cache even without a template definition of that name here
    info = json.loads(ok(vzpkg("info", "mine-13-x86_64", "--json", "--cache-dir", str(dst))).stdout)
    assert info["cache"]["seed"] == "c" and info["cache"]["pulled_from"].endswith("/fleet/debian-13-x86_64:v1")
    assert "Pulled from:" in ok(vzpkg("info", "mine-13-x86_64", "--cache-dir", str(dst))).stdout


def test_delta_from_previous_generation(plain_registry, tmp_path):
    """push --delta stores a patch from the previous generation; a puller that has it downloads only the patch
    and rebuilds the identical archive; a broken patch falls back to the whole layer."""
    from vzpkg.build.update import save_generation

    src, dst = tmp_path / "src", tmp_path / "dst"
    old = make_cache(src, noise=3 << 20, seed="gen", like_pack=True)
    store = CacheStore(src)
    save_generation(store, NAME)
    new = make_cache(src, noise=3 << 20, seed="gen", like_pack=True, extra=b"a changed package\n" * 100)
    assert new["sha256"] != old["sha256"]
    make_cache(dst, noise=3 << 20, seed="gen", like_pack=True)  # the puller has the old generation
    ref = f"{plain_registry.host}/delta/{NAME}:2"
    pushed = json.loads(ok(vzpkg("push", NAME, ref, "--delta", "--cache-dir", str(src), "--json")).stdout)
    assert pushed["delta"]["from_sha256"] == old["sha256"] and pushed["delta"]["tag"] == "2.delta"
    assert pushed["delta"]["patch_bytes"] < new["packed_size"] / 20
    pulled = json.loads(ok(vzpkg("pull", ref, "--cache-dir", str(dst), "--json")).stdout)
    assert pulled["delta"] and pulled["bytes_downloaded"] < new["packed_size"] / 20
    assert (dst / f"{NAME}.tar.zst").read_bytes() == (src / f"{NAME}.tar.zst").read_bytes()
    assert json.loads((dst / f"{NAME}.json").read_text())["sha256"] == new["sha256"]
    assert [p.name for p in dst.iterdir() if p.name.startswith(".tmp-")] == []

    # A corrupt patch blob: the delta is refused (digest), the whole layer comes instead, the result is the same.
    dst2 = tmp_path / "dst2"
    make_cache(dst2, noise=3 << 20, seed="gen", like_pack=True)
    patch_layer = requests.get(f"http://{plain_registry.host}/v2/delta/{NAME}/manifests/2.delta", timeout=10,
                               headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()["layers"][0]["digest"]
    blob = plain_registry.blob_file(patch_layer)
    blob.write_bytes(blob.read_bytes()[::-1])
    proc = ok(vzpkg("pull", ref, "--cache-dir", str(dst2)))
    assert "delta not used" in proc.stderr
    assert (dst2 / f"{NAME}.tar.zst").read_bytes() == (src / f"{NAME}.tar.zst").read_bytes()


def test_tampered_blob_is_refused_and_nothing_published(plain_registry, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    new = make_cache(src, seed="new")
    old = make_cache(dst, seed="old")
    ref = f"{plain_registry.host}/tamper/{NAME}:x"
    ok(vzpkg("push", NAME, ref, "--cache-dir", str(src)))
    blob = plain_registry.blob_file(f"sha256:{new['sha256']}")
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    before = (dst / f"{NAME}.tar.zst").read_bytes()
    proc = vzpkg("pull", ref, "--cache-dir", str(dst))
    one_error_line(proc, 11, "does not match its digest", "nothing was published")
    assert (dst / f"{NAME}.tar.zst").read_bytes() == before
    assert json.loads((dst / f"{NAME}.json").read_text())["sha256"] == old["sha256"]
    assert [p.name for p in dst.iterdir() if p.name.startswith(".tmp-")] == []


def test_unknown_tag_and_unreachable_registry(plain_registry, tmp_path):
    make_cache(tmp_path / "src")
    started = time.monotonic()
    one_error_line(vzpkg("pull", f"{plain_registry.host}/templates/{NAME}:no-such-tag", "--cache-dir",
                         str(tmp_path / "dst")), 42, "not found")
    one_error_line(vzpkg("pull", f"{plain_registry.host}/no/such/repo:1", "--cache-dir", str(tmp_path / "dst")), 42)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    one_error_line(vzpkg("pull", f"{dead}/templates/{NAME}:1", "--cache-dir", str(tmp_path / "dst")), 43,
                   dead, "unreachable")
    one_error_line(vzpkg("push", NAME, f"{dead}/templates/{NAME}:1", "--cache-dir", str(tmp_path / "src")), 43)
    one_error_line(vzpkg("pull", "not-a-reference", "--cache-dir", str(tmp_path / "dst")), 2, "registry reference")
    assert time.monotonic() - started < 30
    assert not (tmp_path / "dst" / f"{NAME}.tar.zst").exists()


def test_tls_and_htpasswd_auth(tls_registry, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    manifest = make_cache(src)
    ref = f"{tls_registry.host}/secure/{NAME}:1"
    ca = ["--ca-file", str(tls_registry.ca)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VZPKG_REGISTRY_", "REGISTRY_AUTH_FILE"))}
    noauth = {**clean, "HOME": str(tmp_path), "DOCKER_CONFIG": str(tmp_path / "none"), "XDG_RUNTIME_DIR": str(tmp_path)}
    # the env passed to run_vzpkg is merged over os.environ: blank what must not leak in
    noauth.update({"REGISTRY_AUTH_FILE": "", "VZPKG_REGISTRY_USERNAME": "", "VZPKG_REGISTRY_PASSWORD": ""})
    started = time.monotonic()
    one_error_line(vzpkg("push", NAME, ref, "--cache-dir", str(src), env=noauth), 44, "--ca-file")
    one_error_line(vzpkg("push", NAME, ref, "--cache-dir", str(src), *ca, env=noauth), 41, "wants credentials")
    wrong = {**noauth, "VZPKG_REGISTRY_USERNAME": "alice", "VZPKG_REGISTRY_PASSWORD": "wrong"}
    one_error_line(vzpkg("push", NAME, ref, "--cache-dir", str(src), *ca, env=wrong), 41, "refused the credentials")
    assert time.monotonic() - started < 30

    # Credentials from a container tools' auth file ($REGISTRY_AUTH_FILE, docker's format).
    auth_file = tmp_path / "auth.json"
    token = __import__("base64").b64encode(b"alice:s3cret").decode()
    auth_file.write_text(json.dumps({"auths": {tls_registry.host: {"auth": token}}}))
    good = {**noauth, "REGISTRY_AUTH_FILE": str(auth_file)}
    ok(vzpkg("push", NAME, ref, "--cache-dir", str(src), *ca, env=good))
    one_error_line(vzpkg("pull", ref, "--cache-dir", str(dst), *ca, env=wrong), 41)
    assert not dst.exists() or not list(dst.glob("*.tar.zst"))
    ok(vzpkg("pull", ref, "--cache-dir", str(dst), *ca, env=good))
    assert hashlib.sha256((dst / f"{NAME}.tar.zst").read_bytes()).hexdigest() == manifest["sha256"]
    # ~/.docker/config.json works the same way
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "config.json").write_text(auth_file.read_text())
    shutil.rmtree(dst)
    ok(vzpkg("pull", ref, "--cache-dir", str(dst), *ca, env={**noauth, "DOCKER_CONFIG": str(tmp_path / "docker")}))


def test_credential_helper(tls_registry, plain_registry, tmp_path):
    """A docker credential helper (credsStore) gives the credentials, run only when the registry asks for them:
    a registry without auth works even when the named helper is not installed."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_cache(src, seed="helper")
    bin_dir, docker = tmp_path / "bin", tmp_path / "docker"
    bin_dir.mkdir()
    docker.mkdir()
    asked = tmp_path / "asked"
    helper = bin_dir / "docker-credential-vzpkgtest"
    helper.write_text(f"""#!/bin/sh
read host
echo "$1 $host" >> {asked}
[ "$host" = "{tls_registry.host}" ] || {{ echo "credentials not found in native keychain"; exit 1; }}
echo '{{"ServerURL": "'$host'", "Username": "alice", "Secret": "s3cret"}}'
""")
    helper.chmod(0o755)
    env = {"HOME": str(tmp_path), "DOCKER_CONFIG": str(docker), "XDG_RUNTIME_DIR": str(tmp_path),
           "REGISTRY_AUTH_FILE": "", "VZPKG_REGISTRY_USERNAME": "", "VZPKG_REGISTRY_PASSWORD": "",
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    (docker / "config.json").write_text(json.dumps({"credsStore": "vzpkgtest"}))
    ref = f"{tls_registry.host}/helper/{NAME}:1"
    ok(vzpkg("push", NAME, ref, "--cache-dir", str(src), "--ca-file", str(tls_registry.ca), env=env))
    ok(vzpkg("pull", ref, "--cache-dir", str(dst), "--ca-file", str(tls_registry.ca), env=env))
    assert (dst / f"{NAME}.tar.zst").read_bytes() == (src / f"{NAME}.tar.zst").read_bytes()
    assert asked.read_text().splitlines() == [f"get {tls_registry.host}"] * 2

    (docker / "config.json").write_text(json.dumps({"credsStore": "not-installed"}))
    ok(vzpkg("push", NAME, f"{plain_registry.host}/helper/{NAME}:1", "--cache-dir", str(src), env=env))
    one_error_line(vzpkg("push", NAME, ref, "--cache-dir", str(src), "--ca-file", str(tls_registry.ca), env=env), 14,
                   "docker-credential-not-installed", "not installed")


class Redirector:
    """An HTTP server on 127.0.0.1 that answers every GET and HEAD with a 307 to the same path at TARGET (a
    registry that serves blobs from elsewhere). With USERS it is the registry's front: /v2/ and everything else
    want Basic credentials first. Records the Authorization header of each request."""

    def __init__(self, target: str, users: dict[str, str] | None = None) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.seen: list[tuple[str, str | None]] = []
        me = self
        expected = {"Basic " + __import__("base64").b64encode(f"{u}:{p}".encode()).decode() for u, p in
                    (users or {}).items()}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                auth = self.headers.get("Authorization")
                me.seen.append((self.path, auth))
                if expected and auth not in expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="front"')
                elif self.path == "/v2/" and expected:
                    self.send_response(200)
                else:
                    self.send_response(307)
                    self.send_header("Location", f"http://{target}{self.path}")
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_HEAD = do_GET

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_pull_follows_redirects_without_credentials_to_other_hosts(plain_registry, tmp_path):
    """A registry front that wants Basic auth and redirects manifests and blobs to another server (which
    redirects once more, to the registry): the pull gets identical bytes, and the credentials went to the front
    only."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_cache(src, seed="redirect")
    ok(vzpkg("push", NAME, f"{plain_registry.host}/redir/{NAME}:1", "--cache-dir", str(src)))
    storage = Redirector(plain_registry.host)
    front = Redirector(storage.host, users={"carol": "pw"})
    env = {"HOME": str(tmp_path), "DOCKER_CONFIG": str(tmp_path / "none"), "XDG_RUNTIME_DIR": str(tmp_path),
           "REGISTRY_AUTH_FILE": "", "VZPKG_REGISTRY_USERNAME": "carol", "VZPKG_REGISTRY_PASSWORD": "pw"}
    try:
        ok(vzpkg("pull", f"{front.host}/redir/{NAME}:1", "--cache-dir", str(dst), env=env))
    finally:
        front.close()
        storage.close()
    assert (dst / f"{NAME}.tar.zst").read_bytes() == (src / f"{NAME}.tar.zst").read_bytes()
    redirected = [path for path, auth in front.seen if path != "/v2/" and auth]
    assert len(redirected) == 3 and any("/manifests/1" in p for p in redirected)  # manifest, config, layer
    assert sorted(path for path, _ in storage.seen) == sorted(redirected)
    assert [auth for _, auth in storage.seen] == [None] * 3


class ForwardProxy:
    """An HTTP proxy on 127.0.0.1: CONNECT tunnels, and plain requests in absolute form passed on as they are
    (Go's server takes absolute-form request lines). Records (first request line, Proxy-Authorization)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(65536)
            if not data:
                client.close()
                return
            head += data
        first, *lines = head.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
        auth = next((v.strip() for k, _, v in (x.partition(":") for x in lines) if k.lower() == "proxy-authorization"),
                    None)
        self.seen.append((first, auth))
        method, target, _ = first.split(" ")
        hostport = target if method == "CONNECT" else target.split("/")[2]
        host, port = hostport.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        if method == "CONNECT":
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            upstream.sendall(head)
        threading.Thread(target=SlowProxy._pipe, args=(None, upstream, client, None), daemon=True).start()
        SlowProxy._pipe(None, client, upstream, None)  # type: ignore[arg-type]

    def close(self) -> None:
        self.sock.close()


def test_proxy_from_environment(plain_registry, tls_registry, tmp_path):
    """$http_proxy (with credentials) and $https_proxy (a CONNECT tunnel, TLS end to end) carry the traffic;
    $no_proxy exempts a registry."""
    src = tmp_path / "src"
    make_cache(src, seed="proxy")
    proxy = ForwardProxy()
    base = {"HOME": str(tmp_path), "DOCKER_CONFIG": str(tmp_path / "none"), "XDG_RUNTIME_DIR": str(tmp_path),
            "REGISTRY_AUTH_FILE": "", "VZPKG_REGISTRY_USERNAME": "", "VZPKG_REGISTRY_PASSWORD": "", "no_proxy": "",
            "NO_PROXY": "", "http_proxy": "", "https_proxy": "", "HTTP_PROXY": "", "HTTPS_PROXY": ""}
    try:
        ref = f"{plain_registry.host}/proxied/{NAME}:1"
        env = {**base, "http_proxy": proxy.url.replace("http://", "http://pu:pp@")}
        ok(vzpkg("push", NAME, ref, "--cache-dir", str(src), env=env))
        ok(vzpkg("pull", ref, "--cache-dir", str(tmp_path / "dst"), env=env))
        assert (tmp_path / "dst" / f"{NAME}.tar.zst").read_bytes() == (src / f"{NAME}.tar.zst").read_bytes()
        assert [line.split(" ")[1] for line, _ in proxy.seen] == [f"http://{plain_registry.host}/v2/"] * 2
        assert {auth for _, auth in proxy.seen} == {"Basic " + __import__("base64").b64encode(b"pu:pp").decode()}

        proxy.seen.clear()
        tls_ref = f"{tls_registry.host}/proxied/{NAME}:1"
        env = {**base, "https_proxy": proxy.url, "VZPKG_REGISTRY_USERNAME": "alice", "VZPKG_REGISTRY_PASSWORD": "s3cret"}
        ok(vzpkg("push", NAME, tls_ref, "--cache-dir", str(src), "--ca-file", str(tls_registry.ca), env=env))
        # two tunnels: the diff_id is known by now, so the config blob goes on a second connection
        # (http.client says HTTP/1.0 in its CONNECT line up to Python 3.12, HTTP/1.1 from 3.13)
        assert [(line.rsplit(" ", 1)[0], auth) for line, auth in proxy.seen] == [(f"CONNECT {tls_registry.host}",
                                                                                 None)] * 2

        proxy.seen.clear()
        ok(vzpkg("push", NAME, ref, "--cache-dir", str(src), env={**env, "http_proxy": proxy.url, "no_proxy": "127.0.0.1"}))
        assert proxy.seen == []
    finally:
        proxy.close()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("registry-token"), users={"bob": "t0ken"}, token_auth=True).start()
    yield reg
    reg.stop()


def test_token_auth(token_registry, tmp_path):
    """Bearer tokens (oras' token dance): a pull-scoped token from the first HEAD is replaced by a push-scoped one
    when the upload asks for it; wrong or missing credentials are one clear error."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    manifest = make_cache(src, seed="token")
    ref = f"{token_registry.host}/tok/{NAME}:1"
    base = {"HOME": str(tmp_path), "DOCKER_CONFIG": str(tmp_path / "none"), "XDG_RUNTIME_DIR": str(tmp_path),
            "REGISTRY_AUTH_FILE": ""}
    good = {**base, "VZPKG_REGISTRY_USERNAME": "bob", "VZPKG_REGISTRY_PASSWORD": "t0ken"}
    bad = {**base, "VZPKG_REGISTRY_USERNAME": "bob", "VZPKG_REGISTRY_PASSWORD": "nope"}
    none = {**base, "VZPKG_REGISTRY_USERNAME": "", "VZPKG_REGISTRY_PASSWORD": ""}
    one_error_line(vzpkg("push", NAME, ref, "--cache-dir", str(src), env=bad), 41, "refused the credentials")
    one_error_line(vzpkg("push", NAME, ref, "--cache-dir", str(src), env=none), 41, "wants credentials")
    ts = token_registry.token_server
    assert ts is not None and ts.refused >= 2 and ts.issued == []
    ok(vzpkg("push", NAME, ref, "--cache-dir", str(src), env=good))
    # a pull token for the first HEAD, then one with push for the upload (oras alone would keep the first)
    scopes = [(s.rsplit(":", 1)[0], set(s.rsplit(":", 1)[1].split(","))) for s in ts.issued]
    assert scopes == [(f"repository:tok/{NAME}", {"pull"}), (f"repository:tok/{NAME}", {"pull", "push"})]
    ok(vzpkg("pull", ref, "--cache-dir", str(dst), env=good))
    assert hashlib.sha256((dst / f"{NAME}.tar.zst").read_bytes()).hexdigest() == manifest["sha256"]
    one_error_line(vzpkg("pull", ref, "--cache-dir", str(tmp_path / "dst2"), env=bad), 41)


class SlowProxy:
    """A TCP forwarder to the registry that sends at most RATE bytes/s back: time to interrupt a pull."""

    def __init__(self, target_port: int, rate: int) -> None:
        self.target, self.rate = target_port, rate
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, self.rate), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket, rate: int | None) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopped = True
        self.sock.close()


def test_sigint_during_pull_keeps_old_cache(plain_registry, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_cache(src, noise=8 << 20, seed="big")
    old = make_cache(dst, seed="old")
    ok(vzpkg("push", NAME, f"{plain_registry.host}/sigint/{NAME}:1", "--cache-dir", str(src)))
    proxy = SlowProxy(plain_registry.port, rate=2 << 20)  # ~4 s for the 8 MiB layer
    try:

        proc = subprocess.Popen([*VZPKG, "pull", f"127.0.0.1:{proxy.port}/sigint/{NAME}:1", "--cache-dir", str(dst)],
                                cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while not any(p.name.startswith(".tmp-") and p.stat().st_size > 0 for p in dst.iterdir()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proxy.close()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert json.loads((dst / f"{NAME}.json").read_text())["sha256"] == old["sha256"]
    assert hashlib.sha256((dst / f"{NAME}.tar.zst").read_bytes()).hexdigest() == old["sha256"]
    assert [p.name for p in dst.iterdir() if p.name.startswith(".tmp-")] == []


def _tree(root: Path) -> dict[str, tuple[str, int, bytes]]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        kind = "d" if p.is_dir() else "f"
        out[rel] = (kind, p.stat().st_mode & 0o7777, p.read_bytes() if kind == "f" else b"")
    return out


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed (make setup)")
def test_container_tools_read_the_image(plain_registry, tmp_path):
    src = tmp_path / "src"
    manifest = make_cache(src, seed="tools")
    ref = f"{plain_registry.host}/tools/{NAME}:1"
    ok(vzpkg("push", NAME, ref, "--cache-dir", str(src)))

    raw = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"],
                                    check=True, capture_output=True, text=True).stdout)
    ann = raw["annotations"]
    assert ann["org.opencontainers.image.title"] == NAME
    assert ann["org.opencontainers.image.created"] == manifest["created"]
    assert ann["org.opencontainers.image.version"] == "12"
    assert (ann["io.vzpkg.distribution"], ann["io.vzpkg.architecture"]) == ("debian", "x86_64")
    assert raw["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
    info = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"],
                                     check=True, capture_output=True, text=True).stdout)
    assert (info["Architecture"], info["Os"]) == ("amd64", "linux")
    assert info["Layers"] == [f"sha256:{manifest['sha256']}"]

    layout = tmp_path / "layout"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:1"],
                   check=True, capture_output=True)
    layer = layout / "blobs" / "sha256" / manifest["sha256"]
    assert layer.read_bytes() == (src / f"{NAME}.tar.zst").read_bytes()  # the layer is the archive, not recompressed

    expected = tmp_path / "expected"
    expected.mkdir()
    subprocess.run(["tar", "--zstd", "-xf", str(src / f"{NAME}.tar.zst"), "-C", str(expected)], check=True)
    unpacked = tmp_path / "from-layout"
    unpacked.mkdir()
    subprocess.run(["tar", "--zstd", "-xf", str(layer), "-C", str(unpacked)], check=True)
    assert _tree(unpacked) == _tree(expected)

    if shutil.which("umoci"):
        bundle = tmp_path / "bundle"
        p = subprocess.run(["umoci", "unpack", "--image", f"{layout}:1", str(bundle)], capture_output=True, text=True)
        if p.returncode != 0 and "mediatype" in p.stderr:
            pytest.skip(f"this umoci cannot unpack zstd layers (Debian 12 has 0.4.7): {p.stderr.strip()[-100:]}")
        assert p.returncode == 0, p.stderr
        assert _tree(bundle / "rootfs") == _tree(expected)
