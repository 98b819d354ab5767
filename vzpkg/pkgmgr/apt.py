"""apt: bootstrap with mmdebstrap (or debootstrap), then apt-get inside the root."""

from __future__ import annotations

import collections
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from ..build.chroot import POLICY_RC_D, build_mounts, host_resolver, no_daemons, run_tool
from ..build.inroot import inside, remove_matches, require_inside
from ..config import Settings
from ..errors import MissingToolError, SignatureError
from ..manifest.model import Manifest
from ..template import Template
from . import apt_cache, apt_errors
from .base import AvailableUpdates, BuildContext, PackageManager
from .names import APT

MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")
OUTPUT_LINES_KEPT = 400  # of a tool's output, for reading its errors (apt's come at the end)


def apt_options(settings: Settings) -> list[tuple[str, str]]:
    """apt's network bounds (apt_timeout, apt_retries): fail on a stalled or unreachable mirror within seconds
    instead of apt's default minutes. A mirror that trickles is stopped by build_timeout around the whole run."""
    timeout, retries = str(settings.apt_timeout), str(settings.apt_retries)
    return [("Acquire::Retries", retries), ("Acquire::http::Timeout", timeout),
            ("Acquire::https::Timeout", timeout), ("Acquire::ftp::Timeout", timeout)]


class AptBackend(PackageManager):
    name = APT

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
        from .apt_status import repository_state

        if ctx.keyring is None:
            raise SignatureError(f"template {ctx.template.name} names no keyring: repositories cannot be verified")
        state = []
        for repo in self._repositories(ctx):
            info = fetch_release(repo, ctx.keyring)
            state.append(repository_state(repo, info.date, info.sha256))
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
        for name, value in apt_options(ctx.settings):
            cmd.append(f'--aptopt={name} "{value}"')
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
        _run_checked(ctx, cmd, tool)

    # ---- apt inside the root ----------------------------------------------------------------------

    def _apt(self, ctx: BuildContext, args: list[str], what: str) -> None:
        argv = ["apt-get", "-y", "-q", "-o", "Dpkg::Options::=--force-confold", "-o", "Dpkg::Options::=--force-unsafe-io"]
        for name, value in apt_options(ctx.settings):
            argv += ["-o", f"{name}={value}"]
        cache = self.deb_cache_dir(ctx)
        apt_cache.sync_in(cache, ctx.root)
        try:
            with build_mounts(ctx.root), host_resolver(ctx.root), no_daemons(ctx.root):
                _run_checked(ctx, ["chroot", str(ctx.root), *argv, *args], what)
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
        # --error-on=any: an index that failed to download is an error, not a warning over stale lists.
        self._apt(ctx, ["update", "--error-on=any"], "apt-get update")
        self._apt(ctx, ["dist-upgrade", "--no-install-recommends"], "apt-get dist-upgrade")

    def clean(self, ctx: BuildContext) -> None:
        root = ctx.root
        for pattern in ("var/lib/apt/lists/*", "var/cache/apt/archives/*.deb", "var/cache/apt/archives/partial/*",
                        "var/cache/apt/*.bin", "var/lib/dpkg/*-old", "var/cache/debconf/*-old",
                        "var/cache/ldconfig/aux-cache", "var/lib/apt/lists/partial/*"):
            remove_matches(root, pattern, keep=("lock",))
        if inside(root, root / "var/lib/apt/lists/partial"):
            (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)

    def available_updates(self, template: Template, manifest: Manifest, settings: Settings, *,
                          refresh: bool = False) -> AvailableUpdates:
        from . import apt_status

        return apt_status.available_updates(template, manifest, settings, refresh=refresh)

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


def _run_checked(ctx: BuildContext, cmd: list[str], what: str) -> None:
    """Run CMD within build_timeout (timeout(1) stops its whole process group), its output into the build log
    (and on the terminal with -v); on failure raise what its output says (apt_errors.classify)."""
    deadline = ctx.settings.build_timeout
    argv = ["timeout", "--kill-after=10", str(deadline), *cmd]
    kept: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES_KEPT)
    with ctx.log.open("ab") as log:
        def on_line(raw: bytes) -> None:
            kept.append(raw.decode(errors="replace").rstrip("\n"))

        # a tool that cannot be started at all is a missing host program
        returncode = run_tool(argv, env=ctx.env(), log=log, echo=sys.stdout.buffer if ctx.verbose else None,
                              on_line=on_line, error=MissingToolError, what=what).returncode
    if returncode != 0:
        raise apt_errors.classify(what, returncode, list(kept), deadline=deadline, log=str(ctx.log))
