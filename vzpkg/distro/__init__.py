"""Distributions: what a release is, where its mirrors are, which keyring signs it.

One axis of two: a Distribution knows *what* to install from; a package-manager backend (vzpkg.pkgmgr) knows
*how*. A new distribution is one small module registered here.
"""

from __future__ import annotations

from .base import _REGISTRY, Distribution, register

__all__ = ["Distribution", "get_distribution", "known_distributions", "register"]


def get_distribution(name: str) -> Distribution:
    _load_builtin()
    return _REGISTRY[name]()


def known_distributions() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    from . import debian, rpm_family  # noqa: F401  (they register themselves)
