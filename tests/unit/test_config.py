"""Settings precedence and mirrors from the host's apt sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from vzpkg.config import load_settings
from vzpkg.distro.debian import Debian
from vzpkg.distro.hostapt import _parse_deb822, _parse_one_line
from vzpkg.errors import ConfigError


def test_precedence_file_env_flag(tmp_path: Path) -> None:
    conf = tmp_path / "vzpkg.conf"
    conf.write_text('cache_dir = "/from/file"\n[mirrors]\ndebian = "http://file.invalid/debian"\n')
    env = {"VZPKG_CONFIG": str(conf)}
    s = load_settings(environ=env)
    assert s.cache_dir == Path("/from/file")
    assert s.mirrors["debian"] == "http://file.invalid/debian"
    s = load_settings(environ={**env, "VZPKG_CACHE_DIR": "/from/env", "VZPKG_MIRROR": "http://env.invalid/d"})
    assert s.cache_dir == Path("/from/env")
    assert Debian().mirrors(s)["mirror"] == "http://env.invalid/d"
    s = load_settings(cache_dir="/from/flag", mirror="http://flag.invalid/d",
                      environ={**env, "VZPKG_CACHE_DIR": "/from/env", "VZPKG_MIRROR": "http://env.invalid/d"})
    assert s.cache_dir == Path("/from/flag")
    assert Debian().mirrors(s)["mirror"] == "http://flag.invalid/d"


def test_config_file_errors(tmp_path: Path) -> None:
    conf = tmp_path / "vzpkg.conf"
    conf.write_text('cache_dirr = "/x"\n')
    with pytest.raises(ConfigError, match="unknown key 'cache_dirr'"):
        load_settings(environ={"VZPKG_CONFIG": str(conf)})
    conf.write_text('bootstrapper = "cdebootstrap"\n')
    with pytest.raises(ConfigError, match="bootstrapper"):
        load_settings(environ={"VZPKG_CONFIG": str(conf)})


def test_default_cache_dir() -> None:
    s = load_settings(environ={"VZPKG_CONFIG": "/nonexistent"})
    assert s.cache_dir == Path("/var/lib/vz/template/cache")


def test_parse_one_line_sources() -> None:
    text = """
# comment
deb http://a.invalid/debian bookworm main contrib
deb [arch=amd64 signed-by=/k.gpg] http://b.invalid/debian-security bookworm-security main
deb-src http://a.invalid/debian bookworm main
"""
    got = _parse_one_line(text)
    assert [(s.uri, s.suites) for s in got] == [
        ("http://a.invalid/debian", ("bookworm",)),
        ("http://b.invalid/debian-security", ("bookworm-security",)),
    ]


def test_parse_deb822_sources() -> None:
    text = """Types: deb
# a comment
URIs: http://a.invalid/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb deb-src
URIs: http://b.invalid/debian-security
Suites: bookworm-security
Components: main

Types: deb
Enabled: no
URIs: http://c.invalid/x
Suites: x
Components: main
"""
    got = _parse_deb822(text)
    assert [(s.uri, s.suites) for s in got] == [
        ("http://a.invalid/debian", ("bookworm", "bookworm-updates")),
        ("http://b.invalid/debian-security", ("bookworm-security",)),
    ]


def test_debian_mirrors_from_host(monkeypatch: pytest.MonkeyPatch) -> None:
    from vzpkg.distro import debian as debian_mod
    from vzpkg.distro.hostapt import AptSource

    monkeypatch.setattr(debian_mod, "host_sources", lambda: [
        AptSource("http://a.invalid/debian", ("bookworm",), ("main",)),
        AptSource("http://a.invalid/debian-security", ("bookworm-security",), ("main",)),
    ])
    m = Debian().mirrors(load_settings(environ={"VZPKG_CONFIG": "/nonexistent"}))
    assert m == {"mirror": "http://a.invalid/debian", "security_mirror": "http://a.invalid/debian-security"}
    monkeypatch.setattr(debian_mod, "host_sources", lambda: [])
    with pytest.raises(ConfigError, match="no debian mirror configured"):
        Debian().mirrors(load_settings(environ={"VZPKG_CONFIG": "/nonexistent"}))


def test_build_in_memory_setting(tmp_path: Path) -> None:
    assert load_settings(environ={"VZPKG_CONFIG": "/nonexistent"}).build_in_memory == "auto"
    assert load_settings(environ={"VZPKG_CONFIG": "/nonexistent", "VZPKG_BUILD_IN_MEMORY": "no"}).build_in_memory == "no"
    with pytest.raises(ConfigError, match="build_in_memory"):
        load_settings(environ={"VZPKG_CONFIG": "/nonexistent", "VZPKG_BUILD_IN_MEMORY": "sometimes"})


def test_compression_level_setting(tmp_path: Path) -> None:
    assert load_settings(environ={"VZPKG_CONFIG": "/nonexistent"}).compression_level == 6
    assert load_settings(environ={"VZPKG_CONFIG": "/nonexistent", "VZPKG_COMPRESSION_LEVEL": "19"}).compression_level == 19
    conf = tmp_path / "vzpkg.conf"
    conf.write_text("compression_level = 25\n")
    with pytest.raises(ConfigError, match="compression_level"):
        load_settings(environ={"VZPKG_CONFIG": str(conf)})


def test_network_limits_file_env_flag(tmp_path: Path) -> None:
    conf = tmp_path / "vzpkg.conf"
    conf.write_text("fetch_timeout = 30\nbuild_timeout = 600\napt_timeout = 5\napt_retries = 0\n"
                    "max_index_size = 1048576\n")
    env = {"VZPKG_CONFIG": str(conf)}
    defaults = load_settings(environ={"VZPKG_CONFIG": str(tmp_path / "none.conf")})
    assert (defaults.fetch_timeout, defaults.build_timeout, defaults.apt_timeout, defaults.apt_retries,
            defaults.max_index_size) == (120, 7200, 15, 1, 128 << 20)
    s = load_settings(environ=env)
    assert (s.fetch_timeout, s.build_timeout, s.apt_timeout, s.apt_retries, s.max_index_size) == (30, 600, 5, 0, 1 << 20)
    s = load_settings(environ={**env, "VZPKG_FETCH_TIMEOUT": "7", "VZPKG_APT_RETRIES": "3"})
    assert (s.fetch_timeout, s.apt_retries, s.build_timeout) == (7, 3, 600)
    s = load_settings(environ={**env, "VZPKG_FETCH_TIMEOUT": "7"}, limits={"fetch_timeout": 2, "build_timeout": None})
    assert (s.fetch_timeout, s.build_timeout) == (2, 600)


@pytest.mark.parametrize("text,env,match", [
    ("fetch_timeout = 0\n", {}, "fetch_timeout: 0 is not an integer >= 1"),
    ('build_timeout = "long"\n', {}, "build_timeout: 'long'"),
    ("apt_retries = -1\n", {}, "apt_retries"),
    ("", {"VZPKG_FETCH_TIMEOUT": "soon"}, "VZPKG_FETCH_TIMEOUT: fetch_timeout: 'soon'"),
    ("", {"VZPKG_MAX_INDEX_SIZE": "10"}, "max_index_size: 10 is not an integer >= 1024"),
])
def test_network_limits_are_checked(tmp_path: Path, text: str, env: dict[str, str], match: str) -> None:
    conf = tmp_path / "vzpkg.conf"
    conf.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_settings(environ={"VZPKG_CONFIG": str(conf), **env})
