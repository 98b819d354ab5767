"""The Distribution interface."""

from __future__ import annotations

from typing import ClassVar

from ..config import Settings

ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


class Distribution:
    name: ClassVar[str] = ""
    #: the package managers this distribution can be built with
    package_managers: ClassVar[tuple[str, ...]] = ()
    #: mirror names a template of this distribution may refer to, first one is the main mirror
    mirror_names: ClassVar[tuple[str, ...]] = ()
    #: the jinja2 variables mirrors() provides (validate renders templates with placeholders for them)
    mirror_variables: ClassVar[tuple[str, ...]] = ("mirror",)

    def native_arch(self, architecture: str) -> str:
        """The architecture name the package manager uses (amd64 for Debian's x86_64)."""
        return architecture

    def mirrors(self, settings: Settings) -> dict[str, str]:
        """Mirror URLs for template rendering, keyed by a jinja2-friendly name (mirror, security_mirror)."""
        raise NotImplementedError

    def default_keyring(self) -> str | None:
        return None


#: name -> class; the built-in distributions register themselves when vzpkg.distro loads them
_REGISTRY: dict[str, type[Distribution]] = {}


def register(cls: type[Distribution]) -> type[Distribution]:
    _REGISTRY[cls.name] = cls
    return cls
