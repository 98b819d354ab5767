"""Package-manager backends: how to install into a root (the other axis is vzpkg.distro: what to install).

Importing this package loads no backend: template validation and the distributions read the names from
vzpkg.pkgmgr.names, and a backend module is imported by get_backend when one is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .names import APT, DNF, PACKAGE_MANAGERS, RPM_MANAGERS, YUM

if TYPE_CHECKING:
    from .base import PackageManager


def get_backend(name: str) -> PackageManager:
    if name == APT:
        from .apt import AptBackend

        return AptBackend()
    if name in RPM_MANAGERS:
        from .dnf import DnfBackend

        return DnfBackend(name)
    raise KeyError(name)


__all__ = ["APT", "DNF", "PACKAGE_MANAGERS", "RPM_MANAGERS", "YUM", "get_backend"]
