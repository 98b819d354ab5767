"""`vzpkg status` for dnf (and yum) templates: repomd.xml and primary metadata against the manifest.

Nothing is unpacked. For each enabled repository of the template, repomd.xml is taken from the metadata cache
or fetched (a mirrorlist or metalink is resolved to its first mirror, as the dnf backend does), and, when the
repository sets repo_gpgcheck, checked against repomd.xml.asc with the template's keys. A repository whose
repomd.xml is byte-identical to the one recorded in the manifest (`repomd_sha256`) offers nothing new, so its
primary metadata is not read; for the others primary is downloaded (its checksum checked against repomd.xml),
parsed, and every installed package with a higher epoch:version-release there (rpm's order, `compare_evr`) is an
update. Package signatures are not looked at here: dnf checks them (gpgcheck) when update-cache installs.
"""

from __future__ import annotations

import fnmatch
import re
import tempfile
from pathlib import Path
from typing import Any

from ..config import Settings
from ..distro import get_distribution
from ..errors import UsageError
from ..repo.rpm import compare_evr
from ..template import Template

RPM_MANAGERS = ("dnf", "yum")

# (epoch, version, release, arch, repository label)
Candidate = tuple[str, str, str, str, str]


def evr_string(epoch: Any, version: str, release: str) -> str:
    """'E:V-R' as rpm prints it, without a zero epoch."""
    e = str(epoch) if epoch not in (None, "", "(none)") else "0"
    return (f"{e}:" if e != "0" else "") + f"{version}-{release}"


def _patterns(value: Any) -> list[str]:
    if not value:
        return []
    words = value if isinstance(value, list) else [value]
    return [w for v in words for w in re.split(r"[\s,]+", str(v)) if w]


def repo_filter(section: dict[str, Any]):
    """A predicate on package names from the repository's `exclude` and `includepkgs` (dnf's globs)."""
    exclude = _patterns(section.get("exclude"))
    include = _patterns(section.get("includepkgs"))

    def allowed(name: str) -> bool:
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            return False
        return not include or any(fnmatch.fnmatchcase(name, p) for p in include)

    return allowed


def arch_matches(installed_arch: str, candidate_arch: str, native_arch: str) -> bool:
    """Whether dnf would upgrade an installed package of INSTALLED_ARCH to one of CANDIDATE_ARCH: the same
    architecture, or noarch (either way round, for the native architecture)."""
    if candidate_arch == installed_arch or candidate_arch == "noarch":
        return True
    return installed_arch == "noarch" and candidate_arch == native_arch


def find_updates(installed: list[dict[str, Any]], offered: dict[str, list[Candidate]],
                 native_arch: str) -> list[dict[str, Any]]:
    """Every installed package (manifest entries: name, epoch, version, release, arch) for which OFFERED holds a
    higher epoch:version-release of a matching architecture: name, architecture, cached, available, repository."""
    updates = []
    for pkg in installed:
        arch = pkg.get("arch") or pkg.get("architecture") or ""
        mine = (str(pkg.get("epoch") or 0), pkg["version"], pkg.get("release") or "")
        best: Candidate | None = None
        for cand in offered.get(pkg["name"], []):
            if not arch_matches(arch, cand[3], native_arch):
                continue
            if best is None or compare_evr(cand[:3], best[:3]) > 0:
                best = cand
        if best is not None and compare_evr(best[:3], mine) > 0:
            updates.append({"name": pkg["name"], "architecture": arch,
                            "cached": pkg.get("evr") or evr_string(*mine),
                            "available": evr_string(*best[:3]), "available_architecture": best[3],
                            "repository": best[4]})
    return updates


def rpm_context(template: Template, settings: Settings, work_dir: Path):
    """(backend, ctx): the dnf backend and a build context for reading the template's repositories (nothing
    is built; WORK_DIR only receives downloaded keys)."""
    from ..pkgmgr import get_backend
    from ..pkgmgr.base import BuildContext

    distro = get_distribution(template["distribution"])
    mirrors = distro.mirrors(settings)
    arch = distro.native_arch(template["architecture"])
    ctx = BuildContext(template=template, settings=settings, root=work_dir / "root", work_dir=work_dir,
                       mirrors=mirrors, native_arch=arch,
                       repositories=template.render_repositories(template.render_context(mirrors, arch)),
                       keyring=None, package_cache=settings.package_cache_dir, log=work_dir / "log")
    return get_backend(template["package_manager"]), ctx


def compare_rpm(template: Template, manifest: dict[str, Any], settings: Settings, *,
                refresh: bool = False) -> dict[str, Any]:
    """The status report of a dnf template's cache (the same shape as status.compare's)."""
    from ..pkgmgr.dnf import expand_repository, verify_repomd_signature
    from ..repo.metadata_cache import RpmMetadataCache
    from ..repo.rpm import resolve_baseurl
    from .status import status_report

    if template["package_manager"] not in RPM_MANAGERS:
        raise UsageError(f"template {template.name}: not a dnf template")
    metadata = RpmMetadataCache(settings.metadata_cache_dir, settings.metadata_expire, refresh)
    recorded = {r.get("id"): r for r in manifest.get("repositories", []) if r.get("id")}
    states: list[dict[str, Any]] = []
    offered: dict[str, list[Candidate]] = {}
    with tempfile.TemporaryDirectory(prefix="vzpkg-status-") as tmp:  # downloaded keys, a GnuPG home
        backend, ctx = rpm_context(template, settings, Path(tmp))
        sections = [r for r in backend.repositories(ctx) if r["enabled"]]
        if any(r["repo_gpgcheck"] for r in sections):
            backend._fetch_keys(ctx)  # keys as local files, for the repomd.xml signature check
        variables = backend.variables(ctx)
        for repo in sections:
            sub = expand_repository(repo, variables)
            base = sub.get("baseurl")
            source = ((base if isinstance(base, str) else base[0]).split()[0] if base
                      else sub.get("metalink") or sub.get("mirrorlist"))
            verify = None
            if repo["repo_gpgcheck"]:
                def verify(md, asc, repo=repo):
                    verify_repomd_signature(repo, md.baseurl, md.raw, asc, Path(tmp))
            md = metadata.repomd(source, lambda sub=sub: resolve_baseurl(sub), verify)
            old = recorded.get(repo["id"])
            changed = old is None or old.get("repomd_sha256") != md.sha256
            states.append({"id": repo["id"], **md.state(), "gpgcheck": repo["gpgcheck"], "changed": changed})
            if changed:
                allowed = repo_filter(repo)
                label = f"{repo['id']} {md.baseurl}"
                for name, versions in metadata.primary(md).items():
                    if allowed(name):
                        offered.setdefault(name, []).extend((e, v, r, a, label) for e, v, r, a in versions)

    updates = find_updates(manifest.get("packages", []), offered, ctx.native_arch)
    return status_report(template, manifest, updates, states)
