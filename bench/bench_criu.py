"""Checkpoint/restore benchmark (root): dump, restore, frozen time and image size against the memory a VE touched
(20 processes), live clone, restore from a warm checkpoint vs a cold start of a slow service, online-migration
frozen time. Uses the debian-12 cache of the test suite (/var/tmp/vzpkg-test-cache) and a temporary VZ root.

    .venv/bin/python bench/bench_criu.py [--sizes 10,100,500] [--runs 3] [--cases sizes,warm] [--json FILE]

Timing is meaningful only on an idle machine. Peer: podman's checkpoint/restore where podman runs containers
(docs/checkpoint.md); otherwise CRIU's own figures are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
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
# "loads data" for a second, then answers on port 7000 (perl: the debian-12 template has it, no nc or python3)
SLOW_SERVICE = ("perl -MIO::Socket::INET -e 'select(undef,undef,undef,1.0); my $s = IO::Socket::INET->new("
                "LocalPort => 7000, Listen => 5, ReuseAddr => 1) or die; while (my $c = $s->accept) { print $c "
                "qq(ready\\n); close $c }' >/dev/null 2>&1 </dev/null &")
BRIDGE = f"vzbc{os.getpid() % 100000}"  # the bench's own bridge: its VEs' addresses are routed through it only
NET = f"10.219.{os.getpid() % 200 + 20}"


def vzctl(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VZ_ROOT": str(root), "VZPKG_CACHE_DIR": str(CACHE), "PYTHONPATH": str(PROJECT)}
    # as an installed vzctl runs: with its bytecode cached (without, each vzctl compiles its modules: ~80 ms)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    p = subprocess.run([*VZCTL, *args], env=env, capture_output=True, text=True, cwd=PROJECT)
    if check and p.returncode != 0:
        raise SystemExit(f"vzctl {' '.join(args)}: {p.stderr.strip()}")
    return p


def route_dev(addr: str) -> str | None:
    """The interface the host would send ADDR's traffic out of (nothing is sent)."""
    out = subprocess.run(["ip", "-j", "route", "get", addr], capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0].get("dev")


def wait_service(addr: str, t0: float, timeout: float = 30.0) -> float:
    """Seconds from T0 until the service on ADDR:7000 answers "ready", probed from the host with plain TCP
    connects (no process per try: a refused connect costs microseconds, so the probe does not bias either side).
    Only once `ip route get` names the bench's bridge: traffic for ADDR never takes the default route."""
    if route_dev(addr) != BRIDGE:
        raise SystemExit(f"{addr} is not routed through {BRIDGE} ({route_dev(addr)}): refusing to send")
    while time.monotonic() - t0 < timeout:
        try:
            with socket.create_connection((addr, 7000), timeout=0.2) as c:
                if c.makefile().readline().strip() == "ready":
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.002)
    raise SystemExit(f"{addr}: the service did not answer in {timeout} s")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def warm_vs_cold(root: Path, runs: int) -> dict:
    """A service that needs a second to become ready: cold (`vzctl start` + starting the service) against a new VE
    restored from a warm checkpoint of a VE where it already runs (`vzctl restore NEW --from D`), until it answers
    the same probe from the host; through the CLI (an interpreter per command) and through the API (in-process:
    VE.start + exec against VE.restore). Interleaved run by run; medians, and the CPU time of the CLI's children."""
    from vzpkg.api import VE

    os.environ["VZ_BRIDGE"] = BRIDGE  # (the API in this process and every vzctl child)
    layout = Layout(root)
    vzctl(root, "create", "svc", "--ostemplate", TEMPLATE, "--layout", "overlay")  # checkpoints need overlay
    vzctl(root, "set", "svc", "--ipadd", f"{NET}.10/24", "--save")
    vzctl(root, "start", "svc")
    vzctl(root, "exec", "svc", "/bin/sh", "-c", SLOW_SERVICE)
    wait_service(f"{NET}.10", time.monotonic())
    warm_dir = root / "warm"
    vzctl(root, "chkpnt", "svc", "--leave-running", "--dumpdir", str(warm_dir))
    vzctl(root, "stop", "svc", "--fast")
    api_cold = VE.create("apisvc", root=root, cache_dir=CACHE, fs_layout="overlay", ipadd=f"{NET}.11/24")
    rows: dict[str, list[float]] = {k: [] for k in ("cli_cold", "cli_warm", "api_cold", "api_warm", "cli_cold_cpu",
                                                    "cli_warm_cpu", "api_restore", "api_criu")}
    try:
        for i in range(runs):
            # CLI, cold: start, start the service, wait
            c0, t0 = children_cpu(), time.monotonic()
            vzctl(root, "start", "svc")
            vzctl(root, "exec", "svc", "/bin/sh", "-c", SLOW_SERVICE)
            rows["cli_cold"].append(wait_service(f"{NET}.10", t0))
            rows["cli_cold_cpu"].append(children_cpu() - c0)
            vzctl(root, "stop", "svc", "--fast")
            # CLI, warm: restore a new VE with its own address, wait
            addr = f"{NET}.{100 + i % 100}"
            c0, t0 = children_cpu(), time.monotonic()
            vzctl(root, "restore", f"w{i}", "--from", str(warm_dir), "--ipadd", f"{addr}/24")
            rows["cli_warm"].append(wait_service(addr, t0))
            rows["cli_warm_cpu"].append(children_cpu() - c0)
            vzctl(root, "destroy", f"w{i}", "--force")
            # API, cold
            t0 = time.monotonic()
            api_cold.start()
            api_cold.exec(["/bin/sh", "-c", SLOW_SERVICE], check=True)
            rows["api_cold"].append(wait_service(f"{NET}.11", t0))
            api_cold.stop(fast=True)
            # API, warm
            t0 = time.monotonic()
            v = VE.restore(warm_dir, f"a{i}", root=root, ipadd=f"{addr}/24")
            rows["api_restore"].append(time.monotonic() - t0)
            rows["api_warm"].append(wait_service(addr, t0))
            v.destroy(force=True)
            log = sorted((root / "dump" / ".logs").glob(f"a{i}-restore-*.log"))
            if log:
                rows["api_criu"].append(criu_log_span(log[-1]))
    finally:
        api_cold.destroy(force=True)
        ve.destroy(layout, "svc", force=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
    res = {k: round(med(v) * 1000, 1) for k, v in rows.items()}
    res["cli_speedup"] = round(med(rows["cli_cold"]) / med(rows["cli_warm"]), 2)
    res["api_speedup"] = round(med(rows["api_cold"]) / med(rows["api_warm"]), 2)
    res["load"] = os.getloadavg()
    print(f"service answers (ms, medians of {runs}): CLI cold {res['cli_cold']} / warm {res['cli_warm']} = "
          f"{res['cli_speedup']}x (CPU of vzctl and children: {res['cli_cold_cpu']} / {res['cli_warm_cpu']}); API "
          f"cold {res['api_cold']} / warm {res['api_warm']} = {res['api_speedup']}x (VE.restore {res['api_restore']}"
          f", CRIU's own log span {res['api_criu']}); load {res['load']}", flush=True)
    return res


def criu_log_span(log: Path) -> float:
    """Seconds from CRIU's first to its last log line (its -v4 timestamps)."""
    last = 0.0
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("(") and ")" in line:
            try:
                last = float(line[1:line.index(")")])
            except ValueError:
                pass
    return last


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
    ap.add_argument("--cases", default="sizes,warm", help="sizes (dump/restore/clone/migration per memory size), "
                    "warm (restore from a warm checkpoint vs a cold start of a slow service)")
    args = ap.parse_args()
    cases = set(args.cases.split(","))
    if os.geteuid() != 0:
        raise SystemExit("bench_criu: run as root")
    root = Path(tempfile.mkdtemp(prefix="vzbench-criu-", dir="/var/tmp"))
    root2 = Path(tempfile.mkdtemp(prefix="vzbench-criu2-", dir="/var/tmp"))
    layout = Layout(root)
    out: dict = {"load": os.getloadavg(), "sizes": {}}
    try:
        for mb in (int(s) for s in args.sizes.split(",") if s and "sizes" in cases):
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
            if mb == min(int(s) for s in args.sizes.split(",") if s):
                t = migrate.migrate(layout, veid, str(root2), online=True)
                out["migrate_online_ms"] = {k: round(v * 1000, 1) for k, v in t.items()}
                print(f"online migration ({mb} MB): " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in t.items()))
                ve.destroy(Layout(root2), veid, force=True)
            else:
                ve.destroy(layout, veid, force=True)
        if "warm" in cases:
            out["warm"] = warm_vs_cold(root, args.runs)
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
