"""Package-manager backends: how to install into a root (the other axis is vzpkg.distro: what to install)."""

from __future__ import annotations

from .base import BuildContext, PackageManager


def get_backend(name: str) -> PackageManager:
    if name == "apt":
        from .apt import AptBackend

        return AptBackend()
    if name in ("dnf", "yum"):
        from .dnf import DnfBackend

        return DnfBackend(name)
    raise KeyError(name)


__all__ = ["BuildContext", "PackageManager", "get_backend"]
