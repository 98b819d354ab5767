"""`vzpkg status` for apt templates: the repositories' signed InRelease and Packages against the manifest.

Nothing is unpacked. For each repository of the template the InRelease is fetched (or taken from the metadata
cache) and verified with gpgv and the template's keyring. A repository whose InRelease is byte-identical to the
one recorded in the manifest offers nothing new, so its Packages files are not even read; for the others the
Packages files (sha256-checked against the verified InRelease) are parsed, and every installed package with a
higher version there is an update.
"""

from __future__ import annotations

from ..build.sources import template_sources
from ..config import Settings
from ..errors import SignatureError, UsageError
from ..manifest.model import Manifest
from ..repo.apt import AptRepository, compare_versions
from ..repo.metadata_cache import MetadataCache
from ..template import Template
from .base import AvailableUpdates, PackageChange


def repository_state(repo: AptRepository, date: str, inrelease_sha256: str) -> dict[str, object]:
    """A repository's state as create-cache records it in the manifest."""
    return {"uri": repo.uri, "suite": repo.suite, "components": list(repo.components), "date": date,
            "inrelease_sha256": inrelease_sha256}


def parse_repositories(template: Template, lines: list[object]) -> list[AptRepository]:
    """The template's rendered repository lines as AptRepository (UsageError naming the template otherwise)."""
    repos = []
    for line in lines:
        if not isinstance(line, str):
            raise UsageError(f"template {template.name}: repository {line!r} is not a 'deb URI SUITE COMPONENT...' line")
        try:
            repos.append(AptRepository.parse(line))
        except ValueError as e:
            raise UsageError(f"template {template.name}: {e}") from e
    return repos


def available_updates(template: Template, manifest: Manifest, settings: Settings, *,
                      refresh: bool = False) -> AvailableUpdates:
    sources = template_sources(template, settings)
    if sources.keyring is None:
        raise SignatureError(f"template {template.name} names no keyring: its repositories cannot be verified")
    repos = parse_repositories(template, sources.repositories)
    arch = sources.native_arch
    metadata = MetadataCache(settings.metadata_cache_dir, settings.metadata_expire, refresh)
    recorded = {(r.get("uri"), r.get("suite")): r for r in manifest.repositories}

    states: list[dict[str, object]] = []
    # name -> [(version, arch, repository label)] from the repositories that changed since the build
    offered: dict[str, list[tuple[str, str, str]]] = {}
    for repo in repos:
        info = metadata.release(repo, sources.keyring)
        old = recorded.get((repo.uri, repo.suite))
        changed = old is None or old.get("inrelease_sha256") != info.sha256
        states.append({**repository_state(repo, info.date, info.sha256), "changed": changed})
        if changed:
            label = f"{repo.uri} {repo.suite}"
            for name, versions in metadata.packages(repo, arch, info.text).items():
                offered.setdefault(name, []).extend((v, a, label) for v, a in versions)

    updates = []
    for pkg in manifest.packages:
        best: tuple[str, str] | None = None
        for version, parch, label in offered.get(pkg.name, []):
            if parch not in (arch, "all", pkg.architecture):
                continue
            if best is None or compare_versions(version, best[0]) > 0:
                best = (version, label)
        if best is not None and compare_versions(best[0], pkg.version or "") > 0:
            updates.append(PackageChange(pkg.name, pkg.architecture or "", pkg.version or "", best[0], best[1]))
    return AvailableUpdates(updates, states)
