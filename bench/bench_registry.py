#!/usr/bin/env python3
"""Benchmark `vzpkg push` / `vzpkg pull` against `skopeo copy`, and pull-then-create against create-cache (issue 12).

Against a local docker-registry (Distribution 2.8, plain HTTP on 127.0.0.1, fresh storage per run):

  vzpkg-push      vzpkg push NAME HOST/bench/NAME:1            (empty registry: every blob uploaded)
  skopeo-push     skopeo copy oci:LAYOUT docker://HOST/...     (LAYOUT: the same archive as its one layer)
  vzpkg-push-again  vzpkg push of the same cache again         (nothing to upload: HEADs and the manifest)
  vzpkg-pull      vzpkg pull HOST/bench/NAME:1 into an empty cache dir (download, verify, publish)
  skopeo-pull     skopeo copy docker://HOST/... oci:DIR        (download into an OCI layout)
  pull+create     vzpkg pull into an empty cache dir, then vzctl create (VE ready to start)
  create-cache    vzpkg create-cache NAME into an empty cache dir (from the mirror), then vzctl create

Ratios: vzpkg-push / skopeo-push and vzpkg-pull / skopeo-pull (target ≤ 1.0), pull+create / create-cache.
Needs root (vzctl create), docker-registry and skopeo (`make setup`), the debian-12-x86_64 cache (built into
--cache-dir if absent) and, for create-cache, the mirror. Medians over --runs (default 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))
sys.path.insert(0, str(REPO_DIR / "tests" / "integration"))

from registry_server import Registry  # noqa: E402

from vzpkg.registry.image import (  # noqa: E402
    MANIFEST_MEDIA_TYPE,
    build_config,
    build_manifest,
    layer_digests,
)

VZPKG = [sys.executable, "-m", "vzpkg.cli.vzpkg"]
VZCTL = [sys.executable, "-m", "vzpkg.cli.vzctl"]


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    subprocess.run(["sync"], check=True)
    start = time.monotonic()
    p = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, cwd=REPO_DIR)
    elapsed = time.monotonic() - start
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]}")
    return elapsed


def oci_layout(cache_dir: Path, name: str, dest: Path) -> None:
    """An OCI layout holding the cache archive as its one layer (what skopeo pushes in the comparison)."""
    manifest = json.loads((cache_dir / f"{name}.json").read_text())
    archive = cache_dir / f"{name}.tar.zst"
    with archive.open("rb") as f:
        layer = layer_digests(f)
    config = build_config(manifest, layer)
    image = build_manifest(config, layer, manifest, "1")
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    os.link(archive, blobs / layer.digest.split(":")[1])
    for data in (config, image):
        (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
    (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": MANIFEST_MEDIA_TYPE, "digest": "sha256:" + hashlib.sha256(image).hexdigest(), "size": len(image),
        "annotations": {"org.opencontainers.image.ref.name": "1"}}]}))


def one_run(base: Path, cache_dir: Path, name: str, with_create: bool) -> dict[str, float]:
    r: dict[str, float] = {}
    reg = Registry(base / "reg").start()
    try:
        ref = f"{reg.host}/bench/{name}:1"
        r["vzpkg-push"] = timed([*VZPKG, "push", name, ref, "--cache-dir", str(cache_dir), "-q"])
        r["vzpkg-push-again"] = timed([*VZPKG, "push", name, ref, "--cache-dir", str(cache_dir), "-q"])
        layout = base / "layout"
        oci_layout(cache_dir, name, layout)
        r["skopeo-push"] = timed(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:1",
                                  f"docker://{reg.host}/skopeo/{name}:1"])
        r["vzpkg-pull"] = timed([*VZPKG, "pull", ref, "--cache-dir", str(base / "pulled"), "-q"])
        r["skopeo-pull"] = timed(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}",
                                  f"oci:{base / 'skopeo-pulled'}:1"])
        if with_create:
            vz_root = base / "vz"
            env = {"VZ_ROOT": str(vz_root), "VZPKG_CACHE_DIR": str(base / "pc")}
            veid = f"bench{os.getpid()}"
            r["pull+create"] = timed([*VZPKG, "pull", ref, "--cache-dir", str(base / "pc"), "-q"]) + \
                timed([*VZCTL, "create", veid, "--ostemplate", name], env)
            subprocess.run([*VZCTL, "destroy", veid, "--force"], env={**os.environ, **env}, capture_output=True)
            env = {"VZ_ROOT": str(vz_root), "VZPKG_CACHE_DIR": str(base / "cc")}
            r["create-cache"] = timed([*VZPKG, "create-cache", name, "--cache-dir", str(base / "cc"), "-q"]) + \
                timed([*VZCTL, "create", veid, "--ostemplate", name], env)
            subprocess.run([*VZCTL, "destroy", veid, "--force"], env={**os.environ, **env}, capture_output=True)
    finally:
        reg.stop()
    return r


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/tmp/vzpkg-test-cache"))
    parser.add_argument("--template", default="debian-12-x86_64")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--no-create", action="store_true", help="skip pull+create and create-cache")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0 and not args.no_create:
        print("bench_registry: needs root for vzctl create (or --no-create)", file=sys.stderr)
        return 2
    name = args.template
    if not (args.cache_dir / f"{name}.tar.zst").is_file():
        timed([*VZPKG, "create-cache", name, "--cache-dir", str(args.cache_dir), "-q"])
    runs: list[dict[str, float]] = []
    for _ in range(args.runs):
        base = Path(tempfile.mkdtemp(prefix="vzpkg-bench-registry-", dir="/var/tmp"))
        try:
            runs.append(one_run(base, args.cache_dir, name, not args.no_create))
        finally:
            shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    size = (args.cache_dir / f"{name}.tar.zst").stat().st_size
    ratios = {"vzpkg-push / skopeo-push": med["vzpkg-push"] / med["skopeo-push"],
              "vzpkg-pull / skopeo-pull": med["vzpkg-pull"] / med["skopeo-pull"]}
    if "create-cache" in med:
        ratios["pull+create / create-cache+create"] = med["pull+create"] / med["create-cache"]
    if args.json:
        print(json.dumps({"runs": runs, "median": med, "ratios": ratios, "archive_bytes": size}, indent=2))
        return 0
    print(f"{name}: archive {size / 1e6:.1f} MB, median of {len(runs)} run(s)")
    print(f"{'case':<20} {'seconds':>8} {'MB/s':>8}")
    for k, v in med.items():
        rate = f"{size / 1e6 / v:8.0f}" if "push" in k or "pull" == k.split("-")[-1] else f"{'':>8}"
        print(f"{k:<20} {v:8.2f} {rate}")
    for k, v in ratios.items():
        target = "≤ 1.0" if "skopeo" in k else ""
        verdict = ("PASS" if v <= 1.0 else "FAIL") if target else ""
        print(f"{k:<36} {v:6.2f} {target:>6} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
