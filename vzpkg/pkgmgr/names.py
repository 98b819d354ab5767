"""The package managers vzpkg knows, and what a package name is for each: plain data, imported by template
validation, the CLI and the docs without loading any backend (this module imports nothing of vzpkg)."""

from __future__ import annotations

import re

APT = "apt"
DNF = "dnf"
YUM = "yum"
#: every package manager a template may name, in the order docs and messages list them
PACKAGE_MANAGERS = (APT, DNF, YUM)
#: the ones built by the dnf backend (yum templates are installed with dnf where the host has it)
RPM_MANAGERS = (DNF, YUM)

#: Debian Policy 5.6.1: lower-case letters, digits, + - . ; at least two characters, starting alphanumeric.
#: Only plain names: the build, status and update-cache compare them with the installed packages' names, so
#: apt's `:arch`, `=version` and `/release` suffixes are not taken.
DEB_NAME_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
#: a plain RPM package name (Fedora's naming guidelines: ASCII letters, digits and - . _ +), not starting with
#: - . or +; no version, arch, file path, provide or @group: status and update-cache compare names with the rpmdb's
RPM_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")

_DEB_PROBLEM = ("is not a Debian package name (lower-case letters, digits, '+', '-' and '.', at least two "
                "characters, starting with a letter or digit; no :arch, =version or /release suffix)")
_RPM_PROBLEM = ("is not an RPM package name (letters, digits, '-', '.', '_' and '+', starting with a letter, digit "
                "or '_'; no version, file path or @group)")
_NAME_RULES = {APT: (DEB_NAME_RE, _DEB_PROBLEM), DNF: (RPM_NAME_RE, _RPM_PROBLEM), YUM: (RPM_NAME_RE, _RPM_PROBLEM)}


def package_name_problem(manager: str, name: str) -> str | None:
    """Why NAME is not a package name MANAGER takes (a phrase), or None when it is one.

    Template validation asks this for every package a template names, so nothing that is not a package name
    (an option, a shell word) ever reaches the package manager's command line."""
    pattern, problem = _NAME_RULES[manager]
    return None if pattern.fullmatch(name) else problem
