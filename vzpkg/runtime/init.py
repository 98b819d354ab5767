"""The VE's pid 1.

Two choices, per VE (``INIT`` in its config):

``minimal`` (default)
    vzinit, a libc-free static C program (vzinit.c beside this file): it reaps orphans, runs the VE's
    start-up scripts (``/etc/vzpkg/start`` — a script or a directory of scripts — then ``/etc/rc.local``)
    and on SIGTERM terminates everything and exits. About 2 KB of code and two pages of memory, where a
    Python pid 1 would cost ~10 MB per VE. It is compiled once per VZ root with gcc and copied into the VE's
    fresh ``/run`` at each start (so /proc/1/exe is inside the VE, which CRIU wants). Without gcc a
    /bin/sh loop inside the VE stands in (it reaps and honours SIGTERM, but costs ~1 MB more).

``distro``
    the distribution's own ``/sbin/init`` (systemd, sysvinit...). It must exist in the template (Debian's
    minbase has none) and a user-namespaced systemd needs more than this runtime gives it (cgroupfs).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

from vzpkg.errors import VEError

SOURCE = Path(__file__).with_name("vzinit.c")
IN_VE_PATH = "/run/vzinit"
DISTRO_INIT = "/sbin/init"

SHELL_INIT = (
    'trap "kill -TERM -1 2>/dev/null; wait; exit 0" TERM INT PWR; '
    "if [ -d /etc/vzpkg/start ]; then for f in /etc/vzpkg/start/*; do [ -x \"$f\" ] && \"$f\"; done; "
    "elif [ -x /etc/vzpkg/start ]; then /etc/vzpkg/start; fi; "
    "if [ -x /etc/rc.local ]; then /etc/rc.local; fi; "
    "while :; do sleep 2147483647 & wait $!; done"
)


_NAME: str | None = None  # the binary's file name, computed once per process (an API user starts many VEs)


def binary_path(lib_dir: Path) -> Path:
    global _NAME
    if _NAME is None:
        # crc32 rather than sha256: this runs at every start and hashlib's import costs more than the hash
        _NAME = f"vzinit-{os.uname().machine}-{zlib.crc32(SOURCE.read_bytes()):08x}"
    return lib_dir / _NAME


def build(lib_dir: Path) -> Path | None:
    """Return the compiled vzinit for this source, compiling it if needed; None when gcc is missing."""
    path = binary_path(lib_dir)
    if path.is_file():
        return path
    import shutil

    from .. import process

    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        return None
    lib_dir.mkdir(parents=True, exist_ok=True)
    import _thread

    # per thread too: threads of one API process may compile at once (the last rename wins, all are the same)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{_thread.get_ident()}")
    cmd = [gcc, "-Os", "-static", "-nostdlib", "-fno-stack-protector", "-fno-builtin", "-fno-pie", "-no-pie",
           "-fno-asynchronous-unwind-tables", "-Wl,--build-id=none", "-s", "-o", str(tmp), str(SOURCE)]
    try:
        process.run(cmd, capture=True, text=True, error=VEError, what=f"compiling the VE init ({' '.join(cmd)})")
    except VEError:
        tmp.unlink(missing_ok=True)
        raise
    os.chmod(tmp, 0o755)
    os.rename(tmp, path)
    return path


def argv_for(kind: str, vzinit_bytes: bytes | None) -> tuple[str, list[str]]:
    """(path inside the VE, argv) of the init to exec after pivot_root."""
    if kind == "distro":
        return DISTRO_INIT, [DISTRO_INIT]
    if vzinit_bytes is not None:
        return IN_VE_PATH, ["vzinit"]
    return "/bin/sh", ["sh", "-c", SHELL_INIT]
