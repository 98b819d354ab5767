"""`vzctl set` address and resolver edits: what --ipadd/--ipdel make of an address list, and how
/etc/resolv.conf is rewritten (the live application is tested with real VEs in
tests/integration/runtime/test_network_live.py)."""

from __future__ import annotations

import pytest

from vzpkg.errors import ConfigError, UsageError
from vzpkg.runtime.conf import VEConfig
from vzpkg.runtime.live import _check_ipdel, _edit_addresses, _ip_ops
from vzpkg.runtime.spawn import _resolv_conf


def edit(current: str, ipadd: str | None = None, ipdel: str | None = None) -> str:
    return " ".join(_edit_addresses(current.split(), *_ip_ops(ipadd, ipdel)))


def test_ipadd_is_additive_and_keeps_the_written_form():
    assert edit("10.0.0.2/24", ipadd="10.0.0.3") == "10.0.0.2/24 10.0.0.3"
    assert edit("", ipadd="10.0.0.3 fd00::3") == "10.0.0.3 fd00::3"
    assert edit("10.0.0.2/24", ipadd="10.0.0.2") == "10.0.0.2"  # same address: the new prefix, in place
    assert edit("10.0.0.2/24 10.0.0.5", ipadd="10.0.0.2/16") == "10.0.0.2/16 10.0.0.5"


def test_ipdel_by_address_whatever_the_prefix_then_ipadd():
    assert edit("10.0.0.2/24 10.0.0.3 fd00::3", ipdel="10.0.0.2") == "10.0.0.3 fd00::3"
    assert edit("10.0.0.2/24 fd00::3", ipdel="fd00:0::3/64") == "10.0.0.2/24"
    assert edit("10.0.0.2/24 10.0.0.3", ipdel="all") == ""
    assert edit("10.0.0.2/24", ipdel="all", ipadd="10.0.0.9/24") == "10.0.0.9/24"  # replace: del first


def test_bad_values_refused_naming_the_option():
    with pytest.raises(ConfigError, match=r"--ipadd '10.0.0.300': '10.0.0.300' is not an IP address"):
        _ip_ops("10.0.0.300", None)
    with pytest.raises(ConfigError, match=r"--ipdel 'eth0'"):
        _ip_ops(None, "eth0")
    with pytest.raises(ConfigError, match="'all' stands alone"):
        _ip_ops(None, "all 10.0.0.2")


def test_ipdel_of_an_address_the_ve_does_not_have():
    _check_ipdel("101", ["10.0.0.2"], ["10.0.0.2/24"], None)
    _check_ipdel("101", ["10.0.0.2"], None, ["10.0.0.2/24"])
    _check_ipdel("101", None, None, [])  # all: nothing to check
    with pytest.raises(UsageError, match=r"--ipdel 10.0.0.7: VE 101 has no such address \(it has: 10.0.0.2/24\)"):
        _check_ipdel("101", ["10.0.0.7"], ["10.0.0.2/24"], ["10.0.0.2/24"])


def _conf(**kv: str) -> VEConfig:
    conf = VEConfig()
    for k, v in kv.items():
        conf.set(k, v)
    return conf


def test_resolv_conf_replaces_only_what_the_config_sets():
    old = "# from the template\nnameserver 10.0.0.53\ndomain old.test\noptions ndots:2\n"
    update = _resolv_conf(_conf(SEARCHDOMAIN="example.test"))
    assert update(old) == "# from the template\nnameserver 10.0.0.53\noptions ndots:2\nsearch example.test\n"
    update = _resolv_conf(_conf(NAMESERVER="10.0.0.54 fd00::54"))
    assert update(old) == ("nameserver 10.0.0.54\nnameserver fd00::54\n# from the template\ndomain old.test\n"
                           "options ndots:2\n")
    assert _resolv_conf(_conf(NAMESERVER="10.0.0.54", SEARCHDOMAIN="a.test b.test"))("") == (
        "nameserver 10.0.0.54\nsearch a.test b.test\n")
