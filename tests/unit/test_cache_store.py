"""CacheStore on a cache directory someone has tampered with (no root, no network): a publish or a clean never
removes or writes anything outside the cache directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vzpkg.store.cache import CacheStore

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


@pytest.mark.parametrize(("change", "problem"), [
    ({"packages": "x"}, '"packages" is str, not list'),
    ({"packages": None}, '"packages" is NoneType, not list'),
    ({"packages": [1, 2]}, '"packages"[0] is not an object with a "name" string'),
    ({"durations": "x"}, '"durations" is str, not dict'),
    ({"durations": {"total": "long"}}, '"durations" has a value that is not a number'),
    ({"packed_size": "x"}, '"packed_size" is str, not int'),
    ({"repositories": [1]}, '"repositories"[0] is not an object'),
    ({"sha256": 5}, '"sha256" is int, not str'),
])
def test_manifest_with_fields_of_the_wrong_type(tmp_path: Path, change: dict, problem: str) -> None:
    """A crafted manifest made `vzpkg info` and `vzpkg status` fail with an internal error (exit 1); now every
    reader gets VerifyError (exit 11) naming the field."""
    import json
    import subprocess
    import sys

    from vzpkg.errors import VerifyError

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"{NAME}.tar.zst").write_bytes(b"not read")
    manifest = {"sha256": "0" * 64, "name": NAME, "packages": [{"name": "bash", "version": "5"}],
                "durations": {"total": 1.5}, "packed_size": 8, "created": None, **change}
    (cache / f"{NAME}.json").write_text(json.dumps(manifest))
    with pytest.raises(VerifyError) as err:
        CacheStore(cache).read_manifest(NAME)
    assert f"manifest {cache / (NAME + '.json')}: {problem}: rebuild it" in err.value.message
    env = {"VZPKG_CACHE_DIR": str(cache), "VZPKG_CONFIG": "/nonexistent", "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzpkg", "info", NAME], env=env, capture_output=True,
                       text=True, timeout=30, cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 11 and p.stderr.count("\n") == 1 and problem in p.stderr, (p.returncode, p.stderr)


def test_manifest_of_the_shipped_form_is_accepted(tmp_path: Path) -> None:
    import json

    from vzpkg.store.cache import manifest_problem

    shared = Path("/var/tmp/vzpkg-test-cache/debian-12-x86_64.json")
    if shared.exists():
        assert manifest_problem(json.loads(shared.read_text())) is None
    assert manifest_problem({"sha256": "0" * 64, "init": None, "packed_size": None, "packages": []}) is None
