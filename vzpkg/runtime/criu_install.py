"""Provide a CRIU that works on this kernel: `python -m vzpkg.runtime.criu_install [--prefix DIR]` (`make criu`).

Debian 12's criu 3.17 fails `criu check` on kernels 6.x ("vdso: Unexpected rt vDSO area bounds"), Debian 13's
4.1.1 cannot dump a TCP socket on kernels from 6.16 (SO_PASSCRED is refused on TCP). CRIU >= 4.2 works. If the
distribution's own criu is new enough and passes `criu check`, it is used and nothing is installed. Otherwise the
criu package of the Debian archive's testing suite and the closure of its library dependencies are fetched with
apt (signatures and hashes checked by apt against the archive keyring; the mirror is the host's own, read from
its apt sources) into a private apt state, and unpacked with `dpkg-deb -x` into PREFIX (default
/opt/vzpkg/criu). Its glibc comes along: the binary is started through the prefix's own ld-linux with
--library-path, so nothing of the host's libraries is replaced and the host's package database is not touched.
PREFIX/bin/criu is that wrapper. Idempotent: a prefix that exists and passes `criu check` is kept.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from vzpkg import process
from vzpkg.distro.hostapt import host_sources
from vzpkg.errors import MissingToolError, VzError
from vzpkg.runtime.criu import version_of  # one reader of `criu --version`

DEFAULT_PREFIX = Path("/opt/vzpkg/criu")
MIN_VERSION = (4, 2)
SUITE = "testing"
# packages of the closure that carry no library criu loads
SKIP = {"gcc-16-base", "gcc-15-base", "gcc-14-base", "libc-gconv-modules-extra"}
DEBIAN_SUITES = {"bullseye", "bookworm", "trixie", "forky", "duke", "sid", "stable", "testing", "unstable",
                 "oldstable"}


def check(criu: str) -> tuple[bool, str]:
    try:
        proc = process.run([criu, "check"], capture=True, text=True, timeout=120, check=False,
                           error=MissingToolError)
    except MissingToolError as e:
        return False, str(e)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def good(criu: str) -> bool:
    v = version_of(criu)
    return v is not None and v >= MIN_VERSION and check(criu)[0]


def debian_mirror() -> str:
    for src in host_sources():
        if any(s in DEBIAN_SUITES for s in src.suites) and src.uri.startswith(("http://", "https://", "file:")):
            return src.uri
    raise SystemExit("criu_install: error: no Debian mirror in the host's apt sources (/etc/apt/sources.list"
                     "[.d]): add one, or install criu >= 4.2 and set VZ_CRIU")


def _apt_opts(work: Path) -> list[str]:
    return ["-o", f"Dir::Etc::sourcelist={work}/sources.list", "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State={work}/state", "-o", f"Dir::Cache={work}/cache", "-o", "Dir::State::status=/dev/null",
            "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root", "-o", "APT::Get::AllowUnauthenticated=false", "-q"]


def install(prefix: Path) -> Path:
    mirror = debian_mirror()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".criu-", dir=prefix.parent))
    try:
        (work / "sources.list").write_text(
            f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} {SUITE} main\n")
        for d in ("state/lists/partial", "cache/archives/partial", "debs"):
            (work / d).mkdir(parents=True)
        opts = _apt_opts(work)
        upd = process.run(["apt-get", *opts, "update"], capture=True, text=True, check=False, error=MissingToolError)
        if upd.returncode != 0 and ("is expired" in upd.stderr or "not valid yet" in upd.stderr):
            # a snapshot mirror (or a clock far off) serves a testing Release past its Valid-Until; signatures
            # and hashes are still checked, only the freshness date is not
            print("criu: note: the mirror's testing Release is out of its validity dates; using it anyway "
                  "(signatures still checked)", file=sys.stderr)
            opts += ["-o", "Acquire::Check-Valid-Until=false", "-o", "Acquire::Check-Date=false"]
            upd = process.run(["apt-get", *opts, "update"], capture=True, text=True, check=False, error=MissingToolError)
        if upd.returncode != 0:
            raise SystemExit(f"criu_install: error: apt-get update of the archive's {SUITE} suite from {mirror} "
                             f"failed: {(upd.stderr.strip().splitlines() or ['?'])[-1]}")
        # with an empty status file every dependency counts as missing: the whole closure down to libc6
        deps = process.run(["apt-cache", *opts, "depends", "--recurse", "--no-recommends", "--no-suggests",
                            "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", "--no-pre-depends",
                            "criu"], capture=True, text=True, error=MissingToolError).stdout
        pkgs = sorted({line.strip() for line in deps.splitlines() if line and not line[0].isspace()
                       and not line.startswith("<")} - SKIP)
        process.run(["apt-get", *opts, "download", *pkgs], cwd=work / "debs", error=MissingToolError)
        tree = work / "tree"
        for deb in sorted((work / "debs").glob("*.deb")):
            process.run(["dpkg-deb", "-x", str(deb), str(tree)], error=MissingToolError)
        loaders = sorted(p for p in tree.glob("usr/lib*/**/ld-linux*.so*") if p.is_file() or p.is_symlink())
        if not loaders:
            raise SystemExit("criu_install: error: the unpacked libc6 has no ld-linux")
        loader = loaders[0].relative_to(tree)
        libdirs = sorted({str(p.parent.relative_to(tree)) for p in tree.glob("usr/lib/*/lib*.so*")}
                         | {str(p.parent.relative_to(tree)) for p in tree.glob("lib/*/lib*.so*")})
        (tree / "bin").mkdir(exist_ok=True)
        wrapper = tree / "bin/criu"
        libpath = ":".join(f"{prefix}/{d}" for d in libdirs)
        wrapper.write_text("#!/bin/sh\n# CRIU from the Debian archive's testing suite with its own libc "
                           "(vzpkg/runtime/criu_install.py)\n"
                           f'exec "{prefix}/{loader}" --library-path "{libpath}" "{prefix}/usr/sbin/criu" "$@"\n')
        wrapper.chmod(0o755)
        (tree / "PACKAGES").write_text("".join(f"{d.name}\n" for d in sorted((work / "debs").glob("*.deb"))))
        replace_tree(tree, prefix)
        return prefix / "bin/criu"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="criu_install", description=__doc__.split("\n")[0])
    ap.add_argument("--prefix", type=Path, default=DEFAULT_PREFIX)
    ap.add_argument("--force", action="store_true", help="install into PREFIX even if a good criu exists")
    args = ap.parse_args(argv)
    prefix = args.prefix.resolve()
    system = shutil.which("criu")
    if not args.force and system and good(system):
        print(f"criu: the distribution's {system} {'.'.join(map(str, version_of(system) or ()))} passes "
              "`criu check`: using it")
        return 0
    mine = prefix / "bin/criu"
    if not args.force and mine.exists() and good(str(mine)):
        print(f"criu: {mine} {'.'.join(map(str, version_of(str(mine)) or ()))} present, `criu check` passes")
        return 0
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        print("criu_install: error: apt-get and dpkg-deb are needed (a Debian host)", file=sys.stderr)
        return 14
    try:
        path = install(prefix)
    except VzError as e:
        print(f"criu_install: error: {e}", file=sys.stderr)
        return e.exit_code
    v = version_of(str(path))
    ok, out = check(str(path))
    if v is None or v < MIN_VERSION or not ok:
        print(f"criu_install: error: {path} (version {v}) fails `criu check`: {out.splitlines()[-1:]}",
              file=sys.stderr)
        return 1
    print(f"criu: installed {path} {'.'.join(map(str, v))} from the archive's {SUITE} suite; `criu check` passes")
    return 0


def replace_tree(tree: Path, prefix: Path) -> None:
    """Put the directory TREE in place of PREFIX (one rename each: a reader sees the old or the new tree)."""
    old = None
    if prefix.exists():
        old = prefix.with_name(f".{prefix.name}.old-{os.getpid()}")
        prefix.rename(old)
    tree.rename(prefix)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
