"""The build-stage key changes with every input that changes the installed root."""

from __future__ import annotations

from vzpkg.build.stage import stage_key

TEMPLATE = {"distribution": "debian", "release": "12", "suite": "bookworm", "architecture": "x86_64",
            "package_manager": "apt", "packages": ["procps"], "summary": "s", "description": "d"}
REPOS = ["deb http://m.invalid/debian bookworm main"]
STATE = [{"uri": "http://m.invalid/debian", "suite": "bookworm", "inrelease_sha256": "a" * 64}]


def test_same_inputs_same_key() -> None:
    assert stage_key(TEMPLATE, REPOS, STATE, "mmdebstrap") == stage_key(dict(TEMPLATE), list(REPOS), list(STATE),
                                                                        "mmdebstrap")


def test_inputs_change_the_key() -> None:
    base = stage_key(TEMPLATE, REPOS, STATE, "mmdebstrap")
    assert stage_key({**TEMPLATE, "packages": ["procps", "less"]}, REPOS, STATE, "mmdebstrap") != base
    assert stage_key(TEMPLATE, REPOS, [{**STATE[0], "inrelease_sha256": "b" * 64}], "mmdebstrap") != base
    assert stage_key(TEMPLATE, ["deb http://other.invalid/debian bookworm main"], STATE, "mmdebstrap") != base
    assert stage_key(TEMPLATE, REPOS, STATE, "debootstrap") != base


def test_description_and_scripts_do_not_change_the_key() -> None:
    """Only inputs of bootstrap and install count: files and scripts are applied after the stage."""
    base = stage_key(TEMPLATE, REPOS, STATE, "mmdebstrap")
    assert stage_key({**TEMPLATE, "description": "other"}, REPOS, STATE, "mmdebstrap") == base


def test_source_date_epoch_changes_the_key() -> None:
    assert stage_key(TEMPLATE, REPOS, STATE, "mmdebstrap", 1700000000) != stage_key(TEMPLATE, REPOS, STATE, "mmdebstrap")
