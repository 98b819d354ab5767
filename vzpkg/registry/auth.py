"""Registry credentials, from where container tools keep them.

Order (first hit wins): $VZPKG_REGISTRY_USERNAME + $VZPKG_REGISTRY_PASSWORD; $REGISTRY_AUTH_FILE (podman,
skopeo, buildah); $XDG_RUNTIME_DIR/containers/auth.json; $DOCKER_CONFIG/config.json or ~/.docker/config.json.
The files share docker's format: {"auths": {"HOST[:PORT]": {"auth": base64("user:password")}}}.

oras reads only ~/.docker/config.json and merges several files through a set (so which file wins is not
defined); the lookup is done here and the result handed to oras' auth backend.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError


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


def _from_file(path: Path, host: str) -> Credentials | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read registry credentials ({e}); fix or remove the file") from e
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
