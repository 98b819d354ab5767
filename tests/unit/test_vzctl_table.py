"""vzctl's two parsers, both built from one table (vzpkg.cli.vzctl.TABLE): the argparse-free fast path must parse
every command line it accepts exactly as argparse does (same attributes, same values), raise the same error line
and exit code where it raises one, and leave everything else to argparse (None). Checked over a corpus of command
lines built from the table itself (every command, every option in both `--opt value` and `--opt=value` forms,
bad values, missing and extra arguments, unknown options, `--`), plus random token sequences."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vzpkg.cli import vzctl
from vzpkg.errors import UsageError


def _argparse(argv: list[str]) -> tuple:
    """('ok', attributes), ('error', exit code, message) or ('exit', status: help) from the argparse parser that
    vzctl.run would build for ARGV."""
    try:
        return ("ok", vars(vzctl._slow_parse(argv)))
    except UsageError as e:
        return ("error", e.exit_code, e.message)
    except SystemExit as e:  # --help
        return ("exit", e.code)


def _fast(argv: list[str]) -> tuple | None:
    try:
        args = vzctl._fast_parse(argv)
    except UsageError as e:
        return ("error", e.exit_code, e.message)
    return None if args is None else ("ok", vars(args))


def _good_value(spec: dict) -> str:
    if "choices" in spec:
        return spec["choices"][-1]
    return {"int": "600000", "timeout": "2.5"}.get(spec.get("type", ""), "val-1")


def _corpus() -> list[list[str]]:
    lines: list[list[str]] = [[], ["-q"], ["--root", "/x"], ["bogus", "101"], ["--", "start", "101"], ["-h"]]
    for name, cmd in vzctl.TABLE.items():
        opts = cmd.get("opts", {})
        required = [a for flag, spec in opts.items() if spec.get("required") for a in (flag, _good_value(spec))]
        base = [name, "101", *required]
        rest = [["/bin/true"], ["--", "ls", "-l"], ["--", "--", "ls"], ["-q", "ls"], ["ls", "--", "x"], ["--help"],
                ["sh -c x"], []] if "rest" in cmd else [[]]
        for r in rest:
            lines += [base + r, [name, "-q", "101", *required] + r, ["--root", "/r", *base] + r,
                      ["-q", name, "--root=/r", "101", *required] + r]
        lines += [[name], [name, *required], base + ["102"], base + ["--bogus"], base + ["--"],
                  [name, "--", "101", *required], [name, "101", "-h"], [name, "-101", *required],
                  [name, "", *required], base + ["--root"], base + ["--root", "-x"], base + ["--quiet=1"],
                  base + ["-q", "-q"], base + ["--root", "/a", "--root", "/b"], base + ["--root="], ["--fast", *base]]
        for long_flag, spec in {**vzctl.COMMON, **opts}.items():
            for flag in (long_flag, *spec.get("aliases", ())):
                if spec.get("flag"):
                    lines += [base + [flag], base + [f"{flag}=1"], base + [flag, flag]]
                    continue
                good = _good_value(spec)
                lines += [base + [flag, good], base + [f"{flag}={good}"], [name, flag, good, "101", *required],
                          base + [flag], base + [flag, "-x"], base + [f"{flag}=-x"], base + [f"{flag}="],
                          base + [flag, "abc"], base + [f"{flag}=abc"], base + [flag, "-5"], base + [flag, "-inf"], base + [flag, "1e300"],
                          base + [flag, good, flag, "7"], base + [flag[:-1], good], base + [flag + "x", good]]
    return lines


def _check(argv: list[str]) -> str:
    fast, slow = _fast(argv), _argparse(argv)
    if fast is None:
        return "argparse"
    if fast[0] == "ok":
        assert slow == fast, argv
    else:  # same exit code and the same line
        assert slow[0] == "error" and slow[1:] == fast[1:], (argv, slow, fast)
    return fast[0]


def test_fast_path_agrees_with_argparse_on_the_corpus():
    corpus = _corpus()
    outcomes = [_check(argv) for argv in corpus]
    # the corpus is no formality: the fast path takes most lines, and errors and declines occur too
    assert outcomes.count("ok") > len(corpus) // 3, outcomes.count("ok")
    assert outcomes.count("error") >= 4 and outcomes.count("argparse") > len(corpus) // 4


_TOKENS = [*vzctl.COMMANDS, "101", "web-1", "--", "-", "", "-q", "--quiet", "--root", "--root=/v", "/v", "-h",
           "--fast", "--timeout", "--timeout=3", "3", "abc", "-5", "--json", "--ostemplate", "--layout", "copy",
           "--idmap=shared", "--id-shift", "--ram", "1G", "--save", "--force", "--bogus", "--ram=", "ls"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=7))
def test_fast_path_agrees_with_argparse_on_random_lines(argv):
    _check(argv)


def test_plain_forms_take_the_fast_path():
    """Every command's plain form is parsed without argparse (its import costs ~6 ms of vzctl exec/start)."""
    for line in (["exec", "101", "/bin/true"], ["exec", "101", "--", "ls"], ["start", "101"], ["-q", "stop", "101"],
                 ["stop", "101", "--timeout", "5"], ["restart", "101", "--fast"], ["status", "101", "--json"],
                 ["create", "101", "--ostemplate", "debian-12-x86_64", "--layout", "copy"], ["enter", "101"],
                 ["set", "101", "--ram", "1G", "--save"], ["destroy", "101", "--force"], ["mount", "101"],
                 ["umount", "101"], ["--root", "/v", "status", "101", "--beancounters"]):
        assert _fast(line) is not None and _fast(line)[0] == "ok", line


@pytest.mark.parametrize("cmd", vzctl.COMMANDS)
def test_parser_of_one_command_is_the_full_parser(cmd):
    """vzctl builds only the named command's sub-parser: it must parse that command as the full parser does."""
    rng = random.Random(cmd)
    for argv in [line for line in _corpus() if vzctl._command_of(line) == cmd] + [
            [cmd, *rng.sample(_TOKENS, 4)] for _ in range(50)]:
        try:
            want: tuple = ("ok", vars(vzctl._parser().parse_args(vzctl._glued(argv))))
        except UsageError as e:
            want = ("error", e.message)
        except SystemExit as e:
            want = ("exit", e.code)
        got = _argparse(argv)
        assert got[0] == want[0] and (got[0] != "ok" or got == want), (argv, got, want)


def test_every_table_option_reaches_argparse():
    """Each Opt of the table is an option of its command's argparse parser, with its default."""
    for name, cmd in vzctl.TABLE.items():
        sub = vzctl._parser(name)._subparsers._group_actions[0].choices[name]
        by_flag = {f: a for a in sub._actions for f in a.option_strings}
        for flag, spec in {**vzctl.COMMON, **cmd.get("opts", {})}.items():
            action = by_flag[flag]
            assert action.dest == vzctl.dest(flag) and action.default == vzctl.default(spec)
            assert action.option_strings == [*spec.get("aliases", ()), flag]


def test_an_option_value_that_looks_like_an_option_is_left_to_argparse():
    """`--root --` (found by the random lines): argparse has its own rules for such values; the fast path declines."""
    for argv in (["start", "create", "--root", "--"], ["stop", "101", "--timeout", "-5"], ["start", "101", "--root", "-q"]):
        assert _check(argv) == "argparse", argv
