"""Template loading, inheritance and strict validation (no root, no network)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vzpkg.config import PROJECT_DIR
from vzpkg.errors import TemplateError
from vzpkg.template import TemplateRepository

SHIPPED = ["debian-11-x86_64", "debian-12-x86_64", "debian-13-x86_64", "debian-12-x86_64-devel"]

BASE = """
summary = "test"
description = "test template"
distribution = "debian"
release = "12"
suite = "bookworm"
architecture = "x86_64"
package_manager = "apt"
packages = ["procps"]
repositories = ["deb {{ mirror }} {{ suite }} main"]
"""


def write(tmp: Path, name: str, text: str) -> Path:
    d = tmp / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "template.toml").write_text(text)
    return d


@pytest.fixture
def repo(tmp_path: Path) -> TemplateRepository:
    write(tmp_path, "test-12-x86_64", BASE)
    return TemplateRepository([tmp_path, PROJECT_DIR / "templates"])


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_templates_load(name: str) -> None:
    t = TemplateRepository([PROJECT_DIR / "templates"]).load(name)
    assert t["distribution"] == "debian"
    for pkg in ("procps", "iproute2", "ca-certificates"):
        assert pkg in t.packages


def test_set_inherits_and_adds() -> None:
    repo = TemplateRepository([PROJECT_DIR / "templates"])
    base = repo.load("debian-12-x86_64")
    devel = repo.load("debian-12-x86_64-devel")
    assert devel.packages[: len(base.packages)] == base.packages
    assert "build-essential" in devel.packages
    assert devel["suite"] == "bookworm"
    assert [p.name for p in devel.chain] == ["debian-12-x86_64", "debian-12-x86_64-devel"]
    assert devel.scripts("post-install")[0].parent.parent.name == "debian-12-x86_64-devel"
    assert devel.digest() != base.digest()


def test_digest_covers_scripts(tmp_path: Path, repo: TemplateRepository) -> None:
    t = repo.load("test-12-x86_64")
    before = t.digest()
    scripts = tmp_path / "test-12-x86_64" / "scripts"
    scripts.mkdir()
    (scripts / "post-install").write_text("#!/bin/sh\necho hi\n")
    assert repo.load("test-12-x86_64").digest() != before


def test_render_repositories(repo: TemplateRepository) -> None:
    t = repo.load("test-12-x86_64")
    ctx = t.render_context({"mirror": "http://mirror.invalid/debian", "security_mirror": "x"}, "amd64")
    assert t.render_repositories(ctx) == ["deb http://mirror.invalid/debian bookworm main"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BASE + 'colour = "blue"\n', "colour: unknown key"),
        (BASE.replace('summary = "test"\n', ""), "summary: missing required key"),
        (BASE.replace('packages = ["procps"]', 'packages = "procps"'), "packages: expected list"),
        (BASE.replace('packages = ["procps"]', "packages = [1]"), "packages[0]: expected str"),
        (BASE.replace('package_manager = "apt"', 'package_manager = "pacman"'), "package_manager: unknown package manager"),
        (BASE.replace('distribution = "debian"', 'distribution = "plan9"'), "distribution: unknown distribution"),
        (BASE + 'inherits = "nope-1-x86_64"\n', "inherits: unknown base template 'nope-1-x86_64'"),
        (BASE + "init = 'systemd-please'\n", "init:"),
        (BASE.replace('suite = "bookworm"\n', ""), "suite: missing required key"),
        ("summary = [", "not valid TOML"),
    ],
)
def test_invalid_definitions_name_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    d = write(tmp_path, "bad-1-x86_64", text)
    with pytest.raises(TemplateError) as err:
        TemplateRepository([tmp_path]).load("bad-1-x86_64")
    message = str(err.value)
    assert expected in message
    assert str(d / "template.toml") in message
    assert "\n" not in message


def test_inheritance_loop(tmp_path: Path) -> None:
    write(tmp_path, "a-1-x86_64", BASE + 'inherits = "b-1-x86_64"\n')
    write(tmp_path, "b-1-x86_64", BASE + 'inherits = "a-1-x86_64"\n')
    with pytest.raises(TemplateError, match="inheritance loop"):
        TemplateRepository([tmp_path]).load("a-1-x86_64")


def test_unknown_script_name(tmp_path: Path) -> None:
    d = write(tmp_path, "s-1-x86_64", BASE)
    (d / "scripts").mkdir()
    (d / "scripts" / "post-instal").write_text("#!/bin/sh\n")
    with pytest.raises(TemplateError, match="unknown script name"):
        TemplateRepository([tmp_path]).load("s-1-x86_64")


def test_missing_template() -> None:
    with pytest.raises(TemplateError, match="template 'nope-1-x86_64' not found"):
        TemplateRepository([PROJECT_DIR / "templates"]).load("nope-1-x86_64")


def test_validate_command_exit_codes(tmp_path: Path) -> None:
    write(tmp_path, "bad-1-x86_64", BASE + 'colour = "blue"\n')
    write(tmp_path, "good-1-x86_64", BASE)
    env = {"VZPKG_TEMPLATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzpkg", "validate"], env=env, capture_output=True, text=True)
    assert proc.returncode == TemplateError.exit_code
    assert "good-1-x86_64: ok" in proc.stdout
    assert "colour: unknown key" in proc.stdout
    ok = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzpkg", "validate", "good-1-x86_64"], env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_shipped_templates_validate_via_cli() -> None:
    proc = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzpkg", "validate"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "VZPKG_CONFIG": "/nonexistent"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
