"""CacheStore on a cache directory someone has tampered with (no root, no network): a publish or a clean never
removes or writes anything outside the cache directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vzpkg.cache import CacheStore

NAME = "foo-1-x86_64"


@pytest.mark.parametrize("target", ["{victim}", "../../../../../victim", "..", "."])
def test_publish_does_not_remove_what_a_tampered_current_link_names(tmp_path: Path, target: str) -> None:
    """.published/NAME/current edited to point outside its directory: the next publish must not rmtree that
    target as "the previous generation" (it did: the victim directory, or the cache directory itself, was gone)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep\n")
    cache = tmp_path / "a" / "b" / "cache"
    pdir = cache / ".published" / NAME
    pdir.mkdir(parents=True)
    os.symlink(target.format(victim=victim), pdir / "current")
    store = CacheStore(cache)
    assert store.leftovers(NAME) == []
    archive = cache / ".tmp-upload"
    archive.write_bytes(b"archive")
    store.publish(NAME, archive, {"sha256": "0" * 64, "name": NAME})
    assert (victim / "precious").read_text() == "keep\n"
    assert store.archive_path(NAME).read_bytes() == b"archive"
    assert store.read_manifest(NAME)["name"] == NAME
    assert "/" not in os.readlink(pdir / "current")
