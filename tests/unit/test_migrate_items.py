"""The storage backends' side of a migration (Backend.migrate_items on the source, receive_prepare and
receive_install on the destination): what the source sends has a place the destination named, for each layout
that needs no pool, and what arrived is checked before it becomes the VE's."""

from __future__ import annotations

import pytest

from vzpkg.errors import StorageError, UsageError
from vzpkg.runtime import backends
from vzpkg.runtime.backends.base import Limits
from vzpkg.runtime.layout import Layout

LIMIT = Limits((100 << 20, 100 << 20))


def _roots(tmp_path):
    src, dst = Layout(tmp_path / "a"), Layout(tmp_path / "b")
    (src.private("101") / "upper" / "etc").mkdir(parents=True)
    staged = dst.private_dir / ".tmp-101-migrate-1"
    staged.mkdir(parents=True)
    return src, dst, staged


def test_overlay_sends_upper_in_both_passes_and_gets_a_work_dir(tmp_path):
    src, dst, staged = _roots(tmp_path)
    b = backends.get("overlay")
    for final in (False, True):
        items = b.migrate_items(src, "101", final=final)
        assert [(i.name, i.path, i.file) for i in items] == [("upper", src.private("101") / "upper", False)]
    targets = b.receive_prepare(dst, "101", staged, tmp_path / "template", Limits())
    assert targets == {"upper": str(staged / "upper")}
    b.receive_install(dst, "101", staged, Limits())
    assert (staged / "work").is_dir()


def test_image_sent_once_as_a_sparse_file_and_checked_on_arrival(tmp_path):
    src, dst, staged = _roots(tmp_path)
    b = backends.get("image")
    assert b.migrate_items(src, "101", final=False) == []  # (a mounted image cannot be copied consistently)
    [item] = b.migrate_items(src, "101", final=True)
    assert (item.name, item.path, item.file) == ("root.img", src.private("101") / "root.img", True)
    with pytest.raises(UsageError, match="needs a space limit"):
        b.receive_prepare(dst, "101", staged, tmp_path / "template", Limits())
    targets = b.receive_prepare(dst, "101", staged, tmp_path / "template", LIMIT)
    assert targets == {"root.img": str(staged / "root.img")}
    with pytest.raises(StorageError, match="did not arrive"):
        b.receive_install(dst, "101", staged, LIMIT)
    (staged / "root.img").write_bytes(b"\0" * 4096)  # not an ext4 image: refused, not installed
    with pytest.raises(StorageError, match="not an ext4 image"):
        b.receive_install(dst, "101", staged, LIMIT)
    assert not (staged / "fs").exists()
