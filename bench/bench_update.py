#!/usr/bin/env python3
"""update-cache against create-cache from scratch, in one run.

    sudo .venv/bin/python bench/bench_update.py [--cache-dir DIR] [--seed-packages DIR] [--json]

A test template (debian-12-x86_64 plus the package vzpkg-hello from a signed repository served on 127.0.0.1, as
in tests/integration/test_update_cache.py) is built with create-cache; then, each timed as one `vzpkg` process:
  create-cache (cold)       a build from scratch: empty package cache, everything downloaded
  create-cache --force      a full rebuild with the package cache warm (debs and index files hard-linked in)
  update-cache (no-op)      nothing changed
  update-cache (1 package)  vzpkg-hello 1 -> 2 published in the repository
Targets: no-op <= 2 s; one-package update <= 0.3 x create-cache. Ratios are given against both builds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "tests" / "integration"))

from aptrepo import DEBIAN_KEYRING, AptTestRepo  # noqa: E402

NAME = "debian-12-x86_64-benchupd"
PKG = "vzpkg-hello"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, help="work cache dir (default: a temporary one, removed)")
    parser.add_argument("--seed-packages", type=Path,
                        help="package cache to hard-link in first (then the 'cold' build is not cold)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_update: needs root (it builds caches)", file=sys.stderr)
        return 2

    base = Path(tempfile.mkdtemp(prefix="vzpkg-bench-update-", dir="/var/tmp"))
    cache_dir = args.cache_dir or base / "cache"
    repo = AptTestRepo(base)
    try:
        repo.add_package(PKG, "1")
        repo.publish()
        repo.serve()
        if args.seed_packages and args.seed_packages.is_dir() and not (cache_dir / ".packages").exists():
            shutil.copytree(args.seed_packages, cache_dir / ".packages", copy_function=os.link)
        tdir = base / "templates" / NAME
        (tdir / "files/etc/apt/trusted.gpg.d").mkdir(parents=True)
        repo.export_key(tdir / "files/etc/apt/trusted.gpg.d/vzpkg-bench.gpg")
        keyring = repo.keyring_with(DEBIAN_KEYRING)
        (tdir / "template.toml").write_text(
            f'inherits = "debian-12-x86_64"\nsummary = "bench"\ndescription = "bench"\nkeyring = "{keyring}"\n'
            f'packages = ["{PKG}"]\nrepositories = ["{repo.line}"]\n')
        env = {**os.environ, "VZPKG_TEMPLATE_DIR": f"{base / 'templates'}:{PROJECT / 'templates'}",
               "VZPKG_CACHE_DIR": str(cache_dir), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}

        def vzpkg(*a: str) -> float:
            start = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzpkg", *a], env=env, capture_output=True,
                                  text=True)
            elapsed = time.monotonic() - start
            if proc.returncode != 0:
                raise SystemExit(f"vzpkg {' '.join(a)} failed ({proc.returncode}): {proc.stderr}")
            return elapsed

        results = {"create_cache_cold": vzpkg("create-cache", NAME, "--force", "-q")}
        results["create_cache"] = vzpkg("create-cache", NAME, "--force", "-q")
        results["update_noop"] = vzpkg("update-cache", NAME, "-q")
        repo.add_package(PKG, "2")
        repo.publish()
        results["update_one_package"] = vzpkg("update-cache", NAME, "-q")
        manifest = json.loads((cache_dir / f"{NAME}.json").read_text())
        assert any(p["name"] == PKG and p["version"] == "2" for p in manifest["packages"]), "update did not install v2"
        results["update_steps"] = manifest["durations"]
        results["noop_ratio"] = results["update_noop"] / results["create_cache"]
        results["one_package_ratio"] = results["update_one_package"] / results["create_cache"]
        results["one_package_ratio_cold"] = results["update_one_package"] / results["create_cache_cold"]
    finally:
        repo.stop()
        shutil.rmtree(base, ignore_errors=True)

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    cold, warm = results["create_cache_cold"], results["create_cache"]
    print(f"{'case':<30} {'seconds':>8} {'x cold build':>13} {'x warm build':>13}")
    for label, key in (("create-cache, cold (scratch)", "create_cache_cold"), ("create-cache, warm (--force)", "create_cache"),
                       ("update-cache, no-op", "update_noop"), ("update-cache, 1 package", "update_one_package")):
        print(f"{label:<30} {results[key]:8.2f} {results[key] / cold:13.2f} {results[key] / warm:13.2f}")
    print("targets: no-op <= 2 s; one-package update <= 0.30 x create-cache")
    print("update steps: " + ", ".join(f"{k} {v:.2f}" for k, v in results["update_steps"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
