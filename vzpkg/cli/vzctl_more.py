"""vzctl's less travelled commands and formats (status tables, storage, checkpoint/restore/clone/migrate):
kept out of cli/vzctl.py, which every `vzctl exec` and `start` imports."""

from __future__ import annotations

from .plain import say as _say


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

    if args.action not in ("init", "show"):
        from vzpkg.errors import UsageError

        raise UsageError(f"vzctl storage {args.action}: unknown action; use init or show")
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


def _criu_commands(args, layout) -> int:
    """chkpnt, restore, clone, migrate (vzpkg.runtime.checkpoint and migrate; docs/checkpoint.md)."""
    from vzpkg.runtime import checkpoint

    cmd = args.command
    if cmd == "chkpnt":
        info = checkpoint.chkpnt(layout, args.veid, dumpdir=args.dumpdir, leave_running=args.leave_running)
        _say(args, f"VE {args.veid} checkpointed into {info['dir']} ({info['size'] >> 10} KiB, dump "
                   f"{info['dump_s'] * 1000:.0f} ms){'' if args.leave_running else '; suspended'}")
    elif cmd == "restore":
        source = getattr(args, "from")  # --from: `from` is a keyword
        if source:
            info = checkpoint.restore_as(layout, args.veid, source, hostname=args.hostname, ipadd=args.ipadd,
                                         lazy=args.lazy)
        else:
            if args.hostname or args.ipadd:
                from vzpkg.errors import UsageError

                raise UsageError("--hostname and --ipadd go with --from (a VE restores with its own config)")
            info = checkpoint.restore(layout, args.veid, dumpdir=args.dumpdir, lazy=args.lazy)
        _say(args, f"VE {args.veid} restored from {info['dir']} (init pid {info['pid']}, "
                   f"{info['restore_s'] * 1000:.0f} ms)")
    elif cmd == "clone":
        info = checkpoint.clone(layout, args.veid, args.dst, live=args.live, hostname=args.hostname,
                                ipadd=args.ipadd)
        _say(args, f"VE {args.veid} cloned to {args.dst}{' (running)' if args.live else ''} in "
                   f"{info['clone_s'] * 1000:.0f} ms")
    elif cmd == "migrate":
        from vzpkg.runtime import migrate

        times = migrate.migrate(layout, args.veid, args.dest, online=args.online, keep_dst=args.keep_dst,
                                lazy=args.lazy, remote_vzctl=args.remote_vzctl)
        if args.times:
            for phase, secs in times.items():
                print(f"{phase:<12} {secs * 1000:9.1f} ms")
        _say(args, f"VE {args.veid} migrated to {args.dest}{' online' if args.online else ''}")
    elif cmd == "migrate-receive":
        from vzpkg.runtime import migrate_agent

        if args.query:
            print(migrate_agent.query(layout, args.veid))
            return 0
        return migrate_agent.main(layout, args.veid)
    return 0


def _server(args) -> int:
    """`vzctl server start|stop|status|run [--idle-timeout S] [--json]` (vzpkg/cli/server.py)."""
    from vzpkg.cli import server_control as server
    from vzpkg.errors import UsageError

    sock = server.socket_path()
    idle = args.idle_timeout or None
    if args.action == "run":
        server.exec_server(sock, idle)  # in the foreground, as this process (never returns)
    if args.action == "start":
        pid, started = server.start(sock, idle)
        result = {"pid": pid, "socket": str(sock), "started": started}
        text = f"vzctl server {'started' if started else 'already running'} (pid {pid}, socket {sock})"
    elif args.action == "stop":
        pid = server.stop(sock)
        result = {"pid": pid, "socket": str(sock), "stopped": pid is not None}
        text = f"vzctl server stopped (pid {pid})" if pid else "vzctl server was not running"
    elif args.action == "status":
        result = server.status(sock)
        text = (f"vzctl server running (pid {result['pid']}, socket {sock})" if result["running"]
                else f"vzctl server not running (socket {sock})")
    else:
        raise UsageError(f"vzctl server {args.action}: unknown action; use start, stop, status or run")
    if args.json:
        import json

        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        _say(args, text)
    return 0
