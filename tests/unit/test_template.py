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


# ---- package names (issue 8, item 2): each backend knows its package manager's name syntax ------------------

DNF_BASE = """
summary = "test"
description = "test template"
distribution = "almalinux"
release = "9"
architecture = "x86_64"
package_manager = "dnf"
packages = ["bash"]
repositories = [{ id = "base", baseurl = "{{ mirror }}/9/BaseOS/$basearch/os/" }]
"""
BAD_NAMES = ["procps; touch /tmp/x", "--allow-unauthenticated", "-y", "procps bash", "$(id)", "a", "", "pkg\nname",
             "../../etc/passwd", "procps=2:4.0.2-3", "libc6:amd64", "procps/bookworm-backports", "Procps"]
BAD_RPM_NAMES = ["procps; touch /tmp/x", "--nogpgcheck", "-y", "bash coreutils", "$(id)", "", "/usr/bin/sh",
                 "@core", "bash >= 5", ".hidden", "pkg\nname", "bash*"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_apt_package_names_are_checked(tmp_path: Path, name: str) -> None:
    d = write(tmp_path, "bad-1-x86_64", BASE.replace('packages = ["procps"]', "packages = " + _toml_list(["bash", name])))
    with pytest.raises(TemplateError) as err:
        TemplateRepository([tmp_path]).load("bad-1-x86_64")
    message = str(err.value)
    assert message.startswith(f"{d / 'template.toml'}: packages[1]: ")
    assert "is not a Debian package name" in message and "\n" not in message


@pytest.mark.parametrize("name", BAD_RPM_NAMES)
def test_rpm_package_names_are_checked(tmp_path: Path, name: str) -> None:
    d = write(tmp_path, "bad-9-x86_64", DNF_BASE + "remove_packages = " + _toml_list([name]) + "\n")
    with pytest.raises(TemplateError) as err:
        TemplateRepository([tmp_path]).load("bad-9-x86_64")
    message = str(err.value)
    assert message.startswith(f"{d / 'template.toml'}: remove_packages[0]: ")
    assert "is not an RPM package name" in message and "\n" not in message


def _toml_list(items: list[str]) -> str:
    import json

    return json.dumps(items)  # a JSON string array is a TOML array of basic strings


def test_backends_accept_real_package_names() -> None:
    from vzpkg.pkgmgr import get_backend

    for name in ("libstdc++6", "g++", "python3.11", "ca-certificates", "0ad", "xz-utils", "libc6-dev"):
        assert get_backend("apt").package_name_problem(name) is None, name
    for name in ("glibc-minimal-langpack", "libstdc++", "389-ds-base", "perl-Net_SSLeay", "python3.11",
                 "NetworkManager", "_internal", "dnf5"):
        assert get_backend("dnf").package_name_problem(name) is None, name


def test_bad_package_in_a_set_names_the_sets_file(tmp_path: Path) -> None:
    write(tmp_path, "base-12-x86_64", BASE)
    s = write(tmp_path, "base-12-x86_64-set", 'inherits = "base-12-x86_64"\nsummary = "s"\ndescription = "s"\n'
                                               'packages = ["git", "--force-yes"]\n')
    with pytest.raises(TemplateError) as err:
        TemplateRepository([tmp_path]).load("base-12-x86_64-set")
    assert str(err.value).startswith(f"{s / 'template.toml'}: packages[1]: '--force-yes' is not a Debian package")


# ---- jinja (issue 8, item 3): a dry render at load finds bad templates before a build starts -----------------


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        ("line one\n{{ hostname }}\n", 2, "'hostname' is undefined"),
        ("a\nb\n{% if suite %}\nno end\n", 3, "Unexpected end of template"),
        ("{{ suite | no_such_filter }}", 1, "No filter named 'no_such_filter'"),
        ("x\n{% include 'other.j2' %}\n", 2, "cannot include other.j2"),
        ("{{ environment.MISSING }}", 1, "has no attribute 'MISSING'"),
        ("{{ 1 + suite }}", 1, "unsupported operand"),
    ],
)
def test_bad_jinja_in_files_is_found_at_load(tmp_path: Path, text: str, line: int, expected: str) -> None:
    d = write(tmp_path, "j-12-x86_64", BASE)
    (d / "files/etc").mkdir(parents=True)
    (d / "files/etc/motd.j2").write_text(text)
    with pytest.raises(TemplateError) as err:
        TemplateRepository([tmp_path]).load("j-12-x86_64")
    message = str(err.value)
    assert message.startswith(f"{d}/files/etc/motd.j2:{line}: "), message
    assert expected in message and "\n" not in message
    env = {"VZPKG_TEMPLATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "VZPKG_CONFIG": "/nonexistent"}
    proc = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzpkg", "validate"], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == TemplateError.exit_code
    assert f"motd.j2:{line}: " in proc.stdout and "Traceback" not in proc.stderr


def test_good_jinja_uses_every_build_variable(tmp_path: Path) -> None:
    d = write(tmp_path, "j-12-x86_64", BASE + '[environment]\nGREETING = "hi"\n')
    (d / "files").mkdir()
    (d / "files/motd.j2").write_text("{{ name }} {{ suite }} {{ release }} {{ arch }} {{ mirror }} "
                                     "{{ security_mirror }} {{ environment.GREETING }}\n")
    TemplateRepository([tmp_path]).load("j-12-x86_64")


@pytest.mark.parametrize(
    ("replace", "expected"),
    [
        ('repositories = ["deb {{ mirorr }} {{ suite }} main"]', "repositories[0]: cannot render"),
        ('repositories = ["deb {{ mirror }} {% if %} main"]', "repositories[0]: cannot render"),
    ],
)
def test_bad_jinja_in_repositories_is_found_at_load(tmp_path: Path, replace: str, expected: str) -> None:
    d = write(tmp_path, "j-12-x86_64", BASE.replace('repositories = ["deb {{ mirror }} {{ suite }} main"]', replace))
    with pytest.raises(TemplateError) as err:
        TemplateRepository([tmp_path]).load("j-12-x86_64")
    assert str(err.value).startswith(f"{d / 'template.toml'}: {expected}")


def test_dnf_gpg_key_and_repository_tables_are_rendered_at_load(tmp_path: Path) -> None:
    d = write(tmp_path, "j-9-x86_64", DNF_BASE + 'gpg_keys = ["{{ mirror }}/{{ nokey }}"]\n')
    with pytest.raises(TemplateError, match=r"gpg_keys\[0\]: cannot render .*'nokey' is undefined"):
        TemplateRepository([tmp_path]).load("j-9-x86_64")
    (d / "template.toml").write_text(DNF_BASE.replace("{{ mirror }}/9", "{{ mirror }}/{{ security_mirror }}"))
    with pytest.raises(TemplateError, match=r"repositories\[0\]\.baseurl: cannot render .*'security_mirror'"):
        TemplateRepository([tmp_path]).load("j-9-x86_64")


# ---- hostile definitions (issue 8, item 6): one line, exit 3, never a traceback -----------------------------


HOSTILE = {
    "nested": "packages = " + "[" * 3000 + "]" * 3000 + "\n",
    "huge": "colour = '" + "x" * 200_000 + "'\n",
    "huge-package": "packages = ['" + "a" * 200_000 + ";']\n",
    "table-package": "packages = [{ name = 'procps' }]\n",
    "int-package": "packages = [1, 2]\n",
    "env-name": "[environment]\n'A=B' = 'x'\n",
    "env-nul": "[environment]\nA = \"x\\u0000y\"\n",
    "env-list": "[environment]\nA = [1]\n",
    "inherits-path": "inherits = '../../etc'\n",
    "inherits-abs": "inherits = '/etc'\n",
    "bool-release": "release2 = true\n",
    "nul-suite": "variant = \"min\\u0000base\"\n",
    "huge-init": "init = '" + "x" * 200_000 + "'\n",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_definitions_give_one_line(tmp_path: Path, case: str) -> None:
    d = write(tmp_path, "h-1-x86_64", BASE.replace('packages = ["procps"]\n', "") + HOSTILE[case])
    env = {"VZPKG_TEMPLATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "VZPKG_CONFIG": "/nonexistent"}
    proc = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzpkg", "validate", "h-1-x86_64"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == TemplateError.exit_code, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = proc.stdout.splitlines()
    assert line.startswith(f"h-1-x86_64: {d / 'template.toml'}: ")
    assert len(line) < 500


@pytest.mark.parametrize("content", [b"\xff\xfe\x00", b"summary = 'x'\x00"])
def test_binary_definition_gives_one_line(tmp_path: Path, content: bytes) -> None:
    d = write(tmp_path, "h-1-x86_64", "")
    (d / "template.toml").write_bytes(content)
    with pytest.raises(TemplateError, match="not valid TOML"):
        TemplateRepository([tmp_path]).load("h-1-x86_64")


@pytest.mark.parametrize("name", ["../../etc", "/etc", "x", "debian-12-x86_64/../debian-12-x86_64"])
def test_template_names_are_not_paths(name: str) -> None:
    with pytest.raises(TemplateError, match="is not a template name"):
        TemplateRepository([PROJECT_DIR / "templates"]).load(name)


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("cycler.__init__.__globals__.os.system('touch {sentinel}')", "unsafe"),
        ("''.__class__.__mro__[1].__subclasses__()", "unsafe"),
        ("range(10**9) | list | length", "Range too big"),
        ("'a' * 10**10", "too large for a template"),
        ("2 ** 100000000", "too large for a template"),
    ],
)
def test_jinja_is_sandboxed(tmp_path: Path, expr: str, expected: str) -> None:
    """A crafted template is data: rendering it (vzpkg validate, a build) cannot run host code nor exhaust the
    host's memory or time; each attempt is one TemplateError. (Unsandboxed, the first created the sentinel.)"""
    sentinel = tmp_path / "SENTINEL"
    expr = expr.replace("{sentinel}", str(sentinel))
    for where in ("repositories", "files"):
        tdir = tmp_path / where
        if where == "repositories":
            d = write(tdir, "j-12-x86_64", BASE.replace("{{ suite }} main", "{{ " + expr + " }} main"))
        else:
            d = write(tdir, "j-12-x86_64", BASE)
            (d / "files").mkdir()
            (d / "files/motd.j2").write_text("{{ " + expr + " }}\n")
        with pytest.raises(TemplateError) as err:
            TemplateRepository([tdir]).load("j-12-x86_64")
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
        assert not sentinel.exists()


def test_jinja_sandbox_keeps_ordinary_expressions(tmp_path: Path) -> None:
    d = write(tmp_path, "j-12-x86_64", BASE)
    (d / "files").mkdir()
    (d / "files/motd.j2").write_text("{{ '-' * 40 }} {{ 2 ** 10 }} {{ suite | upper }} {{ [1, 2] * 3 }}\n")
    TemplateRepository([tmp_path]).load("j-12-x86_64")
    from vzpkg.template import render_file

    assert render_file(d / "files/motd.j2", {"suite": "bookworm"}) == f"{'-' * 40} 1024 BOOKWORM [1, 2, 1, 2, 1, 2]\n"
