"""Per-VE id ranges: which 65536 host uids/gids a VE's uids 0..65535 become.

A VE created with a private range (the default, IDMAP="private") gets the lowest free block of the pool

    POOL_START + k * ID_RANGE,  k = 0, 1, ...   (524288, 589824, ... up to 1879048191)

which is systemd's range for container ids (its UIDS-GIDS convention; systemd-nspawn --private-users=pick
takes blocks from it too), far from the shared range 100000..165535 and from the ids of host users. A block is
skipped when it overlaps:
  - the ID_SHIFT range of any VE of this VZ root (conf/*.conf; a VE given --id-shift by hand counts too),
  - a range reserved by a create still in progress (lock/idrange/<veid>, valid while its creator holds it),
  - a subordinate id range that /etc/subuid or /etc/subgid gives to a host user other than root (root's own
    entries are for root's containers, which is what VEs are).
The config is the record: destroy frees the range by removing it. Allocation holds lock/idrange/.lock only
while choosing; the reservation then keeps the block until the config naming it is saved, so a slow create
(a copy layout) does not hold up the others. Two VZ roots on one host allocate independently.
"""

from __future__ import annotations

import os
from pathlib import Path

from vzpkg.errors import VEError
from vzpkg.flock import lock_file, take
from vzpkg.safeio import CONF_MAX, read_small_bytes

from .layout import ID_RANGE, Layout

POOL_START = 0x80000  # 524288
POOL_END = 0x70000000  # 1879048192: the end (exclusive) of systemd's container range
SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))


def _overlaps(a: int, b: int, ranges: list[tuple[int, int]]) -> bool:
    return any(a < end and start < b for start, end in ranges)


def lowest_free(used: list[tuple[int, int]], start: int = POOL_START, end: int = POOL_END) -> int | None:
    """The lowest block start in [START, END) whose ID_RANGE ids overlap none of USED ([a, b) pairs)."""
    ordered = sorted(r for r in used if r[1] > start and r[0] < end)
    base = start
    for a, b in ordered:
        if base + ID_RANGE <= a:
            break
        if b > base:
            # the next block boundary at or after b
            base = start + -(-(b - start) // ID_RANGE) * ID_RANGE
    return base if base + ID_RANGE <= end else None


def configured_shifts(layout: Layout) -> list[tuple[str, int]]:
    """(VEID, ID_SHIFT) of every VE config under LAYOUT that has one (read as bytes, no conf.py import: this
    runs on every create and start, over every VE's config)."""
    out: list[tuple[str, int]] = []
    try:
        names = os.listdir(layout.conf_dir)
    except FileNotFoundError:
        return out
    conf_dir = os.fsencode(layout.conf_dir)
    for name in names:
        if not name.endswith(".conf") or name.startswith("."):
            continue
        try:
            data = b"\n" + read_small_bytes(conf_dir + b"/" + os.fsencode(name), CONF_MAX)  # a FIFO: skipped
        except OSError:
            continue
        at = data.rfind(b"\nID_SHIFT=")  # the last assignment wins, as when the config is loaded
        if at < 0:
            continue
        value = data[at + 10:].split(b"\n", 1)[0].split(b"#", 1)[0].strip().strip(b"\"'")
        if value.isdigit():
            out.append((name[: -len(".conf")], int(value)))
    return out


def configured_ranges(layout: Layout) -> list[tuple[int, int]]:
    """[ID_SHIFT, ID_SHIFT + ID_RANGE) of every VE config under LAYOUT."""
    return [(shift, shift + ID_RANGE) for _, shift in configured_shifts(layout)]


def overlapping(layout: Layout, veid: str, shift: int) -> list[tuple[str, int]]:
    """The other VEs of LAYOUT whose id range overlaps [SHIFT, SHIFT + ID_RANGE): (VEID, ID_SHIFT) pairs."""
    return [(other, s) for other, s in configured_shifts(layout)
            if other != veid and s < shift + ID_RANGE and shift < s + ID_RANGE]


def host_subid_ranges(files: tuple[Path, ...] = SUBID_FILES) -> list[tuple[int, int]]:
    """Ranges /etc/subuid and /etc/subgid give to users other than root (name:start:count lines)."""
    out = []
    for path in files:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.strip().split(":")
            if len(parts) != 3 or parts[0] in ("root", "0") or not (parts[1].isdigit() and parts[2].isdigit()):
                continue
            out.append((int(parts[1]), int(parts[1]) + int(parts[2])))
    return out


class reserve:  # noqa: N801 (a context manager, used like open)
    """`with reserve(layout, veid) as shift:` picks the lowest free block and keeps it reserved for VEID until
    the block exits; save the VE's config (which then records it) inside the block."""

    def __init__(self, layout: Layout, veid: str, *, subid_files: tuple[Path, ...] = SUBID_FILES) -> None:
        self.dir = layout.lock_dir / "idrange"
        self.layout = layout
        self.veid = veid
        self.subid_files = subid_files
        self.fd = -1

    def _reserved(self) -> list[tuple[int, int]]:
        """Ranges of creates in progress; removes the reservations whose creator is gone."""
        out = []
        for name in os.listdir(self.dir):
            if name.startswith("."):
                continue
            path = self.dir / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # its create finished (its config is read after this)
            try:
                if not take(fd, shared=True, wait=False):
                    value = os.read(fd, 32).decode(errors="replace").strip()
                    if value.isdigit():
                        out.append((int(value), int(value) + ID_RANGE))
                    continue
                path.unlink(missing_ok=True)  # not held: its creator died (or just finished: its config counts)
            finally:
                os.close(fd)
        return out

    def __enter__(self) -> int:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = lock_file(self.dir / ".lock")
        try:
            # reservations before configs: a create finishing in between is seen in one or the other
            used = self._reserved() + configured_ranges(self.layout) + host_subid_ranges(self.subid_files)
            shift = lowest_free(used, POOL_START, POOL_END)
            if shift is None:
                raise VEError(f"no free id range left in {POOL_START}..{POOL_END - 1} for VE {self.veid}: "
                              "destroy unused VEs, or create it with --idmap shared")
            fd = lock_file(self.dir / self.veid, flags=os.O_RDWR | os.O_TRUNC)
            os.write(fd, f"{shift}\n".encode())
            self.fd = fd
            return shift
        finally:
            os.close(lock)

    def __exit__(self, *exc: object) -> None:
        (self.dir / self.veid).unlink(missing_ok=True)
        os.close(self.fd)
