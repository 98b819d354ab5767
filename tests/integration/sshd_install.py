"""`make sshd`: an OpenSSH server in a private prefix for the ssh migration tests, never a system service.

`apt-get download` fetches the host suite's openssh-server (the host's apt sources and keyring: apt checks the
signatures and hashes) and those of its library dependencies the host lacks (libwrap0 on Debian 12); `dpkg-deb -x`
unpacks them into PREFIX (default /opt/vzpkg/sshd). Nothing is installed into the package database, no unit is
enabled, no host key is made, /etc/ssh is not touched. PREFIX/sbin/sshd is a wrapper that finds the unpacked
libraries; the tests start it with a config, host key and authorized key of their own in a temp dir
(tests/integration/runtime/sshd.py). Idempotent: a prefix whose sshd runs (`sshd -V`) is kept.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vzpkg.runtime.criu_install import replace_tree

DEFAULT_PREFIX = Path("/opt/vzpkg/sshd")


def _installed(pkg: str) -> bool:
    p = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return p.returncode == 0 and p.stdout.endswith(" installed")


def _depends(pkg: str) -> list[str]:
    p = subprocess.run(["apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks",
                        "--no-replaces", "--no-enhances", pkg], capture_output=True, text=True)
    out = []
    for line in p.stdout.splitlines():
        line = line.strip().lstrip("|")
        if line.startswith(("Depends:", "PreDepends:")):
            name = line.split(":", 1)[1].strip()
            if not name.startswith("<"):
                out.append(name.split(":")[0])
    return out


def packages() -> list[str]:
    """openssh-server and the closure of its library dependencies (lib*) that are not installed here."""
    want, todo = ["openssh-server"], ["openssh-server"]
    while todo:
        for dep in _depends(todo.pop()):
            if dep.startswith("lib") and dep not in want and not _installed(dep):
                want.append(dep)
                todo.append(dep)
    return want


def works(prefix: Path) -> bool:
    sshd = prefix / "sbin" / "sshd"
    if not os.access(sshd, os.X_OK):
        return False
    # sshd has no --version: -V prints it (OpenSSH >= 9.2) and exits 0; an unloadable library fails
    p = subprocess.run([str(sshd), "-V"], capture_output=True, text=True)
    return "OpenSSH" in p.stderr + p.stdout


def install(prefix: Path) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".sshd-", dir=prefix.parent))
    os.chmod(work, 0o755)  # apt's download sandbox user (_apt) writes here
    try:
        pkgs = packages()
        debs = work / "debs"
        debs.mkdir(mode=0o755)
        os.chmod(debs, 0o755)
        get = subprocess.run(["apt-get", "-q", "download", *pkgs], cwd=debs, capture_output=True, text=True)
        if get.returncode != 0:  # no package lists yet (a fresh machine): read them once and try again
            subprocess.run(["apt-get", "-q", "update"], capture_output=True, text=True)
            get = subprocess.run(["apt-get", "-q", "download", *pkgs], cwd=debs, capture_output=True, text=True)
        if get.returncode != 0:
            raise SystemExit(f"sshd_install: error: apt-get download {' '.join(pkgs)} failed: "
                             f"{(get.stderr.strip().splitlines() or ['?'])[-1]}")
        tree = work / "tree"
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
        libdirs = sorted({str(p.parent.relative_to(tree)) for p in (*tree.glob("usr/lib/*/lib*.so*"),
                                                                    *tree.glob("lib/*/lib*.so*"))})
        libpath = ":".join(f"{prefix}/{d}" for d in libdirs)
        (tree / "sbin").mkdir(exist_ok=True)
        wrapper = tree / "sbin" / "sshd"
        # exec keeps the absolute path sshd needs to re-execute itself; its children inherit LD_LIBRARY_PATH
        wrapper.write_text("#!/bin/sh\n# openssh-server unpacked for the tests (tests/integration/sshd_install.py)\n"
                           + (f'export LD_LIBRARY_PATH="{libpath}"\n' if libpath else "")
                           + f'exec "{prefix}/usr/sbin/sshd" "$@"\n')
        wrapper.chmod(0o755)
        (tree / "PACKAGES").write_text("".join(f"{d.name}\n" for d in sorted(debs.glob("*.deb"))))
        replace_tree(tree, prefix)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sshd_install", description=__doc__.split("\n")[0])
    ap.add_argument("--prefix", type=Path, default=DEFAULT_PREFIX)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    prefix = args.prefix.resolve()
    if not args.force and works(prefix):
        print(f"sshd: {prefix}/sbin/sshd present")
        return 0
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        print("sshd_install: error: apt-get and dpkg-deb are needed (a Debian host)", file=sys.stderr)
        return 14
    install(prefix)
    if not works(prefix):
        print(f"sshd_install: error: {prefix}/sbin/sshd does not run (sshd -V)", file=sys.stderr)
        return 1
    print(f"sshd: unpacked into {prefix} ({', '.join((prefix / 'PACKAGES').read_text().split())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
