"""HTTP fetching with clear errors, bounded time and retries for transient failures."""

from __future__ import annotations

import time

from ..errors import MirrorError

CONNECT_TIMEOUT = 5
READ_TIMEOUT = 20
TRANSIENT_STATUS = {429, 500, 502, 503, 504}


def fetch(url: str, *, retries: int = 2, backoff: float = 0.5, headers: dict[str, str] | None = None):
    """GET url and return the response (status 200 or 304). Proxies come from the environment (requests' default)."""
    import requests

    last: str = ""
    for attempt in range(retries + 1):
        try:
            resp = requests.get(url, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), headers=headers or {})
        except requests.ConnectionError as e:
            last = f"cannot connect ({_short(e)})"
            # A refused connection will not heal within a retry: fail at once.
            if "refused" in str(e).lower():
                break
        except requests.Timeout:
            last = "timed out"
        except requests.RequestException as e:
            last = _short(e)
            break
        else:
            if resp.status_code in (200, 304):
                return resp
            last = f"HTTP {resp.status_code}"
            if resp.status_code not in TRANSIENT_STATUS:
                break
        if attempt < retries:
            time.sleep(backoff * (2**attempt))
    raise MirrorError(f"{url}: {last}; check the mirror (--mirror, VZPKG_MIRROR or the config file)")


def _short(e: Exception) -> str:
    text = str(e)
    return text if len(text) < 160 else text[:157] + "..."
