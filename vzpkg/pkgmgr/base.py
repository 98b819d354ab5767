"""The package-manager interface, and what a backend gets to work with."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..build.sources import Sources
from ..config import Settings
from ..errors import UsageError
from ..manifest.model import Manifest
from ..template import Template
from .names import package_name_problem


@dataclass
class BuildContext:
    template: Template
    settings: Settings
    root: Path                       # the root being built (inside the work dir)
    work_dir: Path                   # temporary, beside the cache; removed at the end
    mirrors: dict[str, str]          # mirror, security_mirror, ...
    native_arch: str                 # amd64, x86_64, ...
    repositories: list[Any]          # rendered template repositories
    keyring: Path | None
    package_cache: Path              # downloaded packages kept between builds
    log: Path                        # where command output goes unless verbose
    verbose: bool = False
    note: Callable[[str], None] = lambda _msg: None   # verbose-only remarks
    facts: dict[str, Any] = field(default_factory=dict)  # backend findings for the manifest

    @classmethod
    def from_sources(cls, template: Template, settings: Settings, sources: Sources, work_dir: Path, log: Path,
                     **options: Any) -> BuildContext:
        """A context for building TEMPLATE from SOURCES (vzpkg.build.sources) in WORK_DIR."""
        return cls(template=template, settings=settings, root=work_dir / "root", work_dir=work_dir,
                   mirrors=sources.mirrors, native_arch=sources.native_arch, repositories=sources.repositories,
                   keyring=sources.keyring, package_cache=settings.package_cache_dir, log=log, **options)

    @property
    def quiet(self) -> bool:
        return not self.verbose

    def env(self) -> dict[str, str]:
        """Environment for package installation and scripts: a clean one plus the template's variables."""
        base = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LC_ALL": "C.UTF-8",
            "DEBIAN_FRONTEND": "noninteractive",
            "DEBCONF_NONINTERACTIVE_SEEN": "true",
            "HOME": "/root",
            "VZPKG_TEMPLATE": self.template.name,
            "VZPKG_ROOT": str(self.root),
        }
        for key in ("SOURCE_DATE_EPOCH", "http_proxy", "https_proxy", "no_proxy", "TMPDIR"):
            if key in os.environ:
                base[key] = os.environ[key]
        base.update(self.template.environment)
        return base


@dataclass(frozen=True)
class PackageChange:
    """A package of the cache with a newer version in the repositories (one entry of `vzpkg status`)."""

    name: str
    architecture: str
    cached: str                                # the version in the cache (rpm: [E:]V-R)
    available: str                             # the newest version offered
    repository: str                            # where: 'URI SUITE' (apt) or 'ID BASEURL' (dnf)
    available_architecture: str | None = None  # rpm only: noarch may replace an arch package and back

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "architecture": self.architecture, "cached": self.cached,
               "available": self.available, "repository": self.repository}
        if self.available_architecture is not None:
            out["available_architecture"] = self.available_architecture
        return out


@dataclass
class AvailableUpdates:
    """What a backend finds in the repositories' metadata against a manifest."""

    updates: list[PackageChange]
    #: each repository's state as the manifest records it, plus "changed" (its metadata differs from the build's)
    repositories: list[dict[str, Any]]


class PackageManager:
    """One backend per package manager. Steps run in this order by vzpkg.build."""

    name = ""

    def bootstrapper_name(self, ctx: BuildContext) -> str:
        """The program that creates the root (recorded in the manifest; part of the build-stage key)."""
        return self.name

    def package_name_problem(self, name: str) -> str | None:
        """Why NAME is not a package name this package manager takes (a phrase), or None when it is one.

        Template validation asks this for every package a template names, so nothing that is not a package name
        (an option, a shell word) ever reaches the package manager's command line."""
        return package_name_problem(self.name, name)

    def check_host(self, ctx: BuildContext) -> None:
        """Raise MissingToolError when a host program the backend needs is absent."""

    def check_repositories(self, ctx: BuildContext) -> list[dict[str, Any]]:
        """Fetch and verify repository metadata before any work: fail fast on a bad mirror or signature.

        Returns the repository state recorded in the manifest."""
        return []

    def bootstrap(self, ctx: BuildContext) -> bool:
        """Create ctx.root with the base system. Return True when the template's packages are already in."""
        raise NotImplementedError

    def write_repositories(self, ctx: BuildContext) -> bool:
        """Make the root's own repository configuration name the template's repositories, for package
        managers that read it from the root (apt's sources.list). True when it had to change."""
        return False

    def install(self, ctx: BuildContext, packages: list[str]) -> None:
        raise NotImplementedError

    def remove(self, ctx: BuildContext, packages: list[str]) -> None:
        raise NotImplementedError

    def upgrade(self, ctx: BuildContext) -> None:
        raise NotImplementedError

    def clean(self, ctx: BuildContext) -> None:
        """Remove the package manager's caches, lists, locks and logs from the root."""

    def available_updates(self, template: Template, manifest: Manifest, settings: Settings, *,
                          refresh: bool = False) -> AvailableUpdates:
        """Compare the repositories' metadata (signature-checked, through the metadata cache; REFRESH asks the
        mirrors even when it is fresh) with the packages of MANIFEST, without unpacking anything."""
        raise UsageError(f"template {template.name}: status and update-cache support apt and dnf templates only "
                         f"(package manager {self.name!r}); rebuild with 'vzpkg create-cache --force'")

    def installed_packages(self, root: Path) -> list[dict[str, str]]:
        """Every installed package: name, version, architecture (and epoch/release for rpm)."""
        raise NotImplementedError
