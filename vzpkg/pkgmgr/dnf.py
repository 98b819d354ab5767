"""dnf (yum where only yum exists): install into the root with `dnf --installroot`, from the host.

Everything dnf reads comes from files vzpkg writes into the work dir: a dnf.conf holding the template's
repositories (no host repository, variable or plugin is used), the template's GPG keys, and an rpm macro file
that puts the rpmdb where the distribution's own rpm looks for it (Debian's rpm would otherwise put it under
~/.rpmdb). Downloaded packages and repository metadata are kept between builds in the package cache, bind-mounted
over the root's /var/cache/dnf while dnf runs.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from .. import process
from ..build.chroot import build_mounts, run_tool, unmount_below
from ..build.inroot import remove_matches, require_inside
from ..errors import BuildError, MirrorError, MissingToolError, SignatureError, TemplateError
from ..template import DEFINITION_FILE, render_string
from . import gnupg
from .base import BuildContext, PackageManager

#: repository-table keys a template may use; each becomes the dnf option of the same name (`id` names the section)
REPO_KEYS = {
    "id": str, "name": str, "baseurl": (str, list), "mirrorlist": str, "metalink": str, "gpgcheck": bool,
    "repo_gpgcheck": bool, "gpgkey": (str, list), "enabled": bool, "priority": int, "cost": int,
    "exclude": (str, list), "includepkgs": (str, list), "module_hotfixes": bool, "sslverify": bool,
    "skip_if_unavailable": bool, "metadata_expire": (str, int), "countme": bool,
}
CACHE_IN_ROOT = "var/cache/dnf"
RPMDB_CANDIDATES = ("/var/lib/rpm", "/usr/lib/sysimage/rpm")
#: a plain RPM package name (Fedora's naming guidelines: ASCII letters, digits and - . _ +), not starting with
#: - . or +; no version, arch, file path, provide or @group: status and update-cache compare names with the rpmdb's
PACKAGE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
_ID_RE = re.compile(r"[^A-Za-z0-9_.:-]+")

SIGNATURE_PATTERNS = ("is not signed", "GPG check FAILED", "Public key for", "signature", "Signature", "digest",
                      "Digest", "NOKEY", "BAD", "not trusted", "is not installed")
CORRUPT_PATTERNS = ("checksum doesn't match", "is corrupted", "Checksum", "checksum mismatch", "incorrect checksum")
MIRROR_PATTERNS = ("Cannot download repomd.xml", "Failed to download metadata", "Curl error", "Connection refused",
                   "Couldn't connect", "Cannot find a valid baseurl", "Could not resolve host",
                   "Librepo error", "Cannot download", "Failed to download packages")
RESOLVE_PATTERNS = ("No match for argument", "Unable to find a match", "nothing provides", "conflicting requests",
                    "Problem:", "No package", "is filtered out")


# ---- template → dnf configuration (pure functions, unit-tested) -------------------------------------------

def _where(template: Any, i: int, key: str | None = None) -> str:
    file = template.path / DEFINITION_FILE
    return f"{file}: repositories[{i}]" + (f".{key}" if key else "")


def normalize_repositories(template: Any, repositories: list[Any], gpg_keys: list[str]) -> list[dict[str, Any]]:
    """The template's rendered repository entries as dnf repository sections, checked strictly.

    A string entry is a base URL; a table uses the keys of REPO_KEYS. Repositories check package signatures
    (gpgcheck) unless the entry turns it off, with the entry's gpgkey or else every key of the template's gpg_keys.
    """
    sections: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, entry in enumerate(repositories):
        if isinstance(entry, str):
            entry = {"baseurl": entry}
        if not isinstance(entry, dict):
            raise TemplateError(f"{_where(template, i)}: expected a URL or a table, got {type(entry).__name__}")
        for key, value in entry.items():
            if key not in REPO_KEYS:
                raise TemplateError(f"{_where(template, i, key)}: unknown dnf repository key "
                                    f"(known: {', '.join(sorted(REPO_KEYS))})")
            want = REPO_KEYS[key]
            if not isinstance(value, want) or (isinstance(value, bool) and want in (int, (str, int))):
                raise TemplateError(f"{_where(template, i, key)}: unexpected value {value!r}")
        if not any(entry.get(k) for k in ("baseurl", "mirrorlist", "metalink")):
            raise TemplateError(f"{_where(template, i)}: needs one of baseurl, mirrorlist or metalink")
        repo_id = entry.get("id") or _ID_RE.sub("-", entry.get("name", "")).strip("-").lower() or f"repo{i}"
        if _ID_RE.search(repo_id):
            raise TemplateError(f"{_where(template, i, 'id')}: {repo_id!r} is not a valid repository id")
        if repo_id in seen:
            raise TemplateError(f"{_where(template, i, 'id')}: repository id {repo_id!r} is used twice")
        seen.add(repo_id)
        section: dict[str, Any] = {"id": repo_id, "name": entry.get("name", repo_id)}
        for key in ("baseurl", "mirrorlist", "metalink"):
            if entry.get(key):
                section[key] = entry[key]
        section["enabled"] = entry.get("enabled", True)
        section["gpgcheck"] = entry.get("gpgcheck", True)
        section["repo_gpgcheck"] = entry.get("repo_gpgcheck", False)
        keys = entry.get("gpgkey", gpg_keys)
        section["gpgkey"] = [keys] if isinstance(keys, str) else list(keys)
        for key, value in entry.items():
            if key not in section:
                section[key] = value
        sections.append(section)
    if not sections:
        raise TemplateError(f"{template.path / DEFINITION_FILE}: repositories: a dnf template needs at least one")
    return sections


def _ini_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def render_config(main: dict[str, Any], repos: list[dict[str, Any]]) -> str:
    """dnf.conf text: [main] then one section per repository."""
    lines = ["# written by vzpkg for one build; host configuration is not used", "[main]"]
    lines += [f"{k}={_ini_value(v)}" for k, v in main.items()]
    for repo in repos:
        lines += ["", f"[{repo['id']}]"]
        lines += [f"{k}={_ini_value(v)}" for k, v in repo.items() if k != "id" and v not in (None, [], "")]
    return "\n".join(lines) + "\n"


def main_options(*, weak_deps: bool, conf_dir: Path, module_platform_id: str | None) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "cachedir": "/" + CACHE_IN_ROOT,      # dnf puts it below the installroot; the package cache is mounted there
        "keepcache": True,
        "install_weak_deps": weak_deps,
        "gpgcheck": True,
        "localpkg_gpgcheck": True,
        "reposdir": str(conf_dir / "repos.d"),  # empty: only the repositories of this file
        "varsdir": str(conf_dir / "vars"),
        "plugins": False,
        "skip_if_unavailable": False,
        "best": True,
        "metadata_expire": 0,                  # repomd.xml is checked each build; unchanged metadata is reused
        "retries": 2,
        "timeout": 15,
        "diskspacecheck": False,
        "clean_requirements_on_remove": True,
        "debuglevel": 2,
    }
    if module_platform_id:
        opts["module_platform_id"] = module_platform_id
    return opts


def substitute(text: str, variables: dict[str, str]) -> str:
    """dnf's $var and ${var} substitution (for the URLs vzpkg fetches itself)."""
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return variables.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, text)


def expand_repository(repo: dict[str, Any], variables: dict[str, str]) -> dict[str, Any]:
    """A repository section with dnf's $variables substituted in its values (and in each base URL)."""
    sub = {k: substitute(v, variables) if isinstance(v, str) else v for k, v in repo.items()}
    if isinstance(sub.get("baseurl"), list):
        sub["baseurl"] = [substitute(u, variables) for u in sub["baseurl"]]
    return sub


_GPG_COUNT = re.compile(r"^(gpg: )?\s*(Total number processed|[\w /-]+): \d+$")


def gpg_reason(lines: list[str]) -> str:
    """gpg's last line that says something: not the import counters (`Total number processed: 0`, ...) it ends
    with, and without its `gpg: ` prefix."""
    said = [ln for ln in lines if ln.strip() and not _GPG_COUNT.match(ln.strip())]
    return said[-1].strip().removeprefix("gpg: ") if said else ""


def verify_repomd_signature(repo: dict[str, Any], baseurl: str, data: bytes, asc: bytes, tmp_parent: Path) -> None:
    """Check repomd.xml DATA against its detached signature ASC with the repository's keys (local file:// refs,
    as _fetch_keys leaves them) in a throwaway GnuPG home; raise SignatureError when it does not verify."""
    import tempfile

    tmp_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp_parent) as home:
        try:
            for ref in repo["gpgkey"]:
                key = ref[len("file://"):]
                # a key gpg cannot import must fail here, naming it: ignored, it surfaced as "signature check
                # failed" with no hint that the key file is the problem
                imported = process.run(["gpg", "--batch", "--homedir", home, "--import", key], capture=True,
                                       text=True, check=False)
                if imported.returncode != 0:
                    raise SignatureError(f"repository {repo['id']}: GPG key {key} cannot be imported: gpg: "
                                         f"{gpg_reason(imported.tail) or process.status_text(imported.returncode)}")
            (Path(home) / "repomd.xml").write_bytes(data)
            (Path(home) / "repomd.xml.asc").write_bytes(asc)
            proc = process.run(["gpg", "--batch", "--homedir", home, "--status-fd", "1", "--verify",
                                str(Path(home) / "repomd.xml.asc"), str(Path(home) / "repomd.xml")],
                               capture=True, text=True, check=False)
        finally:
            process.run(["gpgconf", "--homedir", home, "--kill", "all"], capture=True, check=False)
            # the home's socket directory (/run/user/0/gnupg/d.*, where /run/user/0 exists) goes with the home
            process.run(["gpgconf", "--homedir", home, "--remove-socketdir"], capture=True, check=False)
    if proc.returncode != 0 or "[GNUPG:] VALIDSIG" not in proc.stdout:
        raise SignatureError(f"{baseurl.rstrip('/')}/repodata/repomd.xml: signature check failed with the template's "
                             f"keys (repo_gpgcheck on repository {repo['id']})")


# ---- the backend -----------------------------------------------------------------------------------------------

class DnfBackend(PackageManager):
    def __init__(self, name: str = "dnf") -> None:
        self.name = name
        self._ctx: BuildContext | None = None
        self._repos: list[dict[str, Any]] | None = None

    def package_name_problem(self, name: str) -> str | None:
        if PACKAGE_NAME_RE.fullmatch(name):
            return None
        return ("is not an RPM package name (letters, digits, '-', '.', '_' and '+', starting with a letter, digit "
                "or '_'; no version, file path or @group)")

    # ---- host ----

    def tool(self) -> str | None:
        """dnf when the host has it, else yum (also for templates that say yum: dnf is yum's successor)."""
        for candidate in ("dnf", "yum"):
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

    def repositories(self, ctx: BuildContext) -> list[dict[str, Any]]:
        if self._repos is None:
            self._repos = normalize_repositories(ctx.template, ctx.repositories, self.gpg_key_refs(ctx))
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

    def _fetch_keys(self, ctx: BuildContext) -> None:
        """Download remote keys into the work dir (a key that cannot be had fails here, not inside dnf)."""
        from ..repo.http import fetch

        keydir = self.conf_dir(ctx) / "keys"
        cache: dict[str, str] = {}
        for repo in self.repositories(ctx):
            local = []
            for ref in repo["gpgkey"]:
                ref = substitute(ref, self.variables(ctx))
                if ref.startswith("file://"):
                    path = Path(ref[len("file://"):])
                    if not path.is_file():
                        raise SignatureError(f"repository {repo['id']}: GPG key {path} does not exist "
                                             f"(gpg_keys in {ctx.template.path / DEFINITION_FILE})")
                    local.append(ref)
                elif ref.startswith(("http://", "https://")):
                    if ref not in cache:
                        keydir.mkdir(parents=True, exist_ok=True)
                        data = fetch(ref).content
                        if b"PGP PUBLIC KEY" not in data:
                            raise SignatureError(f"{ref}: not an armored OpenPGP public key")
                        dest = keydir / f"{len(cache)}-{Path(ref).name or 'key'}"
                        dest.write_bytes(data)
                        cache[ref] = dest.as_uri()
                    local.append(cache[ref])
                else:
                    raise SignatureError(f"repository {repo['id']}: unsupported GPG key location {ref!r}")
            repo["gpgkey"] = local

    def check_repositories(self, ctx: BuildContext) -> list[dict[str, Any]]:
        from ..repo.rpm import fetch_repomd, resolve_baseurl

        self._ctx = ctx
        ctx.facts["rpmdb_path"] = self.dbpath(ctx)
        ctx.facts["releasever"] = self.releasever(ctx)
        repos = self.repositories(ctx)
        self._fetch_keys(ctx)
        variables = self.variables(ctx)
        state = []
        unchecked = []
        for repo in repos:
            if not repo["enabled"]:
                continue
            if not repo["gpgcheck"]:
                unchecked.append(repo["id"])
            elif not repo["gpgkey"]:
                raise SignatureError(f"repository {repo['id']} checks signatures (gpgcheck) but the template names "
                                     f"no key: add gpg_keys to {ctx.template.path / DEFINITION_FILE}, or the "
                                     f"repository's gpgkey")
            baseurl = resolve_baseurl(expand_repository(repo, variables))
            md = fetch_repomd(baseurl)
            if repo["repo_gpgcheck"]:
                self._verify_repomd(ctx, repo, baseurl, md.raw)
            state.append({"id": repo["id"], **md.state(), "gpgcheck": repo["gpgcheck"]})
            ctx.note(f"repository {repo['id']}: {baseurl} revision {md.revision or '?'}")
        if unchecked:
            ctx.note(f"warning: package signatures are NOT checked for repositories {', '.join(unchecked)} "
                     f"(gpgcheck = false in the template)")
            ctx.facts["unsigned_repositories"] = unchecked
        self.write_config(ctx)
        return state

    def _verify_repomd(self, ctx: BuildContext, repo: dict[str, Any], baseurl: str, data: bytes) -> None:
        from ..repo.http import fetch

        asc = fetch(f"{baseurl.rstrip('/')}/repodata/repomd.xml.asc").content
        verify_repomd_signature(repo, baseurl, data, asc, ctx.work_dir)

    # ---- running dnf ----

    def _argv(self, ctx: BuildContext, conf: Path) -> list[str]:
        tool = self.tool() or self.name
        argv = [tool, f"--installroot={ctx.root}", f"--config={conf}", f"--releasever={self.releasever(ctx)}",
                f"--setopt=reposdir={self.conf_dir(ctx) / 'repos.d'}", "--assumeyes", "--noplugins"]
        if tool == "dnf":
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
        """Run dnf, its output to the log (and the terminal with -v) and kept for the error message."""
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

    # ---- the manifest ----

    def installed_packages(self, root: Path) -> list[dict[str, Any]]:
        ctx = self._ctx
        dbpath = find_rpmdb(root, self.dbpath(ctx) if ctx else None)
        packages, reader = read_rpmdb(root, dbpath)
        if ctx is not None:
            ctx.facts["rpmdb_reader"] = reader
            ctx.note(f"rpmdb {dbpath} read with {'the rpm Python bindings' if reader == 'python-rpm' else 'the rpm command'}")
            self.clean(ctx)  # reading may leave lock or journal files behind
        return packages


def checkpoint_sqlite(db: Path) -> None:
    """Fold a SQLite write-ahead log into its database, so the cache carries no -wal/-shm files."""
    import sqlite3

    if not (db.with_name(db.name + "-wal").exists() or db.with_name(db.name + "-shm").exists()):
        return
    try:
        con = sqlite3.connect(str(db))
        try:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            con.close()
    except sqlite3.Error as e:
        raise BuildError(f"cannot checkpoint {db}: {e}") from e
    for suffix in ("-wal", "-shm"):
        leftover = db.with_name(db.name + suffix)
        if leftover.exists() and leftover.stat().st_size == 0:
            leftover.unlink()


def find_rpmdb(root: Path, preferred: str | None = None) -> str:
    """The rpmdb directory of ROOT (as a path inside the root)."""
    candidates = ([preferred] if preferred else []) + [c for c in RPMDB_CANDIDATES if c != preferred]
    for c in candidates:
        d = root / c.lstrip("/")
        if any((d / f).exists() for f in ("rpmdb.sqlite", "Packages", "Packages.db")):
            return c
    raise BuildError(f"no rpm database found in {root} (looked in {', '.join(candidates)})")


def _evr(epoch: Any, version: str, release: str) -> str:
    return (f"{epoch}:" if epoch else "") + f"{version}-{release}"


def _entry(name: str, epoch: Any, version: str, release: str, arch: str) -> dict[str, Any]:
    e = int(epoch) if epoch not in (None, "", "(none)") else 0
    return {"name": name, "epoch": e, "version": version, "release": release, "arch": arch,
            "architecture": arch, "evr": _evr(e, version, release)}


def read_rpmdb(root: Path, dbpath: str, force_command: bool = False) -> tuple[list[dict[str, Any]], str]:
    """Installed packages from ROOT's rpmdb: with the rpm Python bindings, else `rpm --root -qa`.

    Returns the packages (sorted by name, arch) and which reader was used: python-rpm or rpm-command."""
    if not force_command and os.environ.get("VZPKG_RPMDB_READER") != "rpm-command":
        try:
            import rpm
        except Exception:  # the PyPI shim raises ImportError (or worse) when python3-rpm is not installed
            rpm = None
        if rpm is not None:
            try:
                rpm.addMacro("_dbpath", dbpath)
                try:
                    ts = rpm.TransactionSet(str(root))
                    ts.setVSFlags(-1)
                    found = [_entry(_s(h["name"]), h["epoch"], _s(h["version"]), _s(h["release"]),
                                    _s(h["arch"] or "")) for h in ts.dbMatch() if _s(h["name"]) != "gpg-pubkey"]
                    ts.closeDB()
                finally:
                    rpm.delMacro("_dbpath")
            except rpm.error:
                pass  # an rpmdb these bindings cannot open: the rpm command says why, below
            else:
                return sorted(found, key=lambda p: (p["name"], p["arch"])), "python-rpm"
    if shutil.which("rpm") is None:
        raise MissingToolError("cannot read the rpmdb: neither the rpm Python bindings nor the rpm command is "
                               "available: apt-get install rpm python3-rpm")
    qf = "%{NAME}\\t%{EPOCH}\\t%{VERSION}\\t%{RELEASE}\\t%{ARCH}\\n"
    proc = process.run(["rpm", "--root", str(root), "--dbpath", dbpath, "-qa", "--qf", qf], capture=True, text=True,
                       error=BuildError, what=f"rpm -qa in {root}")
    found = []
    for line in proc.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 5 and parts[0] != "gpg-pubkey":
            found.append(_entry(parts[0], parts[1], parts[2], parts[3], "" if parts[4] == "(none)" else parts[4]))
    return sorted(found, key=lambda p: (p["name"], p["arch"])), "rpm-command"


def _s(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)
