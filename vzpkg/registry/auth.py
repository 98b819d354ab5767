"""Registry credentials, from where container tools keep them.

Order (first hit wins): $VZPKG_REGISTRY_USERNAME + $VZPKG_REGISTRY_PASSWORD; $REGISTRY_AUTH_FILE (podman,
skopeo, buildah); $XDG_RUNTIME_DIR/containers/auth.json; $DOCKER_CONFIG/config.json or ~/.docker/config.json.
The files share docker's format: {"auths": {"HOST[:PORT]": {"auth": base64("user:password")}}}; in each, a
credential helper named for the host (`credHelpers`) or for all hosts (`credsStore`) is asked first, as docker
does: `docker-credential-NAME get` with the host on stdin, {"Username": ..., "Secret": ...} on stdout. A helper
that has nothing for the host ("credentials not found") lets the file's own `auths` entry answer.

oras reads only ~/.docker/config.json and merges several files through a set (so which file wins is not
defined); the lookup is done here and the result handed to oras' auth backend.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MissingToolError, RegistryAuthError


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    source: str  # where they came from, for error messages


def auth_files() -> list[Path]:
    files = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    docker_dir = Path(os.environ["DOCKER_CONFIG"]) if os.environ.get("DOCKER_CONFIG") else Path.home() / ".docker"
    files.append(docker_dir / "config.json")
    return files


def _host_keys(host: str) -> list[str]:
    keys = [host, f"https://{host}", f"http://{host}", f"https://{host}/v2/", f"http://{host}/v2/"]
    if host.startswith("localhost"):
        keys.append(host.replace("localhost", "127.0.0.1", 1))
    elif host.startswith("127.0.0.1"):
        keys.append(host.replace("127.0.0.1", "localhost", 1))
    return keys


HELPER_TIMEOUT = 30.0
_HELPER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _helper_name(data: dict[str, Any], host: str, path: Path) -> tuple[str, str] | None:
    """(helper, the key it is named under) for HOST in a parsed auth file: credHelpers, else credsStore."""
    helpers = data.get("credHelpers")
    named: tuple[str, str] | None = None
    if isinstance(helpers, dict):
        named = next(((str(helpers[k]), f"credHelpers[{k!r}]") for k in _host_keys(host) if helpers.get(k)), None)
    if named is None and data.get("credsStore"):
        named = (str(data["credsStore"]), "credsStore")
    if named is not None and not _HELPER_NAME.match(named[0]):
        raise ConfigError(f"{path}: {named[1]} names {named[0]!r}, not a credential helper name; fix the file")
    return named


def from_helper(helper: str, host: str, source: str) -> Credentials | None:
    """Ask `docker-credential-HELPER get` for HOST; None when it has nothing for it."""
    import shutil

    from .. import process  # here: a push or pull that needs no credentials does not pay for its import

    program = f"docker-credential-{helper}"
    exe = shutil.which(program)
    if exe is None:
        raise MissingToolError(f"{program} (the credential helper of {source}) is not installed: install it, or "
                               f"remove it from that file and give the credentials another way")
    p = process.run([exe, "get"], input=host, capture=True, text=True, timeout=HELPER_TIMEOUT, check=False,
                    error=RegistryAuthError, what=f"{program} get ({source})")
    out = (p.stdout.strip() or p.stderr.strip())
    if p.returncode != 0:
        if "credentials not found" in out.lower():
            return None
        raise RegistryAuthError(f"{program} get failed for {host} ({source}): "
                                f"{out.splitlines()[-1][:200] if out else f'exit {p.returncode}'}")
    try:
        answer = json.loads(p.stdout)
        user, secret = str(answer["Username"]), str(answer["Secret"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise RegistryAuthError(f"{program} get answered for {host} without Username and Secret ({source})") from e
    if user == "<token>":
        raise RegistryAuthError(f"{program} gives an identity token for {host}, which vzpkg cannot use: give a "
                                "user name and password (VZPKG_REGISTRY_USERNAME/PASSWORD)")
    return Credentials(user, secret, f"{program} ({source})")


def _from_file(path: Path, host: str) -> Credentials | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read registry credentials ({e}); fix or remove the file") from e
    if isinstance(data, dict):
        named = _helper_name(data, host, path)
        if named is not None:
            found = from_helper(named[0], host, f"{named[1]} in {path}")
            if found is not None:
                return found
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return None
    for key in _host_keys(host):
        entry = auths.get(key)
        if not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: the 'auth' of {key!r} is not base64 of user:password") from e
            return Credentials(user, password, str(path))
        if entry.get("username") is not None and entry.get("password") is not None:
            return Credentials(str(entry["username"]), str(entry["password"]), str(path))
    return None


def find_credentials(host: str) -> Credentials | None:
    user, password = os.environ.get("VZPKG_REGISTRY_USERNAME"), os.environ.get("VZPKG_REGISTRY_PASSWORD")
    if user and password is not None:
        return Credentials(user, password, "$VZPKG_REGISTRY_USERNAME/$VZPKG_REGISTRY_PASSWORD")
    for path in auth_files():
        found = _from_file(path, host)
        if found:
            return found
    return None
