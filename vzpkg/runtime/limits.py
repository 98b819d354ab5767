"""A VE's cgroup limits as one value: what CgroupDriver.set_limits applies (v1 and v2 alike).

OpenVZ units: RAM and SWAP in bytes, NUMPROC a count (each may be "unlimited"), CPUUNITS a weight, CPULIMIT a
percentage of one CPU, CPUS a count (0 = all). None leaves a limit as it is (`vzctl set` changes some).

Frozen, like a frozen dataclass, but written out: `vzctl start` applies limits on its hot path, where dataclasses
(inspect and ast, ~6-20 ms of imports, -X importtime) is not loaded; see spawn.InitSpec for the same choice.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not from typing: importing it costs ~1.7 ms of every vzctl verb (type checkers know the name)
if TYPE_CHECKING:
    from typing import Any

Limit = int | str | None   # bytes or a count; "unlimited"; None: unchanged

FIELDS = ("ram", "swap", "cpuunits", "cpulimit", "cpus", "numproc")


class Limits:
    __slots__ = FIELDS
    ram: Limit
    swap: Limit
    cpuunits: int | None
    cpulimit: int | None
    cpus: int | None
    numproc: Limit

    def __init__(self, *, ram: Limit = None, swap: Limit = None, cpuunits: int | None = None,
                 cpulimit: int | None = None, cpus: int | None = None, numproc: Limit = None) -> None:
        for name, value in zip(FIELDS, (ram, swap, cpuunits, cpulimit, cpus, numproc), strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Limits is frozen: cannot set {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Limits is frozen: cannot delete {name}")

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Limits) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.as_dict().values()))

    def __repr__(self) -> str:
        return "Limits(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items() if v is not None) + ")"
