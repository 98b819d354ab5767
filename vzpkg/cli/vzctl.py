"""vzctl: manage VEs (OpenVZ's command set). Parsing and printing only; the work is in vzpkg.runtime (ve, attach).

The commands and options are declared once, in COMMON and TABLE (plain data). Both parsers are built from it:
argparse (help, errors, anything unusual) and an argparse-free fast path for the plain forms. argparse rather than
click: `vzctl start` and `vzctl exec` are on the start-to-first-exec path, where click's ~15 ms of imports would
be a sixth of the budget, and even argparse's own import (with re, enum and gettext) costs ~6 ms of it, hence the
fast path. tests/unit/test_vzctl_table.py checks that both agree.
"""

from __future__ import annotations

import os
import sys

SET_OPTIONS = {
    "ram": "RAM", "swap": "SWAP", "cpuunits": "CPUUNITS", "cpulimit": "CPULIMIT", "cpus": "CPUS",
    "numproc": "NUMPROC", "diskspace": "DISKSPACE", "diskinodes": "DISKINODES", "hostname": "HOSTNAME",
    "ipadd": "IP_ADDRESS", "nameserver": "NAMESERVER", "onboot": "ONBOOT", "init": "INIT",
}

SUPPRESS = "==SUPPRESS=="  # argparse.SUPPRESS (not imported for it): the attribute is absent unless given


class Opt:
    """One option: FLAGS (the last names the attribute); VALUE: takes one value (else a store_true flag);
    TYPE: a key of _TYPES; CHOICES, DEFAULT, REQUIRED and HELP as in argparse's add_argument."""

    __slots__ = ("flags", "dest", "value", "type", "choices", "default", "required", "help")

    def __init__(self, *flags: str, value: bool = True, type: str | None = None,
                 choices: tuple[str, ...] | None = None, default: object = None, required: bool = False,
                 help: str | None = None) -> None:
        self.flags = flags
        self.dest = flags[-1].lstrip("-").replace("-", "_")
        self.value = value
        self.type = type
        self.choices = choices
        self.default = default if value or default is not None else False
        self.required = required
        self.help = help


class Cmd:
    """One command: NAME, HELP, its positional ARGS, OPTS, and REST: the attribute that takes every argument after
    the positionals (argparse.REMAINDER), or None."""

    __slots__ = ("name", "help", "args", "opts", "rest")

    def __init__(self, name: str, help: str, opts: tuple[Opt, ...] = (), *,
                 args: tuple[str, ...] = ("veid",), rest: str | None = None) -> None:
        self.name = name
        self.help = help
        self.args = args
        self.opts = opts
        self.rest = rest


# before the command and after it
COMMON = (
    Opt("--root", default=SUPPRESS, help="VZ root (default $VZ_ROOT or /var/lib/vz)"),
    Opt("-q", "--quiet", value=False, default=SUPPRESS),
)

# in the order of `vzctl --help`; adding a command or an option is one entry here
TABLE = (
    Cmd("create", "create a VE from a template cache", (
        Opt("--ostemplate", required=True,
            help="cache name, e.g. debian-12-x86_64, or a registry reference to pull (HOST/PATH/NAME:TAG)"),
        Opt("--hostname"),
        Opt("--config", help="sample config (basic, light, unlimited)"),
        Opt("--layout", choices=("overlay", "copy")),
        Opt("--privileged", value=False, help="no user namespace: UNSAFE, host root in the VE"),
        Opt("--cache-dir", help="where the caches are (default $VZPKG_CACHE_DIR or the config)"),
        Opt("--idmap", choices=("private", "shared"),
            help="private (default): 65536 host ids of the VE's own, the template seen through an idmapped "
                 "mount; shared: the range 100000..165535 that every shared VE has"),
        Opt("--id-shift", type="int",
            help="host uid/gid of the VE's root (default: the lowest free private range from 524288; "
                 "100000 with --idmap shared, where another value costs one more unpack of the template)"),
    )),
    Cmd("start", "start a VE"),
    Cmd("mount", "mount a VE's root"),
    Cmd("umount", "unmount it"),
    Cmd("enter", "interactive shell in a running VE"),
    Cmd("stop", "stop a VE", (
        Opt("--fast", value=False, help="SIGKILL at once"),
        Opt("--timeout", type="timeout", default=10.0, help="seconds to wait after SIGTERM, 0..3600 (default 10)"),
    )),
    Cmd("restart", "stop and start a VE", (
        Opt("--fast", value=False),
        Opt("--timeout", type="timeout", default=10.0),
    )),
    Cmd("status", "exist/deleted mounted/unmounted running/down", (
        Opt("--json", value=False),
        Opt("--beancounters", value=False, help="resource counters (held, maxheld, limit, failcnt)"),
    )),
    Cmd("exec", "run a command in a running VE", rest="cmd"),
    Cmd("set", "change a VE's parameters (running VEs at once)", (
        *(Opt(f"--{name}") for name in SET_OPTIONS),
        Opt("--save", value=False, help="also write them to the VE's config"),
    )),
    Cmd("destroy", "remove a VE and its private area", (
        Opt("--force", value=False, help="stop it first if running"),
    )),
)
COMMANDS = tuple(c.name for c in TABLE)
_BY_NAME = {c.name: c for c in TABLE}


def parse_timeout(text: str) -> float:
    """--timeout: seconds, finite, 0..3600 (nan, inf or 1e300 would make stop wait forever or fail)."""
    import math

    from vzpkg.errors import UsageError
    from vzpkg.runtime.ve import STOP_TIMEOUT_MAX

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 <= value <= STOP_TIMEOUT_MAX:
        raise UsageError(f"--timeout {text!r}: must be a number of seconds from 0 to {STOP_TIMEOUT_MAX:.0f}")
    return value


# Opt.type -> converter, for both parsers. A ValueError is argparse's "invalid VALUE" error (the fast path leaves
# it to argparse); a UsageError (parse_timeout's) passes through argparse, so both paths print the same line.
_TYPES = {"int": int, "timeout": parse_timeout}


def one_line_parser(argparse, **kw):
    """An ArgumentParser whose errors are one `PROG: error: ...` line (UsageError, exit 2), without the usage
    block: every error of these commands is one line."""

    class Parser(argparse.ArgumentParser):
        def __init__(self, *a, **k) -> None:
            # No prefix matching: `vzctl set 101 --name web1` (OpenVZ's --name) must not be taken as
            # --nameserver, nor `--ip` as --ipadd; an option added later would change what a prefix means.
            k.setdefault("allow_abbrev", False)
            super().__init__(*a, **k)

        def error(self, message: str):  # type: ignore[override]
            from vzpkg.errors import UsageError

            raise UsageError(f"{message} (see '{self.prog} --help')")

    return Parser(**kw)


def _add_option(argparse, parser, opt: Opt) -> None:
    # argparse tests `default is SUPPRESS`: an equal string is not enough
    kw: dict = {"default": argparse.SUPPRESS if opt.default == SUPPRESS else opt.default}
    if opt.value:
        if opt.type is not None:
            kw["type"] = _TYPES[opt.type]
        if opt.choices is not None:
            kw["choices"] = opt.choices
        if opt.required:
            kw["required"] = True
    else:
        kw["action"] = "store_true"
    if opt.help is not None:
        kw["help"] = opt.help
    parser.add_argument(*opt.flags, **kw)


def _parser(only: str | None = None):
    """The argparse parser, built from the table; with ONLY, just that command's sub-parser is built (building all
    costs ~5 ms per run)."""
    import argparse

    common = argparse.ArgumentParser(add_help=False)
    for opt in COMMON:
        _add_option(argparse, common, opt)
    p = one_line_parser(argparse, prog="vzctl", parents=[common], description="Manage VEs (virtual environments).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=type(p))
    for cmd in TABLE:
        if only is not None and cmd.name != only:
            continue
        s = sub.add_parser(cmd.name, parents=[common], help=cmd.help)
        for name in cmd.args:
            s.add_argument(name)
        if cmd.rest is not None:
            s.add_argument(cmd.rest, nargs=argparse.REMAINDER)
        for opt in cmd.opts:
            _add_option(argparse, s, opt)
    return p


def _note_host_cpus(changes: dict[str, str]) -> None:
    """CPUS or CPULIMIT beyond this host's CPUs is valid (the config stays portable) but has no effect here."""
    ncpu = os.cpu_count() or 1
    if changes.get("CPUS", "").isdigit() and int(changes["CPUS"]) > ncpu:
        print(f"vzctl: note: this host has {ncpu} CPUs; CPUS={changes['CPUS']} gives the VE all of them",
              file=sys.stderr)
    if changes.get("CPULIMIT", "").isdigit() and int(changes["CPULIMIT"]) > 100 * ncpu:
        print(f"vzctl: note: this host has {ncpu} CPUs; CPULIMIT={changes['CPULIMIT']} (over {100 * ncpu}) caps "
              "nothing here", file=sys.stderr)


def _say(args, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, flush=True)


def _format_beancounters(bc: dict) -> str:
    lines = [f"{'resource':<12} {'held':>14} {'maxheld':>14} {'limit':>20} {'failcnt':>8}"]
    for res, vals in bc.items():
        if not isinstance(vals, dict) or "held" not in vals:
            continue

        def fmt(v):
            return "unlimited" if v is None else str(v)

        lines.append(f"{res:<12} {fmt(vals.get('held')):>14} {fmt(vals.get('maxheld')):>14} "
                     f"{fmt(vals.get('limit')):>20} {fmt(vals.get('failcnt')):>8}")
    cpu = bc.get("cpu") or {}
    if cpu:
        lines.append(f"cpu usage_ns={cpu.get('usage_ns')} nr_throttled={cpu.get('nr_throttled')}")
    return "\n".join(lines)


def _command_of(argv: list[str]) -> str | None:
    """The command named in ARGV (skipping the common options before it), or None."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in _COMMON_VALUE_FLAGS:
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return a if a in _BY_NAME else None
    return None


class _Args:
    """What argparse would return, for the fast path."""

    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


def _flags(opts: tuple[Opt, ...]) -> dict[str, Opt]:
    return {flag: opt for opt in opts for flag in opt.flags}


_COMMON_FLAGS = _flags(COMMON)
_COMMON_VALUE_FLAGS = frozenset(f for f, opt in _COMMON_FLAGS.items() if opt.value)
_CMD_FLAGS = {cmd.name: {**_COMMON_FLAGS, **_flags(cmd.opts)} for cmd in TABLE}


def _fast_parse(argv: list[str]) -> _Args | None:
    """ARGV parsed from the table without argparse, as argparse would parse it (the same attributes and values);
    None for anything this does not do as argparse would (help, errors, values that start with '-', '--' before
    the command's arguments, abbreviated short options...): argparse then handles it. A bad --timeout raises here
    the same UsageError argparse would."""
    kw: dict = {}
    given: set[str] = set()
    cmd: Cmd | None = None
    flags = _COMMON_FLAGS
    pos: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if cmd is not None and cmd.rest is not None and len(pos) == len(cmd.args):
            rest = argv[i:]
            kw[cmd.rest] = rest[1:] if rest[:1] == ["--"] else rest  # as argparse: a first '--' is dropped
            break
        if a.startswith("-"):
            name, eq, value = a.partition("=")
            opt = flags.get(name) if name.startswith("--") or not eq else None
            if opt is None or (eq and not opt.value):
                return None
            if opt.value:
                if not eq:
                    i += 1
                    if i >= len(argv) or argv[i].startswith("-"):
                        return None
                    value = argv[i]
                if opt.choices is not None and value not in opt.choices:
                    return None
                if opt.type is not None:
                    try:
                        value = _TYPES[opt.type](value)
                    except ValueError:
                        return None
                kw[opt.dest] = value
            else:
                kw[opt.dest] = True
            given.add(opt.dest)
        elif cmd is None:
            cmd = _BY_NAME.get(a)
            if cmd is None:
                return None
            flags = _CMD_FLAGS[a]
            kw.update((opt.dest, opt.default) for opt in cmd.opts if opt.default != SUPPRESS)
        elif len(pos) < len(cmd.args):
            pos.append(a)
        else:
            return None
        i += 1
    if cmd is None or len(pos) != len(cmd.args):
        return None
    if cmd.rest is not None:
        kw.setdefault(cmd.rest, [])
    if any(opt.required and opt.dest not in given for opt in cmd.opts):
        return None
    return _Args(command=cmd.name, **dict(zip(cmd.args, pos, strict=True)), **kw)


def run(argv: list[str]) -> int:
    args = _fast_parse(argv) or _parser(_command_of(argv)).parse_args(argv)
    from vzpkg.runtime import ve
    from vzpkg.runtime.layout import Layout

    layout = Layout.at(getattr(args, "root", None))
    cmd = args.command
    if cmd == "create":
        cache_dir = args.cache_dir or os.environ.get("VZPKG_CACHE_DIR")
        if not cache_dir:
            from vzpkg.config import load_settings

            cache_dir = load_settings().cache_dir
        if "/" in args.ostemplate:  # a registry reference: pull it into the cache directory first
            from vzpkg.registry.transfer import pull_for_create

            args.ostemplate = pull_for_create(args.ostemplate, cache_dir)
        ve.create(layout, args.veid, args.ostemplate, cache_dir=cache_dir, hostname=args.hostname,
                  sample=args.config, layout_kind=args.layout, privileged=args.privileged,
                  id_shift=args.id_shift, idmap=args.idmap)
        if args.privileged:
            print("vzctl: WARNING: a --privileged VE runs as host root without a user namespace; on a stock "
                  "kernel its root can take the host over. Use it only for trusted workloads.", file=sys.stderr)
        _say(args, f"VE {args.veid} created from {args.ostemplate}")
    elif cmd == "start":
        pid = ve.start(layout, args.veid)
        _say(args, f"VE {args.veid} started (init pid {pid})")
    elif cmd == "stop":
        was = ve.stop(layout, args.veid, fast=args.fast, timeout=args.timeout)
        _say(args, f"VE {args.veid} stopped" if was else f"VE {args.veid} was not running (cleaned up)")
    elif cmd == "restart":
        ve.stop(layout, args.veid, fast=args.fast, timeout=args.timeout)
        pid = ve.start(layout, args.veid)
        _say(args, f"VE {args.veid} restarted (init pid {pid})")
    elif cmd == "status":
        st = ve.status(layout, args.veid, beancounters=args.beancounters)
        if args.json:
            import json

            print(json.dumps(st, indent=2, sort_keys=True))
        else:
            print(ve.status_line(st))
            if args.beancounters:
                print(_format_beancounters(st.get("beancounters") or {}))
    elif cmd == "exec":
        cmd_argv = args.cmd  # a '--' after the VEID is gone already (both parsers drop it)
        if not cmd_argv:
            from vzpkg.errors import UsageError

            raise UsageError("vzctl exec VEID COMMAND [ARG...]: no command given")
        if len(cmd_argv) == 1 and " " in cmd_argv[0]:
            cmd_argv = ["/bin/sh", "-c", cmd_argv[0]]  # OpenVZ: a single string is a shell command line
        from vzpkg.runtime import attach

        return attach.exec_in(layout, args.veid, cmd_argv)
    elif cmd == "enter":
        from vzpkg.runtime import attach

        return attach.enter(layout, args.veid)
    elif cmd == "set":
        changes = {key: getattr(args, opt) for opt, key in SET_OPTIONS.items() if getattr(args, opt) is not None}
        if not changes:
            from vzpkg.errors import UsageError

            raise UsageError("vzctl set: nothing to set (see vzctl set --help)")
        from vzpkg.runtime import live

        applied, saved, later = live.set_params(layout, args.veid, changes, save=args.save)
        done = " and ".join(w for w, yes in (("applied", applied), ("saved", saved)) if yes)
        if later:  # (only for a running VE)
            done += f"; {', '.join(later)} take{'s' if len(later) == 1 else ''} effect at the next start"
        _say(args, f"VE {args.veid}: {done}")
        _note_host_cpus(changes)
    elif cmd == "destroy":
        ve.destroy(layout, args.veid, force=args.force)
        _say(args, f"VE {args.veid} destroyed")
    elif cmd == "mount":
        ve.mount(layout, args.veid)
        _say(args, f"VE {args.veid} mounted")
    elif cmd == "umount":
        ve.umount(layout, args.veid)
        _say(args, f"VE {args.veid} unmounted")
    return 0


def main(argv: list[str] | None = None) -> None:
    from vzpkg.cli.plain import run_main

    run_main("vzctl", run, argv)


if __name__ == "__main__":
    main()
