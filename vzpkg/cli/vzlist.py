"""vzlist: list VEs (running ones; -a for all), OpenVZ style. Parsing and printing only."""

from __future__ import annotations

import argparse

FIELDS = ("veid", "status", "hostname", "ip", "numproc", "memory", "disk", "ostemplate", "layout", "init_pid",
          "diskspace", "diskinodes")
DEFAULT_FIELDS = ("veid", "numproc", "status", "ip", "hostname")
HEADERS = {"veid": "VEID", "status": "STATUS", "hostname": "HOSTNAME", "ip": "IP_ADDR", "numproc": "NPROC",
           "memory": "MEMORY", "disk": "DISK", "ostemplate": "OSTEMPLATE", "layout": "LAYOUT",
           "init_pid": "INIT_PID", "diskspace": "DISKSPACE", "diskinodes": "DISKINODES"}
NUMERIC = {"numproc", "memory", "disk", "init_pid", "diskspace", "diskinodes"}


def _parser() -> argparse.ArgumentParser:
    from vzpkg.cli.vzctl import one_line_parser

    p = one_line_parser(argparse, prog="vzlist", description="List VEs.")
    p.add_argument("-a", "--all", action="store_true", help="also VEs that are not running")
    p.add_argument("-S", "--stopped", action="store_true", help="only VEs that are not running")
    p.add_argument("-o", "--output", help=f"comma-separated fields: {','.join(FIELDS)}")
    p.add_argument("-H", "--no-header", action="store_true")
    p.add_argument("-j", "--json", action="store_true")
    p.add_argument("--root", help="VZ root (default $VZ_ROOT or /var/lib/vz)")
    p.add_argument("veids", nargs="*", help="only these VEs")
    return p


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from vzpkg.errors import UsageError
    from vzpkg.runtime import listing
    from vzpkg.runtime.layout import Layout

    fields = tuple(f.strip().lower() for f in args.output.split(",")) if args.output else DEFAULT_FIELDS
    bad = [f for f in fields if f not in FIELDS]
    if bad:
        raise UsageError(f"unknown field {bad[0]!r}; known: {', '.join(FIELDS)}")
    layout = Layout.at(args.root)
    want_disk = "disk" in fields or args.json
    want_quota = "diskspace" in fields or "diskinodes" in fields or args.json
    rows = listing.list_ves(layout, args.veids or None, disk=want_disk, quota=want_quota)
    if args.stopped:
        rows = [r for r in rows if r["status"] != "running"]
    elif not args.all and not args.veids:
        rows = [r for r in rows if r["status"] == "running"]
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
        return 0
    table = []
    for r in rows:
        cells = []
        for f in fields:
            v = r.get(f)
            if f in ("memory", "disk"):
                cells.append(_human(v))
            elif v is None or v == "":
                cells.append("-")
            else:
                cells.append(str(v))
        table.append(cells)
    if not args.no_header:
        table.insert(0, [HEADERS[f] for f in fields])
    if not table:
        return 0
    widths = [max(len(row[i]) for row in table) for i in range(len(fields))]
    for row in table:
        out = []
        for i, f in enumerate(fields):
            out.append(row[i].rjust(widths[i]) if f in NUMERIC or f == "veid" else row[i].ljust(widths[i]))
        print(" ".join(out).rstrip())
    return 0


def main(argv: list[str] | None = None) -> None:
    from vzpkg.cli.plain import run_main

    run_main("vzlist", run, argv)


if __name__ == "__main__":
    main()
