"""VE config files: parsing, validation messages, round-trip preservation, atomic save, samples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vzpkg.errors import ConfigError
from vzpkg.runtime.conf import VEConfig, format_size, list_samples, parse_size, sample_path

SAMPLE = """\
# VE 101 -- managed by hand
OSTEMPLATE="debian-12-x86_64"

HOSTNAME="web1.example.org"   # public name
IP_ADDRESS="10.0.0.5 fd00::5/64"
MY_TOOL_SETTING='keep me'
RAM="512M"
CPUUNITS=1000
DISKSPACE="10G:11G"
"""


# -- sizes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("1K", 1024),
        ("512M", 512 << 20),
        ("512m", 512 << 20),
        ("2G", 2 << 30),
        ("2GB", 2 << 30),
        ("1T", 1 << 40),
        ("unlimited", None),
        ("UNLIMITED", None),
    ],
)
def test_parse_size(text: str, expected: int | None) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "1.5G", "-1", "12X", "G", "1 G x", "ten"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="K/M/G/T"):
        parse_size(text)


@pytest.mark.parametrize(
    ("n", "text"), [(0, "0"), (1000, "1000"), (1024, "1K"), (1536, "1536"), (512 << 20, "512M"), (3 << 40, "3T")]
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 1025, 4096, 1 << 20, (1 << 30) + 4096, 7 << 40, None])
def test_size_round_trip(n: int | None) -> None:
    assert parse_size(format_size(n)) == n


# -- parsing and accessors -----------------------------------------------------------------------------------


def test_parse_values_and_accessors() -> None:
    cfg = VEConfig.parse(SAMPLE)
    assert cfg.get("OSTEMPLATE") == "debian-12-x86_64"
    assert cfg.get("HOSTNAME") == "web1.example.org"
    assert cfg.get("MY_TOOL_SETTING") == "keep me"
    assert cfg.get("CPUUNITS") == "1000"
    assert cfg.get("NOPE") is None
    assert cfg.get("NOPE", "x") == "x"
    assert cfg.ram_bytes == 512 << 20
    assert cfg.swap_bytes is None
    assert cfg.cpuunits == 1000
    assert cfg.cpulimit == 0
    assert cfg.cpus == 0
    assert cfg.numproc is None
    assert cfg.diskspace == (10 << 30, 11 << 30)
    assert cfg.diskinodes == (None, None)
    assert list(cfg.to_dict()) == [
        "OSTEMPLATE", "HOSTNAME", "IP_ADDRESS", "MY_TOOL_SETTING", "RAM", "CPUUNITS", "DISKSPACE"
    ]  # fmt: skip


def test_defaults_when_unset() -> None:
    cfg = VEConfig.parse("")
    assert (cfg.cpuunits, cfg.cpulimit, cfg.cpus, cfg.ram_bytes, cfg.numproc) == (1000, 0, 0, None, None)


def test_single_value_means_barrier_equals_limit() -> None:
    cfg = VEConfig.parse('DISKSPACE="5G"\nDISKINODES="1000"\nNUMPROC="100:120"\n')
    assert cfg.diskspace == (5 << 30, 5 << 30)
    assert cfg.diskinodes == (1000, 1000)
    assert cfg.numproc == 120


def test_last_assignment_wins() -> None:
    cfg = VEConfig.parse('RAM="1G"\nRAM="2G"\n')
    assert cfg.ram_bytes == 2 << 30


def test_escaped_quotes() -> None:
    cfg = VEConfig.parse('DESCRIPTION="say \\"hi\\" for \\$5"\n')
    assert cfg.get("DESCRIPTION") == 'say "hi" for $5'


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("just some words", 'expected KEY="value"'),
        ('RAM="512M', "missing closing"),
        ("HOSTNAME=a b", "must be quoted"),
        ('RAM="1G" trailing', "unexpected text"),
    ],
)
def test_syntax_errors_name_the_line(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as exc:
        VEConfig.parse("# ok\n" + text + "\n", source="conf/101.conf")
    assert str(exc.value).startswith("conf/101.conf:2: ")
    assert "\n" not in str(exc.value)


# -- validation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("CPUUNITS", "8"),
        ("CPUUNITS", "500000"),
        ("CPULIMIT", "0"),
        ("CPULIMIT", "250"),
        ("CPUS", "0"),
        ("CPUS", "4"),
        ("RAM", "16M"),
        ("RAM", "unlimited"),
        ("SWAP", "0"),
        ("NUMPROC", "1"),
        ("NUMPROC", "unlimited"),
        ("NUMPROC", "100:200"),
        ("DISKSPACE", "1G:2G"),
        ("DISKSPACE", "unlimited"),
        ("DISKSPACE", "1G:unlimited"),
        ("DISKINODES", "1000:2000"),
        ("IP_ADDRESS", "10.0.0.1 10.0.0.2/24 2001:db8::1"),
        ("NAMESERVER", "1.1.1.1 2606:4700:4700::1111"),
        ("SEARCHDOMAIN", "example.org lan"),
        ("HOSTNAME", "a-b.example.org"),
        ("ONBOOT", "yes"),
        ("INIT", "distro"),
        ("PRIVILEGED", "no"),
        ("LAYOUT", "copy"),
        ("ID_SHIFT", "100000"),
        ("TEMPLATE_SHA256", "ab" * 32),
        ("NAME", "web-1"),
        ("VE_ROOT", "/vz/root/$VEID"),
        ("OSTEMPLATE", "debian-12-x86_64-devel"),
        ("CPUUNITS", ""),  # empty = not set
    ],
)
def test_valid_values(key: str, value: str) -> None:
    cfg = VEConfig.parse("")
    cfg.set(key, value)
    cfg.validate()
    assert cfg.get(key) == value


@pytest.mark.parametrize(
    ("key", "value", "accepted"),
    [
        ("CPUUNITS", "5", "an integer 8..500000"),
        ("CPUUNITS", "500001", "an integer 8..500000"),
        ("CPUUNITS", "abc", "an integer 8..500000"),
        ("CPULIMIT", "-1", "percent"),
        ("CPUS", "two", "number of CPUs"),
        ("RAM", "1M", "16M..1024T"),
        ("RAM", "99999999999T", "16M..1024T"),
        ("RAM", "1025T", "16M..1024T"),
        ("SWAP", "2048T", "0..1024T"),
        ("CPUUNITS", "500001", "8..500000"),
        ("CPUUNITS", "99999999999999999999", "8..500000"),
        ("CPULIMIT", "99999999999999", "0..819200"),
        ("CPULIMIT", "\uff15", "0..819200"),
        ("CPUS", "8193", "0..8192"),
        ("NUMPROC", "5000000", "1..4194304"),
        ("NUMPROC", "5000000:5000000", "1..4194304"),
        ("NUMPROC", "4194305", "1..4194304"),
        ("DISKSPACE", "2000000T", "barrier:limit"),
        ("RAM", "lots", "K/M/G/T"),
        ("SWAP", "1.5G", "K/M/G/T"),
        ("NUMPROC", "0", "integer 1..4194304"),
        ("DISKSPACE", "2G:1G", "barrier <= limit"),
        ("DISKSPACE", "1G:2G:3G", "barrier:limit"),
        ("DISKINODES", "10K", "integer"),
        ("IP_ADDRESS", "10.0.0.300", "IPv4/IPv6"),
        ("NAMESERVER", "10.0.0.0/8", "IPv4/IPv6"),
        ("HOSTNAME", "-bad-.org", "host name"),
        ("ONBOOT", "true", "yes or no"),
        ("INIT", "systemd", "minimal or distro"),
        ("LAYOUT", "ploop", "overlay, copy, image, btrfs, projquota or auto"),
        ("ID_SHIFT", "-5", "integer"),
        ("TEMPLATE_SHA256", "abc", "hex"),
        ("NAME", "101", "not all digits"),
        ("VE_ROOT", "relative/path", "absolute path"),
        ("OSTEMPLATE", "../etc", "template name"),
    ],
)
def test_invalid_values_name_key_value_and_rule(key: str, value: str, accepted: str) -> None:
    cfg = VEConfig.parse("")
    with pytest.raises(ConfigError) as exc:
        cfg.set(key, value)
    msg = str(exc.value)
    assert msg.startswith(f'{key}="{value}": must be ')
    assert accepted in msg
    assert "\n" not in msg
    assert cfg.get(key) is None  # a rejected set changes nothing


@pytest.mark.parametrize("key,value", [("RAM", "1024T"), ("SWAP", "1024T"), ("CPULIMIT", "819200"), ("CPUS", "8192"),
                                       ("NUMPROC", "4194304"), ("NUMPROC", "100:4194304"), ("CPUUNITS", "500000")])
def test_largest_accepted_values(key: str, value: str) -> None:
    """The upper ends of the documented ranges are accepted (the kernel takes them: see docs/ve-config.md)."""
    cfg = VEConfig.parse("")
    cfg.set(key, value)
    assert cfg.get(key) == value


@pytest.mark.parametrize("text,what", [("", "is missing"), ('TEMPLATE_SHA256=""\n', "is empty"),
                                       ('TEMPLATE_SHA256="abc"\n', "not 64 lowercase hex digits")])
def test_ve_config_needs_its_template_sha256(text: str, what: str) -> None:
    """Without TEMPLATE_SHA256 a VE's lower layer would be the whole template area: validate_ve refuses, naming
    the file and what to do; a sample config (validate) does not need it."""
    cfg = VEConfig.parse(text, source="conf/7.conf", strict=False)
    with pytest.raises(ConfigError) as exc:
        cfg.validate_ve()
    msg = str(exc.value)
    assert msg.startswith("conf/7.conf") and what in msg and "recreate the VE" in msg and "\n" not in msg
    VEConfig.parse(f'TEMPLATE_SHA256="{"a" * 64}"\n').validate_ve()


def test_parse_validates_with_location() -> None:
    with pytest.raises(ConfigError, match=r'^conf/7.conf:2: CPUUNITS="5": must be an integer 8..500000$'):
        VEConfig.parse('RAM="1G"\nCPUUNITS="5"\n', source="conf/7.conf")


def test_non_strict_parse_defers_validation() -> None:
    cfg = VEConfig.parse('CPUUNITS="5"\n', strict=False)
    with pytest.raises(ConfigError, match="CPUUNITS"):
        cfg.validate()
    cfg.set("CPUUNITS", "10")
    cfg.validate()


def test_unknown_keys_are_not_validated_but_must_be_single_line() -> None:
    cfg = VEConfig.parse("")
    cfg.set("X_CUSTOM", "anything goes $here")
    with pytest.raises(ConfigError, match="single line"):
        cfg.set("X_CUSTOM", "a\nb")
    with pytest.raises(ConfigError, match="key"):
        cfg.set("bad key", "1")


# -- round trip and saving ------------------------------------------------------------------------------------


def test_unchanged_round_trip_is_verbatim() -> None:
    assert VEConfig.parse(SAMPLE).render() == SAMPLE


def test_set_rewrites_only_that_line_and_keeps_trailing_comment() -> None:
    cfg = VEConfig.parse(SAMPLE)
    cfg.set("HOSTNAME", "web2.example.org")
    cfg.set("RAM", "1G")
    cfg.set("NUMPROC", "512")
    out = cfg.render().splitlines()
    before = SAMPLE.splitlines()
    assert out[3] == 'HOSTNAME="web2.example.org"   # public name'
    assert out[6] == 'RAM="1G"'
    assert out[-1] == 'NUMPROC="512"'
    unchanged = [i for i in range(len(before)) if i not in (3, 6)]
    assert [out[i] for i in unchanged] == [before[i] for i in unchanged]


def test_set_same_value_keeps_original_formatting() -> None:
    cfg = VEConfig.parse(SAMPLE)
    cfg.set("CPUUNITS", "1000")  # written unquoted in the file; stays so
    assert cfg.render() == SAMPLE


def test_set_quotes_shell_specials() -> None:
    cfg = VEConfig.parse("")
    cfg.set("DESCRIPTION", 'a "b" $c `d` \\e')
    assert cfg.render() == 'DESCRIPTION="a \\"b\\" \\$c \\`d\\` \\\\e"\n'
    assert VEConfig.parse(cfg.render()).get("DESCRIPTION") == 'a "b" $c `d` \\e'


def test_unset() -> None:
    cfg = VEConfig.parse(SAMPLE)
    cfg.unset("RAM")
    assert cfg.get("RAM") is None
    assert "RAM=" not in cfg.render()


def test_save_load_atomic(tmp_path: Path) -> None:
    path = tmp_path / "101.conf"
    cfg = VEConfig.parse(SAMPLE)
    cfg.save(path)
    assert path.read_text() == SAMPLE
    os.chmod(path, 0o600)
    cfg.set("RAM", "2G")
    cfg.save(path)
    assert VEConfig.load(path).ram_bytes == 2 << 30
    assert path.stat().st_mode & 0o777 == 0o600  # a rewrite keeps the file's mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["101.conf"]  # no temp file left behind


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        VEConfig.load(tmp_path / "nope.conf")


# -- samples --------------------------------------------------------------------------------------------------


def test_samples_exist_and_validate() -> None:
    names = list_samples()
    assert {"basic", "light", "unlimited"} <= set(names)
    for name in names:
        VEConfig.load(sample_path(name)).validate()


def test_basic_sample_defaults() -> None:
    cfg = VEConfig.load(sample_path("basic"))
    assert cfg.ram_bytes == 512 << 20
    assert cfg.cpuunits == 1000
    assert cfg.numproc == 1024


def test_unlimited_sample_has_no_limits() -> None:
    cfg = VEConfig.load(sample_path("unlimited"))
    assert (cfg.ram_bytes, cfg.swap_bytes, cfg.numproc, cfg.cpulimit) == (None, None, None, 0)
    assert cfg.diskspace == (None, None)


def test_unknown_sample() -> None:
    with pytest.raises(ConfigError, match="available: .*basic"):
        sample_path("huge")
