"""dnf (yum where only yum exists): install into the root with `dnf --installroot`, from the host.

Everything dnf reads comes from files vzpkg writes into the work dir: a dnf.conf holding the template's
repositories (no host repository, variable or plugin is used), the template's GPG keys, and an rpm macro file
that puts the rpmdb where the distribution's own rpm looks for it (Debian's rpm would otherwise put it under
~/.rpmdb). Downloaded packages and repository metadata are kept between builds in the package cache, bind-mounted
over the root's /var/cache/dnf while dnf runs.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from .. import process
from ..build.chroot import build_mounts, run_tool, unmount_below
from ..build.inroot import remove_matches, require_inside
from ..config import Settings
from ..errors import BuildError, MirrorError, MissingToolError, SignatureError, TemplateError
from ..manifest.model import Manifest
from ..template import DEFINITION_FILE, Template, render_string
from . import gnupg
from .apt_errors import TIMEOUT_EXIT
from .base import AvailableUpdates, BuildContext, PackageManager
from .dnf_keys import fetch_keys, verify_repomd_signature
from .dnf_repos import CACHE_IN_ROOT, DnfRepo, expand_repository, main_options, normalize_repositories, render_config
from .names import DNF, RPM_MANAGERS
from .rpmdb import checkpoint_sqlite, find_rpmdb, read_rpmdb

SIGNATURE_PATTERNS = ("is not signed", "GPG check FAILED", "Public key for", "signature", "Signature", "digest",
                      "Digest", "NOKEY", "BAD", "not trusted", "is not installed")
CORRUPT_PATTERNS = ("checksum doesn't match", "is corrupted", "Checksum", "checksum mismatch", "incorrect checksum")
MIRROR_PATTERNS = ("Cannot download repomd.xml", "Failed to download metadata", "Curl error", "Connection refused",
                   "Couldn't connect", "Cannot find a valid baseurl", "Could not resolve host",
                   "Librepo error", "Cannot download", "Failed to download packages")
RESOLVE_PATTERNS = ("No match for argument", "Unable to find a match", "nothing provides", "conflicting requests",
                    "Problem:", "No package", "is filtered out")


# ---- the backend -----------------------------------------------------------------------------------------------

class DnfBackend(PackageManager):
    def __init__(self, name: str = DNF) -> None:
        self.name = name
        self._ctx: BuildContext | None = None
        self._repos: list[DnfRepo] | None = None

    # ---- host ----

    def tool(self) -> str | None:
        """dnf when the host has it, else yum (also for templates that say yum: dnf is yum's successor)."""
        for candidate in RPM_MANAGERS:
            if shutil.which(candidate):
                return candidate
        return None

    def bootstrapper_name(self, ctx: BuildContext) -> str:
        return self.tool() or self.name

    def check_host(self, ctx: BuildContext) -> None:
        self._ctx = ctx
        if self.tool() is None:
            raise MissingToolError("neither dnf nor yum is installed: apt-get install dnf")
        if shutil.which("rpm") is None:
            raise MissingToolError("rpm is not installed: apt-get install rpm")

    # ---- configuration ----

    def _distro(self, ctx: BuildContext) -> Any:
        from ..distro import get_distribution

        return get_distribution(ctx.template["distribution"])

    def releasever(self, ctx: BuildContext) -> str:
        return str(ctx.template.get("releasever") or ctx.template["release"])

    def dbpath(self, ctx: BuildContext) -> str:
        return getattr(self._distro(ctx), "rpmdb_path", "/var/lib/rpm")

    def variables(self, ctx: BuildContext) -> dict[str, str]:
        rel = self.releasever(ctx)
        return {"releasever": rel, "releasever_major": rel.split(".")[0], "basearch": ctx.native_arch,
                "arch": ctx.native_arch}

    def gpg_key_refs(self, ctx: BuildContext) -> list[str]:
        """The template's gpg_keys, rendered, as URLs (file:// for local paths; relative ones from the template)."""
        context = ctx.template.render_context(ctx.mirrors, ctx.native_arch)
        refs = []
        for i, key in enumerate(ctx.template.get("gpg_keys", [])):
            text = render_string(key, context, where=f"{ctx.template.name}: gpg_keys[{i}]")
            if re.match(r"^[a-z]+://", text):
                refs.append(text)
                continue
            path = Path(text)
            if not path.is_absolute():
                found = [d / text for d in reversed(ctx.template.chain) if (d / text).is_file()]
                path = found[0] if found else ctx.template.path / text
            refs.append(path.as_uri())
        return refs

    def repositories(self, ctx: BuildContext) -> list[DnfRepo]:
        if self._repos is None:
            self._repos = normalize_repositories(ctx.template.path / DEFINITION_FILE, ctx.repositories,
                                                 self.gpg_key_refs(ctx))
        return self._repos

    def conf_dir(self, ctx: BuildContext) -> Path:
        return ctx.work_dir / "dnf"

    def package_cache(self, ctx: BuildContext) -> Path:
        t = ctx.template
        return ctx.package_cache / f"{t['distribution']}-{t['release']}-{ctx.native_arch}"

    def config_text(self, ctx: BuildContext) -> str:
        distro = self._distro(ctx)
        platform = getattr(distro, "module_platform_id", lambda _r: None)(ctx.template["release"])
        main = main_options(weak_deps=bool(ctx.template.get("weak_dependencies", False)),
                            conf_dir=self.conf_dir(ctx), module_platform_id=platform)
        return render_config(main, self.repositories(ctx))

    def write_config(self, ctx: BuildContext) -> Path:
        d = self.conf_dir(ctx)
        for sub in ("repos.d", "vars", "home"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        conf = d / "dnf.conf"
        conf.write_text(self.config_text(ctx))
        # rpm reads ~/.rpmmacros: the rpmdb goes where the root's own rpm expects it
        (d / "home/.rpmmacros").write_text(f"%_dbpath {self.dbpath(ctx)}\n")
        return conf

    # ---- repository metadata ----

    def check_repositories(self, ctx: BuildContext) -> list[dict[str, Any]]:
        from ..repo.rpm import fetch_repomd, resolve_baseurl

        self._ctx = ctx
        ctx.facts["rpmdb_path"] = self.dbpath(ctx)
        ctx.facts["releasever"] = self.releasever(ctx)
        variables = self.variables(ctx)
        # remote keys become local files (dnf.conf names those); a key that cannot be had fails here
        repos = self._repos = fetch_keys(self.repositories(ctx), variables, self.conf_dir(ctx) / "keys",
                                         ctx.template.path / DEFINITION_FILE)
        state = []
        unchecked = []
        for repo in repos:
            if not repo.enabled:
                continue
            if not repo.gpgcheck:
                unchecked.append(repo.id)
            elif not repo.gpgkey:
                raise SignatureError(f"repository {repo.id} checks signatures (gpgcheck) but the template names "
                                     f"no key: add gpg_keys to {ctx.template.path / DEFINITION_FILE}, or the "
                                     f"repository's gpgkey")
            baseurl = resolve_baseurl(expand_repository(repo, variables).options())
            md = fetch_repomd(baseurl)
            if repo.repo_gpgcheck:
                self._verify_repomd(ctx, repo, baseurl, md.raw)
            state.append({"id": repo.id, **md.state(), "gpgcheck": repo.gpgcheck})
            ctx.note(f"repository {repo.id}: {baseurl} revision {md.revision or '?'}")
        if unchecked:
            ctx.note(f"warning: package signatures are NOT checked for repositories {', '.join(unchecked)} "
                     f"(gpgcheck = false in the template)")
            ctx.facts["unsigned_repositories"] = unchecked
        self.write_config(ctx)
        return state

    def _verify_repomd(self, ctx: BuildContext, repo: DnfRepo, baseurl: str, data: bytes) -> None:
        from ..repo.http import fetch

        asc = fetch(f"{baseurl.rstrip('/')}/repodata/repomd.xml.asc").content
        verify_repomd_signature(repo, baseurl, data, asc, ctx.work_dir)

    # ---- running dnf ----

    def _argv(self, ctx: BuildContext, conf: Path) -> list[str]:
        tool = self.tool() or self.name
        argv = [tool, f"--installroot={ctx.root}", f"--config={conf}", f"--releasever={self.releasever(ctx)}",
                f"--setopt=reposdir={self.conf_dir(ctx) / 'repos.d'}", "--assumeyes", "--noplugins"]
        if tool == DNF:
            argv.append(f"--forcearch={ctx.native_arch}")
        return argv

    def _env(self, ctx: BuildContext) -> dict[str, str]:
        env = ctx.env()
        env["HOME"] = str(self.conf_dir(ctx) / "home")  # ~/.rpmmacros: the rpmdb path
        env.pop("DEBIAN_FRONTEND", None)
        env.pop("DEBCONF_NONINTERACTIVE_SEEN", None)
        return env

    def _dnf(self, ctx: BuildContext, args: list[str], what: str) -> None:
        conf = self.conf_dir(ctx) / "dnf.conf"
        if not conf.is_file():
            conf = self.write_config(ctx)
        root = ctx.root
        for d in (CACHE_IN_ROOT, "proc", "sys", "dev", "etc"):
            (root / d).mkdir(parents=True, exist_ok=True)
        cache = self.package_cache(ctx)
        cache.mkdir(parents=True, exist_ok=True)
        cmd = self._argv(ctx, conf) + args
        ctx.note(f"running: {shlex.join(cmd)}")
        target = root / CACHE_IN_ROOT
        require_inside(root, target, "mount the package cache over")  # mount(8) follows symlinks
        process.run(["mount", "--bind", str(cache), str(target)], capture=True, error=BuildError,
                    what=f"mounting the package cache {cache} on {target}")
        try:
            with build_mounts(root):
                rc, output = self._run(ctx, gnupg.with_private_run_user(cmd))
        finally:
            # repo_gpgcheck: the gpg-agent librepo started for the keyring in the cache must not outlive the build
            if (stopped := gnupg.stop_agents_below(root)):
                ctx.note(f"stopped {stopped} gpg-agent started by {cmd[0]} for its keyrings")
            unmount_below(target)
        if rc != 0:
            raise self._error(ctx, what, rc, output)

    def _run(self, ctx: BuildContext, cmd: list[str]) -> tuple[int, list[str]]:
        """Run dnf within build_timeout, its output to the log (and the terminal with -v) and kept for the error
        message. dnf's own limits (timeout, minrate) stop a mirror that stalls, not one that trickles just above
        minrate: timeout(1) around the whole run does, as for apt (it stops the run's whole process group)."""
        cmd = ["timeout", "--kill-after=10", str(ctx.settings.build_timeout), *cmd]
        output: list[str] = []
        with ctx.log.open("ab") as log:

            def on_line(raw: bytes) -> None:
                line = raw.decode(errors="replace").rstrip()
                output.append(line)
                if ctx.verbose:
                    sys.stderr.write(line + "\n")

            rc = run_tool(cmd, env=self._env(ctx), log=log, on_line=on_line, what=cmd[0]).returncode
        return rc, output

    def _error(self, ctx: BuildContext, what: str, rc: int, output: list[str]) -> Exception:
        tool = self.tool() or self.name
        if rc == TIMEOUT_EXIT:
            deadline = ctx.settings.build_timeout
            last = next((ln.strip() for ln in reversed(output) if ln.strip()), "")
            said = f" (its last line: {last[:120]!r})" if last else ""
            if not any(ln.startswith("Running transaction") for ln in output):  # before it: downloads
                return MirrorError(f"{what}: not finished within {deadline} s (build_timeout): the repository is "
                                   f"too slow; {tool} was still downloading{said}; check the mirror or raise "
                                   f"build_timeout")
            return BuildError(f"{what}: not finished within {deadline} s (build_timeout){said} (full log: "
                              f"{ctx.log})")
        important = [ln.strip() for ln in output if ln.strip() and (
            ln.startswith(("Error", "error:", " - ", "Problem", "No match", "Package ", "Public key", "warning:"))
            or any(p in ln for p in SIGNATURE_PATTERNS + CORRUPT_PATTERNS + MIRROR_PATTERNS + RESOLVE_PATTERNS))]
        tail = " | ".join((important or [ln.strip() for ln in output if ln.strip()])[-6:])
        text = "\n".join(output)
        full = "" if ctx.verbose else " (run with --verbose to see dnf's output)"
        if any(p in text for p in ("is not signed", "GPG check FAILED", "Public key for", "NOKEY", "BAD signature",
                                   "signature", "digest", "Digest", "not trusted")):
            return SignatureError(f"{what}: package signature or digest check failed: {tail}{full}")
        if any(p in text for p in CORRUPT_PATTERNS):
            return SignatureError(f"{what}: a downloaded package does not match its digest in the repository "
                                  f"metadata: {tail}{full}")
        if any(p in text for p in RESOLVE_PATTERNS):
            return BuildError(f"{what}: packages not found or not installable: {tail}{full}")
        if any(p in text for p in MIRROR_PATTERNS):
            return MirrorError(f"{what}: cannot download from the repository: {tail}{full}")
        return BuildError(f"{tool} failed (exit status {rc}) in {what}: {tail}{full}")

    # ---- the steps ----

    def bootstrap(self, ctx: BuildContext) -> bool:
        self._ctx = ctx
        ctx.root.mkdir(parents=True, exist_ok=True)
        packages = ctx.template.packages
        if not packages:
            raise TemplateError(f"{ctx.template.path / DEFINITION_FILE}: packages: a dnf template lists the "
                                f"packages of its base system")
        self._dnf(ctx, ["install", *packages], f"{self.tool()} install {' '.join(packages)}")
        return True

    def install(self, ctx: BuildContext, packages: list[str]) -> None:
        if packages:
            self._dnf(ctx, ["install", *packages], f"{self.tool()} install {' '.join(packages)}")

    def remove(self, ctx: BuildContext, packages: list[str]) -> None:
        if packages:
            self._dnf(ctx, ["remove", *packages], f"{self.tool()} remove {' '.join(packages)}")

    def upgrade(self, ctx: BuildContext) -> None:
        self._dnf(ctx, ["upgrade", "--refresh"], f"{self.tool()} upgrade")

    def clean(self, ctx: BuildContext) -> None:
        root = ctx.root
        for db in [*root.glob("var/lib/dnf/*.sqlite"), *root.glob("var/lib/rpm/*.sqlite"),
                   *root.glob("usr/lib/sysimage/rpm/*.sqlite")]:
            checkpoint_sqlite(db)
        for pattern in (f"{CACHE_IN_ROOT}/*", "var/cache/yum/*", "var/log/dnf*", "var/log/yum.log", "var/log/hawkey.log",
                        "var/lib/dnf/repos/*", "var/lib/rpm/__db.*", "var/lib/rpm/.rpm.lock", "var/lib/rpm/.dbenv.lock",
                        "usr/lib/sysimage/rpm/.rpm.lock", "usr/lib/sysimage/rpm/__db.*",
                        "usr/lib/sysimage/rpm/.dbenv.lock", "var/lib/rpm/*-shm", "var/lib/rpm/*-wal",
                        "usr/lib/sysimage/rpm/*-shm", "usr/lib/sysimage/rpm/*-wal", "root/.rpmdb"):
            remove_matches(root, pattern)

    # ---- status and the manifest ----

    def available_updates(self, template: Template, manifest: Manifest, settings: Settings, *,
                          refresh: bool = False) -> AvailableUpdates:
        import tempfile

        from ..build.sources import template_sources
        from . import dnf_status

        with tempfile.TemporaryDirectory(prefix="vzpkg-status-") as tmp:  # downloaded keys, GnuPG homes
            work = Path(tmp)
            ctx = BuildContext.from_sources(template, settings, template_sources(template, settings), work,
                                            work / "log")
            return dnf_status.available_updates(self.repositories(ctx), self.variables(ctx), ctx.native_arch,
                                                self.conf_dir(ctx), template, manifest, settings, refresh=refresh)

    def installed_packages(self, root: Path) -> list[dict[str, Any]]:
        ctx = self._ctx
        dbpath = find_rpmdb(root, self.dbpath(ctx) if ctx else None)
        packages, reader = read_rpmdb(root, dbpath)
        if ctx is not None:
            ctx.facts["rpmdb_reader"] = reader
            ctx.note(f"rpmdb {dbpath} read with {'the rpm Python bindings' if reader == 'python-rpm' else 'the rpm command'}")
            self.clean(ctx)  # reading may leave lock or journal files behind
        return packages
