"""Checkpoint/restore benchmark (root): dump, restore, frozen time and image size against the memory a VE touched
(20 processes), live clone, restore from a warm checkpoint vs a cold start of a slow service, online-migration
frozen time. Uses the debian-12 cache of the test suite (/var/tmp/vzpkg-test-cache) and a temporary VZ root.

    .venv/bin/python bench/bench_criu.py [--sizes 10,100,500] [--runs 3] [--json FILE]

Timing is meaningful only on an idle machine. Peer: podman's checkpoint/restore where podman runs containers
(docs/checkpoint.md); otherwise CRIU's own figures are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from vzpkg.runtime import checkpoint, migrate, ve  # noqa: E402
from vzpkg.runtime.layout import Layout  # noqa: E402

CACHE = Path(os.environ.get("VZPKG_TEST_CACHE", "/var/tmp/vzpkg-test-cache"))
TEMPLATE = "debian-12-x86_64"
VZCTL = [sys.executable, "-m", "vzpkg.cli.vzctl"]
# "loads data" for a second, then answers on port 7000
SLOW_SERVICE = ("perl -MIO::Socket::INET -e 'select(undef,undef,undef,1.0); my $s = IO::Socket::INET->new("
                "LocalPort => 7000, Listen => 5, ReuseAddr => 1) or die; while (my $c = $s->accept) { print $c "
                "qq(ready\\n); close $c }' >/dev/null 2>&1 </dev/null &")
PROBE = "perl -MIO::Socket::INET -e 'my $c = IO::Socket::INET->new(PeerAddr => q(127.0.0.1), PeerPort => 7000) or exit 1; exit(<$c> ? 0 : 1)'"


def vzctl(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VZ_ROOT": str(root), "VZPKG_CACHE_DIR": str(CACHE), "PYTHONPATH": str(PROJECT)}
    p = subprocess.run([*VZCTL, *args], env=env, capture_output=True, text=True, cwd=PROJECT)
    if check and p.returncode != 0:
        raise SystemExit(f"vzctl {' '.join(args)}: {p.stderr.strip()}")
    return p


def wait_service(root: Path, veid: str, t0: float, timeout: float = 30.0) -> float:
    while time.monotonic() - t0 < timeout:
        if vzctl(root, "exec", veid, "/bin/sh", "-c", PROBE, check=False).returncode == 0:
            return time.monotonic() - t0
        time.sleep(0.02)
    raise SystemExit(f"VE {veid}: the service did not answer in {timeout} s")


def memory_ve(root: Path, veid: str, mb: int) -> None:
    vzctl(root, "create", veid, "--ostemplate", TEMPLATE, "--layout", "overlay")  # CRIU moves file trees
    vzctl(root, "set", veid, "--ram", f"{mb + 512}M", "--numproc", "200", "--save")
    vzctl(root, "start", veid)
    # (every background process off vzctl exec's pipes, or exec waits for them)
    script = (f"(for i in $(seq 18); do sleep 100000 & done; perl -e '$x = q(a) x ({mb} << 20); "
              "open F, q(>/root/ready); close F; sleep 100000') >/dev/null 2>&1 </dev/null &")
    vzctl(root, "exec", veid, "/bin/sh", "-c", script)
    t0 = time.monotonic()
    while vzctl(root, "exec", veid, "test", "-e", "/root/ready", check=False).returncode != 0:
        if time.monotonic() - t0 > 120:
            raise SystemExit(f"VE {veid}: the memory toucher did not start")
        time.sleep(0.1)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10,100,500", help="MB touched, comma-separated")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_criu: run as root")
    root = Path(tempfile.mkdtemp(prefix="vzbench-criu-", dir="/var/tmp"))
    root2 = Path(tempfile.mkdtemp(prefix="vzbench-criu2-", dir="/var/tmp"))
    layout = Layout(root)
    out: dict = {"load": os.getloadavg(), "sizes": {}}
    try:
        for mb in (int(s) for s in args.sizes.split(",")):
            veid = f"b{mb}"
            memory_ve(root, veid, mb)
            rows: dict[str, list[float]] = {"dump_ms": [], "frozen_ms": [], "restore_ms": [], "image_mb": [],
                                            "clone_ms": []}
            for r in range(args.runs):
                info = checkpoint.chkpnt(layout, veid)
                rows["dump_ms"].append(info["dump_s"] * 1000)
                rows["frozen_ms"].append(info["frozen_s"] * 1000)
                rows["image_mb"].append(info["size"] / 2**20)
                rows["restore_ms"].append(checkpoint.restore(layout, veid)["restore_s"] * 1000)
                c = checkpoint.clone(layout, veid, f"{veid}c{r}", live=True)
                rows["clone_ms"].append(c["clone_s"] * 1000)
                ve.destroy(layout, f"{veid}c{r}", force=True)
            out["sizes"][mb] = {k: round(med(v), 1) for k, v in rows.items()}
            print(f"{mb:4d} MB touched, 20 processes: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                                   out["sizes"][mb].items()), flush=True)
            if mb == min(int(s) for s in args.sizes.split(",")):
                t = migrate.migrate(layout, veid, str(root2), online=True)
                out["migrate_online_ms"] = {k: round(v * 1000, 1) for k, v in t.items()}
                print(f"online migration ({mb} MB): " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in t.items()))
                ve.destroy(Layout(root2), veid, force=True)
            else:
                ve.destroy(layout, veid, force=True)
        # warm checkpoint vs cold start of a service that needs a second to become ready
        vzctl(root, "create", "svc", "--ostemplate", TEMPLATE, "--layout", "overlay")
        cold = []
        for _ in range(args.runs):
            t0 = time.monotonic()
            vzctl(root, "start", "svc")
            vzctl(root, "exec", "svc", "/bin/sh", "-c", SLOW_SERVICE)
            cold.append(wait_service(root, "svc", t0))
            vzctl(root, "stop", "svc", "--fast")
        vzctl(root, "start", "svc")
        vzctl(root, "exec", "svc", "/bin/sh", "-c", SLOW_SERVICE)
        wait_service(root, "svc", time.monotonic())
        warm_dir = root / "warm"
        vzctl(root, "chkpnt", "svc", "--leave-running", "--dumpdir", str(warm_dir))
        warm = []
        for i in range(args.runs):
            t0 = time.monotonic()
            vzctl(root, "restore", f"w{i}", "--from", str(warm_dir))
            warm.append(wait_service(root, f"w{i}", t0))
            vzctl(root, "destroy", f"w{i}", "--force")
        out["cold_start_to_service_ms"] = round(med(cold) * 1000, 1)
        out["warm_restore_to_service_ms"] = round(med(warm) * 1000, 1)
        out["warm_speedup"] = round(med(cold) / med(warm), 2)
        print(f"service ready: cold start {out['cold_start_to_service_ms']} ms, warm restore "
              f"{out['warm_restore_to_service_ms']} ms ({out['warm_speedup']}x)")
        out["podman"] = "installed" if shutil.which("podman") else "not installed: no peer figures"
        print(f"podman: {out['podman']}; load average {out['load']}")
    finally:
        for r in (root, root2):
            for v in Layout(r).veids():
                try:
                    ve.destroy(Layout(r), v, force=True)
                except Exception:  # noqa: BLE001
                    pass
            shutil.rmtree(r, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
