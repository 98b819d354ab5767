#!/usr/bin/env python3
"""VE runtime benchmark (issue 4): vzctl against the unshare floor, LXC and podman, in one run.

    sudo .venv/bin/python bench/bench_runtime.py [--runs 20] [--idle 100] [--cache-dir DIR] [--json FILE]

Cases, each timed as the wall time of the commands a user would type (Python start-up included):
  vzpkg     create   vzctl create ID --ostemplate debian-12-x86_64 (template already unpacked: warm)
            start    vzctl start ID, then vzctl exec ID /bin/true until it succeeds (start to first exec)
            stop     vzctl stop ID
            destroy  vzctl destroy ID
            (each VE with a private id range: the template through an idmapped mount, the default)
  vzpkg-shared       the same with `vzctl create --idmap shared` (one id range for all VEs, no idmapped mount)
  vzpkg-overlay      the same with `vzctl create --layout overlay` (the basic sample's disk limit makes `vzpkg`
                     an image-layout VE: a loop-mounted ext4 image; this case is the overlay layout without one)
  vzpkg-server, vzpkg-overlay-server
                     the same two through a resident `vzctl server` (started for the case, on its own socket):
                     `vzctl` is then the C front end that hands each command to it (the other vzpkg cases set
                     VZCTL_SERVER=0: the Python vzctl runs each command itself)
  floor     start    unshare -pmuin --fork chroot ROOT /bin/true (ROOT: the unpacked template)
  lxc       create   lxc-copy -s -B overlayfs (snapshot of a base container made from the same rootfs)
            start    lxc-start -d, then lxc-attach -- /bin/true until it succeeds
            stop     lxc-stop -k (the base runs `sleep infinity` as init, which ignores SIGPWR)
            destroy  lxc-destroy
  podman    start    podman run --rm --network=none IMAGE /bin/true (only if podman is installed)
  api       the Python API in this process (vzpkg.api, issue 13): create = VE.create(), start = .start() then
            .exec(["/bin/true"]) (start to first exec), stop = .stop(), destroy = .destroy(); per-test = one
            more VE created, started, one exec, destroyed (with force), timed as a whole (a test's `ve` fixture)
  api-overlay        the same with VE.create(fs_layout="overlay") (like for like with vzpkg-overlay and LXC's overlayfs)
  api-noserver       the same with .start(exec_server=False): every exec joins the VE's cgroups itself (A/B
                     of the exec server, interleaved with `api`)
  parallel  --parallel N VEs (default 100) created and started by --workers W processes (default 8) through
            the API, each running one exec; wall time until all are up, errors (run once, after the rounds)
Then issue 13's targets, each met or not: CLI create, start -> first exec and stop <= 2x LXC (vzpkg, vzpkg-overlay,
and the two -server cases),
API start -> first exec <= 1x LXC and per-test <= 50 ms (api, api-overlay), parallel without errors.
Idle memory: MemAvailable before and after starting --idle VEs (vzpkg, minimal init), divided by their number.

Runs are interleaved (vzpkg, lxc, floor, ...) so that load from other processes affects all alike; medians
are reported with min/max. Work directories live under /var/tmp/vzpkg-bench-runtime-PID and are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))


def vzctl_cmd() -> list[str]:
    script = Path(sys.executable).parent / "vzctl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vzpkg.cli.vzctl"]


def run(cmd, env=None, check=True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}): {p.stderr.strip()[-400:]}")
    return p


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def until_ok(cmd, env=None, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{' '.join(cmd)} never succeeded")
        time.sleep(0.002)


def mem_available_kb() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise RuntimeError("no MemAvailable")


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


class Vzpkg:
    name = "vzpkg"

    def __init__(self, work: Path, cache_dir: Path, template: str, *, name: str = "vzpkg",
                 create_opts: tuple[str, ...] = (), server: bool = False) -> None:
        self.name = name
        self.create_opts = create_opts
        self.root = work / ("vz" if name == "vzpkg" else name)
        self.env = {**os.environ, "VZ_ROOT": str(self.root), "VZPKG_CACHE_DIR": str(cache_dir)}
        # each case says whether a resident server serves it (a server a user runs must not serve the others)
        self.server = server
        if server:
            self.env["VZCTL_SERVER_SOCKET"] = str(work / f"{name}.sock")
        else:
            self.env["VZCTL_SERVER"] = "0"
        # measure what users get: bytecode cached (some sandboxes set this variable)
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        run([sys.executable, "-m", "compileall", "-q", str(PROJECT / "vzpkg")], env=self.env, check=False)
        self.template = template
        self.vzctl = vzctl_cmd()
        if server:
            run([*self.vzctl, "server", "start", "-q"], env=self.env)
        self.n = 0
        # warm up: unpack the template and compile the init (not timed)
        # (VEIDs differ between the runners: cgroup names are host-wide)
        self.prefix = {"vzpkg": "b", "vzpkg-server": "c", "vzpkg-overlay-server": "d"}.get(name, "s")
        warm = f"{self.prefix}warm"
        run([*self.vzctl, "create", warm, "--ostemplate", template, *create_opts, "-q"], env=self.env)
        run([*self.vzctl, "start", warm, "-q"], env=self.env)
        run([*self.vzctl, "destroy", warm, "--force", "-q"], env=self.env)

    def template_root(self) -> Path:
        return next(p for p in (self.root / "template").iterdir() if not p.name.startswith("."))

    def cycle(self) -> dict[str, float]:
        self.n += 1
        veid = f"{self.prefix}{self.n}"
        v, e = self.vzctl, self.env
        out = {"create": timed(lambda: run([*v, "create", veid, "--ostemplate", self.template, *self.create_opts,
                                            "-q"], env=e))}
        out["start"] = timed(lambda: (run([*v, "start", veid, "-q"], env=e),
                                      until_ok([*v, "exec", veid, "/bin/true"], env=e)))
        out["stop"] = timed(lambda: run([*v, "stop", veid, "-q"], env=e))
        out["destroy"] = timed(lambda: run([*v, "destroy", veid, "-q"], env=e))
        return out

    def idle_memory(self, count: int) -> dict:
        """MiB per idle VE: the MemAvailable drop (averaged over start and stop, to cancel drift from other
        processes), and the sum of the VEs' own memory cgroup usage (what the kernel charges them)."""
        ids = [f"idle{i}" for i in range(count)]
        for veid in ids:
            run([*self.vzctl, "create", veid, "--ostemplate", self.template, "-q"], env=self.env)
        run(["sync"])
        time.sleep(1)
        before = mem_available_kb()
        charged = 0
        try:
            for veid in ids:
                run([*self.vzctl, "start", veid, "-q"], env=self.env)
            time.sleep(2)
            during = mem_available_kb()
            for veid in ids:
                try:
                    charged += int(Path(f"/sys/fs/cgroup/memory/vzpkg/{veid}/memory.usage_in_bytes").read_text())
                except OSError:
                    try:
                        charged += int(Path(f"/sys/fs/cgroup/vzpkg/{veid}/memory.current").read_text())
                    except OSError:
                        pass
        finally:
            for veid in ids:
                run([*self.vzctl, "stop", veid, "-q"], env=self.env, check=False)
        run(["sync"])
        time.sleep(1)
        after = mem_available_kb()
        for veid in ids:
            run([*self.vzctl, "destroy", veid, "--force", "-q"], env=self.env, check=False)
        drop = ((before - during) + (after - during)) / 2
        return {"memavailable_mib_per_ve": drop / count / 1024, "cgroup_charged_mib_per_ve": charged / count / 2**20,
                "before_kb": before, "during_kb": during, "after_kb": after}

    def close(self) -> None:
        from vzpkg.runtime import ve
        from vzpkg.runtime.layout import Layout

        lay = Layout(self.root)
        for veid in lay.veids():
            try:
                ve.destroy(lay, veid, force=True)
            except Exception:
                pass
        if self.server:
            run([*self.vzctl, "server", "stop", "-q"], env=self.env, check=False)


class Api:
    """The Python API in this process (bytecode warm, modules imported: what a test suite sees)."""

    def __init__(self, work: Path, cache_dir: Path, template: str, *, name: str = "api",
                 exec_server: bool = True, fs_layout: str | None = None) -> None:
        from vzpkg.api import VE

        self.VE = VE
        self.name = name
        self.exec_server = exec_server
        self.root = work / "api"  # the API runners share a VZ root (ids are allocated per owner)
        self.kw = {"template": template, "root": self.root, "cache_dir": cache_dir, "fs_layout": fs_layout}
        with VE.create(**self.kw) as v:  # warm-up: unpack the template, compile the init
            v.start(exec_server=exec_server)
            v.exec(["/bin/true"], check=True)

    def cycle(self) -> dict[str, float]:
        holder = {}
        out = {"create": timed(lambda: holder.setdefault("v", self.VE.create(**self.kw)))}
        v = holder["v"]
        out["start"] = timed(lambda: (v.start(exec_server=self.exec_server), v.exec(["/bin/true"], check=True)))
        out["exec"] = timed(lambda: v.exec(["/bin/true"], check=True))
        out["stop"] = timed(v.stop)
        out["destroy"] = timed(v.destroy)

        def per_test():
            with self.VE.create(**self.kw) as w:
                w.start(exec_server=self.exec_server)
                w.exec(["/bin/true"], check=True)

        out["per-test"] = timed(per_test)
        return out

    def close(self) -> None:
        from vzpkg.api import destroy_owned

        destroy_owned()


_PARALLEL_WORKER = """
import sys, time
from vzpkg.api import VE
root, cache, template, n = sys.argv[1:5]
ves, errors = [], 0
t = time.perf_counter()
for _ in range(int(n)):
    try:
        v = VE.create(template=template, root=root, cache_dir=cache)
        ves.append(v)
        v.start()
        v.exec(["/bin/true"], check=True)
    except Exception as e:
        errors += 1
        print(f"error: {e}", file=sys.stderr)
print(f"{(time.perf_counter() - t) * 1000:.1f} {errors}", flush=True)
sys.stdin.read()  # hold them until told; the VEs are destroyed at exit
"""


def parallel(work: Path, cache_dir: Path, template: str, count: int, workers: int) -> dict:
    """COUNT VEs created and started by WORKERS API processes at once; wall time until all answered an exec."""
    root = work / "parallel"
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    shares = [count // workers + (1 if i < count % workers else 0) for i in range(workers)]
    # warm-up (template unpacked, init compiled), not timed
    run([sys.executable, "-c", _PARALLEL_WORKER, str(root), str(cache_dir), template, "1"], env=env, input="")
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", _PARALLEL_WORKER, str(root), str(cache_dir), template, str(n)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for n in shares]
    lines = [p.stdout.readline().split() for p in procs]
    wall = (time.perf_counter() - t) * 1000
    errors = sum(int(x[1]) if len(x) == 2 else 1 for x in lines)
    stderr = []
    for p in procs:
        _, err = p.communicate("")
        stderr += err.strip().splitlines()
    left = len(list((root / "conf").glob("*.conf")))
    return {"ves": count, "workers": workers, "wall_ms": wall, "per_ve_ms": wall / count, "errors": errors,
            "worker_ms": [float(x[0]) for x in lines if len(x) == 2], "left_after": left, "stderr": stderr[:5]}


class Floor:
    name = "floor"

    def __init__(self, rootfs: Path) -> None:
        self.rootfs = rootfs

    def cycle(self) -> dict[str, float]:
        return {"start": timed(lambda: run(["unshare", "-pmuin", "--fork", "chroot", str(self.rootfs), "/bin/true"]))}


class Lxc:
    name = "lxc"

    def __init__(self, work: Path, rootfs: Path) -> None:
        self.path = work / "lxc"
        self.path.mkdir()
        base = self.path / "base"
        base.mkdir()
        (base / "rootfs").mkdir()
        # the same Debian tree, unshifted (LXC runs it privileged here, like most LXC installs as root)
        run(["cp", "-a", "--reflink=auto", f"{rootfs}/.", str(base / "rootfs")])
        run(["chown", "-R", "--from=100000:100000", "0:0", str(base / "rootfs")], check=False)
        (base / "config").write_text(
            "lxc.uts.name = base\n"
            f"lxc.rootfs.path = dir:{base / 'rootfs'}\n"
            "lxc.net.0.type = empty\n"
            "lxc.init.cmd = /bin/sleep infinity\n"
            "lxc.apparmor.profile = unconfined\n"
            "lxc.mount.auto = proc:mixed sys:ro\n"
            "lxc.autodev = 1\n"
            "lxc.tty.max = 0\n"
            "lxc.pty.max = 16\n"
        )
        self.n = 0

    def cycle(self) -> dict[str, float]:
        self.n += 1
        name = f"c{self.n}"
        p = str(self.path)
        out = {"create": timed(lambda: run(["lxc-copy", "-P", p, "-n", "base", "-N", name, "-s", "-B", "overlayfs"]))}
        out["start"] = timed(lambda: (run(["lxc-start", "-P", p, "-n", name, "-d"]),
                                      until_ok(["lxc-attach", "-P", p, "-n", name, "--", "/bin/true"])))
        out["stop"] = timed(lambda: run(["lxc-stop", "-P", p, "-n", name, "-k"]))
        out["destroy"] = timed(lambda: run(["lxc-destroy", "-P", p, "-n", name]))
        return out

    def close(self) -> None:
        for d in self.path.iterdir():
            if d.name != "base" and (d / "config").exists():
                run(["lxc-stop", "-P", str(self.path), "-n", d.name, "-k"], check=False)
                run(["lxc-destroy", "-P", str(self.path), "-n", d.name], check=False)


class Podman:
    name = "podman"

    def __init__(self, rootfs: Path) -> None:
        self.image = "vzpkg-bench-debian12"
        run(["sh", "-c", f"tar -C {rootfs} -c . | podman import - {self.image}"])
        # A container that cannot start here (e.g. crun refused by the sandbox) is reported, not timed.
        run(["podman", "run", "--rm", "--network=none", self.image, "/bin/true"])

    def cycle(self) -> dict[str, float]:
        return {"start": timed(lambda: run(["podman", "run", "--rm", "--network=none", self.image, "/bin/true"]))}


def issue13_targets(results: dict) -> list[str]:
    """Issue 13's targets against this run's medians, one line each: from the CLI, create, start -> first exec
    and stop each <= 2x LXC (the default image layout and the overlay layout); through the API, start -> first
    exec <= 1x LXC and a VE per test <= 50 ms; 100 VEs by 8 workers without errors."""
    cases = results["cases"]
    lxc = cases.get("lxc", {})
    lines = []

    def ratio(case: str, op: str, limit: float) -> None:
        c = cases.get(case, {})
        if op in c and op in lxc:
            r = c[op]["median"] / lxc[op]["median"]
            lines.append(f"target {case} {op} <= {limit:g}x LXC: {r:.2f}x ({c[op]['median']:.1f} / "
                         f"{lxc[op]['median']:.1f} ms) {'met' if r <= limit else 'NOT met'}")

    for case in ("vzpkg", "vzpkg-overlay", "vzpkg-server", "vzpkg-overlay-server"):
        for op in ("create", "start", "stop"):
            ratio(case, op, 2.0)
    for case in ("api", "api-overlay"):
        ratio(case, "start", 1.0)
        if "per-test" in cases.get(case, {}):
            ms = cases[case]["per-test"]["median"]
            lines.append(f"target {case} per-test <= 50 ms: {ms:.1f} ms {'met' if ms <= 50 else 'NOT met'}")
    par = results.get("parallel")
    if par:
        ok = par["errors"] == 0 and par["left_after"] == 0
        lines.append(f"target parallel {par['ves']} VEs by {par['workers']} workers without errors: errors "
                     f"{par['errors']}, left {par['left_after']} {'met' if ok else 'NOT met'}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--idle", type=int, default=100, help="VEs for the idle memory figure (0 to skip)")
    ap.add_argument("--cache-dir", default=os.environ.get("VZPKG_CACHE_DIR", "/var/tmp/vzpkg-test-cache"))
    ap.add_argument("--template", default="debian-12-x86_64")
    ap.add_argument("--cases", default="vzpkg,vzpkg-shared,vzpkg-overlay,vzpkg-server,vzpkg-overlay-server,api,api-overlay,api-noserver,floor,lxc,podman,"
                                       "parallel")
    ap.add_argument("--parallel", type=int, default=100, help="VEs of the parallel case")
    ap.add_argument("--workers", type=int, default=8, help="processes of the parallel case")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_runtime: needs root", file=sys.stderr)
        return 1
    cases = set(args.cases.split(","))
    work = Path(f"/var/tmp/vzpkg-bench-runtime-{os.getpid()}")
    work.mkdir(parents=True)
    runners = []
    results: dict = {"host": {"kernel": platform.release(), "cpus": os.cpu_count(),
                              "loadavg_start": os.getloadavg()}, "cases": {}}
    try:
        vz = Vzpkg(work, Path(args.cache_dir), args.template)
        runners.append(vz)
        rootfs = vz.template_root()
        if "vzpkg-shared" in cases:
            runners.append(Vzpkg(work, Path(args.cache_dir), args.template, name="vzpkg-shared",
                                 create_opts=("--idmap", "shared")))
        if "vzpkg-overlay" in cases:  # the default sample has disk limits: image layout; this one has none
            runners.append(Vzpkg(work, Path(args.cache_dir), args.template, name="vzpkg-overlay",
                                 create_opts=("--layout", "overlay")))
        if "vzpkg-server" in cases:  # the same commands through the C front end and a resident `vzctl server`
            runners.append(Vzpkg(work, Path(args.cache_dir), args.template, name="vzpkg-server", server=True))
        if "vzpkg-overlay-server" in cases:
            runners.append(Vzpkg(work, Path(args.cache_dir), args.template, name="vzpkg-overlay-server",
                                 create_opts=("--layout", "overlay"), server=True))
        if "api" in cases:
            runners.append(Api(work, Path(args.cache_dir), args.template))
        if "api-overlay" in cases:
            runners.append(Api(work, Path(args.cache_dir), args.template, name="api-overlay", fs_layout="overlay"))
        if "api-noserver" in cases:
            runners.append(Api(work, Path(args.cache_dir), args.template, name="api-noserver", exec_server=False))
        if "floor" in cases:
            runners.append(Floor(rootfs))
        if "lxc" in cases:
            if shutil.which("lxc-copy"):
                try:
                    lxc = Lxc(work, rootfs)
                    lxc.cycle()  # warm-up, and a check that LXC runs here
                    runners.append(lxc)
                except Exception as e:
                    results["cases"]["lxc"] = {"error": str(e)}
            else:
                results["cases"]["lxc"] = {"error": "not installed (apt-get install lxc)"}
        if "podman" in cases:
            if shutil.which("podman"):
                try:
                    runners.append(Podman(rootfs))
                except Exception as e:
                    results["cases"]["podman"] = {"error": str(e)}
            else:
                results["cases"]["podman"] = {"error": "not installed"}
        if "vzpkg" not in cases:
            runners.remove(vz)
        samples: dict[str, dict[str, list[float]]] = {r.name: {} for r in runners}
        for _ in range(args.runs):
            for r in runners:
                for op, ms in r.cycle().items():
                    samples[r.name].setdefault(op, []).append(ms)
        for name, ops in samples.items():
            results["cases"][name] = {op: summary(v) for op, v in ops.items()}
        if "parallel" in cases:
            results["parallel"] = parallel(work, Path(args.cache_dir), args.template, args.parallel, args.workers)
        if args.idle:
            results["idle_memory"] = vz.idle_memory(args.idle)
            results["idle_count"] = args.idle
        results["host"]["loadavg_end"] = os.getloadavg()
    finally:
        for r in runners:
            if hasattr(r, "close"):
                try:
                    r.close()
                except Exception as e:
                    print(f"cleanup of {r.name}: {e}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)

    print(f"{'case':<13} {'op':<9} {'median ms':>10} {'min':>8} {'max':>8}")
    for name, ops in results["cases"].items():
        if "error" in ops:
            print(f"{name:<13} {'-':<9} {ops['error']}")
            continue
        for op, s in ops.items():
            print(f"{name:<13} {op:<9} {s['median']:>10.1f} {s['min']:>8.1f} {s['max']:>8.1f}")
    vzc = results["cases"].get("vzpkg", {})
    for other in ("vzpkg-shared", "vzpkg-overlay", "floor", "lxc", "podman"):
        oc = results["cases"].get(other, {})
        if "error" in oc or not oc or not vzc:
            continue
        ratios = [f"{op} {vzc[op]['median'] / oc[op]['median']:.2f}x" for op in vzc if op in oc]
        print(f"vzpkg / {other}: {', '.join(ratios)}")
    ovl, lxc_ = results["cases"].get("vzpkg-overlay", {}), results["cases"].get("lxc", {})
    if ovl and lxc_ and "error" not in lxc_:
        ratios = [f"{op} {ovl[op]['median'] / lxc_[op]['median']:.2f}x" for op in ovl if op in lxc_]
        print(f"vzpkg-overlay / lxc: {', '.join(ratios)}")
    for case, other in (("api", "lxc"), ("api-overlay", "lxc"), ("api", "api-noserver")):
        api, oc = results["cases"].get(case, {}), results["cases"].get(other, {})
        if api and "error" not in api and oc and "error" not in oc:
            ratios = [f"{op} {api[op]['median'] / oc[op]['median']:.2f}x" for op in api if op in oc]
            print(f"{case} / {other}: {', '.join(ratios)}")
    targets = issue13_targets(results)
    for line in targets:
        print(line)
    results["targets"] = targets
    if "parallel" in results:
        par = results["parallel"]
        print(f"parallel: {par['ves']} VEs by {par['workers']} processes in {par['wall_ms']:.0f} ms "
              f"({par['per_ve_ms']:.1f} ms per VE), errors {par['errors']}, left after exit {par['left_after']}")
    if "idle_memory" in results:
        im = results["idle_memory"]
        print(f"idle memory over {results['idle_count']} VEs: MemAvailable drop {im['memavailable_mib_per_ve']:.2f} MiB"
              f" per VE; charged to the VEs' memory cgroups {im['cgroup_charged_mib_per_ve']:.2f} MiB per VE")
    print(f"load average: start {results['host']['loadavg_start']}, end {results['host'].get('loadavg_end')}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
