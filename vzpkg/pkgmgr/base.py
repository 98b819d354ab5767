"""The package-manager interface, and what a backend gets to work with."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Settings
from ..template import Template


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
        return None

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

    def installed_packages(self, root: Path) -> list[dict[str, str]]:
        """Every installed package: name, version, architecture (and epoch/release for rpm)."""
        raise NotImplementedError
