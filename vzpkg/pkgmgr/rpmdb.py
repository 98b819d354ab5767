"""Reading a root's rpmdb (for the manifest), and leaving it as a cache should carry it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from .. import process
from ..errors import BuildError, MissingToolError

RPMDB_CANDIDATES = ("/var/lib/rpm", "/usr/lib/sysimage/rpm")

def checkpoint_sqlite(db: Path) -> None:
    """Fold a SQLite write-ahead log into its database, so the cache carries no -wal/-shm files."""
    import sqlite3

    if not (db.with_name(db.name + "-wal").exists() or db.with_name(db.name + "-shm").exists()):
        return
    try:
        con = sqlite3.connect(str(db))
        try:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            con.close()
    except sqlite3.Error as e:
        raise BuildError(f"cannot checkpoint {db}: {e}") from e
    for suffix in ("-wal", "-shm"):
        leftover = db.with_name(db.name + suffix)
        if leftover.exists() and leftover.stat().st_size == 0:
            leftover.unlink()


def find_rpmdb(root: Path, preferred: str | None = None) -> str:
    """The rpmdb directory of ROOT (as a path inside the root)."""
    candidates = ([preferred] if preferred else []) + [c for c in RPMDB_CANDIDATES if c != preferred]
    for c in candidates:
        d = root / c.lstrip("/")
        if any((d / f).exists() for f in ("rpmdb.sqlite", "Packages", "Packages.db")):
            return c
    raise BuildError(f"no rpm database found in {root} (looked in {', '.join(candidates)})")


def _evr(epoch: Any, version: str, release: str) -> str:
    return (f"{epoch}:" if epoch else "") + f"{version}-{release}"


def _entry(name: str, epoch: Any, version: str, release: str, arch: str) -> dict[str, Any]:
    e = int(epoch) if epoch not in (None, "", "(none)") else 0
    return {"name": name, "epoch": e, "version": version, "release": release, "arch": arch,
            "architecture": arch, "evr": _evr(e, version, release)}


def read_rpmdb(root: Path, dbpath: str, force_command: bool = False) -> tuple[list[dict[str, Any]], str]:
    """Installed packages from ROOT's rpmdb: with the rpm Python bindings, else `rpm --root -qa`.

    Returns the packages (sorted by name, arch) and which reader was used: python-rpm or rpm-command."""
    if not force_command and os.environ.get("VZPKG_RPMDB_READER") != "rpm-command":
        try:
            import rpm
        except Exception:  # the PyPI shim raises ImportError (or worse) when python3-rpm is not installed
            rpm = None
        if rpm is not None:
            try:
                rpm.addMacro("_dbpath", dbpath)
                try:
                    ts = rpm.TransactionSet(str(root))
                    ts.setVSFlags(-1)
                    found = [_entry(_s(h["name"]), h["epoch"], _s(h["version"]), _s(h["release"]),
                                    _s(h["arch"] or "")) for h in ts.dbMatch() if _s(h["name"]) != "gpg-pubkey"]
                    ts.closeDB()
                finally:
                    rpm.delMacro("_dbpath")
            except rpm.error:
                pass  # an rpmdb these bindings cannot open: the rpm command says why, below
            else:
                return sorted(found, key=lambda p: (p["name"], p["arch"])), "python-rpm"
    if shutil.which("rpm") is None:
        raise MissingToolError("cannot read the rpmdb: neither the rpm Python bindings nor the rpm command is "
                               "available: apt-get install rpm python3-rpm")
    qf = "%{NAME}\\t%{EPOCH}\\t%{VERSION}\\t%{RELEASE}\\t%{ARCH}\\n"
    proc = process.run(["rpm", "--root", str(root), "--dbpath", dbpath, "-qa", "--qf", qf], capture=True, text=True,
                       error=BuildError, what=f"rpm -qa in {root}")
    found = []
    for line in proc.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 5 and parts[0] != "gpg-pubkey":
            found.append(_entry(parts[0], parts[1], parts[2], parts[3], "" if parts[4] == "(none)" else parts[4]))
    return sorted(found, key=lambda p: (p["name"], p["arch"])), "rpm-command"


def _s(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)
