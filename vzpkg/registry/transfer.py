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
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RegistryError, UsageError, VerifyError, VzError
from ..store.cache import CacheStore
from .client import Progress, RegistryClient, sha256_digest
from .image import (
    CONFIG_KEY,
    MANIFEST_MEDIA_TYPE,
    ImageManifest,
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
               progress: Callable[[str], Progress | None] | None = None, delta: bool = False) -> dict[str, Any]:
    """Upload cache NAME as the image REF (tag default `latest`). Returns what was done.

    The layer digest is the manifest's sha256, not hashed again: the registry checks the uploaded bytes against
    it (and a mismatch says to verify the cache). When the tar's digest (diff_id) is known from an earlier push
    or pull, the image manifest is known before anything is sent, and one HEAD of it answers "all there"; else
    the diff_id is computed while the layer uploads.
    """
    if ref.digest:
        raise UsageError(f"{ref}: push to a tag, not a digest (the digest follows from the content)")
    tag = ref.tag or "latest"
    started = time.monotonic()
    manifest = store.read_manifest(name)
    sha = str(manifest.get("sha256", ""))
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise VerifyError(f"cache {name!r}: its manifest {store.manifest_path(name)} has no valid sha256: "
                          f"rebuild it with 'vzpkg create-cache --force {name}'")
    layer_digest = f"sha256:{sha}"
    client = conn.client(ref)
    try:
        client.connect()
        extra: dict[str, str] = {}
        delta_info: dict[str, Any] | None = None
        if delta:
            from .delta import ANNOTATION_FROM, ANNOTATION_TAG

            delta_info = _push_delta(store, name, sha, client, tag)
            if delta_info:
                extra = {ANNOTATION_FROM: delta_info["from_sha256"], ANNOTATION_TAG: delta_info["tag"]}
        skipped = 0
        diff_id = known_diff_id(store, sha)
        image: bytes | None = None
        tagged = False
        if diff_id:
            size = store.archive_path(name).stat().st_size
            config, image = _image(manifest, LayerDigests(layer_digest, size, diff_id), tag, extra)
            digest = sha256_digest(image)
            tagged = client.manifest_digest(tag) == digest
            if tagged or client.manifest_digest(digest) == digest:
                skipped = 2  # a registry takes a manifest only when it has its blobs (distribution spec)
        if not skipped:
            # With the diff_id known the config is too: it goes on a second connection while the layer uploads.
            second = client.fork() if image is not None else None
            config_job = _Background(_ensure_blob, second, config) if second is not None else None
            layer, skipped = _push_layer(store, name, client, layer_digest, diff_id, progress)
            if config_job is None or second is None:
                config, image = _image(manifest, layer, tag, extra)
                skipped += _ensure_blob(client, config)
            else:
                skipped += config_job.get()
                for k, v in second.stats.items():
                    client.stats[k] += v
                second.close()
        assert image is not None
        digest = sha256_digest(image)
        if not tagged:
            client.put_manifest(tag, image, MANIFEST_MEDIA_TYPE)
    finally:
        client.close()
    return {"name": name, "reference": str(ref.with_tag(tag)), "digest": digest, "layer": layer_digest,
            "blobs_uploaded": client.stats["blobs_uploaded"], "blobs_skipped": skipped,
            "bytes_uploaded": client.stats["bytes_uploaded"], "delta": delta_info,
            "seconds": round(time.monotonic() - started, 3)}


def _ensure_blob(client: RegistryClient, data: bytes) -> int:
    """Upload the small blob DATA unless the registry has it; 1 if it had it."""
    digest = sha256_digest(data)
    if client.blob_exists(digest):
        return 1
    client.upload_blob(digest, len(data), data)
    return 0


class _Background(threading.Thread):
    """FN(*ARGS) in a thread; get() waits and returns its result or raises its exception."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        super().__init__(daemon=True)
        self.fn, self.args = fn, args
        self.result: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller by get()
            self.error = e

    def get(self) -> Any:
        self.join()
        if self.error is not None:
            raise self.error
        return self.result


def _image(manifest: dict[str, Any], layer: LayerDigests, tag: str, extra: dict[str, str]) -> tuple[bytes, bytes]:
    """(config blob, image manifest) of the cache."""
    config = build_config(manifest, layer)
    return config, build_manifest(config, layer, manifest, tag, extra)


def _push_layer(store: CacheStore, name: str, client: RegistryClient, layer_digest: str, diff_id: str | None,
                progress: Callable[[str], Progress | None] | None) -> tuple[LayerDigests, int]:
    """Upload the archive unless the registry has it; (its digests, 1 if it was there else 0)."""
    # One open file for the upload: an update-cache that replaces the archive meanwhile does not mix two
    # generations in one push (the old inode stays readable); the hasher checks it is the manifest's archive.
    with store.archive_path(name).open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        hasher = None if diff_id else _Hasher(Path(f"/proc/self/fd/{f.fileno()}"))
        skipped = 0
        if client.blob_exists(layer_digest):
            skipped = 1
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
                                  f"manifest ({layer_digest[7:23]}...): run 'vzpkg verify-cache {name}'")
            diff_id = layer.diff_id
            remember_diff_id(store, layer_digest[7:], diff_id)
    assert diff_id is not None
    return LayerDigests(layer_digest, size, diff_id), skipped


def _push_delta(store: CacheStore, name: str, sha: str, client: RegistryClient, tag: str) -> dict[str, Any] | None:
    """Patch from the newest earlier generation of NAME to the cache, pushed as the artifact TAG.delta."""
    from ..build.update import list_generations
    from .delta import ANNOTATION_FROM, PATCH_CONFIG_MEDIA_TYPE, PATCH_MEDIA_TYPE, make_patch

    previous = next((g for g in list_generations(store, name) if g.get("sha256") and g["sha256"] != sha), None)
    if previous is None:
        return None
    work = store.temp_path(name, "delta")
    try:
        patch = make_patch(Path(previous["archive"]), str(previous["sha256"]), store.archive_path(name), sha, work)
        patch_size = patch.path.stat().st_size
        patch_digest = "sha256:" + _sha256_file(patch.path)
        if not client.blob_exists(patch_digest):
            with patch.path.open("rb") as f:
                client.upload_blob(patch_digest, patch_size, f)
        config = patch.config()
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        if not client.blob_exists(config_digest):
            client.upload_blob(config_digest, len(config), config)
        artifact = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {"mediaType": PATCH_CONFIG_MEDIA_TYPE, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": PATCH_MEDIA_TYPE, "digest": patch_digest, "size": patch_size}],
            "annotations": {ANNOTATION_FROM: patch.from_sha256, "io.vzpkg.delta.to-sha256": sha},
        }, sort_keys=True, separators=(",", ":")).encode()
        delta_tag = f"{tag[:120]}.delta"
        client.put_manifest(delta_tag, artifact, MANIFEST_MEDIA_TYPE)
        return {"from_sha256": patch.from_sha256, "tag": delta_tag, "patch_bytes": patch_size}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _pull_delta(client: RegistryClient, store: CacheStore, target: str, image: ImageManifest, manifest: dict[str, Any],
                tmp: Path, note: Callable[[str], None]) -> bool:
    """Rebuild the layer into TMP from the local cache and a patch; False (after a note) when that cannot be done."""
    from .delta import ANNOTATION_FROM, ANNOTATION_TAG, PATCH_CONFIG_MEDIA_TYPE, PATCH_MEDIA_TYPE, apply_patch

    local = store.manifest_or_none(target)
    wanted_from, delta_tag = image.annotations.get(ANNOTATION_FROM), image.annotations.get(ANNOTATION_TAG)
    if not (local and wanted_from and delta_tag and local.get("sha256") == wanted_from):
        return False
    work = store.temp_path(target, "delta")
    try:
        body, _, _ = client.get_manifest(delta_tag)
        art = json.loads(body)
        layer, cfg = art["layers"][0], art["config"]
        if layer.get("mediaType") != PATCH_MEDIA_TYPE or cfg.get("mediaType") != PATCH_CONFIG_MEDIA_TYPE:
            raise VerifyError(f"{delta_tag} is not a vzpkg patch")
        info = json.loads(client.get_small_blob(str(cfg["digest"]), int(cfg["size"])))
        if info.get("from_sha256") != wanted_from or f"sha256:{info.get('to_sha256')}" != image.layer_digest:
            raise VerifyError(f"{delta_tag} patches {str(info.get('from_sha256'))[:12]} to "
                              f"{str(info.get('to_sha256'))[:12]}, not this cache to this image")
        work.mkdir(parents=True, exist_ok=True)
        patch = work / "patch.zst"
        client.download_blob(str(layer["digest"]), int(layer["size"]), patch)
        got = apply_patch(store.archive_path(target), patch, int(info["window_log"]),
                          int(manifest.get("compression_level") or 6), tmp, work)
        if f"sha256:{got}" != image.layer_digest:
            raise VerifyError("the archive rebuilt from the patch differs from the layer (another zstd?)")
        return True
    except (VzError, OSError, ValueError, KeyError, TypeError, IndexError) as e:
        note(f"{target}: delta not used ({e}); downloading the whole layer")
        tmp.unlink(missing_ok=True)
        return False
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
               delta: bool = True, note: Callable[[str], None] = lambda _msg: None) -> dict[str, Any]:
    """Download image REF into the cache store (as NAME, default: the template name it was pushed as)."""
    from ..lock import locked

    started = time.monotonic()
    client = conn.client(ref)
    client.connect()
    body, digest, media_type = client.get_manifest(ref.target)
    image = parse_manifest(body, media_type, str(ref))
    result: dict[str, Any] = {"reference": str(ref), "digest": digest, "layer": image.layer_digest}
    # Before fetching anything else: the name asked for, or the name the image was pushed as.
    guess = name or image.annotations.get("org.opencontainers.image.title") or ref.name
    if _up_to_date(store, _check_name(guess), image.layer_digest, image.layer_size):
        return {**result, "name": guess, "up_to_date": True, "delta": False, "bytes_downloaded": 0, "blobs_downloaded": 0,
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
            for what in ("pull", "delta"):
                for stale in store.root.glob(f"{store.temp_path(target, what).name.rsplit('-', 1)[0]}-*"):
                    shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
            tmp = store.temp_path(target, "pull")
            try:
                used_delta = delta and _pull_delta(client, store, target, image, manifest, tmp, note)
                if not used_delta:
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
        if up_to_date:
            used_delta = False
    return {**result, "name": target, "up_to_date": up_to_date, "delta": used_delta,
            "bytes_downloaded": client.stats["bytes_downloaded"],
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
