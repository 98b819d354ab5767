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
            else:
                getattr(self.ve, verb)()
        except VzError as e:
            return e.exit_code, str(e).replace(self.veid, "X"), "", ""
        return 0, "", "", ""

    def status(self) -> dict:
        return self.ve.status().as_dict()


def _same_state(cli: Cli, api: Api) -> None:
    def norm(st: dict, veid: str) -> dict:
        st = dict(st)
        assert st.pop("veid") == veid
        st["init_pid"] = st["init_pid"] is not None
        return st

    assert norm(cli.status(), cli.veid) == norm(api.status(), api.veid)


STEPS = [
    # (verb, args, expected exit code)
    ("start", (), 31),  # does not exist
    ("destroy", (), 31),
    ("create", (), 0),
    ("create", (), 32),  # exists
    ("exec", ("true",), 32),  # not running
    ("start", (), 0),
    ("start", (), 32),  # running
    ("exec", ("sh", "-c", "echo out; echo err >&2; exit 7"), 7),
    ("exec", ("no-such-command",), 127),
    ("exec", ("sh", "-c", "kill -TERM $$"), None),  # killed by a signal: see below
    ("destroy", (), 32),  # running, no --force
    ("stop", (), 0),
    ("exec", ("true",), 32),
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
        if verb == "exec" and expected not in (32, None):
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
