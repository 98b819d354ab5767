"""`vzpkg push` and `vzpkg pull`: a cache to a registry and back.

push: hash the archive (its digest and the tar's diff_id in one read) → config blob → for each blob, HEAD and
upload only what the registry lacks → PUT the manifest under the tag.

pull: GET the manifest → if the local cache already has the layer's digest, stop → GET the config (the vzpkg
manifest) and check it describes the layer → under the template's lock, stream the layer into a temporary file
beside the cache, hashing it → CacheStore.publish. A failure or Ctrl-C before publish removes the temporary
file and leaves the previous cache as it was.
"""

from __future__ import annotations

import hashlib
import io
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache import CacheStore
from ..errors import UsageError, VerifyError
from ..lock import locked
from .client import Progress, RegistryClient
from .image import (
    MANIFEST_MEDIA_TYPE,
    build_config,
    build_manifest,
    cache_manifest_from_config,
    layer_digests,
    parse_manifest,
)
from .reference import Reference

_CACHE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]*$")


@dataclass(frozen=True)
class Connection:
    insecure: bool = False
    ca_file: str | None = None

    def client(self, ref: Reference) -> RegistryClient:
        return RegistryClient(ref, insecure=self.insecure, ca_file=self.ca_file)


def push_cache(store: CacheStore, name: str, ref: Reference, conn: Connection,
               progress: Callable[[str], Progress | None] | None = None) -> dict[str, Any]:
    """Upload cache NAME as the image REF (tag default `latest`). Returns what was done."""
    if ref.digest:
        raise UsageError(f"{ref}: push to a tag, not a digest (the digest follows from the content)")
    tag = ref.tag or "latest"
    started = time.monotonic()
    manifest = store.read_manifest(name)
    client = conn.client(ref)
    client.connect()
    # One open file for hashing and uploading: an update-cache that replaces the archive meanwhile does not mix
    # two generations in one push (the old inode stays readable).
    with store.archive_path(name).open("rb") as f:
        layer = layer_digests(f)
        if layer.digest != f"sha256:{manifest.get('sha256')}":
            raise VerifyError(f"cache {name!r}: archive sha256 {layer.digest[7:23]}... differs from its manifest "
                              f"({str(manifest.get('sha256'))[:16]}...): run 'vzpkg verify-cache {name}'")
        config = build_config(manifest, layer)
        image = build_manifest(config, layer, manifest, tag)
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        skipped = 0
        if client.blob_exists(layer.digest):
            skipped += 1
        else:
            f.seek(0)
            client.upload_blob(layer.digest, layer.size, f, progress(f"{name}: upload") if progress else None)
    if client.blob_exists(config_digest):
        skipped += 1
    else:
        client.upload_blob(config_digest, len(config), io.BytesIO(config))
    digest = client.put_manifest(tag, image, MANIFEST_MEDIA_TYPE)
    return {"name": name, "reference": str(ref.with_tag(tag)), "digest": digest, "layer": layer.digest,
            "blobs_uploaded": client.stats["blobs_uploaded"], "blobs_skipped": skipped,
            "bytes_uploaded": client.stats["bytes_uploaded"], "seconds": round(time.monotonic() - started, 3)}


def _check_name(name: str) -> str:
    if not _CACHE_NAME.match(name):
        raise UsageError(f"{name!r} is not a usable cache name: use letters, digits, '.', '+', '_' and '-' "
                         "(choose one with --name)")
    return name


def _up_to_date(store: CacheStore, name: str, layer_digest: str, layer_size: int) -> bool:
    if not store.exists(name):
        return False
    local = store.manifest_or_none(name)
    return (local is not None and f"sha256:{local.get('sha256')}" == layer_digest
            and store.archive_path(name).stat().st_size == layer_size)


def pull_cache(store: CacheStore, ref: Reference, conn: Connection, *, lock_dir: Path, name: str | None = None,
               lock_timeout: float = 600, progress: Callable[[str], Progress | None] | None = None,
               ) -> dict[str, Any]:
    """Download image REF into the cache store (as NAME, default: the template name it was pushed as)."""
    started = time.monotonic()
    client = conn.client(ref)
    client.connect()
    body, digest, media_type = client.get_manifest(ref.target)
    image = parse_manifest(body, media_type, str(ref))
    result: dict[str, Any] = {"reference": str(ref), "digest": digest, "layer": image.layer_digest}
    # Before fetching anything else: the name asked for, or the name the image was pushed as.
    guess = name or image.annotations.get("org.opencontainers.image.title") or ref.name
    if _up_to_date(store, _check_name(guess), image.layer_digest, image.layer_size):
        return {**result, "name": guess, "up_to_date": True, "bytes_downloaded": 0, "blobs_downloaded": 0,
                "seconds": round(time.monotonic() - started, 3)}
    config = client.get_small_blob(image.config_digest, image.config_size)
    manifest = cache_manifest_from_config(config, image, str(ref))
    target = _check_name(name or str(manifest.get("name") or ref.name))
    with locked(lock_dir / f"{target}.lock", timeout=lock_timeout, what=f"template {target}"):
        if _up_to_date(store, target, image.layer_digest, image.layer_size):
            up_to_date = True
        else:
            up_to_date = False
            tmp = store.temp_path(target, "pull")
            try:
                client.download_blob(image.layer_digest, image.layer_size, tmp,
                                     progress(f"{target}: download") if progress else None)
                manifest = {**manifest, "name": target, "archive": store.archive_path(target).name,
                            "pulled_from": str(ref), "image_digest": digest}
                store.publish(target, tmp, manifest)
            finally:
                tmp.unlink(missing_ok=True)
    return {**result, "name": target, "up_to_date": up_to_date, "bytes_downloaded": client.stats["bytes_downloaded"],
            "blobs_downloaded": client.stats["blobs_downloaded"], "seconds": round(time.monotonic() - started, 3)}


def pull_for_create(text: str, cache_dir: str | Path) -> str:
    """`vzctl create --ostemplate REF`: pull REF (if the cache does not have it yet); return the cache name.

    No command-line options reach here: a registry on 127.0.0.1 may speak plain HTTP, and
    $VZPKG_REGISTRY_CA_FILE names a CA for a private registry (credentials as for `vzpkg pull`).
    """
    import os

    from .reference import parse_reference

    store = CacheStore(Path(cache_dir))
    result = pull_cache(store, parse_reference(text), Connection(ca_file=os.environ.get("VZPKG_REGISTRY_CA_FILE")),
                        lock_dir=Path(cache_dir) / ".locks")
    return str(result["name"])
