"""The overlay and copy layouts (storage.py does the work): no disk limits."""

from __future__ import annotations

from pathlib import Path

from .. import storage
from ..layout import Layout
from .base import Backend, Limits, Usage


class OverlayBackend(Backend):
    kind = "overlay"

    def prepare(self, layout: Layout, veid: str, tmp: Path, template: Path, id_shift: int, *, idmapped: bool,
                limits: Limits) -> None:
        storage.fill_private(tmp, veid, template, self.kind, id_shift, idmapped=idmapped)

    def mount(self, layout: Layout, veid: str, template: Path, id_shift: int, idmap_shift: int | None,
              limits: Limits | None = None) -> Path:
        return storage.mount_root(layout, veid, template, self.kind, idmap_shift)

    def usage(self, layout: Layout, veid: str) -> Usage | None:
        """No quota: what the private area holds (a walk, as du), inodes counted the same way."""
        blocks, inodes = storage.disk_usage_counts(layout.private(veid))
        return Usage(blocks // 1024, None, inodes, None)


class CopyBackend(OverlayBackend):
    kind = "copy"
