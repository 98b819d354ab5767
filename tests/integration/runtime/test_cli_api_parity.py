"""vzctl and vzpkg.api behave the same: one VE driven through the CLI, another through the API, the same steps;
after each, the same exit code (an exception's exit_code for the API), the same error message (the VEID
aside), the same output and the same state."""

from __future__ import annotations

import json
import os

import pytest

from vzpkg.api import VE
from vzpkg.errors import VzError

pytestmark = pytest.mark.root


class Cli:
    def __init__(self, rt, veid: str) -> None:
        self.rt = rt
        self.veid = veid

    def run(self, verb: str, *args: str) -> tuple[int, str, str, str]:
        """(exit code, error message without 'vzctl: error: ', stdout, stderr)"""
        if verb == "create":
            args = ("--ostemplate", self.rt.template, *args)
        p = self.rt.vzctl(verb, self.veid, *args, check=False)
        err = p.stderr.strip()
        msg = err.split("vzctl: error: ", 1)[1] if "vzctl: error: " in err else ""
        return p.returncode, msg.replace(self.veid, "X"), p.stdout, p.stderr

    def status(self) -> dict:
        return json.loads(self.rt.vzctl("status", self.veid, "--json").stdout)

    def beancounters(self) -> dict:
        bc = json.loads(self.rt.vzctl("status", self.veid, "--json", "--beancounters").stdout)["beancounters"]
        return {name: c["limit"] for name, c in bc.items() if "limit" in c}


class Api:
    def __init__(self, rt, veid: str) -> None:
        self.rt = rt
        self.veid = veid
        self.ve = VE(veid, root=rt.root)

    def run(self, verb: str, *args: str) -> tuple[int, str, str, str]:
        try:
            if verb == "create":
                VE.create(self.veid, self.rt.template, root=self.rt.root, cache_dir=self.rt.cache_dir)
            elif verb == "exec":
                r = self.ve.exec(list(args))
                return r.returncode, "", r.stdout, r.stderr
            elif verb == "destroy":
                self.ve.destroy(force="--force" in args)
            elif verb == "set":
                opts = [a for a in args if a != "--save"]
                params = {opts[i].removeprefix("--"): opts[i + 1] for i in range(0, len(opts), 2)}
                self.ve.set(save="--save" in args, **params)
            else:
                getattr(self.ve, verb)()
        except VzError as e:
            return e.exit_code, str(e).replace(self.veid, "X"), "", ""
        return 0, "", "", ""

    def status(self) -> dict:
        return self.ve.status().as_dict()

    def beancounters(self) -> dict:
        return {name: c["limit"] for name, c in self.ve.status(beancounters=True).beancounters.items() if "limit" in c}


SAVED = ("RAM", "SWAP", "NUMPROC", "CPUUNITS", "HOSTNAME")


def _saved(rt, veid: str) -> dict[str, str | None]:
    """The settable keys in the VE's config file (None: no such file)."""
    conf = rt.root / "conf" / f"{veid}.conf"
    if not conf.exists():
        return dict.fromkeys(SAVED)
    lines = dict(line.split("=", 1) for line in conf.read_text().splitlines() if "=" in line)
    return {k: lines.get(k) for k in SAVED}


def _same_state(cli: Cli, api: Api) -> None:
    def norm(st: dict, veid: str) -> dict:
        st = dict(st)
        assert st.pop("veid") == veid
        st["init_pid"] = st["init_pid"] is not None
        return st

    assert norm(cli.status(), cli.veid) == norm(api.status(), api.veid)
    assert _saved(cli.rt, cli.veid) == _saved(api.rt, api.veid)
    if cli.status()["running"]:
        # what a live set changed: the same limits in the kernel
        assert cli.beancounters() == api.beancounters()


STEPS = [
    # (verb, args, expected exit code)
    ("start", (), 31),  # does not exist
    ("destroy", (), 31),
    ("stop", (), 31),
    ("exec", ("true",), 31),
    ("set", ("--ram", "256M", "--save"), 31),
    ("create", (), 0),
    ("create", (), 32),  # exists
    ("exec", ("true",), 32),  # not running
    ("set", ("--ram", "256M"), 2),  # not running and not saved: would change nothing
    ("set", ("--ram", "lots", "--save"), 13),  # a bad value: the config's own check
    ("set", ("--cpuunits", "7", "--save"), 13),  # out of range
    ("set", ("--numproc", "-1", "--save"), 13),
    ("set", ("--ram", "256M", "--numproc", "300", "--hostname", "same", "--save"), 0),
    ("start", (), 0),
    ("start", (), 32),  # running
    ("set", ("--ram", "192M", "--numproc", "250"), 0),  # live, not saved
    ("set", ("--ram", "lots"), 13),  # refused before anything is applied: the limits stay
    ("exec", ("hostname",), 0),
    ("exec", ("sh", "-c", "echo out; echo err >&2; exit 7"), 7),
    ("exec", ("no-such-command",), 127),
    ("exec", ("sh", "-c", "kill -TERM $$"), None),  # killed by a signal: see below
    ("destroy", (), 32),  # running, no --force
    ("stop", (), 0),
    ("exec", ("true",), 32),
    ("stop", (), 0),  # not running: cleaned up all the same
    ("start", (), 0),
    ("destroy", ("--force",), 0),
    ("destroy", (), 31),
]


def test_cli_and_api_agree(rt):
    cli = Cli(rt, rt.new_id())
    api = Api(rt, rt.new_id())
    rt.created += [cli.veid, api.veid]
    for verb, args, expected in STEPS:
        c = cli.run(verb, *args)
        a = api.run(verb, *args)
        if expected is None:
            # a signal: vzctl exits 128+N, the API reports -N (as subprocess)
            assert (c[0], a[0]) == (128 + 15, -15), (verb, args, c, a)
        else:
            assert c[0] == a[0] == expected, (verb, args, c, a)
        assert c[1] == a[1], (verb, args)  # the same error message
        if verb == "exec" and expected not in (31, 32, None):
            assert (c[2], c[3]) == (a[2], a[3])  # the same output
        _same_state(cli, api)
    assert not (rt.root / "conf" / f"{cli.veid}.conf").exists()
    assert not (rt.root / "conf" / f"{api.veid}.conf").exists()


def test_invalid_veid_is_a_usage_error_in_both(rt):
    p = rt.vzctl("start", "0101", check=False)
    with pytest.raises(VzError) as info:
        VE("0101", root=rt.root)
    assert p.returncode == info.value.exit_code == 2
    assert p.stderr.strip() == f"vzctl: error: {info.value}"
    assert os.path.isdir(rt.root)


def test_the_api_takes_every_set_option_of_vzctl():
    """VE.create(**params) and VE.set(**params) name the same parameters, for the same config keys, as `vzctl set`."""
    from vzpkg.api import PARAMS
    from vzpkg.cli.vzctl import SET_OPTIONS

    assert PARAMS == SET_OPTIONS
