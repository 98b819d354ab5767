"""HTTP fetching with clear errors, retries for transient failures, and bounds on everything a mirror controls.

A mirror can be slow, hostile or broken. Every download here is bounded:

* in time: each read waits at most READ_TIMEOUT, and the whole download (retries included) ends within a total
  deadline (`fetch_timeout`, seconds; a mirror trickling one byte a second cannot keep a run going for hours);
* in size: the body is read in chunks and refused once it passes MAX_BYTES (the caller gives the size the signed
  metadata vouches for when it knows it), so a huge or endless body never fills memory;
* in redirects: followed as apt does (cross-host redirects are how many mirror networks work), at most
  MAX_REDIRECTS, never from https to http. What was fetched is checked by the caller against signed metadata,
  whatever host served it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from ..errors import MirrorError

CONNECT_TIMEOUT = 5
READ_TIMEOUT = 20
TRANSIENT_STATUS = {429, 500, 502, 503, 504}
REDIRECT_STATUS = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 5
# A cap for metadata whose size nothing signed gives (InRelease, repomd.xml): Debian's largest InRelease is
# about 200 KB, so this only stops a mirror that sends without end.
MAX_METADATA_BYTES = 64 << 20
CHUNK = 1 << 16
HINT = "check the mirror (--mirror, VZPKG_MIRROR or the config file)"


class TooLargeError(MirrorError):
    """The body is larger than allowed (the caller may turn this into a SignatureError: size vouched for)."""


@dataclass
class Response:
    url: str                       # where the body came from, after redirects
    status_code: int
    headers: Mapping[str, str] = field(default_factory=dict)
    content: bytes = b""

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


def default_deadline() -> float:
    """The `fetch_timeout` setting (config file < VZPKG_FETCH_TIMEOUT)."""
    from ..config import load_settings

    return float(load_settings().fetch_timeout)


def fetch(url: str, *, retries: int = 2, backoff: float = 0.5, headers: dict[str, str] | None = None,
          max_bytes: int = MAX_METADATA_BYTES, deadline: float | None = None) -> Response:
    """GET url (status 200 or 304), the body read into memory up to MAX_BYTES, all within DEADLINE seconds
    (default: the fetch_timeout setting). Proxies come from the environment (requests' default)."""
    import requests
    import urllib3.exceptions

    total = default_deadline() if deadline is None else deadline
    end = time.monotonic() + total
    last: str = ""
    for attempt in range(retries + 1):
        try:
            return _get(url, headers or {}, max_bytes, end, total)
        except _Transient as e:
            last = str(e)
        except requests.ConnectionError as e:
            last = f"cannot connect ({_short(e)})"
            # A refused connection will not heal within a retry: fail at once.
            if "refused" in str(e).lower():
                break
        except (requests.Timeout, urllib3.exceptions.ReadTimeoutError):
            last = "timed out"
        except urllib3.exceptions.HTTPError as e:  # raised while reading the body: cut short, reset
            last = f"transfer broken off ({_short(e)})"
        except requests.RequestException as e:
            last = _short(e)
            break
        if time.monotonic() >= end:
            raise MirrorError(f"{url}: {last}, and no answer within {total:g} s (fetch_timeout); {HINT}")
        if attempt < retries:
            time.sleep(min(backoff * (2**attempt), max(0.0, end - time.monotonic())))
    raise MirrorError(f"{url}: {last}; {HINT}")


class _Transient(Exception):
    """An HTTP status worth retrying."""


def _remaining(url: str, end: float, total: float, got: int | None = None) -> float:
    left = end - time.monotonic()
    if left <= 0:
        received = f" ({got} bytes received)" if got is not None else ""
        raise MirrorError(f"{url}: not complete within {total:g} s (fetch_timeout){received}: the mirror is too "
                          f"slow; {HINT}")
    return left


def _get(url: str, headers: dict[str, str], max_bytes: int, end: float, total: float) -> Response:
    import requests

    # No Content-Encoding: a compressed transfer would expand beyond what max_bytes bounds.
    headers = {"Accept-Encoding": "identity", **headers}
    current = url
    for _hop in range(MAX_REDIRECTS + 1):
        left = _remaining(url, end, total)
        resp = requests.get(current, headers=headers, stream=True, allow_redirects=False,
                            timeout=(min(CONNECT_TIMEOUT, left), min(READ_TIMEOUT, left)))
        with resp:
            if resp.status_code in REDIRECT_STATUS and resp.headers.get("Location"):
                target = urljoin(current, resp.headers["Location"])
                if urlsplit(current).scheme == "https" and urlsplit(target).scheme != "https":
                    raise MirrorError(f"{url}: redirected from https to {target}: refused (a download never "
                                      f"leaves https); {HINT}")
                current = target
                continue
            if resp.status_code in (200, 304):
                body = _read_body(resp, url, max_bytes, end, total)
                return Response(current, resp.status_code, resp.headers, body)
            if resp.status_code in TRANSIENT_STATUS:
                raise _Transient(f"HTTP {resp.status_code}")
            where = f" (redirected to {current})" if current != url else ""
            raise MirrorError(f"{url}: HTTP {resp.status_code}{where}; {HINT}")
    raise MirrorError(f"{url}: more than {MAX_REDIRECTS} redirects (the last to {current}); {HINT}")


def _read_body(resp, url: str, max_bytes: int, end: float, total: float) -> bytes:
    length = resp.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise TooLargeError(f"{url}: the mirror sends {length} bytes, more than the {max_bytes} allowed; {HINT}")
    raw = resp.raw
    # read1 returns what one read gives: the deadline is checked between reads even when the mirror trickles.
    read = raw.read1 if hasattr(raw, "read1") else raw.read
    body = bytearray()
    while True:
        _remaining(url, end, total, len(body))
        chunk = read(CHUNK, decode_content=False)
        if not chunk:
            break
        body += chunk
        if len(body) > max_bytes:
            raise TooLargeError(f"{url}: the mirror sends more than the {max_bytes} bytes allowed; {HINT}")
    return bytes(body)


def _short(e: Exception) -> str:
    text = str(e)
    return text if len(text) < 160 else text[:157] + "..."
