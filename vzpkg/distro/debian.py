"""Debian (and, by subclassing, its derivatives)."""

from __future__ import annotations

from ..config import Settings
from ..errors import ConfigError
from ..pkgmgr.names import APT
from .base import Distribution, register
from .hostapt import host_sources

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "i686": "i386", "armv7l": "armhf"}


@register
class Debian(Distribution):
    name = "debian"
    package_managers = (APT,)
    mirror_names = ("debian", "debian-security")
    mirror_variables = ("mirror", "security_mirror")
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"

    def native_arch(self, architecture: str) -> str:
        return _ARCH.get(architecture, architecture)

    def default_keyring(self) -> str:
        return self.keyring

    def _host_mirrors(self) -> tuple[str | None, str | None]:
        main = security = None
        for src in host_sources():
            if src.uri.startswith(("cdrom:", "file:")):
                continue
            is_security = any(s.endswith("-security") or s.endswith("/updates") for s in src.suites)
            if is_security and security is None:
                security = src.uri
            elif not is_security and main is None and "main" in src.components:
                main = src.uri
        return main, security

    def mirrors(self, settings: Settings) -> dict[str, str]:
        host_main, host_security = self._host_mirrors()
        main = settings.mirrors.get("default") or settings.mirrors.get(self.mirror_names[0]) or host_main
        if not main:
            raise ConfigError(
                f"no {self.name} mirror configured: pass --mirror URL, set VZPKG_MIRROR, add "
                f"'[mirrors] {self.mirror_names[0]} = \"URL\"' to the config file, or configure apt on the host"
            )
        security = settings.mirrors.get(self.mirror_names[1]) or host_security or main.rstrip("/") + "-security"
        return {"mirror": main.rstrip("/"), "security_mirror": security.rstrip("/")}
