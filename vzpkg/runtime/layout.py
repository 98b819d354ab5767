"""Where things live under a VZ root (default /var/lib/vz; --root or $VZ_ROOT).

    template/<sha256>/        a cache unpacked once, ownership shifted by 100000 (read-only); VEs with a
                              private id range see it through an idmapped mount
    template/<sha256>-<shift> the same for another id shift (0 for --privileged VEs, N for --idmap shared
                              --id-shift N)
    template/.tmp-*           unpacks in progress; template/.<key>.lock their locks
    private/<id>/             a VE's own data: upper/ + work/ (overlay layout) or root/ (copy layout);
                              lower/, where the idmapped template is attached while the overlay is mounted
    private/.tmp-<id>-*       creates in progress
    root/<id>/                the VE's root mount point
    conf/<id>.conf            its config (OpenVZ KEY="value")
    dump/<id>/                checkpoint images
    lock/<id>.lock            one vzctl at a time per VE
    lock/idrange/             id range allocation: .lock, and <id> reservations of creates in progress
    run/<id>.state            the running VE's init (pid, start time), written by start
    lib/                      the compiled minimal init
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vzpkg.errors import UsageError

DEFAULT_ID_SHIFT = 100000
ID_RANGE = 65536


def template_shift(privileged: bool, id_shift: int, idmap: str | None) -> int:
    """The id shift of the unpacked template a VE uses: a private range (IDMAP="private") sees the shared
    generation (DEFAULT_ID_SHIFT) through an idmapped mount; otherwise the generation is unpacked at ID_SHIFT."""
    if privileged:
        return 0
    return DEFAULT_ID_SHIFT if idmap == "private" else id_shift


# The VEID rule, here only (vzctl, the runtime, cgroups' name check and the config's NAME derive from it): a
# number 1..VEID_MAX without leading zeros, or a name of VEID_NAME_CHARS starting with a letter, at most
# VEID_NAME_MAX long.
VEID_MAX = 2**31 - 1  # OpenVZ's ids are C ints; 0 is the host
VEID_NAME_MAX = 64
VEID_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
VEID_RULE = (f"a number 1..{VEID_MAX} (no leading zeros) or a name of up to {VEID_NAME_MAX} letters, digits, "
             "'.', '_', '-' starting with a letter")
ROOT_TAG_LEN = 8  # Layout.root_tag: crc32 in hex
CGROUP_NAME_MAX = ROOT_TAG_LEN + 1 + VEID_NAME_MAX  # Layout.cgroup_name: <root tag>-<VEID>


def _veid_problem(veid: str) -> str | None:
    """Why VEID is not a valid id, or None. No regex: `re` costs ms to import on vzctl's hot path."""
    if veid.isascii() and veid.isdigit():
        if veid == "0" or int(veid) == 0:
            return f"0 is the host in OpenVZ, not a VE: use 1..{VEID_MAX}"
        if veid[0] == "0":
            return f"write it without leading zeros ({int(veid)}): 0101 and 101 would be two names for one VE"
        if int(veid) > VEID_MAX:
            return f"a numeric VEID must be 1..{VEID_MAX}"
        return None
    if veid[:1] == "-":
        return "a VEID cannot start with '-' (did you mean an option? put options after the command)"
    if 0 < len(veid) <= VEID_NAME_MAX and veid[0].isascii() and veid[0].isalpha() and set(veid) <= VEID_NAME_CHARS:
        return None
    return f"use {VEID_RULE}"


def check_veid(veid: str) -> str:
    veid = str(veid)
    problem = _veid_problem(veid)
    if problem is not None:
        raise UsageError(f"invalid VEID {veid!r}: {problem}")
    return veid


def valid_veid(veid: str) -> bool:
    return _veid_problem(str(veid)) is None


def resolve_root(root: str | os.PathLike[str] | None = None) -> Path:
    """--root, else $VZ_ROOT, else the settings (config file) default."""
    if root is not None:
        return usable_root(Path(root).absolute())
    env = os.environ.get("VZ_ROOT")
    if env:
        return usable_root(Path(env).absolute())
    from vzpkg.config import load_settings

    return usable_root(load_settings().vz_root)


# Directories of the host that a clumsy --root may name: their run/, root/, lock/ ... are the host's, and start
# would make them root-only 0700 (--root / would lock every other user out of /run).
_SYSTEM_DIRS = frozenset(("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/media", "/mnt", "/opt",
                          "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/usr/local", "/var",
                          "/var/lib", "/var/tmp", "/var/cache", "/var/local", "/var/opt"))


def usable_root(path: Path) -> Path:
    if os.path.realpath(path) in _SYSTEM_DIRS:
        raise UsageError(f"VZ root {str(path)!r} is a system directory: its run/, root/, lock/ ... are the host's; "
                         "use a directory of its own (the default is /var/lib/vz)")
    # overlayfs's mount options separate layers with ':' and options with ',': such a root made every start fail
    # with a bare ENOENT (and a crafted one could add mount options)
    bad = sorted({c for c in str(path) if c in ",:\n"})
    if bad:
        raise UsageError(f"VZ root {str(path)!r}: its path must not contain {' or '.join(map(repr, bad))} "
                         "(overlay mount options cannot carry them): use another directory")
    return path


class Layout:
    __slots__ = ("root", "_real", "_tag")

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._real: str | None = None
        self._tag: str | None = None

    def __repr__(self) -> str:
        return f"Layout({str(self.root)!r})"

    @classmethod
    def at(cls, root: str | os.PathLike[str] | None = None) -> Layout:
        return cls(resolve_root(root))

    # directories
    @property
    def template_dir(self) -> Path:
        return self.root / "template"

    @property
    def private_dir(self) -> Path:
        return self.root / "private"

    @property
    def mount_dir(self) -> Path:
        return self.root / "root"

    @property
    def conf_dir(self) -> Path:
        return self.root / "conf"

    @property
    def lock_dir(self) -> Path:
        return self.root / "lock"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def lib_dir(self) -> Path:
        return self.root / "lib"

    # per VE
    def private(self, veid: str) -> Path:
        return self.private_dir / veid

    def ve_root(self, veid: str) -> Path:
        return self.mount_dir / veid

    def conf(self, veid: str) -> Path:
        return self.conf_dir / f"{veid}.conf"

    def dump(self, veid: str) -> Path:
        return self.root / "dump" / veid

    def lock(self, veid: str) -> Path:
        return self.lock_dir / f"{veid}.lock"

    def state(self, veid: str) -> Path:
        return self.run_dir / f"{veid}.state"

    # host-wide names: cgroups (and veth host ends, see net.host_ifname) are one namespace for the whole host,
    # so they carry a tag of the VZ root: the same VEID in two VZ roots are two VEs
    def real_root(self) -> str:
        if self._real is None:
            self._real = os.path.realpath(self.root)
        return self._real

    def root_tag(self) -> str:
        """8 hex digits naming this VZ root host-wide: crc32 of its real path."""
        if self._tag is None:
            import zlib

            self._tag = f"{zlib.crc32(os.fsencode(self.real_root())):0{ROOT_TAG_LEN}x}"
        return self._tag

    def cgroup_name(self, veid: str) -> str:
        """The VE's cgroup below vzpkg/ in every hierarchy: <root tag>-<VEID>."""
        return f"{self.root_tag()}-{veid}"

    # templates
    def template(self, sha256: str, id_shift: int = DEFAULT_ID_SHIFT) -> Path:
        name = sha256 if id_shift == DEFAULT_ID_SHIFT else f"{sha256}-{id_shift}"
        return self.template_dir / name

    # the areas only root may enter: templates and private areas hold files owned by the VEs' shifted ids
    # (host uid 100000 would own them) and setuid binaries; configs, state, locks and dumps are the runtime's
    SECURE_AREAS = ("template", "private", "root", "conf", "dump", "run", "lock")

    def secure_areas(self) -> None:
        """Create the VZ root's areas root-owned and 0700, or make them so if they were found wider."""
        for name in self.SECURE_AREAS:
            path = self.root / name
            try:
                os.makedirs(path, 0o700)
                continue
            except FileExistsError:
                pass
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                # not followed: `--root /var` would otherwise make /var/run (-> /run) and /var/lock root-only
                continue
            if st.st_mode & 0o077 or st.st_uid != os.geteuid():
                if st.st_uid != os.geteuid():
                    os.chown(path, os.geteuid(), os.getegid())
                os.chmod(path, 0o700)

    def veids(self) -> list[str]:
        """Every VE with a config, numbers first in numeric order, then names."""
        try:
            names = [n[:-5] for n in os.listdir(self.conf_dir) if n.endswith(".conf") and not n.startswith(".")]
        except FileNotFoundError:
            return []
        names = [n for n in names if valid_veid(n)]  # a stray file (0101.conf) is no VE
        return sorted(names, key=lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n))


def templates_in_use(layout: Layout) -> set[str]:
    """Names of template/<...> directories some VE still uses (for `vzpkg clean`)."""
    import re

    from vzpkg.safeio import CONF_MAX, read_small_text

    used = set()
    for veid in layout.veids():
        try:
            text = read_small_text(layout.conf(veid), CONF_MAX)  # not open(): a FIFO there would block
        except (OSError, UnicodeDecodeError):
            continue
        sha = shift = idmap = None
        privileged = False
        for line in text.splitlines():
            m = re.match(r'^\s*(TEMPLATE_SHA256|ID_SHIFT|IDMAP|PRIVILEGED)="?([0-9a-z]+)"?', line)
            if m:
                if m.group(1) == "TEMPLATE_SHA256":
                    sha = m.group(2)
                elif m.group(1) == "IDMAP":
                    idmap = m.group(2)
                elif m.group(1) == "PRIVILEGED":
                    privileged = m.group(2) == "yes"
                elif m.group(2).isdigit():
                    shift = int(m.group(2))
        if sha:
            used.add(layout.template(sha, template_shift(privileged, DEFAULT_ID_SHIFT if shift is None else shift,
                                                         idmap)).name)
    return used
