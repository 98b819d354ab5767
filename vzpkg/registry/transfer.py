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
import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache import CacheStore
from ..errors import RegistryError, UsageError, VerifyError
from ..lock import locked
from .client import Progress, RegistryClient
from .image import (
    CONFIG_KEY,
    MANIFEST_MEDIA_TYPE,
    LayerDigests,
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


def _diff_id_file(store: CacheStore, sha256: str) -> Path:
    # Beside the caches, not in CacheStore: the tar's digest is the registry's business, and costs a full
    # decompression (0.5 s for the 43 MB debian-12 cache) that a second push or a pulled cache need not repeat.
    return store.root / ".registry" / f"{sha256}.diff_id"


def known_diff_id(store: CacheStore, sha256: str) -> str | None:
    try:
        text = _diff_id_file(store, sha256).read_text().strip()
    except OSError:
        return None
    return text if re.fullmatch(r"sha256:[0-9a-f]{64}", text) else None


def remember_diff_id(store: CacheStore, sha256: str, diff_id: str) -> None:
    path = _diff_id_file(store, sha256)
    try:
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(diff_id + "\n")
        os.rename(tmp, path)
    except OSError:
        pass  # only an optimisation


class _Hasher(threading.Thread):
    """Digests of an archive in the background (zstd and sha256 release the GIL), while the upload runs."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.result: LayerDigests | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            with self.path.open("rb") as f:
                self.result = layer_digests(f)
        except BaseException as e:  # noqa: BLE001 - handed to the caller by get()
            self.error = e

    def get(self) -> LayerDigests:
        self.join()
        if self.error is not None or self.result is None:
            raise VerifyError(f"cannot read {self.path}: {self.error}")
        return self.result


def push_cache(store: CacheStore, name: str, ref: Reference, conn: Connection,
               progress: Callable[[str], Progress | None] | None = None) -> dict[str, Any]:
    """Upload cache NAME as the image REF (tag default `latest`). Returns what was done.

    The layer digest is the manifest's sha256 (the registry checks uploaded bytes against it); the tar's digest
    (diff_id) is computed while the layer uploads, or known from an earlier push or pull.
    """
    if ref.digest:
        raise UsageError(f"{ref}: push to a tag, not a digest (the digest follows from the content)")
    tag = ref.tag or "latest"
    started = time.monotonic()
    manifest = store.read_manifest(name)
    sha = str(manifest.get("sha256", ""))
    client = conn.client(ref)
    client.connect()
    # One open file for the upload: an update-cache that replaces the archive meanwhile does not mix two
    # generations in one push (the old inode stays readable); the hasher checks it is the manifest's archive.
    with store.archive_path(name).open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        diff_id = known_diff_id(store, sha)
        hasher = None if diff_id else _Hasher(Path(f"/proc/self/fd/{f.fileno()}"))
        layer_digest = f"sha256:{sha}"
        skipped = 0
        if client.blob_exists(layer_digest):
            skipped += 1
        else:
            try:
                client.upload_blob(layer_digest, size, f, progress(f"{name}: upload") if progress else None)
            except RegistryError as e:
                if "DIGEST_INVALID" in e.message or "digest" in e.message.lower():
                    raise VerifyError(f"cache {name!r}: the archive does not match its manifest's sha256 (the "
                                      f"registry refused it): run 'vzpkg verify-cache {name}'") from e
                raise
        if hasher is not None:
            layer = hasher.get()
            if layer.digest != layer_digest or layer.size != size:
                raise VerifyError(f"cache {name!r}: archive sha256 {layer.digest[7:23]}... differs from its "
                                  f"manifest ({sha[:16]}...): run 'vzpkg verify-cache {name}'")
            diff_id = layer.diff_id
            remember_diff_id(store, sha, diff_id)
    assert diff_id is not None
    layer = LayerDigests(layer_digest, size, diff_id)
    config = build_config(manifest, layer)
    image = build_manifest(config, layer, manifest, tag)
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
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
            # With the lock held no other pull of TARGET runs: a temporary file of one is left by a killed pull.
            for stale in store.root.glob(f"{store.temp_path(target, 'pull').name.rsplit('-', 1)[0]}-*"):
                stale.unlink(missing_ok=True)
            tmp = store.temp_path(target, "pull")
            try:
                client.download_blob(image.layer_digest, image.layer_size, tmp,
                                     progress(f"{target}: download") if progress else None)
                manifest = {**manifest, "name": target, "archive": store.archive_path(target).name,
                            "pulled_from": str(ref), "image_digest": digest}
                store.publish(target, tmp, manifest)
                diff_ids = json.loads(config).get("rootfs", {}).get("diff_ids") or [None]
                if isinstance(diff_ids[0], str) and config_is_ours(config):
                    remember_diff_id(store, str(manifest["sha256"]), diff_ids[0])
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


def config_is_ours(config: bytes) -> bool:
    """Only a diff_id from a config vzpkg wrote is remembered (another tool's could be anything)."""
    try:
        return isinstance(json.loads(config).get(CONFIG_KEY), dict)
    except (ValueError, AttributeError):
        return False
