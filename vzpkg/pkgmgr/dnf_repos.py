"""A dnf repository as a frozen dataclass, and the template's repository entries → dnf.conf (pure functions).

The fields of DnfRepo are the one list of repository keys: template validation (vzpkg.template), the strict
normalization below and dnf.conf rendering all derive from it. This module imports nothing of vzpkg but errors,
so template validation can use it without loading a backend.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TemplateError

CACHE_IN_ROOT = "var/cache/dnf"
URL_KEYS = ("baseurl", "mirrorlist", "metalink")
_ID_RE = re.compile(r"[^A-Za-z0-9_.:-]+")


def _key(types: type | tuple[type, ...], default: Any = None) -> Any:
    """A repository key: the JSON/TOML types a template may give it (kept in the field's metadata)."""
    return field(default=default, metadata={"types": types})


@dataclass(frozen=True)
class DnfRepo:
    """One [section] of dnf.conf; every key but `id` is the dnf option of the same name. None: not written."""

    id: str = _key(str, "")
    name: str = _key(str, "")
    baseurl: str | tuple[str, ...] | None = _key((str, list))
    mirrorlist: str | None = _key(str)
    metalink: str | None = _key(str)
    enabled: bool = _key(bool, True)
    gpgcheck: bool = _key(bool, True)
    repo_gpgcheck: bool = _key(bool, False)
    gpgkey: tuple[str, ...] = _key((str, list), ())
    priority: int | None = _key(int)
    cost: int | None = _key(int)
    exclude: str | tuple[str, ...] | None = _key((str, list))
    includepkgs: str | tuple[str, ...] | None = _key((str, list))
    module_hotfixes: bool | None = _key(bool)
    sslverify: bool | None = _key(bool)
    skip_if_unavailable: bool | None = _key(bool)
    metadata_expire: str | int | None = _key((str, int))
    countme: bool | None = _key(bool)

    def options(self) -> dict[str, Any]:
        """The keys that are set, in field order, `id` included (what dnf.conf and the status code read)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) not in (None, (), "")}

    @property
    def first_url(self) -> str | None:
        """The first base URL, else the metalink or mirror list (what the metadata cache is keyed by)."""
        if self.baseurl:
            return (self.baseurl if isinstance(self.baseurl, str) else self.baseurl[0]).split()[0]
        return self.metalink or self.mirrorlist


#: repository-table keys a template may use, with their types: derived from DnfRepo
REPO_KEYS: dict[str, type | tuple[type, ...]] = {f.name: f.metadata["types"] for f in dataclasses.fields(DnfRepo)}


def check_repository_keys(entry: dict[str, Any], where: str) -> None:
    """The checks template validation makes on an unrendered repository table: known keys, a URL key."""
    for key in entry:
        if key not in REPO_KEYS:
            raise TemplateError(f"{where}.{key}: unknown dnf repository key (known: {', '.join(sorted(REPO_KEYS))})")
    if not any(entry.get(k) for k in URL_KEYS):
        raise TemplateError(f"{where}: needs one of baseurl, mirrorlist or metalink")


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def normalize_repositories(file: Path, repositories: list[Any], gpg_keys: list[str]) -> list[DnfRepo]:
    """The template's rendered repository entries (from FILE, for messages) as dnf repositories, checked strictly.

    A string entry is a base URL; a table uses the keys of REPO_KEYS. Repositories check package signatures
    (gpgcheck) unless the entry turns it off, with the entry's gpgkey or else every key of the template's gpg_keys.
    """
    repos: list[DnfRepo] = []
    seen: set[str] = set()
    for i, entry in enumerate(repositories):
        where = f"{file}: repositories[{i}]"
        if isinstance(entry, str):
            entry = {"baseurl": entry}
        if not isinstance(entry, dict):
            raise TemplateError(f"{where}: expected a URL or a table, got {type(entry).__name__}")
        for key, value in entry.items():
            if key not in REPO_KEYS:
                raise TemplateError(f"{where}.{key}: unknown dnf repository key "
                                    f"(known: {', '.join(sorted(REPO_KEYS))})")
            want = REPO_KEYS[key]
            if not isinstance(value, want) or (isinstance(value, bool) and want in (int, (str, int))):
                raise TemplateError(f"{where}.{key}: unexpected value {value!r}")
        if not any(entry.get(k) for k in URL_KEYS):
            raise TemplateError(f"{where}: needs one of baseurl, mirrorlist or metalink")
        repo_id = entry.get("id") or _ID_RE.sub("-", entry.get("name", "")).strip("-").lower() or f"repo{i}"
        if _ID_RE.search(repo_id):
            raise TemplateError(f"{where}.id: {repo_id!r} is not a valid repository id")
        if repo_id in seen:
            raise TemplateError(f"{where}.id: repository id {repo_id!r} is used twice")
        seen.add(repo_id)
        keys = entry.get("gpgkey", gpg_keys)
        values = {k: _as_tuple(v) for k, v in entry.items() if v != ""}
        values.update(id=repo_id, name=entry.get("name", repo_id),
                      gpgkey=(keys,) if isinstance(keys, str) else tuple(keys))
        repos.append(DnfRepo(**values))
    if not repos:
        raise TemplateError(f"{file}: repositories: a dnf template needs at least one")
    return repos


def _ini_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def render_config(main: dict[str, Any], repos: list[DnfRepo]) -> str:
    """dnf.conf text: [main] then one section per repository."""
    lines = ["# written by vzpkg for one build; host configuration is not used", "[main]"]
    lines += [f"{k}={_ini_value(v)}" for k, v in main.items()]
    for repo in repos:
        lines += ["", f"[{repo.id}]"]
        lines += [f"{k}={_ini_value(v)}" for k, v in repo.options().items() if k != "id"]
    return "\n".join(lines) + "\n"


def main_options(*, weak_deps: bool, conf_dir: Path, module_platform_id: str | None) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "cachedir": "/" + CACHE_IN_ROOT,      # dnf puts it below the installroot; the package cache is mounted there
        "keepcache": True,
        "install_weak_deps": weak_deps,
        "gpgcheck": True,
        "localpkg_gpgcheck": True,
        "reposdir": str(conf_dir / "repos.d"),  # empty: only the repositories of this file
        "varsdir": str(conf_dir / "vars"),
        "plugins": False,
        "skip_if_unavailable": False,
        "best": True,
        "metadata_expire": 0,                  # repomd.xml is checked each build; unchanged metadata is reused
        "retries": 2,
        "timeout": 15,
        "diskspacecheck": False,
        "clean_requirements_on_remove": True,
        "debuglevel": 2,
    }
    if module_platform_id:
        opts["module_platform_id"] = module_platform_id
    return opts


def substitute(text: str, variables: dict[str, str]) -> str:
    """dnf's $var and ${var} substitution (for the URLs vzpkg fetches itself)."""
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return variables.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, text)


def expand_repository(repo: DnfRepo, variables: dict[str, str]) -> DnfRepo:
    """REPO with dnf's $variables substituted in its string values (and in each base URL)."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(repo):
        value = getattr(repo, f.name)
        if isinstance(value, str):
            changes[f.name] = substitute(value, variables)
    if isinstance(repo.baseurl, tuple):
        changes["baseurl"] = tuple(substitute(u, variables) for u in repo.baseurl)
    return dataclasses.replace(repo, **changes)
