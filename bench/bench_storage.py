#!/usr/bin/env python3
"""Storage backend benchmark (issue 10): per layout, create + start -> first exec, and sequential write
throughput inside a VE against the host's own disk.

    sudo .venv/bin/python bench/bench_storage.py [--runs 5] [--mb 1024] [--cache-dir DIR] [--json FILE]

Cases, each in a VZ root of its own under /var/tmp/vzpkg-bench-storage-PID (removed at the end; the btrfs ones
get a loop-backed pool, `vzctl storage init --btrfs`); every VE gets the `unlimited` sample (no memory limit: a
1 GB write in a VE limited to the basic sample's 512M RAM measures memory-cgroup reclaim, not the disk), plus:
  overlay   vzctl create --layout overlay (no disk limit)
  image     vzctl create --layout image --diskspace 4G (a sparse ext4 image, loop-mounted)
  btrfs     vzctl create --layout btrfs --diskspace 4G (snapshot of a read-only template subvolume)
  btrfs-noquota   the baseline of the quota cost: the same kind of pool (`storage init`: loop-backed, same mount
            options) with quotas then disabled (`btrfs quota disable`), VEs without a disk limit; "quota cost" is
            btrfs / btrfs-noquota (qgroups + the limit), "x host" the rest (btrfs against ext4)
  timed:    create, then start + `vzctl exec ID /bin/true` until it succeeds (start to first exec); the sum is
            "create+start->exec"
  write:    `dd if=/dev/zero of=/root/f bs=1M count=MB conv=fsync` (buffered, then one fsync) and the same with
            `oflag=direct` (no page cache) inside the VE, MB/s from dd's own figures (so vzctl exec's start-up
            is not counted); "host" is the same dd on the host into a file in the directory that holds the
            VZ roots, i.e. on the file system under the images and the btrfs pool's image file. The page cache
            is dropped (sync; drop_caches=3) before every dd: a write must not find its predecessor's dirty
            pages still being written back.
Runs are interleaved (overlay, image, btrfs, host, ...); medians with min/max; ratios against overlay (time)
and host (throughput, per dd variant). Targets (issue 10): image <= 2x overlay, btrfs <= 1.2x overlay, quota
cost <= 10 %. Dropping caches slows every process on the machine for a moment: run it on a machine of your own.
vzctl runs with its modules byte-compiled, as installed (PYTHONDONTWRITEBYTECODE is dropped: with it, every
vzctl process compiles what it imports, and the btrfs and image layouts import more).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

LAYOUTS = ("overlay", "image", "btrfs", "btrfs-noquota")


def vzctl_cmd() -> list[str]:
    script = Path(sys.executable).parent / "vzctl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vzpkg.cli.vzctl"]


def run(cmd, env=None, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}): {p.stderr.strip()[-400:]}")
    return p


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


class Root:
    def __init__(self, base: Path, name: str, cache_dir: str, template: str) -> None:
        self.path = base / name
        self.path.mkdir(parents=True)
        self.layout = name  # (the row's name)
        self.kind = name.split("-")[0]  # vzctl's --layout
        self.template = template
        self.env = {**os.environ, "VZ_ROOT": str(self.path), "VZPKG_CACHE_DIR": cache_dir,
                    "PYTHONPATH": str(PROJECT)}
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.vz = vzctl_cmd()
        self.n = 0
        if self.kind == "btrfs":
            run([*self.vz, "storage", "init", "--btrfs", "8G", "-q"], env=self.env)
        if name == "btrfs-noquota":
            run(["btrfs", "quota", "disable", str(self.path / "btrfs")])

    def opts(self) -> list[str]:
        if self.kind == "overlay" or self.layout == "btrfs-noquota":
            return ["--layout", self.kind, "--config", "unlimited"]
        return ["--layout", self.kind, "--config", "unlimited", "--diskspace", "4G", "--diskinodes", "unlimited"]

    def cycle(self, mb: int) -> dict[str, float]:
        self.n += 1
        veid = f"bs{os.getpid()}{self.layout[0]}{self.layout[-1]}{self.n}"
        out: dict[str, float] = {}
        out["create"] = timed(lambda: run([*self.vz, "create", veid, "--ostemplate", self.template, "-q",
                                           *self.opts()], env=self.env))

        def start() -> None:
            run([*self.vz, "start", veid, "-q"], env=self.env)
            deadline = time.monotonic() + 10
            while run([*self.vz, "exec", veid, "/bin/true"], env=self.env, check=False).returncode != 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"VE {veid} did not answer")

        out["start_exec"] = timed(start)
        out["create_start_exec"] = out["create"] + out["start_exec"]
        for variant, flag in DD_VARIANTS if mb else ():
            drop_caches()
            p = run([*self.vz, "exec", veid, "/bin/sh", "-c",
                     f"dd if=/dev/zero of=/root/f bs=1M count={mb} {flag} 2>&1; rm -f /root/f"], env=self.env)
            out[f"write_{variant}"] = dd_mb_s(p.stdout)
        run([*self.vz, "destroy", veid, "--force", "-q"], env=self.env)
        return out

    def close(self) -> None:
        if self.kind == "btrfs":
            subprocess.run(["umount", str(self.path / "btrfs")], capture_output=True)


DD_VARIANTS = (("fsync", "conv=fsync"), ("direct", "oflag=direct"))


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def dd_mb_s(output: str) -> float:
    """MB/s (10^6 bytes) from dd's summary line: "N bytes (...) copied, S s, ..."."""
    for line in output.splitlines():
        if " bytes" in line and " copied, " in line:
            nbytes = int(line.split()[0])
            seconds = float(line.split(" copied, ")[1].split()[0].replace(",", "."))
            return nbytes / 1e6 / seconds
    raise RuntimeError(f"no dd summary in: {output.strip()[-300:]}")


def host_write(base: Path, mb: int) -> dict[str, float]:
    """The dd variants on the host, into BASE: the file system the VZ roots (their images, the pool) live on."""
    f = base / "host-dd"
    out = {}
    for variant, flag in DD_VARIANTS:
        drop_caches()
        p = run(["dd", "if=/dev/zero", f"of={f}", "bs=1M", f"count={mb}", flag])
        out[f"write_{variant}"] = dd_mb_s(p.stderr)
        f.unlink()
    return out


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mb", type=int, default=1024, help="MB written by the throughput case (0: skip it)")
    ap.add_argument("--cache-dir", default=os.environ.get("VZPKG_CACHE_DIR", "/var/tmp/vzpkg-test-cache"))
    ap.add_argument("--template", default="debian-12-x86_64")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_storage: needs root (loop devices, mounts, namespaces)", file=sys.stderr)
        return 2
    layouts = [x for x in args.layouts.split(",") if x]
    if shutil.which("mkfs.btrfs") is None and any(x.startswith("btrfs") for x in layouts):
        print("bench_storage: mkfs.btrfs missing: skipping btrfs (make setup installs btrfs-progs)", file=sys.stderr)
        layouts = [x for x in layouts if not x.startswith("btrfs")]
    base = Path(f"/var/tmp/vzpkg-bench-storage-{os.getpid()}")
    roots = []
    results: dict[str, dict[str, list[float]]] = {x: {} for x in [*layouts, "host"]}
    try:
        roots = [Root(base, x, args.cache_dir, args.template) for x in layouts]
        for r in roots:
            r.cycle(0)  # untimed: unpacks the template, prepares images, makes the template subvolume
        for _ in range(args.runs):
            for r in roots:
                for k, v in r.cycle(args.mb).items():
                    results[r.layout].setdefault(k, []).append(v)
            if args.mb:
                for k, v in host_write(base, args.mb).items():
                    results["host"].setdefault(k, []).append(v)
    finally:
        for r in roots:
            r.close()
        shutil.rmtree(base, ignore_errors=True)
    report = {name: {k: summary(v) for k, v in res.items()} for name, res in results.items() if res}
    over = report.get("overlay", {}).get("create_start_exec", {}).get("median")
    host = {v: report.get("host", {}).get(f"write_{v}", {}).get("median") for v, _ in DD_VARIANTS}
    print(f"{'layout':<13} {'create ms':>10} {'start->exec ms':>15} {'sum ms':>8} {'x overlay':>10} "
          f"{'fsync MB/s':>11} {'x host':>7} {'direct MB/s':>12} {'x host':>7}")

    def cols(r: dict, variant: str) -> str:
        w = r.get(f"write_{variant}", {}).get("median")
        ratio = w / host[variant] if w and host[variant] else 0
        return f"{(w or 0):>{12 if variant == 'direct' else 11}.0f} {ratio:>7.2f}"

    for name in layouts:
        r = report.get(name, {})
        s = r.get("create_start_exec", {}).get("median")
        print(f"{name:<13} {r['create']['median']:>10.0f} {r['start_exec']['median']:>15.0f} {s:>8.0f} "
              f"{(s / over if over else 0):>10.2f} {cols(r, 'fsync')} {cols(r, 'direct')}")
    if args.mb:
        print(f"{'host':<13} {'':>10} {'':>15} {'':>8} {'':>10} {cols(report['host'], 'fsync')} "
              f"{cols(report['host'], 'direct')}")
    bq, nq = report.get("btrfs", {}), report.get("btrfs-noquota", {})
    if args.mb and bq and nq:
        ratios = "  ".join(f"{v} {bq[f'write_{v}']['median'] / nq[f'write_{v}']['median']:.2f}x"
                           for v, _ in DD_VARIANTS)
        print(f"quota cost, btrfs (qgroups + 4G limit) / btrfs-noquota (same pool kind, quotas off): {ratios}")
    print(f"({args.runs} runs, medians; {args.mb} MB written per run; load average {os.getloadavg()[0]:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
