"""A cache as an OCI image, and back: the config blob, the manifest and its annotations."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import IO, Any

from ..errors import RegistryError, VerifyError

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+zstd"
# Key of the image config under which the whole vzpkg manifest travels (container tools ignore unknown keys).
CONFIG_KEY = "vzpkg"
ANNOTATION_PREFIX = "io.vzpkg"
# Template architectures as OCI (GOARCH) names.
OCI_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "i386": "386", "i686": "386",
            "armhf": "arm", "ppc64le": "ppc64le", "ppc64el": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
_READ = 1 << 20


@dataclass(frozen=True)
class LayerDigests:
    digest: str   # sha256 of the archive as stored (the layer's digest, the cache's sha256)
    size: int
    diff_id: str  # sha256 of the uncompressed tar (the image config's rootfs.diff_ids)


def layer_digests(f: IO[bytes]) -> LayerDigests:
    """Hash the archive and, in the same read, the tar inside it."""
    import zstandard

    from ..store.archive import MAX_WINDOW_SIZE

    packed, unpacked = hashlib.sha256(), hashlib.sha256()
    size = 0
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_SIZE)
    dobj = dctx.decompressobj()
    while chunk := f.read(_READ):
        packed.update(chunk)
        size += len(chunk)
        unpacked.update(dobj.decompress(chunk))
    return LayerDigests("sha256:" + packed.hexdigest(), size, "sha256:" + unpacked.hexdigest())


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def build_config(manifest: dict[str, Any], layer: LayerDigests) -> bytes:
    created = manifest.get("created")
    config = {
        "architecture": OCI_ARCH.get(str(manifest.get("architecture")), str(manifest.get("architecture", "amd64"))),
        "os": "linux",
        "created": created,
        "config": {"Labels": {f"{ANNOTATION_PREFIX}.template": manifest.get("name", "")}},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
        "history": [{"created": created, "created_by": f"vzpkg create-cache {manifest.get('name', '')}"}],
        CONFIG_KEY: manifest,
    }
    return _canonical(config)


def annotations(manifest: dict[str, Any], tag: str) -> dict[str, str]:
    dist, release, arch = (str(manifest.get(k, "")) for k in ("distribution", "release", "architecture"))
    ann = {
        "org.opencontainers.image.title": str(manifest.get("name", "")),
        "org.opencontainers.image.created": str(manifest.get("created", "")),
        "org.opencontainers.image.version": release,
        "org.opencontainers.image.description": f"vzpkg template cache: {dist} {release} {arch}".strip(),
        "org.opencontainers.image.ref.name": tag,
        f"{ANNOTATION_PREFIX}.distribution": dist,
        f"{ANNOTATION_PREFIX}.release": release,
        f"{ANNOTATION_PREFIX}.architecture": arch,
        f"{ANNOTATION_PREFIX}.sha256": str(manifest.get("sha256", "")),
    }
    return {k: v for k, v in ann.items() if v}


def build_manifest(config: bytes, layer: LayerDigests, manifest: dict[str, Any], tag: str,
                   extra_annotations: dict[str, str] | None = None) -> bytes:
    return _canonical({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                   "size": len(config)},
        "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": layer.digest, "size": layer.size,
                    "annotations": {"org.opencontainers.image.title": str(manifest.get("archive", ""))}}],
        "annotations": {**annotations(manifest, tag), **(extra_annotations or {})},
    })


@dataclass(frozen=True)
class ImageManifest:
    config_digest: str
    config_size: int
    layer_digest: str
    layer_size: int
    annotations: dict[str, str]


def parse_manifest(body: bytes, media_type: str, ref: str) -> ImageManifest:
    """The config and the one layer of a vzpkg image; RegistryError naming what is wrong for anything else."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise RegistryError(f"{ref}: the manifest is not JSON ({e})") from e
    kind = data.get("mediaType") or media_type
    if "index" in kind or "list" in kind:
        raise RegistryError(f"{ref} is an image index (several images); name one image by its digest")
    layers = data.get("layers") or []
    cfg = data.get("config") or {}
    if len(layers) != 1 or layers[0].get("mediaType") != LAYER_MEDIA_TYPE:
        raise RegistryError(f"{ref} is not a vzpkg template cache: expected one layer of type {LAYER_MEDIA_TYPE}, "
                            f"found {[layer.get('mediaType') for layer in layers]}")
    try:
        return ImageManifest(str(cfg["digest"]), int(cfg["size"]), str(layers[0]["digest"]), int(layers[0]["size"]),
                             dict(data.get("annotations") or {}))
    except (KeyError, TypeError, ValueError) as e:
        raise RegistryError(f"{ref}: malformed manifest (missing {e})") from e


def cache_manifest_from_config(config: bytes, image: ImageManifest, ref: str) -> dict[str, Any]:
    """The vzpkg manifest carried in the config blob, checked against the layer it describes."""
    try:
        manifest = json.loads(config)[CONFIG_KEY]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise RegistryError(f"{ref} is not a vzpkg template cache: its image config has no {CONFIG_KEY!r} "
                            "manifest") from e
    if not isinstance(manifest, dict) or "sha256" not in manifest:
        raise RegistryError(f"{ref}: the vzpkg manifest in the image config is malformed")
    if f"sha256:{manifest['sha256']}" != image.layer_digest or manifest.get("packed_size") not in (None, image.layer_size):
        raise VerifyError(f"{ref}: the layer {image.layer_digest[:19]}... is not the archive its vzpkg manifest "
                          f"describes (sha256 {str(manifest['sha256'])[:12]}...); nothing was published")
    return manifest
