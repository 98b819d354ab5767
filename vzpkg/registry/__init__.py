"""Template caches in an OCI registry: `vzpkg push` and `vzpkg pull`.

A cache travels as a one-layer OCI image:

    manifest (application/vnd.oci.image.manifest.v1+json)
      annotations: org.opencontainers.image.{title,created,version,description,ref.name} + io.vzpkg.*
      config  (application/vnd.oci.image.config.v1+json)  a valid image config (os, architecture, rootfs.diff_ids)
                                                           plus the whole vzpkg manifest under the key "vzpkg"
      layers[0] (application/vnd.oci.image.layer.v1.tar+zstd)  the cache archive itself, byte for byte

so the layer digest *is* the cache's sha256, container tools (skopeo, umoci) read the image as a rootfs image,
and `vzpkg info` works on a pulled cache because the manifest comes along in the config blob.

    reference.py  parse REF, choose https/http, TLS verification
    auth.py       credentials: the environment, container tools' auth files and their credential helpers
    client.py     the registry protocol (http.client, keep-alive; oras.auth for bearer tokens; streamed, verified blobs)
    image.py      cache <-> OCI config + manifest
    transfer.py   push and pull (lock, dedup, verify, atomic publish)
"""
