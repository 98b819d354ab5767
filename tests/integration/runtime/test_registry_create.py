"""A VE from a registry: push the real debian-12 cache to a local docker-registry, then `vzctl create
--ostemplate REF` into an empty cache directory pulls it, and the VE starts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import run_vzpkg
from registry_server import REGISTRY_BIN, Registry

from .conftest import Runtime

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not Path(REGISTRY_BIN).exists(), reason="docker-registry is not installed")]


def test_vzctl_create_pulls_from_registry_and_starts(vz_root, debian12_cache, tmp_path):
    shared, name = debian12_cache
    registry = Registry(tmp_path / "registry").start()
    try:
        ref = f"{registry.host}/templates/{name}:test"
        push = run_vzpkg("push", name, ref, "--cache-dir", str(shared), "--json")
        assert push.returncode == 0, push.stderr
        cache_dir = tmp_path / "cache"
        cache_dir.mkdir()
        rt = Runtime(vz_root, cache_dir, ref)
        try:
            veid = rt.create()  # create --ostemplate REF (pulls), then start
            assert rt.vzctl("exec", veid, "cat", "/etc/debian_version").stdout.strip().startswith("12")
            conf = (rt.root / "conf" / f"{veid}.conf").read_text()
            assert f'OSTEMPLATE="{name}"' in conf
        finally:
            rt.cleanup()
        pulled = json.loads((cache_dir / f"{name}.json").read_text())
        original = json.loads((shared / f"{name}.json").read_text())
        assert pulled["sha256"] == original["sha256"] == json.loads(push.stdout)["layer"].split(":", 1)[1]
        assert {k: v for k, v in pulled.items() if k not in ("pulled_from", "image_digest")} == original
        digest = hashlib.sha256((cache_dir / f"{name}.tar.zst").read_bytes()).hexdigest()
        assert digest == original["sha256"]
    finally:
        registry.stop()
