"""Template → where its packages come from: mirrors, architecture, rendered repositories, keyring.

One step shared by create-cache, update-cache and `vzpkg status` (for every package manager), so the three
can never disagree about which repositories a template names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Settings
from ..distro import get_distribution
from ..template import Template


@dataclass(frozen=True)
class Sources:
    mirrors: dict[str, str]        # mirror, security_mirror, ... (the distribution's, as configured)
    native_arch: str               # the package manager's name of the architecture: amd64, x86_64, ...
    repositories: list[Any]        # the template's repository entries, rendered: apt lines or dnf entries
    keyring: Path | None           # the keyring verifying apt repositories (dnf templates name gpg_keys)


def template_sources(template: Template, settings: Settings) -> Sources:
    """The sources of TEMPLATE with SETTINGS' mirrors (ConfigError when the distribution has no mirror)."""
    distro = get_distribution(template["distribution"])
    mirrors = distro.mirrors(settings)
    native_arch = distro.native_arch(template["architecture"])
    repositories = template.render_repositories(template.render_context(mirrors, native_arch))
    keyring = template.get("keyring") or distro.default_keyring()
    return Sources(mirrors, native_arch, repositories, Path(keyring) if keyring else None)
