"""vzctl: manage VEs (OpenVZ's command set). Parsing and printing only; the work is in vzpkg.runtime (ve, attach).

argparse rather than click: `vzctl start` and `vzctl exec` are on the start-to-first-exec path, where
click's ~15 ms of imports would be a sixth of the budget.
"""

from __future__ import annotations

import os
import sys

SET_OPTIONS = {
    "ram": "RAM", "swap": "SWAP", "cpuunits": "CPUUNITS", "cpulimit": "CPULIMIT", "cpus": "CPUS",
    "numproc": "NUMPROC", "diskspace": "DISKSPACE", "diskinodes": "DISKINODES", "hostname": "HOSTNAME",
    "ipadd": "IP_ADDRESS", "nameserver": "NAMESERVER", "onboot": "ONBOOT", "init": "INIT",
    "quotaugidlimit": "QUOTAUGIDLIMIT",
}
LAYOUTS = ("overlay", "copy", "image", "btrfs", "projquota", "auto")


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


def _timeout_type(text: str) -> float:
    import argparse

    from vzpkg.errors import UsageError

    try:
        return parse_timeout(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(e.message.split(": ", 1)[1]) from None


COMMANDS = ("create", "start", "mount", "umount", "enter", "stop", "restart", "status", "exec", "set", "destroy",
            "storage")


def _parser(only: str | None = None):
    """The parser; with ONLY, just that command's sub-parser is built (building all costs ~5 ms per run)."""
    import argparse

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=argparse.SUPPRESS, help="VZ root (default $VZ_ROOT or /var/lib/vz)")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS)
    p = one_line_parser(argparse, prog="vzctl", parents=[common], description="Manage VEs (virtual environments).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=type(p))
    real_add = sub.add_parser

    def add_parser(name, **kw):
        if only is not None and name != only:
            return argparse.ArgumentParser(add_help=False)  # a throw-away stand-in
        return real_add(name, **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    c = sub.add_parser("create", parents=[common], help="create a VE from a template cache")
    c.add_argument("veid")
    c.add_argument("--ostemplate", required=True,
                   help="cache name, e.g. debian-12-x86_64, or a registry reference to pull (HOST/PATH/NAME:TAG)")
    c.add_argument("--hostname")
    c.add_argument("--config", help="sample config (basic, light, unlimited)")
    c.add_argument("--layout", choices=LAYOUTS, help="storage backend (default: the VZ root's, see docs/storage.md)")
    c.add_argument("--diskspace", help="SOFT[:HARD] space limit (K/M/G/T)")
    c.add_argument("--diskinodes", help="SOFT[:HARD] inode limit")
    c.add_argument("--quotaugidlimit", help="user/group quotas inside the VE (needs kernel quota support)")
    c.add_argument("--privileged", action="store_true", help="no user namespace: UNSAFE, host root in the VE")
    c.add_argument("--cache-dir", help="where the caches are (default $VZPKG_CACHE_DIR or the config)")
    c.add_argument("--idmap", choices=("private", "shared"), default=None,
                   help="private (default): 65536 host ids of the VE's own, the template seen through an idmapped "
                        "mount; shared: the range 100000..165535 that every shared VE has")
    c.add_argument("--id-shift", type=int, default=None,
                   help="host uid/gid of the VE's root (default: the lowest free private range from 524288; "
                        "100000 with --idmap shared, where another value costs one more unpack of the template)")

    for name, helptext in (("start", "start a VE"), ("mount", "mount a VE's root"), ("umount", "unmount it"),
                           ("enter", "interactive shell in a running VE")):
        s = sub.add_parser(name, parents=[common], help=helptext)
        s.add_argument("veid")

    s = sub.add_parser("stop", parents=[common], help="stop a VE")
    s.add_argument("veid")
    s.add_argument("--fast", action="store_true", help="SIGKILL at once")
    s.add_argument("--timeout", type=_timeout_type, default=10.0,
                   help="seconds to wait after SIGTERM, 0..3600 (default 10)")

    s = sub.add_parser("restart", parents=[common], help="stop and start a VE")
    s.add_argument("veid")
    s.add_argument("--fast", action="store_true")
    s.add_argument("--timeout", type=_timeout_type, default=10.0)

    s = sub.add_parser("status", parents=[common], help="exist/deleted mounted/unmounted running/down",
                       add_help=False)
    s.add_argument("--help", action="help", help="show this help message and exit")
    s.add_argument("veid")
    s.add_argument("--json", action="store_true")
    s.add_argument("--beancounters", action="store_true", help="resource counters (held, maxheld, limit, failcnt)")
    s.add_argument("--quota", action="store_true", help="disk usage and limits (1K blocks, inodes)")
    s.add_argument("-h", "--human", action="store_true", help="--quota in K/M/G/T")

    s = sub.add_parser("exec", parents=[common], help="run a command in a running VE")
    s.add_argument("veid")
    s.add_argument("cmd", nargs=argparse.REMAINDER)

    s = sub.add_parser("set", parents=[common], help="change a VE's parameters (running VEs at once)")
    s.add_argument("veid")
    for opt in SET_OPTIONS:
        s.add_argument(f"--{opt}")
    s.add_argument("--save", action="store_true", help="also write them to the VE's config")

    s = sub.add_parser("storage", parents=[common], help="the VZ root's storage: init --btrfs SIZE, show")
    s.add_argument("action", choices=("init", "show"))
    s.add_argument("--btrfs", metavar="SIZE", help="make a loop-backed btrfs pool of SIZE (once)")
    s.add_argument("--default-layout", choices=LAYOUTS, help="the layout new VEs get (default auto)")

    s = sub.add_parser("destroy", parents=[common], help="remove a VE and its private area")
    s.add_argument("veid")
    s.add_argument("--force", action="store_true", help="stop it first if running")
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


def _format_quota(q: dict, *, human: bool) -> str:
    """OpenVZ's vzquota stat columns: resource, usage, softlimit, hardlimit (1K blocks; -h: K/M/G/T)."""

    def fmt(v, blocks: bool) -> str:
        if v is None:
            return "-"
        if not human or not blocks:
            return str(v)
        n = float(v)
        for unit in ("K", "M", "G", "T"):
            if n < 1024 or unit == "T":
                return f"{n:.1f}{unit}" if unit != "K" else f"{n:.0f}K"
            n /= 1024
        return str(v)

    lines = [f"layout {q['layout']}", f"{'resource':<12} {'usage':>12} {'softlimit':>12} {'hardlimit':>12}"]
    for res, blocks in (("1k-blocks", True), ("inodes", False)):
        d = q["diskspace" if blocks else "diskinodes"]
        soft = fmt(d["soft"], blocks) if d["soft"] is not None else "unlimited"
        hard = fmt(d["hard"], blocks) if d["hard"] is not None else "unlimited"
        if not d["enforced"] and d["hard"] is not None:
            hard += " (not enforced)"
        lines.append(f"{res:<12} {fmt(d['used'], blocks):>12} {soft:>12} {hard:>12}")
    return "\n".join(lines)


def _storage(layout, args) -> None:
    """`vzctl storage init [--btrfs SIZE] [--default-layout L]`, `vzctl storage show`."""
    from vzpkg.runtime import backends

    if args.action == "init":
        if args.btrfs is None and args.default_layout is None:
            from vzpkg.errors import UsageError

            raise UsageError("vzctl storage init: give --btrfs SIZE and/or --default-layout LAYOUT")
        if args.btrfs is not None:
            from vzpkg.errors import UsageError
            from vzpkg.runtime.backends import btrfs
            from vzpkg.runtime.conf import parse_size

            try:
                size = parse_size(args.btrfs)
            except Exception:
                size = None
            if not size:
                raise UsageError(f"--btrfs {args.btrfs!r}: a size with K/M/G/T, e.g. 20G")
            pool, made = btrfs.init_pool(layout, size)
            _say(args, f"btrfs pool {'made' if made else 'already'} at {pool}"
                       + (f" (image {layout.root / btrfs.POOL_IMAGE})" if (layout.root / btrfs.POOL_IMAGE).exists()
                          else " (the VZ root is on btrfs)"))
        if args.default_layout is not None:
            backends.write_storage_conf(layout, {"DEFAULT_LAYOUT": args.default_layout})
            _say(args, f"new VEs in {layout.root} get layout {args.default_layout}")
    else:
        from vzpkg.runtime.backends import btrfs

        print(f"default layout: {backends.default_layout(layout)}")
        print(f"btrfs pool: {btrfs.pool_dir(layout) if btrfs.pool_available(layout) else 'none'}")


def _command_of(argv: list[str]) -> str | None:
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--root":
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return a if a in COMMANDS else None
    return None


class _Args:
    """What argparse would return, for the fast path."""

    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


# command -> {option: (attribute, takes a value)} for the argparse-free fast path
_FAST = {
    "start": {}, "mount": {}, "umount": {}, "status": {"--json": ("json", False), "--beancounters": ("beancounters", False),
               "--quota": ("quota", False), "-h": ("human", False), "--human": ("human", False)},
    "stop": {"--fast": ("fast", False), "--timeout": ("timeout", True)},
    "restart": {"--fast": ("fast", False), "--timeout": ("timeout", True)},
    "destroy": {"--force": ("force", False)},
    "create": {"--ostemplate": ("ostemplate", True), "--hostname": ("hostname", True), "--config": ("config", True),
               "--diskspace": ("diskspace", True), "--diskinodes": ("diskinodes", True),
               "--quotaugidlimit": ("quotaugidlimit", True),
               "--layout": ("layout", True), "--privileged": ("privileged", False), "--cache-dir": ("cache_dir", True),
               "--id-shift": ("id_shift", True), "--idmap": ("idmap", True)},
}
_FAST_DEFAULTS = {"quiet": False, "fast": False, "timeout": 10.0, "json": False, "beancounters": False, "force": False,
                  "ostemplate": None, "hostname": None, "config": None, "layout": None, "privileged": False,
                  "cache_dir": None, "id_shift": None, "idmap": None, "quota": False, "human": False,
                  "diskspace": None, "diskinodes": None, "quotaugidlimit": None}


def _fast_parse(argv: list[str]) -> _Args | None:
    """The plain forms of the frequent commands, parsed without argparse: its import (with re, enum and gettext)
    costs ~6 ms of the start-to-first-exec budget. Anything unusual (help, errors, --timeout...) -> None, and
    argparse handles it."""
    kw: dict = dict(_FAST_DEFAULTS)
    pos: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if len(pos) == 2 and pos[0] == "exec":
            kw["cmd"] = argv[i:]
            break
        opts = _FAST.get(pos[0], {}) if pos else {}
        if a == "--root" and i + 1 < len(argv):
            kw["root"] = argv[i + 1]
            i += 1
        elif a in ("-q", "--quiet"):
            kw["quiet"] = True
        elif a in opts:
            attr, takes_value = opts[a]
            if takes_value:
                if i + 1 >= len(argv):
                    return None
                kw[attr] = argv[i + 1]
                i += 1
            else:
                kw[attr] = True
        elif a.startswith("-") or len(pos) == 2:
            return None
        else:
            pos.append(a)
        i += 1
    if len(pos) != 2 or (pos[0] not in _FAST and pos[0] != "exec"):
        return None
    if isinstance(kw["timeout"], str):
        kw["timeout"] = parse_timeout(kw["timeout"])  # a bad value: one line, exit 2
    if pos[0] == "exec" and (not kw.get("cmd") or kw["cmd"][0] in ("-h", "--help")):
        return None
    if pos[0] == "create":
        if kw["ostemplate"] is None or (kw["layout"] not in (None, *LAYOUTS)) or (
                kw["idmap"] not in (None, "private", "shared")):
            return None
        if kw["id_shift"] is not None:
            if not kw["id_shift"].isdigit():
                return None
            kw["id_shift"] = int(kw["id_shift"])
    return _Args(command=pos[0], veid=pos[1], **kw)


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
        if args.json:
            import json

            print(json.dumps(st, indent=2, sort_keys=True))
        else:
            print(ve.status_line(st))
            if args.beancounters:
                print(_format_beancounters(st.get("beancounters") or {}))
            if args.quota and st.get("quota"):
                print(_format_quota(st["quota"], human=args.human))
    elif cmd == "exec":
        cmd_argv = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
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
        _storage(layout, args)
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
