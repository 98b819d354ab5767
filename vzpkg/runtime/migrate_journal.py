"""The source's record of a migration in progress, and what the next command does with one cut off half-way.

`vzctl migrate` holds the VE's lock for the whole migration with the journal entry `migrate` in the lock file
(see leftovers.py); the details are in run/<id>.migrate (JSON: the destination and how to reach it, online or
not, the phase). The phases, and what a vzctl killed in each leaves:

    copy        files copied while the VE runs here          -> undo: nothing runs there
    frozen      online: dumped, the VE suspended here         -> undo: the VE stays suspended here (restorable)
    stopped     offline: stopped here                         -> undo: the VE stays stopped here (startable)
    restoring   restore/start sent to the destination         -> ask the destination
    committing  it runs there; commit sent                    -> ask the destination

"Ask the destination" runs `vzctl migrate-receive VEID --query` there, which takes that side's lock: it waits for a
receiving end still alive (which undoes its work when its source is gone unless committed) and recovers a killed
one's. `running` there: the migration is finished (the VE is destroyed here); otherwise it is undone. The VE never
runs on both nodes (it runs here again only once the destination said it does not run there), and never on neither
for good: undone, it is restorable (or startable) here. A destination that cannot be reached in the last two phases
leaves the journal as it is: every command on the VE says so until it can be reached.
"""

from __future__ import annotations

import json
import os

from vzpkg import process
from vzpkg.errors import MigrationError

from . import migrate_dest
from .layout import Layout

ASK_PHASES = ("restoring", "committing")


def details_path(layout: Layout, veid: str):
    return layout.run_dir / f"{veid}.migrate"


def write(layout: Layout, veid: str, rec: dict) -> None:
    path = details_path(layout, veid)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, path)


def read(layout: Layout, veid: str) -> dict | None:
    try:
        return json.loads(details_path(layout, veid).read_text())
    except (OSError, ValueError):
        return None


def clear(layout: Layout, veid: str) -> None:
    details_path(layout, veid).unlink(missing_ok=True)


def where_it_runs(veid: str, rec: dict) -> str:
    """"running", "stopped" or "absent" on the destination of REC; "unknown" if it cannot be asked."""
    dest = migrate_dest.from_record(rec["dest"])
    try:
        proc = process.run(dest.command(["migrate-receive", veid, "--query"]), capture=True, text=True, check=False,
                           timeout=120, error=MigrationError, pdeathsig=None)
    except MigrationError:
        return "unknown"
    answer = proc.stdout.strip().splitlines()[-1:] if proc.returncode == 0 else []
    return answer[0] if answer and answer[0] in ("running", "stopped", "absent") else "unknown"


def outcome(veid: str, rec: dict) -> str:
    """"finish" (the VE runs on the destination), "undo" or "unknown"."""
    if rec.get("phase") not in ASK_PHASES:
        return "undo"
    there = where_it_runs(veid, rec)
    return "finish" if there == "running" else "unknown" if there == "unknown" else "undo"


def recover(layout: Layout, veid: str) -> str:
    """For ve._recover (a `migrate` entry found in the journal): the entry to go on with — "destroy" when the
    migration went through (the VE runs on the destination), "" when it is undone here."""
    rec = read(layout, veid)
    if rec is None:  # killed before the details were written: nothing left the source
        return ""
    result = outcome(veid, rec)
    if result == "unknown":
        raise MigrationError(f"VE {veid}: a migration to {rec['dest']['spec']} was interrupted and that node cannot be "
                             "asked whether the VE runs there; when it answers again, any vzctl command on "
                             f"{veid} finishes or undoes the migration")
    clear(layout, veid)
    return "destroy" if result == "finish" else ""
