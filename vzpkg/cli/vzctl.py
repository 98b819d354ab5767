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
    "ipadd": "IP_ADDRESS", "ipdel": "IPDEL", "nameserver": "NAMESERVER", "searchdomain": "SEARCHDOMAIN",
    "onboot": "ONBOOT", "init": "INIT", "quotaugidlimit": "QUOTAUGIDLIMIT",
}
LAYOUTS = ("overlay", "copy", "image", "btrfs", "projquota", "auto")

SUPPRESS = "==SUPPRESS=="  # argparse.SUPPRESS (not imported for it): the attribute is absent unless given

# The table: plain data (dict literals, ~10 us to build; objects for each option cost ten times that on every run).
# An option: its long flag -> {"aliases": other flags, "flag": True (store_true; else it takes one value),
# "type": a key of _TYPES, "choices", "default", "required", "help"} as in argparse's add_argument; the attribute
# is the long flag without "--", "-" -> "_". A command: {"help", "opts", "rest": the attribute that takes every
# argument after the VEID (argparse.REMAINDER), "args": names of positionals after the VEID, "aliases": other names
# of the command, "veid": False for a command without the VEID (storage), "add_help": False where -h is an option
# (status -h: human units; --help stays)}; a command's first positional is the VEID.

# before the command and after it
COMMON = {
    "--root": {"default": SUPPRESS, "help": "VZ root (default $VZ_ROOT or /var/lib/vz)"},
    "--quiet": {"aliases": ("-q",), "flag": True, "default": SUPPRESS},
}

# in the order of `vzctl --help`; adding a command or an option is one entry here
TABLE: dict[str, dict] = {
    "create": {"help": "create a VE from a template cache", "opts": {
        "--ostemplate": {"required": True, "help": "cache name, e.g. debian-12-x86_64, or a registry reference to "
                                                   "pull (HOST/PATH/NAME:TAG)"},
        "--hostname": {},
        "--config": {"help": "sample config (basic, light, unlimited)"},
        "--layout": {"choices": LAYOUTS, "help": "storage backend (default: the VZ root's, see docs/storage.md)"},
        "--diskspace": {"help": "SOFT[:HARD] space limit (K/M/G/T)"},
        "--diskinodes": {"help": "SOFT[:HARD] inode limit"},
        "--quotaugidlimit": {"help": "user/group quotas inside the VE (needs kernel quota support)"},
        "--privileged": {"flag": True, "help": "no user namespace: UNSAFE, host root in the VE"},
        "--cache-dir": {"help": "where the caches are (default $VZPKG_CACHE_DIR or the config)"},
        "--idmap": {"choices": ("private", "shared"),
                    "help": "private (default): 65536 host ids of the VE's own, the template seen through an "
                            "idmapped mount; shared: the range 100000..165535 that every shared VE has"},
        "--id-shift": {"type": "int",
                       "help": "host uid/gid of the VE's root (default: the lowest free private range from 524288; "
                               "100000 with --idmap shared, where another value costs one more unpack of the "
                               "template)"},
    }},
    "start": {"help": "start a VE"},
    "mount": {"help": "mount a VE's root"},
    "umount": {"help": "unmount it"},
    "enter": {"help": "interactive shell in a running VE"},
    "stop": {"help": "stop a VE", "opts": {
        "--fast": {"flag": True, "help": "SIGKILL at once"},
        "--timeout": {"type": "timeout", "default": 10.0, "help": "seconds to wait after SIGTERM, 0..3600 (default 10)"},
    }},
    "restart": {"help": "stop and start a VE", "opts": {
        "--fast": {"flag": True},
        "--timeout": {"type": "timeout", "default": 10.0},
    }},
    "status": {"help": "exist/deleted mounted/unmounted running/down", "add_help": False, "opts": {
        "--json": {"flag": True},
        "--beancounters": {"flag": True, "help": "resource counters (held, maxheld, limit, failcnt)"},
        "--quota": {"flag": True, "help": "disk usage and limits (1K blocks, inodes)"},
        "--human": {"aliases": ("-h",), "flag": True, "help": "--quota in K/M/G/T"},
    }},
    "exec": {"help": "run a command in a running VE", "rest": "cmd"},
    "set": {"help": "change a VE's parameters (running VEs at once)", "opts": {
        **{f"--{name}": {} for name in SET_OPTIONS},
        "--save": {"flag": True, "help": "also write them to the VE's config"},
    }},
    "storage": {"help": "the VZ root's storage: init --btrfs SIZE, show", "veid": False, "args": ("action",),
                "opts": {
        "--btrfs": {"help": "make a loop-backed btrfs pool of SIZE (once)"},
        "--default-layout": {"choices": LAYOUTS, "help": "the layout new VEs get (default auto)"},
    }},
    "destroy": {"help": "remove a VE and its private area", "opts": {
        "--force": {"flag": True, "help": "stop it first if running"},
    }},
    "chkpnt": {"help": "checkpoint a running VE with CRIU (alias: suspend)", "aliases": ("suspend",), "opts": {
        "--dumpdir": {"help": "where the images go (default <VZ root>/dump/VEID)"},
        "--leave-running": {"flag": True, "help": "keep the VE running (its files are copied too)"},
    }},
    "restore": {"help": "restore a VE from a checkpoint (alias: resume)", "aliases": ("resume",), "opts": {
        "--dumpdir": {"help": "the checkpoint to restore (default: where chkpnt put it)"},
        "--from": {"help": "a new VE VEID from a --leave-running checkpoint DIR"},
        "--hostname": {"help": "with --from: its hostname (default VEID)"},
        "--ipadd": {"help": "with --from: its addresses (default none)"},
        "--lazy": {"flag": True, "help": "post-copy: run at once, memory paged in on demand (userfaultfd)"},
    }},
    "clone": {"help": "copy a VE; --live: a running copy of a running VE", "args": ("dst",), "opts": {
        "--live": {"flag": True},
        "--hostname": {},
        "--ipadd": {},
    }},
    "migrate": {"help": "move a VE to another VZ root", "args": ("dest",), "opts": {
        "--online": {"flag": True, "help": "checkpoint and restore instead of stop and start"},
        "--keep-dst": {"flag": True, "help": "keep what reached DEST if the migration fails"},
        "--lazy": {"flag": True, "help": "with --online: restore on DEST post-copy (userfaultfd)"},
        "--times": {"aliases": ("-t",), "flag": True, "help": "print each phase's time and the frozen time"},
        "--remote-vzctl": {"help": "the vzctl command on DEST (shell words; default $VZ_REMOTE_VZCTL, else this "
                                   "vzctl's path); ssh options: $VZ_SSH_OPTS"},
    }},
    "server": {"help": "the resident vzctl server (faster commands): start, stop, status, run", "veid": False,
               "args": ("action",), "opts": {
        "--idle-timeout": {"type": "timeout", "help": "start/run: stop after this many idle seconds, 0..3600"},
        "--json": {"flag": True},
    }},
    "migrate-receive": {"help": "(internal) the receiving end of a migration, run by the source's vzctl", "opts": {
        "--query": {"flag": True, "help": "print running, stopped or absent (after any half-done receive is undone)"},
    }},
}
COMMANDS = tuple(TABLE)
ALIASES = {alias: name for name, cmd in TABLE.items() for alias in cmd.get("aliases", ())}  # OpenVZ's other names


def dest(flag: str) -> str:
    """The attribute of the option FLAG (its long flag)."""
    return flag[2:].replace("-", "_")


def default(spec: dict) -> object:
    """What the attribute of an option is when it is not given."""
    return spec.get("default", False if spec.get("flag") else None)


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


# an option's "type" -> converter, for both parsers. A ValueError is argparse's "invalid VALUE" error (the fast
# path leaves it to argparse); a UsageError (parse_timeout's) passes through argparse: both print the same line.
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


def _add_option(argparse, parser, flag: str, spec: dict) -> None:
    value = default(spec)
    # argparse tests `default is SUPPRESS`: an equal string is not enough
    kw: dict = {"default": argparse.SUPPRESS if value == SUPPRESS else value}
    if spec.get("flag"):
        kw["action"] = "store_true"
    else:
        if "type" in spec:
            kw["type"] = _TYPES[spec["type"]]
        if "choices" in spec:
            kw["choices"] = spec["choices"]
        if spec.get("required"):
            kw["required"] = True
    if "help" in spec:
        kw["help"] = spec["help"]
    parser.add_argument(*spec.get("aliases", ()), flag, **kw)


def _parser(only: str | None = None):
    """The argparse parser, built from the table; with ONLY, just that command's sub-parser is built (building all
    costs ~5 ms per run)."""
    import argparse

    common = argparse.ArgumentParser(add_help=False)
    for flag, spec in COMMON.items():
        _add_option(argparse, common, flag, spec)
    p = one_line_parser(argparse, prog="vzctl", parents=[common], description="Manage VEs (virtual environments).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=type(p))
    for name, cmd in TABLE.items():
        if only is not None and name != only:
            continue
        s = sub.add_parser(name, parents=[common], help=cmd["help"], add_help=cmd.get("add_help", True))
        if not cmd.get("add_help", True):
            s.add_argument("--help", action="help", help="show this help message and exit")
        if cmd.get("veid", True):
            s.add_argument("veid")
        for extra in cmd.get("args", ()):
            s.add_argument(extra)
        if "rest" in cmd:
            s.add_argument(cmd["rest"], nargs=argparse.REMAINDER)
        for flag, spec in cmd.get("opts", {}).items():
            _add_option(argparse, s, flag, spec)
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
    from .plain import say

    say(args, text)








def _command_of(argv: list[str]) -> str | None:
    """The command named in ARGV (skipping the common options before it), or None."""
    i = 0
    while i < len(argv):
        a = argv[i]
        spec = COMMON.get(a)
        if spec is not None and not spec.get("flag"):
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return a if a in TABLE else None
    return None


class _Args:
    """What argparse would return, for the fast path."""

    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


def _by_flag(opts: dict[str, dict]) -> dict[str, tuple[str, dict]]:
    """flag or alias -> (long flag, spec)."""
    out = {}
    for flag, spec in opts.items():
        out[flag] = (flag, spec)
        for alias in spec.get("aliases", ()):
            out[alias] = (flag, spec)
    return out


def _fast_parse(argv: list[str]) -> _Args | None:
    """ARGV parsed from the table without argparse, as argparse would parse it (the same attributes and values);
    None for anything this does not do as argparse would (help, errors, '--' before the VEID, combined short
    options...): argparse then handles it. A bad --timeout raises here the same UsageError argparse would."""
    kw: dict = {}
    given: set[str] = set()
    name: str | None = None
    cmd: dict = {}
    flags = _by_flag(COMMON)
    names: tuple[str, ...] = ()
    pos: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if pos and len(pos) == len(names) and "rest" in cmd:
            rest = argv[i:]
            kw[cmd["rest"]] = rest[1:] if rest[:1] == ["--"] else rest  # as argparse: a first '--' is dropped
            break
        if a.startswith("-"):
            text, eq, value = a.partition("=")
            found = flags.get(text) if text.startswith("--") or not eq else None
            if found is None:
                return None
            flag, spec = found
            if spec.get("flag"):
                if eq:
                    return None
                value = True
            else:
                if not eq:
                    i += 1
                    if i >= len(argv):
                        return None
                    value = argv[i]
                    if value.startswith("-"):
                        return None  # ('--', '-5', '--x': argparse's own rules for what an option's value may be)
                if value not in spec.get("choices", (value,)):
                    return None
                if "type" in spec:
                    try:
                        value = _TYPES[spec["type"]](value)
                    except ValueError:
                        return None
            kw[dest(flag)] = value
            given.add(flag)
        elif name is None:
            if a not in TABLE:
                return None
            name, cmd = a, TABLE[a]
            names = (("veid",) if cmd.get("veid", True) else ()) + tuple(cmd.get("args", ()))
            opts = cmd.get("opts", {})
            flags = {**flags, **_by_flag(opts)}
            kw.update((dest(flag), default(spec)) for flag, spec in opts.items())
        elif len(pos) < len(names):
            pos.append(a)
        else:
            return None
        i += 1
    if name is None or len(pos) != len(names) or any(spec.get("required") and flag not in given for flag, spec in cmd.get("opts", {}).items()):
        return None
    if "rest" in cmd:
        kw.setdefault(cmd["rest"], [])
    kw.update(zip(names, pos, strict=True))
    return _Args(command=name, **kw)


def _glued(argv: list[str]) -> list[str]:
    """ARGV with each option that takes a value joined to it (`--timeout -inf` -> `--timeout=-inf`): as getopt
    (and the fast path) does, such an option takes the next argument whatever it starts with, where argparse
    would call `-inf` or `-x` a missing value. Not after '--', nor in exec's command."""
    out: list[str] = []
    flags = _by_flag(COMMON)
    cmd: dict | None = None
    npos = 0
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--" or (cmd is not None and "rest" in cmd and npos == 2):
            return out + argv[i:]
        found = flags.get(a)
        if found is not None and not found[1].get("flag") and i + 1 < len(argv):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        if not a.startswith("-"):
            npos += 1
            if npos == 1:
                cmd = TABLE.get(a)
                if cmd is None:
                    return out + argv[i:]
                flags = {**flags, **_by_flag(cmd.get("opts", {}))}
        out.append(a)
        i += 1
    return out


def _slow_parse(argv: list[str]):
    """ARGV parsed by argparse (help, usage errors, whatever the fast path leaves)."""
    return _parser(_command_of(argv)).parse_args(_glued(argv))


def _unalias(argv: list[str]) -> list[str]:
    """ARGV with an alias of a command (suspend, resume) replaced by the command's name."""
    i = 0
    while i < len(argv):
        spec = COMMON.get(argv[i])
        if spec is not None and not spec.get("flag"):
            i += 2
            continue
        if not argv[i].startswith("-"):
            return argv[:i] + [ALIASES.get(argv[i], argv[i])] + argv[i + 1:]
        i += 1
    return argv




def run(argv: list[str]) -> int:
    argv = _unalias(argv)
    args = _fast_parse(argv) or _slow_parse(argv)
    from vzpkg.runtime import ve
    from vzpkg.runtime.layout import Layout

    layout = Layout.at(getattr(args, "root", None))
    cmd = args.command
    if cmd in ("chkpnt", "restore", "clone", "migrate", "migrate-receive"):
        from . import vzctl_more

        return vzctl_more._criu_commands(args, layout)
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
                  id_shift=args.id_shift, idmap=args.idmap, diskspace=args.diskspace, diskinodes=args.diskinodes,
                  quotaugidlimit=args.quotaugidlimit)
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
        st = ve.status(layout, args.veid, beancounters=args.beancounters, quota=args.quota)
        if args.beancounters or args.quota:
            from . import vzctl_more
        if args.json:
            import json

            print(json.dumps(st, indent=2, sort_keys=True))
        else:
            print(ve.status_line(st))
            if args.beancounters:
                print(vzctl_more._format_beancounters(st.get("beancounters") or {}))
            if args.quota and st.get("quota"):
                print(vzctl_more._format_quota(st["quota"], human=args.human))
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
    elif cmd == "storage":
        from . import vzctl_more

        vzctl_more._storage(layout, args)
    elif cmd == "server":
        from . import vzctl_more

        return vzctl_more._server(args)
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
