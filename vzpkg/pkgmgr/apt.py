"""apt: bootstrap with mmdebstrap (or debootstrap), then apt-get inside the root."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ..chroot import POLICY_RC_D, build_mounts, host_resolver, no_daemons, run_in_root, run_tool
from ..errors import BuildError, MirrorError, MissingToolError, SignatureError
from ..inroot import inside, remove_matches, require_inside
from . import apt_cache
from .base import BuildContext, PackageManager

MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")
# Fail fast on an unreachable mirror instead of apt's default minutes of retrying.
#: Debian Policy 5.6.1: lower-case letters, digits, + - . ; at least two characters, starting alphanumeric.
#: Only plain names: the build, status and update-cache compare them with the installed packages' names, so
#: apt's `:arch`, `=version` and `/release` suffixes are not taken.
PACKAGE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
APT_OPTIONS = ['Acquire::Retries "1"', 'Acquire::http::Timeout "15"', 'Acquire::https::Timeout "15"']


class AptBackend(PackageManager):
    name = "apt"

    def package_name_problem(self, name: str) -> str | None:
        if PACKAGE_NAME_RE.fullmatch(name):
            return None
        return ("is not a Debian package name (lower-case letters, digits, '+', '-' and '.', at least two "
                "characters, starting with a letter or digit; no :arch, =version or /release suffix)")

    # ---- host checks and repository metadata --------------------------------------------------

    def bootstrapper_name(self, ctx: BuildContext) -> str:
        return self._bootstrapper(ctx)

    def _bootstrapper(self, ctx: BuildContext) -> str:
        choice = ctx.settings.bootstrapper
        if choice == "auto":
            return "mmdebstrap" if shutil.which("mmdebstrap") else "debootstrap"
        return choice

    def check_host(self, ctx: BuildContext) -> None:
        tool = self._bootstrapper(ctx)
        if shutil.which(tool) is None:
            raise MissingToolError(f"{tool} is not installed: apt-get install {tool}")
        if ctx.keyring is not None and not ctx.keyring.is_file():
            raise MissingToolError(f"keyring {ctx.keyring} is missing: apt-get install debian-archive-keyring")

    def _repositories(self, ctx: BuildContext):
        from ..repo.apt import AptRepository

        return [AptRepository.parse(line) for line in ctx.repositories]

    def check_repositories(self, ctx: BuildContext) -> list[dict[str, Any]]:
        from ..repo.apt import fetch_release

        if ctx.keyring is None:
            raise SignatureError(f"template {ctx.template.name} names no keyring: repositories cannot be verified")
        state = []
        for repo in self._repositories(ctx):
            info = fetch_release(repo, ctx.keyring)
            state.append({"uri": repo.uri, "suite": repo.suite, "components": list(repo.components),
                          "date": info.date, "inrelease_sha256": info.sha256})
        return state

    # ---- bootstrap ------------------------------------------------------------------------------

    def deb_cache_dir(self, ctx: BuildContext) -> Path:
        t = ctx.template
        path = ctx.package_cache / f"{t['distribution']}-{t['suite']}-{ctx.native_arch}"
        (path / "lists").mkdir(parents=True, exist_ok=True)
        return path

    def bootstrap(self, ctx: BuildContext) -> bool:
        if self._bootstrapper(ctx) == "mmdebstrap":
            self._mmdebstrap(ctx)
            return True
        self._debootstrap(ctx)
        return False

    def _mmdebstrap(self, ctx: BuildContext) -> None:
        t = ctx.template
        cache = self.deb_cache_dir(ctx)
        policy_rc_d = '"$1/usr/sbin/policy-rc.d"'
        policy = f"printf %s {shlex.quote(POLICY_RC_D)} > {policy_rc_d} && chmod 755 {policy_rc_d}"
        cmd = [
            "mmdebstrap", "--mode=root", "--format=directory",
            f"--variant={t.get('variant', 'minbase')}",
            f"--architectures={ctx.native_arch}",
            f"--keyring={ctx.keyring}",
            "--dpkgopt=force-unsafe-io",
            "--skip=essential/unlink",  # keep the essential packages for the package cache
            f"--setup-hook={apt_cache.hook_command('in', cache)}",
            f"--essential-hook={policy}",
            f"--customize-hook={apt_cache.hook_command('out', cache)}",
            "--customize-hook=rm -f \"$1/usr/sbin/policy-rc.d\"",
        ]
        for opt in APT_OPTIONS:
            cmd.append(f"--aptopt={opt}")
        if t.get("merged_usr", True) and MERGED_USR_HOOKS.is_dir():
            cmd.append(f"--hook-dir={MERGED_USR_HOOKS}")
        if t.packages:
            cmd.append(f"--include={','.join(t.packages)}")
        cmd += [t["suite"], str(ctx.root)]
        cmd += list(ctx.repositories)
        self._run_bootstrapper(ctx, cmd, "mmdebstrap")

    def _debootstrap(self, ctx: BuildContext) -> None:
        t = ctx.template
        cache = self.deb_cache_dir(ctx)
        cmd = [
            "debootstrap", f"--variant={t.get('variant', 'minbase')}", f"--arch={ctx.native_arch}",
            f"--keyring={ctx.keyring}", f"--cache-dir={cache}",
            "--merged-usr" if t.get("merged_usr", True) else "--no-merged-usr",
            t["suite"], str(ctx.root), ctx.mirrors["mirror"],
        ]
        self._run_bootstrapper(ctx, cmd, "debootstrap")
        self.write_repositories(ctx)
        # debootstrap reads only the main suite: bring in -updates and -security like mmdebstrap does.
        self.upgrade(ctx)

    def _run_bootstrapper(self, ctx: BuildContext, cmd: list[str], tool: str) -> None:
        ctx.note(f"running: {shlex.join(cmd)}")
        env = ctx.env()
        with ctx.log.open("ab") as log:
            returncode = run_tool(cmd, env=env, stdout=None if ctx.verbose else log,
                                  stderr=None if ctx.verbose else subprocess.STDOUT)
        if returncode != 0:
            tail = _log_tail(ctx.log)
            if any(s in tail for s in ("NO_PUBKEY", "not signed", "BADSIG", "is not signed", "signatures were invalid")):
                raise SignatureError(f"{tool}: repository signature check failed: {tail}")
            if any(s in tail for s in ("Failed to fetch", "Could not resolve", "Connection refused", "404", "Unable to connect")):
                raise MirrorError(f"{tool}: cannot download from the mirror: {tail}")
            raise BuildError(f"{tool} failed (exit status {returncode}): {tail} (full log: {ctx.log})")

    # ---- apt inside the root ----------------------------------------------------------------------

    def _apt(self, ctx: BuildContext, args: list[str], what: str) -> None:
        argv = ["apt-get", "-y", "-q", "-o", "Dpkg::Options::=--force-confold", "-o", "Dpkg::Options::=--force-unsafe-io"]
        for opt in APT_OPTIONS:
            name, value = opt.split(" ", 1)
            argv += ["-o", f"{name}={value.strip(chr(34))}"]
        cache = self.deb_cache_dir(ctx)
        apt_cache.sync_in(cache, ctx.root)
        try:
            with build_mounts(ctx.root), host_resolver(ctx.root), no_daemons(ctx.root):
                run_in_root(ctx.root, argv + args, env=ctx.env(), what=what, quiet=ctx.quiet, log=ctx.log)
        finally:
            apt_cache.sync_out(cache, ctx.root)

    def write_repositories(self, ctx: BuildContext) -> bool:
        path = ctx.root / "etc/apt/sources.list"
        require_inside(ctx.root, path, "write")
        wanted = [r for r in ctx.repositories if isinstance(r, str)]
        try:
            current = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        except FileNotFoundError:
            current = []
        if current == wanted:
            return False
        path.write_text("\n".join(wanted) + "\n")
        return True

    def install(self, ctx: BuildContext, packages: list[str]) -> None:
        if packages:
            self._apt(ctx, ["install", "--no-install-recommends", *packages], f"apt-get install {' '.join(packages)}")

    def remove(self, ctx: BuildContext, packages: list[str]) -> None:
        if packages:
            self._apt(ctx, ["purge", "--auto-remove", *packages], f"apt-get purge {' '.join(packages)}")

    def upgrade(self, ctx: BuildContext) -> None:
        self._apt(ctx, ["update"], "apt-get update")
        self._apt(ctx, ["dist-upgrade", "--no-install-recommends"], "apt-get dist-upgrade")

    def clean(self, ctx: BuildContext) -> None:
        root = ctx.root
        for pattern in ("var/lib/apt/lists/*", "var/cache/apt/archives/*.deb", "var/cache/apt/archives/partial/*",
                        "var/cache/apt/*.bin", "var/lib/dpkg/*-old", "var/cache/debconf/*-old",
                        "var/cache/ldconfig/aux-cache", "var/lib/apt/lists/partial/*"):
            remove_matches(root, pattern, keep=("lock",))
        if inside(root, root / "var/lib/apt/lists/partial"):
            (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)

    def installed_packages(self, root: Path) -> list[dict[str, str]]:
        from debian.deb822 import Packages

        status = root / "var/lib/dpkg/status"
        packages = []
        with status.open(encoding="utf-8", errors="replace") as f:
            for para in Packages.iter_paragraphs(f, use_apt_pkg=False):
                if para.get("Status", "").split()[-1:] != ["installed"]:
                    continue
                packages.append({"name": para["Package"], "version": para["Version"],
                                 "architecture": para.get("Architecture", "")})
        return sorted(packages, key=lambda p: (p["name"], p["architecture"]))


def _log_tail(log: Path, lines: int = 3) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    interesting = [ln for ln in text if ln.startswith(("E:", "W:", "Err:")) or "error" in ln.lower()]
    picked = (interesting or text)[-lines:]
    return " | ".join(s.strip() for s in picked)
