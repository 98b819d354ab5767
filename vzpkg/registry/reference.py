"""Registry references (`HOST[:PORT]/PATH/NAME[:TAG][@DIGEST]`) and how to reach their registry."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

# The distribution specification's grammar, reduced to what a reference to a registry needs: a host part
# (with a dot, a port or "localhost") is required, since there is no default registry for vzpkg.
_HOST = r"(?P<host>(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?)"
_PATH = r"(?P<path>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
_TAG = r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
_DIGEST = r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
_REF = re.compile(f"^{_HOST}/{_PATH}{_TAG}{_DIGEST}$")
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@dataclass(frozen=True)
class Reference:
    host: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def target(self) -> str:
        """What the manifest endpoint is asked for: the digest when given, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def name(self) -> str:
        """The last path component (a default cache name)."""
        return self.path.rsplit("/", 1)[-1]

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.host, self.path, tag, None)

    def child(self, name: str) -> Reference:
        return Reference(self.host, f"{self.path}/{name}", self.tag, None)

    def __str__(self) -> str:
        s = f"{self.host}/{self.path}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def looks_like_reference(text: str) -> bool:
    """True for `HOST/PATH...` with a host part (dot, port or localhost): not a plain template name."""
    head = text.split("/", 1)[0]
    return "/" in text and ("." in head or ":" in head or head == "localhost")


def parse_reference(text: str) -> Reference:
    m = _REF.match(text)
    if not m or not looks_like_reference(text):
        raise UsageError(f"{text!r} is not a registry reference: write HOST[:PORT]/PATH/NAME[:TAG] "
                         "(e.g. registry.example:5000/templates/debian-12-x86_64:2026-11-30)")
    return Reference(m["host"], m["path"], m["tag"], m["digest"])


def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:host.index("]")]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Transport:
    """How to talk to a registry: scheme candidates in order, and the CA file to verify TLS with (True: the defaults)."""

    schemes: tuple[str, ...]
    verify: bool | str

    @classmethod
    def for_host(cls, host: str, *, insecure: bool = False, ca_file: str | None = None) -> Transport:
        if ca_file is not None and not Path(ca_file).is_file():
            raise UsageError(f"--ca-file {ca_file}: no such file")
        verify: bool | str = ca_file or (str(SYSTEM_CA_BUNDLE) if SYSTEM_CA_BUNDLE.is_file() else True)
        if insecure:
            return cls(("http",), verify)
        # Like docker and podman: a registry on the loopback interface may speak plain HTTP (asked first: it costs
        # no TLS set-up, and a TLS registry refuses it at once).
        if is_loopback(host):
            return cls(("http", "https"), verify)
        return cls(("https",), verify)
