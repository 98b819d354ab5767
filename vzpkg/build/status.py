"""Is a cache current? Compare the repositories' signed metadata and the template definition with its manifest.

Nothing is unpacked. For each repository of the template the InRelease is fetched (or taken from the metadata
cache) and verified with gpgv and the template's keyring. A repository whose InRelease is byte-identical to the
one recorded in the manifest offers nothing new, so its Packages files are not even read; for the others the
Packages files (sha256-checked against the verified InRelease) are parsed, and every installed package with a
higher version there is an update. The template definition changed when its digest differs from the manifest's.
dnf (and yum) templates are compared by status_rpm (repomd.xml, primary, rpm's version order).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Settings
from ..distro import get_distribution
from ..errors import SignatureError, UsageError
from ..repo.apt import AptRepository, compare_versions
from ..repo.metadata_cache import MetadataCache
from ..store.cache import CacheStore
from ..template import Template, TemplateRepository


@dataclass
class RepositoryState:
    repo: AptRepository
    date: str
    inrelease_sha256: str
    changed: bool

    def manifest_entry(self) -> dict[str, Any]:
        """The form create-cache records in the manifest."""
        return {"uri": self.repo.uri, "suite": self.repo.suite, "components": list(self.repo.components),
                "date": self.date, "inrelease_sha256": self.inrelease_sha256}


def template_repositories(template: Template, settings: Settings) -> tuple[list[AptRepository], Path, str]:
    """The template's rendered repositories, its keyring and the native architecture."""
    if template["package_manager"] != "apt":
        raise UsageError(f"template {template.name}: status and update-cache support apt and dnf templates only "
                         f"(package manager {template['package_manager']!r}); rebuild with 'vzpkg create-cache --force'")
    distro = get_distribution(template["distribution"])
    mirrors = distro.mirrors(settings)
    arch = distro.native_arch(template["architecture"])
    lines = template.render_repositories(template.render_context(mirrors, arch))
    keyring = template.get("keyring") or distro.default_keyring()
    if not keyring:
        raise SignatureError(f"template {template.name} names no keyring: its repositories cannot be verified")
    repos = []
    for line in lines:
        if not isinstance(line, str):
            raise UsageError(f"template {template.name}: repository {line!r} is not a 'deb URI SUITE COMPONENT...' line")
        try:
            repos.append(AptRepository.parse(line))
        except ValueError as e:
            raise UsageError(f"template {template.name}: {e}") from e
    return repos, Path(keyring), arch


def compare(template: Template, manifest: dict[str, Any], settings: Settings, *, refresh: bool = False) -> dict[str, Any]:
    """The status report of one cache (see `check_status`)."""
    if template["package_manager"] in ("dnf", "yum"):
        from .status_rpm import compare_rpm

        return compare_rpm(template, manifest, settings, refresh=refresh)
    repos, keyring, arch = template_repositories(template, settings)
    metadata = MetadataCache(settings.metadata_cache_dir, settings.metadata_expire, refresh)
    recorded = {(r.get("uri"), r.get("suite")): r for r in manifest.get("repositories", [])}

    states: list[RepositoryState] = []
    # name -> [(version, arch, repository label)] from the repositories that changed since the build
    offered: dict[str, list[tuple[str, str, str]]] = {}
    for repo in repos:
        info = metadata.release(repo, keyring)
        old = recorded.get((repo.uri, repo.suite))
        changed = old is None or old.get("inrelease_sha256") != info.sha256
        states.append(RepositoryState(repo, info.date, info.sha256, changed))
        if changed:
            label = f"{repo.uri} {repo.suite}"
            for name, versions in metadata.packages(repo, arch, info.text).items():
                offered.setdefault(name, []).extend((v, a, label) for v, a in versions)

    updates = []
    for pkg in manifest.get("packages", []):
        best: tuple[str, str] | None = None
        for version, parch, label in offered.get(pkg["name"], []):
            if parch not in (arch, "all", pkg.get("architecture")):
                continue
            if best is None or compare_versions(version, best[0]) > 0:
                best = (version, label)
        if best is not None and compare_versions(best[0], pkg["version"]) > 0:
            updates.append({"name": pkg["name"], "architecture": pkg.get("architecture", ""),
                            "cached": pkg["version"], "available": best[0], "repository": best[1]})

    return status_report(template, manifest, updates,
                         [{**s.manifest_entry(), "changed": s.changed} for s in states])


def status_report(template: Template, manifest: dict[str, Any], updates: list[dict[str, Any]],
                  repositories: list[dict[str, Any]]) -> dict[str, Any]:
    """What `vzpkg status` reports, whatever the package manager: updates, template changes, repositories."""
    installed = {p["name"] for p in manifest.get("packages", [])}
    plan = template_changes(template, manifest)
    template_changed = manifest.get("template_digest") != template.digest()
    return {
        "name": template.name,
        "cache_created": manifest.get("created"),
        "cache_sha256": manifest.get("sha256"),
        "template_changed": template_changed,
        "install": plan["install"],
        "remove": [p for p in plan["remove"] if p in installed],
        "updates": updates,
        "repositories": repositories,
        "current": not template_changed and not updates,
        "checked": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def repository_label(state: dict[str, Any]) -> str:
    """A repository state entry as one line: 'URI SUITE' (apt) or 'ID BASEURL' (dnf)."""
    if "uri" in state:
        return f"{state['uri']} {state.get('suite', '')}".strip()
    return f"{state.get('id', '?')} {state.get('baseurl', '')}".strip()


def template_changes(template: Template, manifest: dict[str, Any]) -> dict[str, list[str]]:
    """Packages the template now wants that the cache lacks, and packages it no longer wants.

    Dropped packages are known when the manifest records the template's package list (`template_packages`);
    packages named in `remove_packages` are purged whenever they are installed."""
    installed = {p["name"] for p in manifest.get("packages", [])}
    wanted = template.packages
    install = [p for p in wanted if p not in installed]
    remove = [p for p in manifest.get("template_packages", []) if p not in wanted and p in installed]
    remove += [p for p in template.get("remove_packages", []) if p in installed and p not in remove]
    return {"install": install, "remove": remove}


def check_status(name: str, settings: Settings, *, refresh: bool = False) -> dict[str, Any]:
    """Compare the cache of template NAME with its repositories and definition, without unpacking it.

    Returns {name, current, template_changed, updates: [{name, architecture, cached, available, repository}],
    install, remove, repositories: [... changed], cache_created, cache_sha256, checked}."""
    template = TemplateRepository(settings.template_dirs).load(name)
    manifest = CacheStore(settings.cache_dir).read_manifest(name)
    return compare(template, manifest, settings, refresh=refresh)
