"""`vzpkg status`, `update-cache`, `rollback-cache`, `clean`: keeping caches current (filled in by issue 5)."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    """Attach this module's commands to the `vzpkg` group."""
