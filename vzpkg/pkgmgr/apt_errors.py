"""What went wrong inside apt-get, mmdebstrap or debootstrap, read from their output.

apt says why it failed in a line or two among many; the exit status (100) says nothing. The decisive line decides
the exit code, as docs/exit-codes.md documents: a hash or signature failure is a SignatureError (8), a download
that failed (unreachable, refused, timed out, HTTP error) a MirrorError (7), anything else a BuildError (9). The
line is quoted in the message. Checked in this order, because apt reports a hash mismatch as "Failed to fetch
URL  Hash Sum mismatch".
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import BuildError, MirrorError, SignatureError

TIMEOUT_EXIT = 124  # timeout(1): the command ran past its deadline

_HASH = ("Hash Sum mismatch", "Hashes of expected file", "File has unexpected size", "sha256 mismatch",
         "Checksum mismatch", "MD5Sum mismatch", "Size mismatch")
_SIGNATURE = ("NO_PUBKEY", "BADSIG", "EXPKEYSIG", "REVKEYSIG", "is not signed", "signatures were invalid",
              "signatures couldn't be verified", "Release signed by unknown key", "Invalid Release signature",
              "NODATA", "GPG error", "Clearsigned file isn't valid")
_FETCH = ("Failed to fetch", "Could not resolve", "Temporary failure resolving", "Connection refused",
          "Unable to connect", "Could not connect", "Connection failed", "Connection timed out",
          "404  Not Found", "File not found", "Redirection loop",
          "Redirection from https", "Bad header", "Undetermined Error", "Couldn't download",
          "Failed getting release file", "Failed getting release signature file", "couldn't download")
# apt's summaries: used only when no line says what failed
_FETCH_SUMMARY = ("does not have a Release file", "Unable to fetch some archives", "Some index files failed to download")


def decisive_line(lines: Iterable[str], markers: tuple[str, ...]) -> str | None:
    """The first error-like line holding one of MARKERS (apt's E:/W:/Err: lines first, then any line). apt puts
    the reason of an 'Err:N URL ...' on the indented line below it: such a line comes back with the Err: line."""
    lines = [ln.rstrip() for ln in lines if ln.strip()]
    for ln in lines:
        if ln.startswith(("E:", "W:", "Err:")) and any(m in ln for m in markers):
            return ln.strip()
    context = None
    for ln in lines:
        if ln.startswith("Err:"):
            context = ln.strip()
        elif not ln.startswith((" ", "\t")):
            context = None
        if any(m in ln for m in markers):
            return f"{context}: {ln.strip()}" if context and ln.startswith((" ", "\t")) else ln.strip()
    return None


def _quote(line: str, limit: int = 300) -> str:
    return line if len(line) <= limit else line[: limit - 3] + "..."


def last_download(lines: list[str]) -> str | None:
    """The download apt had started and not finished (a 'Get:' line after the last 'Fetched' line), if any."""
    current = None
    for ln in lines:
        s = ln.strip()
        if s.startswith("Get:"):
            current = s
        elif s.startswith("Fetched ") or s.startswith("Hit:"):
            current = None
    return current


def classify(what: str, returncode: int, lines: list[str], *, deadline: int | None = None,
             log: str | None = None) -> Exception:
    """The exception for a failed run of WHAT (a tool and its arguments, shortened), from its output LINES."""
    hint = f" (full log: {log})" if log else ""
    if returncode == TIMEOUT_EXIT and deadline is not None:
        pending = last_download(lines)
        if pending is not None:
            return MirrorError(f"{what}: not finished within {deadline} s (build_timeout): the mirror is too slow; "
                               f"still downloading {_quote(pending)}; check the mirror or raise build_timeout")
        return BuildError(f"{what}: not finished within {deadline} s (build_timeout){hint}")
    line = decisive_line(lines, _HASH)
    if line is not None:
        return SignatureError(f"{what}: a download does not match the repository's signed metadata: {_quote(line)}")
    line = decisive_line(lines, _SIGNATURE)
    if line is not None:
        return SignatureError(f"{what}: repository signature check failed: {_quote(line)}")
    line = decisive_line(lines, _FETCH) or decisive_line(lines, _FETCH_SUMMARY)
    if line is not None:
        return MirrorError(f"{what}: cannot download from the mirror: {_quote(line)}; check the mirror")
    status = f"exit status {returncode}" if returncode >= 0 else f"killed by signal {-returncode}"
    tail = " | ".join(_quote(ln.strip(), 200) for ln in _interesting(lines)[-3:])
    return BuildError(f"{what} failed ({status}){': ' + tail if tail else ''}{hint}")


def _interesting(lines: list[str]) -> list[str]:
    picked = [ln for ln in lines if ln.strip().startswith(("E:", "W:", "Err:")) or "error" in ln.lower()]
    return picked or [ln for ln in lines if ln.strip()]
