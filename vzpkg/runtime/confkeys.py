"""The known keys of a VE config (KNOWN_KEYS): what each accepts, in OpenVZ's units and within the kernel's ranges,
and validate_value, which checks a value against it; with the size and count syntax they share (parse_size,
format_size, parse_barrier_limit). conf.py (the file format) uses it and re-exports its names."""

from __future__ import annotations

import re
from collections.abc import Callable

from vzpkg.errors import ConfigError

from .layout import VEID_NAME_CHARS, VEID_NAME_MAX

UNLIMITED = "unlimited"
_SUFFIXES = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}
_SIZE_RE = re.compile(r"^([0-9]+)([KMGT]?)B?$", re.IGNORECASE)
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

DEFAULT_CPUUNITS = 1000
CPUUNITS_MIN, CPUUNITS_MAX = 8, 500000
# RAM below this cannot even start a shell; refusing it early beats an OOM loop at start.
RAM_MIN = 16 << 20
# The kernel's ranges, so that a value `set --save` accepts never makes the VE unable to start (docs/ve-config.md):
# the most CPUs a Linux kernel supports (NR_CPUS at most 8192); CPULIMIT is percent of one CPU
CPUS_MAX = 8192
CPULIMIT_MAX = 100 * CPUS_MAX
# pids.max takes at most PID_MAX_LIMIT (4194304 on 64-bit kernels)
NUMPROC_MAX = 4 * 1024 * 1024
# memory limits: 1 PiB, far above any host's RAM and far below the kernel's 2^63 page-counter bound
MEMORY_MAX = 1 << 50
# disk limits: 1 EiB and 2^63-1 inodes (quota interfaces take 64-bit values)
DISKSPACE_MAX = 1 << 60
DISKINODES_MAX = 2**63 - 1
SHA256_HEX = frozenset("0123456789abcdef")


# ---------------------------------------------------------------------------------------------------------
# sizes and counts


def parse_size(text: str) -> int | None:
    """'512M' -> 536870912 (binary suffixes K/M/G/T, optional B; plain numbers are bytes); 'unlimited' -> None."""
    value = text.strip()
    if value.lower() == UNLIMITED:
        return None
    m = _SIZE_RE.match(value)
    if not m:
        raise ConfigError(f'size "{text}": must be a number with an optional K/M/G/T suffix, or "unlimited"')
    return int(m.group(1)) << _SUFFIXES[m.group(2).upper()]


def format_size(n: int | None) -> str:
    """Inverse of parse_size: the largest suffix that represents n exactly (536870912 -> '512M')."""
    if n is None:
        return UNLIMITED
    if n < 0:
        raise ConfigError(f"size {n}: must not be negative")
    for suffix in ("T", "G", "M", "K"):
        shift = _SUFFIXES[suffix]
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return str(n)


def _parse_count(text: str) -> int | None:
    value = text.strip()
    if value.lower() == UNLIMITED:
        return None
    if not (value.isascii() and value.isdigit()):
        raise ValueError(value)
    return int(value)


def parse_barrier_limit(text: str, parse: Callable[[str], int | None]) -> tuple[int | None, int | None]:
    """OpenVZ 'barrier:limit'; one value means barrier == limit. None stands for unlimited."""
    parts = text.split(":")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ValueError(text)
    barrier, limit = parse(parts[0]), parse(parts[1])
    if barrier is not None and limit is not None and barrier > limit:
        raise ValueError(text)
    if barrier is None and limit is not None:
        raise ValueError(text)
    return barrier, limit


# ---------------------------------------------------------------------------------------------------------
# validators: each returns None when the value is fine and raises ValueError/ConfigError otherwise


def _int_range(lo: int, hi: int | None) -> Callable[[str], None]:
    def check(v: str) -> None:
        if not re.fullmatch(r"[0-9]+", v):
            raise ValueError(v)
        n = int(v)
        if n < lo or (hi is not None and n > hi):
            raise ValueError(v)

    return check


def _choice(*options: str) -> Callable[[str], None]:
    def check(v: str) -> None:
        if v not in options:
            raise ValueError(v)

    return check


def _hostname(v: str) -> None:
    labels = v.rstrip(".").split(".")
    if len(v) > 253 or not all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", x) for x in labels):
        raise ValueError(v)


def _hostnames(v: str) -> None:
    for name in v.split():
        _hostname(name)


def _ip_list(v: str) -> None:
    import ipaddress  # lazily: only `set --ipadd` and config validation need it

    for item in v.split():
        ipaddress.ip_interface(item)


def _ns_list(v: str) -> None:
    import ipaddress

    for item in v.split():
        ipaddress.ip_address(item)


def _ram(v: str) -> None:
    n = parse_size(v)
    if n is not None and not RAM_MIN <= n <= MEMORY_MAX:
        raise ValueError(v)


def _swap(v: str) -> None:
    n = parse_size(v)
    if n is not None and n > MEMORY_MAX:
        raise ValueError(v)


def _bounded(parse: Callable[[str], int | None], hi: int) -> Callable[[str], int | None]:
    def check(text: str) -> int | None:
        n = parse(text)
        if n is not None and n > hi:
            raise ValueError(text)
        return n

    return check


def _numproc(v: str) -> None:
    # OpenVZ configs carry NUMPROC as barrier:limit; the pids controller has just one limit (the second).
    _, limit = parse_barrier_limit(v, _bounded(_parse_count, NUMPROC_MAX))
    if limit == 0:
        raise ValueError(v)


def _path(v: str) -> None:
    # $VEID is expanded by the runtime (as OpenVZ's global config did), so it is allowed here.
    if not v.startswith("/") or "\n" in v:
        raise ValueError(v)


def _ostemplate(v: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", v):
        raise ValueError(v)


def _name(v: str) -> None:
    # A VEID's name characters and length (it may start with a digit), but it must not look like a numeric VE id,
    # or `vzctl start 101` would be ambiguous.
    if not (0 < len(v) <= VEID_NAME_MAX and v[0].isascii() and v[0].isalnum() and set(v) <= VEID_NAME_CHARS) \
            or v.isdigit():
        raise ValueError(v)


def _sha256(v: str) -> None:
    if not is_sha256(v):
        raise ValueError(v)


def is_sha256(v: str | None) -> bool:
    return v is not None and len(v) == 64 and set(v) <= SHA256_HEX


def template_sha256_problem(value: str | None, source: str) -> str | None:
    """Why a VE config's TEMPLATE_SHA256 cannot name its template generation, or None.

    Without it the VE's lower layer would be layout.template("") — the whole template area, every
    generation at once — so start and mount refuse it (no import of this module needed: confcache.py has a copy of
    the check on its hot path, tested to agree)."""
    if not value:
        what = "is missing" if value is None else "is empty"
    elif not is_sha256(value):
        what = f'="{value}" is not 64 lowercase hex digits'
    else:
        return None
    return (f"{source}: TEMPLATE_SHA256 {what}: the VE does not know which template generation it was created "
            "from; set it to the \"sha256\" of the cache manifest (<cache_dir>/<OSTEMPLATE>.json) it was made from, "
            "or recreate the VE")


class KeySpec:
    """How a known key's value is checked. A plain class: dataclasses import inspect and ast, ~10 ms that
    `vzctl create` cannot spare."""

    __slots__ = ("check", "accepted")

    def __init__(self, check: Callable[[str], None], accepted: str) -> None:
        self.check = check
        self.accepted = accepted  # shown to the user after "must be"


KNOWN_KEYS: dict[str, KeySpec] = {
    "OSTEMPLATE": KeySpec(_ostemplate, "a template name like debian-12-x86_64"),
    "HOSTNAME": KeySpec(_hostname, "a host name (letters, digits, '-', dot-separated labels)"),
    "IP_ADDRESS": KeySpec(_ip_list, "a space-separated list of IPv4/IPv6 addresses, each optionally /prefix"),
    "NAMESERVER": KeySpec(_ns_list, "a space-separated list of IPv4/IPv6 addresses"),
    "SEARCHDOMAIN": KeySpec(_hostnames, "a space-separated list of domain names"),
    "CPUUNITS": KeySpec(_int_range(CPUUNITS_MIN, CPUUNITS_MAX), f"an integer {CPUUNITS_MIN}..{CPUUNITS_MAX}"),
    "CPULIMIT": KeySpec(_int_range(0, CPULIMIT_MAX),
                        f"an integer 0..{CPULIMIT_MAX}, percent of one CPU (100 per core, 0 = unlimited)"),
    "CPUS": KeySpec(_int_range(0, CPUS_MAX), f"an integer number of CPUs 0..{CPUS_MAX} (0 = all)"),
    "RAM": KeySpec(_ram, f'a size {RAM_MIN >> 20}M..{MEMORY_MAX >> 40}T with an optional K/M/G/T suffix, '
                         'or "unlimited"'),
    "SWAP": KeySpec(_swap, f'a size 0..{MEMORY_MAX >> 40}T with an optional K/M/G/T suffix (0 = no swap), '
                           'or "unlimited"'),
    "NUMPROC": KeySpec(_numproc, f'an integer 1..{NUMPROC_MAX} (the kernel\'s pid limit), "unlimited", '
                                 'or barrier:limit'),
    "DISKSPACE": KeySpec(
        lambda v: parse_barrier_limit(v, _bounded(parse_size, DISKSPACE_MAX)),
        f'a size (K/M/G/T) up to {DISKSPACE_MAX >> 40}T or barrier:limit with barrier <= limit, or "unlimited"',
    ),
    "DISKINODES": KeySpec(
        lambda v: parse_barrier_limit(v, _bounded(_parse_count, DISKINODES_MAX)),
        f'an integer up to {DISKINODES_MAX} or barrier:limit with barrier <= limit, or "unlimited"',
    ),
    "VE_ROOT": KeySpec(_path, "an absolute path ($VEID allowed)"),
    "VE_PRIVATE": KeySpec(_path, "an absolute path ($VEID allowed)"),
    "ONBOOT": KeySpec(_choice("yes", "no"), "yes or no"),
    "INIT": KeySpec(_choice("minimal", "distro"), "minimal or distro"),
    "PRIVILEGED": KeySpec(_choice("yes", "no"), "yes or no"),
    "LAYOUT": KeySpec(_choice("overlay", "copy", "image", "btrfs", "projquota", "auto"),
                      "overlay, copy, image, btrfs, projquota or auto"),
    "QUOTAUGIDLIMIT": KeySpec(_int_range(0, 2**31 - 1), "an integer 0..2147483647 (0 = no quotas inside the VE)"),
    "ID_SHIFT": KeySpec(_int_range(0, 2**32 - 65536), "an integer 0..4294901760 (host uid of the VE's root)"),
    "IDMAP": KeySpec(_choice("private", "shared"), "private or shared"),
    "TEMPLATE_SHA256": KeySpec(_sha256, "64 lowercase hex digits"),
    "NAME": KeySpec(_name, f"letters, digits, '.', '_', '-' (at most {VEID_NAME_MAX}, not all digits)"),
}


def validate_value(key: str, value: str) -> None:
    """Raise ConfigError naming key, value and what is accepted. Empty values mean 'not set' and pass."""
    if not _KEY_RE.match(key):
        raise ConfigError(f'key "{key}": must be letters, digits and "_", not starting with a digit')
    if "\n" in value or "\0" in value:
        raise ConfigError(f"{key}: value must be a single line")
    spec = KNOWN_KEYS.get(key)
    if spec is None or value == "":
        return
    try:
        spec.check(value)
    except (ValueError, ConfigError):
        raise ConfigError(f'{key}="{value}": must be {spec.accepted}') from None
