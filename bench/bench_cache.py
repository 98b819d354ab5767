#!/usr/bin/env python3
"""Benchmark `vzpkg create-cache` against mmdebstrap and debootstrap (issue 2, section Benchmark).

Every case builds the same template (default debian-12-x86_64) from the same mirror, in one run, with the runs of
the different cases interleaved round-robin so that network and disk drift affect all of them alike. For each case:
median, min and max wall time over --runs runs, and the size of the output (.tar.zst).

Cases (--cases, comma-separated; default all):

  vzpkg-cold          vzpkg create-cache NAME --cache-dir D --force -q, D emptied before each run (no package
                      download cache, no metadata, no build-stage cache)
  vzpkg-warm          the same with D kept from a previous (untimed, priming) run
  vzpkg-warm-nostage  vzpkg-warm with VZPKG_STAGE_CACHE=0 (build-stage reuse disabled)
  mmdebstrap-cold     mmdebstrap --variant=minbase --include=PKGS --hook-dir=.../merged-usr --dpkgopt=force-unsafe-io
                      SUITE OUT.tar.zst REPOS
  mmdebstrap-warm     the same plus a package cache through sync-in/sync-out hooks (man mmdebstrap, "caching")
  debootstrap-cold    debootstrap --variant=minbase --include=PKGS SUITE DIR MIRROR; tar | zstd -T0
  debootstrap-warm    the same with --cache-dir=C kept from a previous (untimed, priming) run

Needs root. Work directories live under /var/tmp/vzpkg-bench and are removed at the end. The mirror comes from
--mirror, or from vzpkg's own settings (environment, config file, the host's apt sources); it is never printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parent.parent
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))

try:
    from vzpkg import __version__ as VZPKG_VERSION
    from vzpkg.build.chroot import unmount_below
    from vzpkg.config import load_settings
    from vzpkg.distro import get_distribution
    from vzpkg.store.cache import CacheStore
    from vzpkg.template import TemplateRepository
except ImportError as exc:  # pragma: no cover - environment problem
    sys.exit(f"bench_cache: cannot import vzpkg ({exc}): run it with {REPO_DIR}/.venv/bin/python (make bench)")

BENCH_ROOT = Path("/var/tmp/vzpkg-bench")
MERGED_USR_HOOKS = "/usr/share/mmdebstrap/hooks/merged-usr"
ALL_CASES = ("vzpkg-cold", "vzpkg-warm", "vzpkg-warm-nostage", "mmdebstrap-cold", "mmdebstrap-warm",
             "debootstrap-cold", "debootstrap-warm")
TARGETS = (  # (label, numerator case, denominator case, limit, what)
    ("cold time", "vzpkg-cold", "mmdebstrap-cold", 1.0, "time"),
    ("warm time", "vzpkg-warm", "mmdebstrap-warm", 0.5, "time"),
    ("cache size", "vzpkg-cold", "mmdebstrap-cold", 1.0, "size"),
)
RATIOS = (  # informational ratios, (numerator, denominator)
    ("vzpkg-cold", "mmdebstrap-cold"), ("vzpkg-warm", "mmdebstrap-warm"),
    ("vzpkg-warm-nostage", "mmdebstrap-warm"), ("vzpkg-cold", "debootstrap-cold"),
    ("vzpkg-warm", "debootstrap-warm"), ("vzpkg-warm", "vzpkg-warm-nostage"),
)


@dataclass
class Setup:
    """What every case needs to know: template, mirrors, repositories, tools, work directory."""

    template: str
    suite: str
    packages: list[str]
    mirror: str
    repositories: list[str]
    work: Path
    vzpkg: str
    mirror_flag: bool
    secrets: list[str] = field(default_factory=list)  # strings to mask in anything printed

    def mask(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "MIRROR" if secret == self.mirror else "SECURITY_MIRROR")
        return text


@dataclass
class Result:
    case: str
    command: str = ""
    times: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    steps: list[dict[str, float]] = field(default_factory=list)  # vzpkg's own step durations, per run

    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    def size(self) -> int | None:
        return int(statistics.median(self.sizes)) if self.sizes else None

    def as_dict(self) -> dict[str, Any]:
        steps: dict[str, float] = {}
        if self.steps:
            for key in self.steps[0]:
                values = [s[key] for s in self.steps if key in s]
                steps[key] = round(statistics.median(values), 2)
        return {
            "case": self.case, "command": self.command, "runs": len(self.times),
            "times_s": [round(t, 2) for t in self.times],
            "median_s": _r(self.median()), "min_s": _r(min(self.times, default=None)),
            "max_s": _r(max(self.times, default=None)),
            "size_bytes": self.size(), "size_mb": _r(self.size() / 1e6 if self.size() else None),
            "vzpkg_steps_median_s": steps or None, "errors": self.errors,
        }


def _r(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# ---- the cases ------------------------------------------------------------------------------------------------


class Case:
    name = ""

    def __init__(self, setup: Setup) -> None:
        self.s = setup
        self.dir = setup.work / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = setup.work / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def prime(self) -> None:
        """Untimed preparation (fill the caches of a warm case)."""

    def before(self) -> None:
        """Untimed, before each timed run."""

    def timed(self) -> None:
        self._run(self.command())

    def output(self) -> Path:
        raise NotImplementedError

    def after(self) -> dict[str, float] | None:
        """Untimed, after each timed run: remove what must not carry over; return step durations, if any."""
        return None

    def shown(self) -> str:
        return self.s.mask(shlex.join(self.command()))

    def _run(self, cmd: list[str], shell: bool = False) -> None:
        with self.log.open("ab") as log:
            log.write(f"\n### {self.s.mask(cmd if isinstance(cmd, str) else shlex.join(cmd))}\n".encode())
            log.flush()
            proc = subprocess.run(cmd, shell=shell, env=self.env(), stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, cwd=self.s.work)
        if proc.returncode != 0:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"exit status {proc.returncode}: {self.s.mask(' | '.join(tail))}")


class VzpkgCase(Case):
    name = "vzpkg"

    def command(self) -> list[str]:
        cmd = [self.s.vzpkg, "create-cache", self.s.template, "--cache-dir", str(self.dir), "--force", "-q"]
        if self.s.mirror_flag:
            cmd += ["--mirror", self.s.mirror]
        return cmd

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("VZPKG_STAGE_CACHE", None)
        return env

    def output(self) -> Path:
        return CacheStore(self.dir).archive_path(self.s.template)

    def after(self) -> dict[str, float] | None:
        manifest = CacheStore(self.dir).manifest_or_none(self.s.template) or {}
        return manifest.get("durations")


class VzpkgCold(VzpkgCase):
    name = "vzpkg-cold"

    def before(self) -> None:
        # Everything goes: the package download cache (.packages), repository metadata, any build-stage cache.
        unmount_below(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)


class VzpkgWarm(VzpkgCase):
    name = "vzpkg-warm"

    def prime(self) -> None:
        self.timed()


class VzpkgWarmNoStage(VzpkgWarm):
    name = "vzpkg-warm-nostage"

    def env(self) -> dict[str, str]:
        return {**super().env(), "VZPKG_STAGE_CACHE": "0"}

    def shown(self) -> str:
        return "VZPKG_STAGE_CACHE=0 " + super().shown()


class MmdebstrapCold(Case):
    name = "mmdebstrap-cold"

    def env(self) -> dict[str, str]:
        return {**os.environ, "TMPDIR": str(self.dir)}  # its temporary root, on the same disk as vzpkg's

    def options(self) -> list[str]:
        return []

    def command(self) -> list[str]:
        # force-unsafe-io as vzpkg gives its own mmdebstrap run: the same dpkg settings on both sides.
        return ["mmdebstrap", "--variant=minbase", f"--include={','.join(self.s.packages)}",
                f"--hook-dir={MERGED_USR_HOOKS}", "--dpkgopt=force-unsafe-io", *self.options(),
                self.s.suite, str(self.output()), *self.s.repositories]

    def output(self) -> Path:
        return self.dir / "out.tar.zst"

    def after(self) -> None:
        self.output().unlink(missing_ok=True)


class MmdebstrapWarm(MmdebstrapCold):
    name = "mmdebstrap-warm"

    def options(self) -> list[str]:
        cache = shlex.quote(str(self.dir / "apt-archives"))
        return ["--skip=essential/unlink",
                "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/",
                f"--setup-hook=sync-in {cache} /var/cache/apt/archives/",
                f"--customize-hook=sync-out /var/cache/apt/archives {cache}"]

    def prime(self) -> None:
        (self.dir / "apt-archives").mkdir(exist_ok=True)
        self.timed()
        self.after()


class DebootstrapCold(Case):
    name = "debootstrap-cold"

    def options(self) -> list[str]:
        return []

    def root(self) -> Path:
        return self.dir / "root"

    def command(self) -> list[str]:
        return ["debootstrap", "--variant=minbase", f"--include={','.join(self.s.packages)}", *self.options(),
                self.s.suite, str(self.root()), self.s.mirror]

    def pack_command(self) -> str:
        return (f"tar -C {shlex.quote(str(self.root()))} --numeric-owner -cf - . | "
                f"zstd -q -T0 -o {shlex.quote(str(self.output()))}")

    def shown(self) -> str:
        return f"{super().shown()} && {self.pack_command()}"

    def before(self) -> None:
        self.after()

    def timed(self) -> None:
        self._run(self.command())
        self._run(f"set -o pipefail; {self.pack_command()}", shell=True)

    def output(self) -> Path:
        return self.dir / "out.tar.zst"

    def after(self) -> None:
        unmount_below(self.root())
        shutil.rmtree(self.root(), ignore_errors=True)
        self.output().unlink(missing_ok=True)

    def _run(self, cmd: list[str] | str, shell: bool = False) -> None:
        if shell:
            cmd = ["bash", "-c", cmd]
        super()._run(cmd)


class DebootstrapWarm(DebootstrapCold):
    name = "debootstrap-warm"

    def options(self) -> list[str]:
        return [f"--cache-dir={self.dir / 'debs'}"]

    def prime(self) -> None:
        (self.dir / "debs").mkdir(exist_ok=True)
        self.before()
        self.timed()
        self.after()


CASE_CLASSES = {c.name: c for c in (VzpkgCold, VzpkgWarm, VzpkgWarmNoStage, MmdebstrapCold, MmdebstrapWarm,
                                     DebootstrapCold, DebootstrapWarm)}


# ---- driver -----------------------------------------------------------------------------------------------------


def make_setup(args: argparse.Namespace, work: Path) -> Setup:
    settings = load_settings(mirror=args.mirror)
    template = TemplateRepository(settings.template_dirs).load(args.template)
    distro = get_distribution(template["distribution"])
    mirrors = distro.mirrors(settings)
    context = template.render_context(mirrors, distro.native_arch(template["architecture"]))
    repositories = list(template.render_repositories(context))
    vzpkg = args.vzpkg or str(Path(sys.executable).with_name("vzpkg"))
    if not Path(vzpkg).exists():
        vzpkg = shutil.which("vzpkg") or sys.exit("bench_cache: no vzpkg program found: pass --vzpkg PATH")
    secrets = [m for m in {mirrors.get("mirror"), mirrors.get("security_mirror")} if m]
    return Setup(template=args.template, suite=template["suite"], packages=list(template.packages),
                 mirror=mirrors["mirror"], repositories=repositories, work=work, vzpkg=vzpkg,
                 mirror_flag=args.mirror is not None, secrets=secrets)


def machine() -> dict[str, Any]:
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
            return out.strip().splitlines()[0] if out.strip() else ""
        except OSError:
            return ""

    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_gb, 1), "kernel": platform.release(),
        "debian": Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else "",
        "python": platform.python_version(), "vzpkg": VZPKG_VERSION,
        "vzpkg_git": first_line(["git", "-C", str(REPO_DIR), "describe", "--always", "--dirty"]),
        "mmdebstrap": first_line(["mmdebstrap", "--version"]),
        "debootstrap": first_line(["debootstrap", "--version"]),
        "zstd": first_line(["zstd", "--version"]).strip("* "),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    BENCH_ROOT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=BENCH_ROOT))
    try:
        setup = make_setup(args, work)
        cases = [CASE_CLASSES[name](setup) for name in args.cases]
        results = {c.name: Result(c.name, command=c.shown()) for c in cases}
        say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else (lambda msg: None)
        say(f"bench: {args.template}, {len(cases)} cases x {args.runs} runs, work dir {work}")
        for case in cases:
            started = time.monotonic()
            try:
                case.prime()
            except RuntimeError as e:
                results[case.name].errors.append(f"prime: {e}")
            if type(case).prime is not Case.prime:
                say(f"  primed {case.name} in {time.monotonic() - started:.1f} s")
        for i in range(args.runs):
            # Round-robin, and the order rotates each round so that no case always follows the same one.
            order = cases[i % len(cases):] + cases[:i % len(cases)]
            for case in order:
                result = results[case.name]
                if any(e.startswith("prime:") for e in result.errors):
                    continue
                try:
                    case.before()
                    os.sync()  # what the previous run left dirty is not charged to this one
                    started = time.monotonic()
                    case.timed()
                    elapsed = time.monotonic() - started
                    result.times.append(elapsed)
                    result.sizes.append(case.output().stat().st_size)
                    steps = case.after()
                    if steps:
                        result.steps.append(steps)
                    say(f"  run {i + 1}/{args.runs} {case.name}: {elapsed:.1f} s, "
                        f"{result.sizes[-1] / 1e6:.1f} MB")
                except (RuntimeError, OSError) as e:
                    result.errors.append(f"run {i + 1}: {e}")
                    say(f"  run {i + 1}/{args.runs} {case.name}: FAILED: {e}")
        return report(setup, results, args)
    finally:
        unmount_below(work)
        shutil.rmtree(work, ignore_errors=True)
        try:
            BENCH_ROOT.rmdir()
        except OSError:
            pass


def report(setup: Setup, results: dict[str, Result], args: argparse.Namespace) -> dict[str, Any]:
    def value(case: str, what: str) -> float | None:
        r = results.get(case)
        if r is None:
            return None
        return r.median() if what == "time" else r.size()

    ratios = {}
    for num, den in RATIOS:
        a, b = value(num, "time"), value(den, "time")
        if a is not None and b:
            ratios[f"{num} / {den}"] = round(a / b, 3)
    size_ratio_base = "vzpkg-cold" if value("vzpkg-cold", "size") else "vzpkg-warm"
    if (a := value(size_ratio_base, "size")) and (b := value("mmdebstrap-cold", "size")):
        ratios[f"size {size_ratio_base} / mmdebstrap-cold"] = round(a / b, 3)
    targets = []
    for label, num, den, limit, what in TARGETS:
        if what == "size":
            num = size_ratio_base
        a, b = value(num, what), value(den, what)
        ratio = round(a / b, 3) if a is not None and b else None
        targets.append({"target": label, "ratio": ratio, "limit": limit, "of": f"{num} / {den}",
                        "status": "n/a" if ratio is None else ("PASS" if ratio <= limit else "FAIL")})
    return {
        "benchmark": "create-cache", "template": setup.template, "packages": setup.packages,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "runs": args.runs,
        "machine": machine(), "mirror": "from --mirror" if setup.mirror_flag else "vzpkg settings (host apt sources)",
        "results": [r.as_dict() for r in results.values()], "ratios": ratios, "targets": targets,
    }


def table(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [
        f"create-cache benchmark: {data['template']} ({', '.join(data['packages'])}), {data['runs']} runs each, "
        f"{data['date']}",
        f"machine: {m['nproc']} x {m['cpu']}, {m['memory_gib']} GiB, kernel {m['kernel']}, Debian {m['debian']}; "
        f"{m['mmdebstrap']}, {m['debootstrap']}, vzpkg {m['vzpkg']} ({m.get('vzpkg_git') or '?'})",
        "",
        f"| {'case':<20} | {'median s':>8} | {'min s':>7} | {'max s':>7} | {'output MB':>9} |",
        f"|{'-' * 22}|{'-' * 10}:|{'-' * 8}:|{'-' * 8}:|{'-' * 10}:|",
    ]

    def fmt(v: float | None, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    for r in data["results"]:
        lines.append(f"| {r['case']:<20} | {fmt(r['median_s'], '8.1f')} | {fmt(r['min_s'], '7.1f')} | "
                     f"{fmt(r['max_s'], '7.1f')} | {fmt(r['size_mb'], '9.1f')} |")
    lines += ["", "ratios (median wall time unless noted):"]
    lines += [f"  {k:<45} {v:6.2f}" for k, v in data["ratios"].items()]
    lines += ["", "targets (issue 2):"]
    for t in data["targets"]:
        ratio = "—" if t["ratio"] is None else f"{t['ratio']:.2f}"
        lines.append(f"  {t['target']:<11} {t['of']:<36} {ratio:>5} <= {t['limit']:.1f}  {t['status']}")
    errors = [(r["case"], e) for r in data["results"] for e in r["errors"]]
    if errors:
        lines += ["", "errors:"] + [f"  {case}: {e}" for case, e in errors]
    steps = [r for r in data["results"] if r.get("vzpkg_steps_median_s")]
    if steps:
        lines += ["", "vzpkg steps (median s):"]
        for r in steps:
            lines.append(f"  {r['case']:<20} " + ", ".join(f"{k} {v:.1f}" for k, v in r["vzpkg_steps_median_s"].items()))
    lines += ["", "commands:"] + [f"  {r['case']}: {r['command']}" for r in data["results"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="timed runs per case (median reported; default 3)")
    p.add_argument("--cases", default=",".join(ALL_CASES),
                   help=f"comma-separated cases to run (default all: {','.join(ALL_CASES)})")
    p.add_argument("--template", default="debian-12-x86_64", help="template to build (default debian-12-x86_64)")
    p.add_argument("--mirror", help="mirror URL for every case (default: vzpkg's settings, e.g. host apt sources)")
    p.add_argument("--vzpkg", help="vzpkg program (default: the one beside this Python, else on PATH)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--table", metavar="JSON", help="print the table of a saved --json result and exit (no runs)")
    args = p.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASE_CLASSES]
    if unknown:
        p.error(f"unknown case {unknown[0]!r}; known: {', '.join(ALL_CASES)}")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    if os.geteuid() != 0:
        sys.exit("bench_cache: needs root (mmdebstrap and debootstrap build real roots)")
    for tool in ("mmdebstrap", "debootstrap", "zstd", "tar"):
        if shutil.which(tool) is None:
            sys.exit(f"bench_cache: {tool} is not installed (make system-packages)")
    data = run(args)
    print(json.dumps(data, indent=2) if args.json else table(data))
    return 1 if any(r["errors"] for r in data["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
