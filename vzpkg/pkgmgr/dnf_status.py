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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import Settings
from ..manifest.model import Manifest, PackageEntry
from ..repo.metadata_cache import RpmMetadataCache
from ..repo.rpm import compare_evr, resolve_baseurl
from ..template import DEFINITION_FILE, Template
from .base import AvailableUpdates, PackageChange
from .dnf_keys import fetch_keys, verify_repomd_signature
from .dnf_repos import DnfRepo, expand_repository

# (epoch, version, release, arch, repository label)
Candidate = tuple[str, str, str, str, str]


def evr_string(epoch: Any, version: str, release: str) -> str:
    """'E:V-R' as rpm prints it, without a zero epoch."""
    e = str(epoch) if epoch not in (None, "", "(none)") else "0"
    return (f"{e}:" if e != "0" else "") + f"{version}-{release}"


def _patterns(value: Any) -> list[str]:
    if not value:
        return []
    words = value if isinstance(value, (list, tuple)) else [value]
    return [w for v in words for w in re.split(r"[\s,]+", str(v)) if w]


def repo_filter(repo: DnfRepo) -> Callable[[str], bool]:
    """A predicate on package names from the repository's `exclude` and `includepkgs` (dnf's globs)."""
    exclude = _patterns(repo.exclude)
    include = _patterns(repo.includepkgs)

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


def find_updates(installed: list[PackageEntry], offered: dict[str, list[Candidate]],
                 native_arch: str) -> list[PackageChange]:
    """Every installed package for which OFFERED holds a higher epoch:version-release of a matching
    architecture."""
    updates = []
    for pkg in installed:
        arch = pkg.arch or pkg.architecture or ""
        mine = (str(pkg.epoch or 0), pkg.version or "", pkg.release or "")
        best: Candidate | None = None
        for cand in offered.get(pkg.name, []):
            if not arch_matches(arch, cand[3], native_arch):
                continue
            if best is None or compare_evr(cand[:3], best[:3]) > 0:
                best = cand
        if best is not None and compare_evr(best[:3], mine) > 0:
            updates.append(PackageChange(pkg.name, arch, pkg.evr or evr_string(*mine), evr_string(*best[:3]),
                                         best[4], available_architecture=best[3]))
    return updates


def available_updates(repos: list[DnfRepo], variables: dict[str, str], native_arch: str, work: Path,
                      template: Template, manifest: Manifest, settings: Settings, *,
                      refresh: bool = False) -> AvailableUpdates:
    """The template's repositories (REPOS, their $VARIABLES) against MANIFEST; WORK (temporary) receives
    downloaded keys and GnuPG homes."""
    metadata = RpmMetadataCache(settings.metadata_cache_dir, settings.metadata_expire, refresh)
    recorded = {r.get("id"): r for r in manifest.repositories if r.get("id")}
    states: list[dict[str, Any]] = []
    offered: dict[str, list[Candidate]] = {}
    if any(r.enabled and r.repo_gpgcheck for r in repos):
        # keys as local files, for the repomd.xml signature check
        repos = fetch_keys(repos, variables, work / "keys", template.path / DEFINITION_FILE)
    for repo in (r for r in repos if r.enabled):
        sub = expand_repository(repo, variables)
        verify = None
        if repo.repo_gpgcheck:
            def verify(md, asc, repo=repo):
                verify_repomd_signature(repo, md.baseurl, md.raw, asc, work)
        md = metadata.repomd(sub.first_url, lambda sub=sub: resolve_baseurl(sub.options()), verify)
        old = recorded.get(repo.id)
        changed = old is None or old.get("repomd_sha256") != md.sha256
        states.append({"id": repo.id, **md.state(), "gpgcheck": repo.gpgcheck, "changed": changed})
        if changed:
            allowed = repo_filter(repo)
            label = f"{repo.id} {md.baseurl}"
            for name, versions in metadata.primary(md).items():
                if allowed(name):
                    offered.setdefault(name, []).extend((e, v, r, a, label) for e, v, r, a in versions)
    return AvailableUpdates(find_updates(manifest.packages, offered, native_arch), states)
