"""Small helpers of the registry client: proxies from the environment, Basic credentials, exception chains."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import IO
from urllib.parse import urlsplit

from ..errors import RegistryError
from .auth import Credentials


def _proxy_for(scheme: str, netloc: str) -> tuple[str, str | None] | None:
    """(proxy HOST:PORT, Proxy-Authorization or None) for SCHEME://NETLOC from $https_proxy / $http_proxy, unless
    $no_proxy exempts it: the environment's rules, as requests and curl read them."""
    if not any(k.lower() in ("http_proxy", "https_proxy", "all_proxy") for k in os.environ):
        return None  # the common case, without importing urllib.request
    import urllib.request
    from urllib.parse import unquote

    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme) or proxies.get("all")
    if not url or urllib.request.proxy_bypass_environment(netloc, proxies):
        return None
    p = urlsplit(url if "://" in url else f"http://{url}")
    if p.scheme != "http" or not p.hostname:
        raise RegistryError(f"proxy {url!r} (from ${scheme}_proxy): only http:// proxies are supported; fix the "
                            "variable, or exempt the registry in $no_proxy")
    auth = None
    if p.username:
        import base64

        auth = "Basic " + base64.b64encode(f"{unquote(p.username)}:{unquote(p.password or '')}".encode()).decode()
    host = f"[{p.hostname}]" if ":" in p.hostname else p.hostname
    return f"{host}:{p.port or 80}", auth


def _has_fileno(f: IO[bytes]) -> bool:
    try:
        f.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


def _basic(c: Credentials) -> str:
    import base64

    return base64.b64encode(f"{c.username}:{c.password}".encode()).decode()


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    """E, the exceptions in its args, and its causes (bounded: exception graphs can be cyclic)."""
    seen = 0
    while e is not None and seen < 10:
        yield e
        for arg in getattr(e, "args", ()):
            if isinstance(arg, BaseException):
                yield from _chain(arg)
        e = e.__cause__ or e.__context__
        seen += 1
