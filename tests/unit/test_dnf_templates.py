"""The RPM templates load, validate and render to the right dnf configuration; --mirror overrides the default."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from vzpkg.build.pipeline import Reporter, prepare_context
from vzpkg.config import PROJECT_DIR, load_settings
from vzpkg.distro import get_distribution, known_distributions
from vzpkg.errors import TemplateError
from vzpkg.pkgmgr import get_backend
from vzpkg.pkgmgr.dnf import DnfBackend
from vzpkg.pkgmgr.dnf_repos import REPO_KEYS, DnfRepo, normalize_repositories, render_config, substitute
from vzpkg.template import DEFINITION_FILE, TemplateRepository

RPM_TEMPLATES = {
    "almalinux-9-x86_64": ("almalinux", "https://repo.almalinux.org/almalinux", "/var/lib/rpm"),
    "centos-stream-9-x86_64": ("centos-stream", "https://mirror.stream.centos.org", "/var/lib/rpm"),
    "fedora-41-x86_64": ("fedora", "https://dl.fedoraproject.org/pub/fedora/linux", "/usr/lib/sysimage/rpm"),
}


def _settings(tmp_path: Path, mirror: str | None = None, env: dict[str, str] | None = None):
    environ = {"VZPKG_CACHE_DIR": str(tmp_path / "cache"), "VZPKG_CONFIG": str(tmp_path / "none.conf"),
               "VZPKG_TEMPLATE_DIR": str(PROJECT_DIR / "templates"), **(env or {})}
    return load_settings(mirror=mirror, environ=environ)


def _ctx(tmp_path: Path, name: str, mirror: str | None = None, env: dict[str, str] | None = None,
         template_dirs: list[Path] | None = None):
    settings = _settings(tmp_path, mirror, env)
    if template_dirs:
        settings.template_dirs = template_dirs
    template = TemplateRepository(settings.template_dirs).load(name)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return prepare_context(template, settings, work, False, Reporter())


def _parse(text: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None)
    cp.read_string(text)
    return cp


def test_rpm_distributions_registered():
    for name in ("almalinux", "fedora", "centos-stream", "rocky"):
        assert name in known_distributions()
        assert get_distribution(name).package_managers == ("dnf", "yum")


def test_backend_by_name():
    assert isinstance(get_backend("dnf"), DnfBackend)
    yum = get_backend("yum")
    assert isinstance(yum, DnfBackend) and yum.name == "yum"


def test_repository_keys_are_the_dataclass_fields():
    """One list: template validation, normalization and dnf.conf all read DnfRepo's fields."""
    assert set(REPO_KEYS) == {"id", "name", "baseurl", "mirrorlist", "metalink", "gpgcheck", "repo_gpgcheck",
                              "gpgkey", "enabled", "priority", "cost", "exclude", "includepkgs", "module_hotfixes",
                              "sslverify", "skip_if_unavailable", "metadata_expire", "countme"}
    [repo] = normalize_repositories(Path("t.toml"), [{"id": "r", "baseurl": ["http://a", "http://b"],
                                                      "priority": 0, "sslverify": False}], ["file:///k"])
    assert repo == DnfRepo(id="r", name="r", baseurl=("http://a", "http://b"), gpgkey=("file:///k",), priority=0,
                           sslverify=False)
    section = render_config({}, [repo]).split("[r]\n")[1]
    assert section.splitlines() == ["name=r", "baseurl=http://a http://b", "enabled=1", "gpgcheck=1",
                                    "repo_gpgcheck=0", "gpgkey=file:///k", "priority=0", "sslverify=0"]


@pytest.mark.parametrize("name", sorted(RPM_TEMPLATES))
def test_rpm_template_renders_dnf_config(tmp_path, name):
    distro, default_mirror, dbpath = RPM_TEMPLATES[name]
    ctx = _ctx(tmp_path, name)
    assert ctx.template["distribution"] == distro
    assert ctx.mirrors["mirror"] == default_mirror
    backend = DnfBackend("dnf")
    cp = _parse(backend.config_text(ctx))
    main = cp["main"]
    assert main["install_weak_deps"] == "0"
    assert main["gpgcheck"] == "1"
    assert main["keepcache"] == "1"
    assert main["plugins"] == "0"
    assert main["skip_if_unavailable"] == "0"
    assert main["cachedir"] == "/var/cache/dnf"
    assert main["reposdir"] == str(ctx.work_dir / "dnf/repos.d")
    assert main["module_platform_id"].startswith("platform:")
    repos = [s for s in cp.sections() if s != "main"]
    assert len(repos) == 2
    for section in repos:
        repo = cp[section]
        assert repo["baseurl"].startswith(default_mirror + "/")
        assert "$basearch" in repo["baseurl"] and "$releasever" in repo["baseurl"]
        assert repo["gpgcheck"] == "1" and repo["enabled"] == "1"
        assert repo["gpgkey"].startswith("https://")
    assert backend.dbpath(ctx) == dbpath
    assert backend.releasever(ctx) == ctx.template["release"]
    assert backend.package_cache(ctx) == ctx.package_cache / f"{distro}-{ctx.template['release']}-x86_64"


def test_almalinux_exact_repositories(tmp_path):
    ctx = _ctx(tmp_path, "almalinux-9-x86_64")
    cp = _parse(DnfBackend("dnf").config_text(ctx))
    assert cp["baseos"]["baseurl"] == "https://repo.almalinux.org/almalinux/$releasever/BaseOS/$basearch/os/"
    assert cp["appstream"]["baseurl"] == "https://repo.almalinux.org/almalinux/$releasever/AppStream/$basearch/os/"
    assert cp["baseos"]["gpgkey"] == "https://repo.almalinux.org/almalinux/RPM-GPG-KEY-AlmaLinux-9"
    assert cp["main"]["module_platform_id"] == "platform:el9"
    assert substitute(cp["baseos"]["baseurl"], DnfBackend().variables(ctx)) == \
        "https://repo.almalinux.org/almalinux/9/BaseOS/x86_64/os/"


@pytest.mark.parametrize("how", ["flag", "env", "env-named"])
def test_mirror_override(tmp_path, how):
    url = "http://mirror.example.test/alma/"
    if how == "flag":
        ctx = _ctx(tmp_path, "almalinux-9-x86_64", mirror=url)
    elif how == "env":
        ctx = _ctx(tmp_path, "almalinux-9-x86_64", env={"VZPKG_MIRROR": url})
    else:
        ctx = _ctx(tmp_path, "almalinux-9-x86_64", env={"VZPKG_MIRROR_ALMALINUX": url})
    assert ctx.mirrors["mirror"] == url.rstrip("/")
    cp = _parse(DnfBackend("dnf").config_text(ctx))
    assert cp["baseos"]["baseurl"] == "http://mirror.example.test/alma/$releasever/BaseOS/$basearch/os/"
    assert cp["baseos"]["gpgkey"] == "http://mirror.example.test/alma/RPM-GPG-KEY-AlmaLinux-9"


def test_named_mirror_of_another_distribution_is_ignored(tmp_path):
    ctx = _ctx(tmp_path, "fedora-41-x86_64", env={"VZPKG_MIRROR_ALMALINUX": "http://elsewhere.test"})
    assert ctx.mirrors["mirror"] == "https://dl.fedoraproject.org/pub/fedora/linux"


def _write(tmp_path: Path, name: str, body: str) -> Path:
    d = tmp_path / "templates" / name
    d.mkdir(parents=True)
    (d / "template.toml").write_text(body)
    return tmp_path / "templates"


HEAD = """summary = "t"
description = "t"
distribution = "almalinux"
release = "9"
architecture = "x86_64"
package_manager = "dnf"
packages = ["bash"]
"""


def test_unknown_repository_key_names_file_and_key(tmp_path):
    tdir = _write(tmp_path, "alma-9-x86_64", HEAD + 'repositories = [{ id = "x", baseurl = "http://h/", gpg_check = true }]\n')
    with pytest.raises(TemplateError) as e:
        TemplateRepository([tdir]).load("alma-9-x86_64")
    assert "template.toml" in str(e.value) and "repositories[0].gpg_check" in str(e.value)


def test_repository_without_url_is_rejected(tmp_path):
    tdir = _write(tmp_path, "alma-9-x86_64", HEAD + 'repositories = [{ id = "x", name = "no url" }]\n')
    with pytest.raises(TemplateError, match="baseurl, mirrorlist or metalink"):
        TemplateRepository([tdir]).load("alma-9-x86_64")


def test_string_repositories_local_keys_and_weak_deps(tmp_path):
    key = tmp_path / "templates" / "alma-9-x86_64" / "KEY"
    tdir = _write(tmp_path, "alma-9-x86_64", HEAD + 'weak_dependencies = true\ngpg_keys = ["KEY"]\n'
                  'repositories = ["{{ mirror }}/os", { name = "Extra Stuff", baseurl = "http://h/x", gpgcheck = false }]\n')
    key.write_text("key")
    ctx = _ctx(tmp_path, "alma-9-x86_64", mirror="http://m.test", template_dirs=[tdir])
    cp = _parse(DnfBackend("dnf").config_text(ctx))
    assert cp["main"]["install_weak_deps"] == "1"
    assert cp["repo0"]["baseurl"] == "http://m.test/os"
    assert cp["repo0"]["gpgkey"] == key.as_uri()
    assert cp["extra-stuff"]["gpgcheck"] == "0"


def test_bad_repository_values(tmp_path):
    tdir = _write(tmp_path, "alma-9-x86_64", HEAD)
    template = TemplateRepository([tdir]).load("alma-9-x86_64").path / DEFINITION_FILE
    with pytest.raises(TemplateError, match=r"repositories\[0\]\.priority"):
        normalize_repositories(template, [{"baseurl": "http://h", "priority": "high"}], [])
    with pytest.raises(TemplateError, match="used twice"):
        normalize_repositories(template, [{"id": "a", "baseurl": "http://h"}, {"id": "a", "baseurl": "http://i"}], [])
    with pytest.raises(TemplateError, match="at least one"):
        normalize_repositories(template, [], [])


def test_yum_templates_validate(tmp_path):
    tdir = _write(tmp_path, "alma-9-x86_64", HEAD.replace('"dnf"', '"yum"') + 'repositories = ["http://h/"]\n')
    assert TemplateRepository([tdir]).load("alma-9-x86_64")["package_manager"] == "yum"


def test_the_docs_list_the_repository_keys_and_package_managers():
    """The docs are written by hand: they must name exactly the keys and package managers the code knows."""
    from vzpkg.pkgmgr.names import PACKAGE_MANAGERS

    rpm_md = " ".join((PROJECT_DIR / "docs/rpm.md").read_text().split())
    keys = rpm_md.split("Repository tables accept `", 1)[1].split("`", 1)[0].split()
    assert sorted(keys) == sorted(REPO_KEYS)
    templates_md = (PROJECT_DIR / "docs/templates.md").read_text()
    row = next(ln for ln in templates_md.splitlines() if ln.startswith("| `package_manager` |"))
    assert row.split("|")[4].replace(",", " ").replace(" or ", " ").replace("`", "").split() == list(PACKAGE_MANAGERS)
