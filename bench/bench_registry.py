#!/usr/bin/env python3
"""Benchmark `vzpkg push` / `vzpkg pull` against `skopeo copy`, and pull-then-create against create-cache (issue 12).

Against a local docker-registry (Distribution 2.8, plain HTTP on 127.0.0.1, fresh storage per run):

  skopeo-push       skopeo copy oci:LAYOUT docker://HOST/...  (LAYOUT: the same archive as its one layer and the
                    same config, prepared untimed)
  skopeo-push-again the same copy again (skopeo finds the blobs by HEAD)
  vzpkg-push-first  vzpkg push NAME REF, first push from this cache dir (the tar's diff_id hashed meanwhile)
  vzpkg-push        vzpkg push NAME REF, diff_id remembered (what skopeo's prepared layout also has)
  vzpkg-push-again  the same push again (nothing to upload: HEADs and the manifest)
  skopeo-pull       skopeo copy docker://REF oci:DIR
  vzpkg-pull        vzpkg pull REF into an empty cache dir (download, verify every digest, publish)
  vzpkg-pull-again  the same pull again (the cache has the digest: nothing downloaded)
  pull+create       vzpkg pull into an empty cache dir, then vzctl create
  create-cache+create  vzpkg create-cache NAME into an empty cache dir (from the mirror), then vzctl create

Each push case gets its own registry with empty storage. Ratios: vzpkg-push / skopeo-push and vzpkg-pull /
skopeo-pull (target ≤ 1.0), vzpkg-push-again / skopeo-push-again, vzpkg-push-first / skopeo-push, pull+create /
create-cache+create; of the medians, and the median of each run's own ratio (both sides of a run saw the same
load: the steadier figure on a busy machine).
Needs root (vzctl create), docker-registry and skopeo (`make setup`), the debian-12-x86_64 cache (built into
--cache-dir if absent) and, for create-cache, the mirror. Medians over --runs (default 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
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


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    # Byte-compiled modules, as an installed vzpkg has them (some CI environments set PYTHONDONTWRITEBYTECODE,
    # and then every command compiles its imports again: ~0.2 s here).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, **(extra or {})}


CPU: dict[str, float] = {}  # the client's own CPU seconds (user + sys) per case, summed over runs


def timed(cmd: list[str], env: dict[str, str] | None = None, label: str | None = None) -> float:
    """Wall seconds of CMD; its CPU seconds go to CPU[label] (a figure that load on the machine changes less)."""
    subprocess.run(["sync"], check=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    p = subprocess.run(cmd, env=_env(env), capture_output=True, text=True, cwd=REPO_DIR)
    elapsed = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]}")
    if label:
        CPU[label] = CPU.get(label, 0.0) + (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
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


def fresh_registry(base: Path, label: str) -> Registry:
    return Registry(base / f"reg-{label}").start()


def one_run(base: Path, shared: Path, name: str, with_create: bool) -> dict[str, float]:
    """Every push goes to a registry of its own (empty storage), so no case finds another's blobs."""
    r: dict[str, float] = {}
    src = base / "src"  # the cache hard-linked in, so the remembered diff_id (<cache_dir>/.registry) is ours
    src.mkdir()
    os.link(shared / f"{name}.tar.zst", src / f"{name}.tar.zst")
    shutil.copy(shared / f"{name}.json", src / f"{name}.json")
    layout = base / "layout"
    oci_layout(src, name, layout)
    registries = []
    try:
        reg = fresh_registry(base, "skopeo")
        registries.append(reg)
        skopeo_push = ["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:1",
                       f"docker://{reg.host}/bench/{name}:1"]
        r["skopeo-push"] = timed(skopeo_push, label="skopeo-push")
        r["skopeo-push-again"] = timed(skopeo_push, label="skopeo-push-again")
        reg = fresh_registry(base, "cold")
        registries.append(reg)
        # first push from this cache directory: the tar's digest is hashed while the layer uploads
        r["vzpkg-push-first"] = timed([*VZPKG, "push", name, f"{reg.host}/bench/{name}:1", "--cache-dir", str(src), "-q"], label="vzpkg-push-first")
        reg = fresh_registry(base, "warm")
        registries.append(reg)
        ref = f"{reg.host}/bench/{name}:1"
        r["vzpkg-push"] = timed([*VZPKG, "push", name, ref, "--cache-dir", str(src), "-q"], label="vzpkg-push")
        r["vzpkg-push-again"] = timed([*VZPKG, "push", name, ref, "--cache-dir", str(src), "-q"], label="vzpkg-push-again")
        r["skopeo-pull"] = timed(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}",
                                  f"oci:{base / 'skopeo-pulled'}:1"], label="skopeo-pull")
        r["vzpkg-pull"] = timed([*VZPKG, "pull", ref, "--cache-dir", str(base / "pulled"), "-q"], label="vzpkg-pull")
        r["vzpkg-pull-again"] = timed([*VZPKG, "pull", ref, "--cache-dir", str(base / "pulled"), "-q"], label="vzpkg-pull-again")
        if with_create:
            vz_root = base / "vz"
            veid = f"bench{os.getpid()}"
            env = {"VZ_ROOT": str(vz_root), "VZPKG_CACHE_DIR": str(base / "pc")}
            r["pull+create"] = timed([*VZPKG, "pull", ref, "--cache-dir", str(base / "pc"), "-q"]) + \
                timed([*VZCTL, "create", veid, "--ostemplate", name], env)
            subprocess.run([*VZCTL, "destroy", veid, "--force"], env={**os.environ, **env}, capture_output=True)
            env = {"VZ_ROOT": str(vz_root), "VZPKG_CACHE_DIR": str(base / "cc")}
            r["create-cache+create"] = timed([*VZPKG, "create-cache", name, "--cache-dir", str(base / "cc"), "-q"]) + \
                timed([*VZCTL, "create", veid, "--ostemplate", name], env)
            subprocess.run([*VZCTL, "destroy", veid, "--force"], env={**os.environ, **env}, capture_output=True)
    finally:
        for reg in registries:
            reg.stop()
    return r


def next_generation(shared: Path, name: str, dest: Path) -> dict[str, int]:
    """DEST: a cache dir whose NAME has the shared cache as generation 1 and, as the current cache, the same root
    with one package's worth of change (one file rewritten, 2 MB of new files), packed as archive.pack packs."""
    import io
    import tarfile

    from vzpkg.build.update import save_generation
    from vzpkg.registry.delta import compress_like_pack, decompress
    from vzpkg.store.cache import CacheStore

    dest.mkdir()
    os.link(shared / f"{name}.tar.zst", dest / f"{name}.tar.zst")
    shutil.copy(shared / f"{name}.json", dest / f"{name}.json")
    store = CacheStore(dest)
    save_generation(store, name)
    manifest = json.loads((dest / f"{name}.json").read_text())
    old_tar, new_tar = dest / "old.tar", dest / "new.tar"
    decompress(shared / f"{name}.tar.zst", old_tar)
    with tarfile.open(old_tar) as src, tarfile.open(new_tar, "w", format=tarfile.PAX_FORMAT) as out:
        for member in src:
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name.endswith("etc/os-release") and data is not None:
                data += b"BENCH_UPDATE=1\n"
                member.size = len(data)
            out.addfile(member, io.BytesIO(data) if data is not None else None)
        for i in range(4):
            info = tarfile.TarInfo(f"./usr/share/bench-update/file{i}")
            blob = hashlib.shake_256(f"bench{i}".encode()).digest(512 << 10)
            info.size, info.mtime = len(blob), 1700000000
            out.addfile(info, io.BytesIO(blob))
    tmp = store.temp_path(name, "bench")
    sha = compress_like_pack(new_tar, tmp, int(manifest.get("compression_level") or 6))
    old_tar.unlink()
    new_tar.unlink()
    store.publish(name, tmp, {**manifest, "sha256": sha, "packed_size": tmp.stat().st_size})
    return {"packed_size": store.archive_path(name).stat().st_size}


def delta_run(base: Path, shared: Path, name: str) -> dict[str, float]:
    r: dict[str, float] = {}
    gen = next_generation(shared, name, base / "gen")
    reg = fresh_registry(base, "delta")
    try:
        ref = f"{reg.host}/bench/{name}:2"
        p = subprocess.run([*VZPKG, "push", name, ref, "--delta", "--cache-dir", str(base / "gen"), "--json"],
                           env=_env(None), capture_output=True, text=True, cwd=REPO_DIR, check=True)
        r["delta-patch-bytes"] = json.loads(p.stdout)["delta"]["patch_bytes"]
        r["delta-layer-bytes"] = gen["packed_size"]
        have_old = base / "have-old"
        have_old.mkdir()
        os.link(shared / f"{name}.tar.zst", have_old / f"{name}.tar.zst")
        shutil.copy(shared / f"{name}.json", have_old / f"{name}.json")
        start = time.monotonic()
        p = subprocess.run([*VZPKG, "pull", ref, "--cache-dir", str(have_old), "--json"], env=_env(None),
                           capture_output=True, text=True, cwd=REPO_DIR, check=True)
        r["delta-pull-seconds"] = time.monotonic() - start
        out = json.loads(p.stdout)
        assert out["delta"], p.stderr
        r["delta-pull-bytes"] = out["bytes_downloaded"]
        start = time.monotonic()
        p = subprocess.run([*VZPKG, "pull", ref, "--cache-dir", str(base / "empty"), "--json"], env=_env(None),
                           capture_output=True, text=True, cwd=REPO_DIR, check=True)
        r["full-pull-seconds"] = time.monotonic() - start
        r["full-pull-bytes"] = json.loads(p.stdout)["bytes_downloaded"]
    finally:
        reg.stop()
    return r


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/tmp/vzpkg-test-cache"))
    parser.add_argument("--template", default="debian-12-x86_64")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--no-create", action="store_true", help="skip pull+create and create-cache")
    parser.add_argument("--no-delta", action="store_true", help="skip the delta case")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0 and not args.no_create:
        print("bench_registry: needs root for vzctl create (or --no-create)", file=sys.stderr)
        return 2
    name = args.template
    if not (args.cache_dir / f"{name}.tar.zst").is_file():
        timed([*VZPKG, "create-cache", name, "--cache-dir", str(args.cache_dir), "-q"])
    subprocess.run([*VZPKG, "push", "--help"], env=_env(None), capture_output=True, cwd=REPO_DIR)  # write the .pyc
    subprocess.run([sys.executable, "-c", "import vzpkg.registry.transfer, vzpkg.registry.client, oras.auth"],
                   env=_env(None), capture_output=True, cwd=REPO_DIR)
    runs: list[dict[str, float]] = []
    for _ in range(args.runs):
        base = Path(tempfile.mkdtemp(prefix="vzpkg-bench-registry-", dir="/var/tmp"))
        try:
            runs.append(one_run(base, args.cache_dir, name, not args.no_create))
        finally:
            shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    delta: dict[str, float] = {}
    if not args.no_delta:
        base = Path(tempfile.mkdtemp(prefix="vzpkg-bench-registry-", dir="/var/tmp"))
        try:
            delta = delta_run(base, args.cache_dir, name)
        finally:
            shutil.rmtree(base, ignore_errors=True)
    size = (args.cache_dir / f"{name}.tar.zst").stat().st_size
    ratios = {"vzpkg-push / skopeo-push": med["vzpkg-push"] / med["skopeo-push"],
              "vzpkg-pull / skopeo-pull": med["vzpkg-pull"] / med["skopeo-pull"]}
    ratios["vzpkg-push-again / skopeo-push-again"] = med["vzpkg-push-again"] / med["skopeo-push-again"]
    ratios["vzpkg-push-first / skopeo-push"] = med["vzpkg-push-first"] / med["skopeo-push"]
    if "create-cache+create" in med:
        ratios["pull+create / create-cache+create"] = med["pull+create"] / med["create-cache+create"]
    per_run = {}
    for k in ratios:
        a, b = (x.strip() for x in k.split("/"))
        if all(a in r and b in r for r in runs):
            per_run[k] = statistics.median(r[a] / r[b] for r in runs)
    if args.json:
        print(json.dumps({"runs": runs, "median": med, "ratios": ratios, "ratios_per_run": per_run, "archive_bytes": size,
                          "client_cpu_mean": {k: v / len(runs) for k, v in CPU.items()},
                          "delta": delta, "loadavg": os.getloadavg()}, indent=2))
        return 0
    print(f"{name}: archive {size / 1e6:.1f} MB, median of {len(runs)} run(s), load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'case':<22} {'seconds':>8} {'MB/s':>8} {'client CPU s':>13}")
    for k, v in med.items():
        moved = k in ("skopeo-push", "vzpkg-push-first", "vzpkg-push", "skopeo-pull", "vzpkg-pull")
        rate = f"{size / 1e6 / v:8.0f}" if moved else f"{'':>8}"
        cpu = f"{CPU[k] / len(runs):13.2f}" if k in CPU else ""
        print(f"{k:<22} {v:8.2f} {rate} {cpu}")
    if delta:
        print(f"next generation (1 file changed, 2 MB added): layer {delta['delta-layer-bytes'] / 1e6:.1f} MB, "
              f"patch {delta['delta-patch-bytes'] / 1e6:.2f} MB")
        print(f"  pull with the previous generation: {delta['delta-pull-bytes'] / 1e6:.2f} MB downloaded, "
              f"{delta['delta-pull-seconds']:.2f} s; without: {delta['full-pull-bytes'] / 1e6:.1f} MB, "
              f"{delta['full-pull-seconds']:.2f} s")
    print(f"{'ratio':<40} {'medians':>8} {'per run':>8}")
    for k, v in ratios.items():
        target = "≤ 1.0" if k in ("vzpkg-push / skopeo-push", "vzpkg-pull / skopeo-pull") else ""
        verdict = ("PASS" if v <= 1.0 else "FAIL") if target else ""
        print(f"{k:<40} {v:8.2f} {per_run.get(k, float('nan')):8.2f} {target:>6} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
