"""Registry references, credentials lookup and the cache <-> OCI image mapping (no registry needed)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os

import pytest
import zstandard

from vzpkg.errors import ConfigError, MissingToolError, RegistryAuthError, RegistryError, UsageError, VerifyError
from vzpkg.registry.auth import find_credentials
from vzpkg.registry.image import (
    LAYER_MEDIA_TYPE,
    build_config,
    build_manifest,
    cache_manifest_from_config,
    layer_digests,
    parse_manifest,
)
from vzpkg.registry.reference import Transport, looks_like_reference, parse_reference


@pytest.mark.parametrize("text,host,path,tag,digest", [
    ("127.0.0.1:5000/templates/debian-12-x86_64:2026-11-30", "127.0.0.1:5000", "templates/debian-12-x86_64",
     "2026-11-30", None),
    ("registry.example/a/b", "registry.example", "a/b", None, None),
    ("localhost:5000/x@sha256:" + "a" * 64, "localhost:5000", "x", None, "sha256:" + "a" * 64),
    ("[::1]:5000/x:t", "[::1]:5000", "x", "t", None),
])
def test_parse_reference(text, host, path, tag, digest):
    ref = parse_reference(text)
    assert (ref.host, ref.path, ref.tag, ref.digest) == (host, path, tag, digest)
    assert str(ref) == text
    assert ref.target == (digest or tag or "latest")


@pytest.mark.parametrize("text", ["debian-12-x86_64", "templates/debian:1", "host:5000/UPPER:1", "host:5000/x:bad tag",
                                  "host:5000/x@sha256:short", ""])
def test_parse_reference_refuses(text):
    with pytest.raises(UsageError):
        parse_reference(text)


def test_template_names_are_not_references():
    assert not looks_like_reference("debian-12-x86_64")
    assert not looks_like_reference("debian-12.1-x86_64")  # a dot but no slash
    assert looks_like_reference("127.0.0.1:5000/t/debian-12-x86_64:1")
    assert looks_like_reference("localhost/t")


def test_transport():
    assert Transport.for_host("127.0.0.1:5000").schemes == ("http", "https")
    assert Transport.for_host("localhost:5000").schemes == ("http", "https")
    assert Transport.for_host("registry.example").schemes == ("https",)  # plain HTTP only when asked
    assert Transport.for_host("registry.example", insecure=True).schemes == ("http",)
    with pytest.raises(UsageError):
        Transport.for_host("registry.example", ca_file="/nonexistent/ca.pem")


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    for var in ("VZPKG_REGISTRY_USERNAME", "VZPKG_REGISTRY_PASSWORD", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    return tmp_path


def _auth_file(path, host, user, password):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}))


def test_credentials_order(no_credentials, monkeypatch):
    tmp = no_credentials
    assert find_credentials("reg.example:5000") is None
    _auth_file(tmp / "docker" / "config.json", "reg.example:5000", "docker", "d")
    assert find_credentials("reg.example:5000").username == "docker"
    assert find_credentials("other.example") is None
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp / "run"))
    _auth_file(tmp / "run" / "containers" / "auth.json", "https://reg.example:5000", "podman", "p")
    assert find_credentials("reg.example:5000").username == "podman"
    _auth_file(tmp / "regauth.json", "reg.example:5000", "file", "f:with:colons")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp / "regauth.json"))
    found = find_credentials("reg.example:5000")
    assert (found.username, found.password) == ("file", "f:with:colons")
    monkeypatch.setenv("VZPKG_REGISTRY_USERNAME", "env")
    monkeypatch.setenv("VZPKG_REGISTRY_PASSWORD", "e")
    assert find_credentials("reg.example:5000").username == "env"


def test_credentials_localhost_alias_and_bad_files(no_credentials, monkeypatch):
    tmp = no_credentials
    _auth_file(tmp / "docker" / "config.json", "localhost:5000", "me", "pw")
    assert find_credentials("127.0.0.1:5000").username == "me"
    (tmp / "bad.json").write_text("{not json")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp / "bad.json"))
    with pytest.raises(ConfigError, match="bad.json"):
        find_credentials("127.0.0.1:5000")
    (tmp / "bad.json").write_text(json.dumps({"auths": {"127.0.0.1:5000": {"auth": "%%%"}}}))
    with pytest.raises(ConfigError, match="base64"):
        find_credentials("127.0.0.1:5000")


def _archive() -> tuple[bytes, bytes]:
    tar = b"x" * 10000
    return tar, zstandard.ZstdCompressor().compress(tar)


def _manifest(packed: bytes) -> dict:
    return {"name": "debian-12-x86_64", "archive": "debian-12-x86_64.tar.zst", "sha256": hashlib.sha256(packed).hexdigest(),
            "packed_size": len(packed), "created": "2026-11-30T00:00:00+00:00", "distribution": "debian",
            "release": "12", "architecture": "x86_64", "packages": [{"name": "bash", "version": "5.2"}]}


def test_image_roundtrip():
    tar, packed = _archive()
    layer = layer_digests(io.BytesIO(packed))
    assert layer.digest == "sha256:" + hashlib.sha256(packed).hexdigest()
    assert layer.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest() and layer.size == len(packed)
    manifest = _manifest(packed)
    config = build_config(manifest, layer)
    cfg = json.loads(config)
    assert (cfg["architecture"], cfg["os"], cfg["rootfs"]["diff_ids"]) == ("amd64", "linux", [layer.diff_id])
    body = build_manifest(config, layer, manifest, "v1")
    assert body == build_manifest(config, layer, manifest, "v1")  # deterministic: a second push is the same manifest
    image = parse_manifest(body, "", "ref")
    assert (image.layer_digest, image.layer_size) == (layer.digest, layer.size)
    assert image.config_digest == "sha256:" + hashlib.sha256(config).hexdigest()
    ann = image.annotations
    assert ann["org.opencontainers.image.title"] == "debian-12-x86_64"
    assert ann["org.opencontainers.image.created"] == manifest["created"]
    assert ann["org.opencontainers.image.version"] == "12" and ann["org.opencontainers.image.ref.name"] == "v1"
    assert cache_manifest_from_config(config, image, "ref") == manifest


def test_image_refusals():
    _, packed = _archive()
    layer = layer_digests(io.BytesIO(packed))
    manifest = _manifest(packed)
    config = build_config(manifest, layer)
    image = parse_manifest(build_manifest(config, layer, manifest, "v1"), "", "ref")
    other = build_config({**manifest, "sha256": "0" * 64}, layer)
    with pytest.raises(VerifyError, match="not the archive"):
        cache_manifest_from_config(other, image, "ref")
    with pytest.raises(RegistryError, match="no 'vzpkg' manifest"):
        cache_manifest_from_config(b'{"os": "linux"}', image, "ref")
    with pytest.raises(RegistryError, match="image index"):
        parse_manifest(json.dumps({"mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []}).encode(),
                       "", "ref")
    gzip_image = {"layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "x", "size": 1}],
                  "config": {"digest": "y", "size": 1}}
    with pytest.raises(RegistryError, match=LAYER_MEDIA_TYPE.replace("+", r"\+")):
        parse_manifest(json.dumps(gzip_image).encode(), "", "ref")


def _fake_helper(bin_dir, name, answers: dict[str, tuple[str, str]], log):
    """docker-credential-NAME: `get` reads a host on stdin, answers from ANSWERS or says "credentials not found"
    (exit 1) as docker's helpers do; every host asked is appended to LOG."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / f"docker-credential-{name}"
    table = json.dumps({h: {"ServerURL": h, "Username": u, "Secret": s} for h, (u, s) in answers.items()})
    script.write_text(f"""#!/usr/bin/python3
import json, sys
host = sys.stdin.read().strip()
open({str(log)!r}, "a").write(sys.argv[1] + " " + host + "\\n")
table = json.loads({table!r})
if sys.argv[1] != "get":
    sys.exit(2)
if host == "broken.example":
    print("helper exploded: keychain locked", file=sys.stderr)
    sys.exit(3)
if host not in table:
    print("credentials not found in native keychain")
    sys.exit(1)
print(json.dumps(table[host]))
""")
    script.chmod(0o755)


def test_credential_helpers(no_credentials, monkeypatch):
    """credHelpers (per host) before credsStore (all hosts) before the file's auths; the host goes on stdin."""
    tmp = no_credentials
    log = tmp / "helper.log"
    _fake_helper(tmp / "bin", "store", {"reg.example:5000": ("storeuser", "s1"), "broken.example": ("x", "y")}, log)
    _fake_helper(tmp / "bin", "special", {"special.example": ("specialuser", "s2")}, log)
    monkeypatch.setenv("PATH", f"{tmp / 'bin'}:{os.environ['PATH']}")
    config = tmp / "docker" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({
        "credsStore": "store", "credHelpers": {"special.example": "special"},
        "auths": {"fallback.example": {"auth": base64.b64encode(b"fileuser:f").decode()}, "reg.example:5000": {}}}))
    found = find_credentials("reg.example:5000")
    assert (found.username, found.password) == ("storeuser", "s1") and "docker-credential-store" in found.source
    assert find_credentials("special.example").username == "specialuser"
    assert find_credentials("fallback.example").username == "fileuser"  # the store has nothing: the file answers
    assert find_credentials("nowhere.example") is None
    assert log.read_text().splitlines() == ["get reg.example:5000", "get special.example", "get fallback.example",
                                            "get nowhere.example"]
    with pytest.raises(RegistryAuthError, match="keychain locked"):
        find_credentials("broken.example")
    config.write_text(json.dumps({"credsStore": "absent"}))
    with pytest.raises(MissingToolError, match="docker-credential-absent"):
        find_credentials("reg.example:5000")
    config.write_text(json.dumps({"credsStore": "../../bin/sh"}))
    with pytest.raises(ConfigError, match="credential helper name"):
        find_credentials("reg.example:5000")
