"""Is a cache current? Compare the repositories' signed metadata and the template definition with its manifest.

Nothing is unpacked. The template's package-manager backend reads its repositories' metadata against the
manifest's packages (`PackageManager.available_updates`: InRelease and Packages for apt, in
vzpkg/pkgmgr/apt_status.py; repomd.xml and primary for dnf, in vzpkg/pkgmgr/dnf_status.py). The template
definition changed when its digest differs from the manifest's.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..manifest.model import Manifest
from ..pkgmgr import get_backend
from ..pkgmgr.base import PackageChange
from ..store.cache import CacheStore
from ..template import Template, TemplateRepository


@dataclass
class StatusReport:
    """What `vzpkg status` reports about one cache (its JSON is `to_dict()`)."""

    name: str
    cache_created: str | None
    cache_sha256: str | None
    template_changed: bool
    install: list[str]                     # packages the template now wants that the cache lacks
    remove: list[str]                      # installed packages the template no longer wants
    updates: list[PackageChange]
    repositories: list[dict[str, Any]]     # each repository's state, with "changed"
    current: bool
    checked: str                           # when, UTC, ISO 8601

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "cache_created": self.cache_created, "cache_sha256": self.cache_sha256,
                "template_changed": self.template_changed, "install": self.install, "remove": self.remove,
                "updates": [u.to_dict() for u in self.updates], "repositories": self.repositories,
                "current": self.current, "checked": self.checked}

    def changed_repositories(self) -> list[str]:
        return [repository_label(r) for r in self.repositories if r["changed"]]


def compare(template: Template, manifest: Manifest, settings: Settings, *, refresh: bool = False) -> StatusReport:
    """The status report of one cache (see `check_status`)."""
    found = get_backend(template["package_manager"]).available_updates(template, manifest, settings, refresh=refresh)
    plan = template_changes(template, manifest)
    template_changed = manifest.template_digest != template.digest()
    installed = manifest.package_names()
    return StatusReport(
        name=template.name,
        cache_created=manifest.created,
        cache_sha256=manifest.sha256,
        template_changed=template_changed,
        install=plan["install"],
        remove=[p for p in plan["remove"] if p in installed],
        updates=found.updates,
        repositories=found.repositories,
        current=not template_changed and not found.updates,
        checked=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )


def repository_label(state: dict[str, Any]) -> str:
    """A repository state entry as one line: 'URI SUITE' (apt) or 'ID BASEURL' (dnf)."""
    if "uri" in state:
        return f"{state['uri']} {state.get('suite', '')}".strip()
    return f"{state.get('id', '?')} {state.get('baseurl', '')}".strip()


def template_changes(template: Template, manifest: Manifest) -> dict[str, list[str]]:
    """Packages the template now wants that the cache lacks, and packages it no longer wants.

    Dropped packages are known when the manifest records the template's package list (`template_packages`);
    packages named in `remove_packages` are purged whenever they are installed."""
    installed = manifest.package_names()
    wanted = template.packages
    install = [p for p in wanted if p not in installed]
    remove = [p for p in manifest.template_packages if p not in wanted and p in installed]
    remove += [p for p in template.get("remove_packages", []) if p in installed and p not in remove]
    return {"install": install, "remove": remove}


def check_status(name: str, settings: Settings, *, refresh: bool = False) -> StatusReport:
    """Compare the cache of template NAME with its repositories and definition, without unpacking it."""
    template = TemplateRepository(settings.template_dirs).load(name)
    manifest = CacheStore(settings.cache_dir).load_manifest(name)
    return compare(template, manifest, settings, refresh=refresh)
