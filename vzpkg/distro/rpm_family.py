"""The RPM family: Fedora, CentOS Stream, AlmaLinux, Rocky Linux. Built with dnf (yum where only yum exists).

Each distribution says only what differs: its name, its public mirror, where its rpmdb lives.
"""

from __future__ import annotations

from typing import ClassVar

from ..config import Settings
from ..pkgmgr.names import RPM_MANAGERS
from .base import Distribution, register


class RpmDistribution(Distribution):
    package_managers = RPM_MANAGERS
    #: the public mirror used when neither --mirror, VZPKG_MIRROR nor a configured mirror is given
    default_mirror: ClassVar[str] = ""
    #: where rpm inside the root keeps its database (the host's rpm must write it there)
    rpmdb_path: ClassVar[str] = "/var/lib/rpm"

    def module_platform_id(self, release: str) -> str | None:
        """dnf's module_platform_id: the root has no /etc/os-release to read it from while it is bootstrapped."""
        return f"platform:el{release.split('.')[0]}"

    def mirrors(self, settings: Settings) -> dict[str, str]:
        main = (settings.mirrors.get("default") or settings.mirrors.get(self.mirror_names[0])
                or self.default_mirror)
        return {"mirror": main.rstrip("/")}


@register
class Fedora(RpmDistribution):
    name = "fedora"
    mirror_names = ("fedora",)
    default_mirror = "https://dl.fedoraproject.org/pub/fedora/linux"
    rpmdb_path = "/usr/lib/sysimage/rpm"  # since Fedora 36; rpm ships /var/lib/rpm as a symlink to it

    def module_platform_id(self, release: str) -> str | None:
        return f"platform:f{release}"


@register
class CentOSStream(RpmDistribution):
    name = "centos-stream"
    mirror_names = ("centos-stream",)
    default_mirror = "https://mirror.stream.centos.org"


@register
class AlmaLinux(RpmDistribution):
    name = "almalinux"
    mirror_names = ("almalinux",)
    default_mirror = "https://repo.almalinux.org/almalinux"


@register
class Rocky(RpmDistribution):
    name = "rocky"
    mirror_names = ("rocky",)
    default_mirror = "https://dl.rockylinux.org/pub/rocky"
