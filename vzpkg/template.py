"""Templates: load a definition, resolve inheritance (template sets), validate strictly, render.

A template is a directory `templates/<name>/` with
    template.toml       the definition (keys in SCHEMA; unknown keys are errors)
    files/              optional tree rendered with jinja2 into the root (`*.j2` files are rendered, others copied)
    scripts/            optional pre-cache, post-install, post-cache, pre-update, post-update (executables)
A template with `inherits = "base-name"` adds to its base: packages and repositories are appended,
environment is merged, files overlay the base's, and both templates' scripts run (base first).
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TemplateError

DEFINITION_FILE = "template.toml"
SCRIPT_NAMES = ("pre-cache", "post-install", "post-cache", "pre-update", "post-update")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.+_]*(-[a-z0-9.+_]+)+$")


@dataclass(frozen=True)
class Key:
    types: tuple[type, ...]
    required: bool = False
    merge: str = "override"  # override | append | merge
    item_types: tuple[type, ...] = ()
    doc: str = ""


SCHEMA: dict[str, Key] = {
    "inherits": Key((str,), doc="base template this one adds to"),
    "description": Key((str,), required=True, doc="one paragraph"),
    "summary": Key((str,), required=True, doc="one line"),
    "distribution": Key((str,), required=True, doc="debian, almalinux, fedora, ..."),
    "release": Key((str,), required=True, doc="release number, e.g. 12"),
    "suite": Key((str,), doc="apt suite (codename), e.g. bookworm"),
    "architecture": Key((str,), required=True, doc="x86_64, aarch64"),
    "package_manager": Key((str,), required=True, doc="apt or dnf"),
    "variant": Key((str,), doc="bootstrap variant (apt: minbase, buildd, ...)"),
    "packages": Key((list,), merge="append", item_types=(str,), doc="packages installed on top of the base"),
    "remove_packages": Key((list,), merge="append", item_types=(str,), doc="packages purged after install"),
    "repositories": Key((list,), merge="append", item_types=(str, dict), doc="jinja2-rendered repository entries"),
    "keyring": Key((str,), doc="keyring verifying the repositories"),
    "gpg_keys": Key((list,), merge="append", item_types=(str,), doc="dnf: key files or URLs"),
    "releasever": Key((str,), doc="dnf: $releasever"),
    "weak_dependencies": Key((bool,), doc="dnf: install weak dependencies (default false)"),
    "merged_usr": Key((bool,), doc="apt: merged /usr layout (default true)"),
    "environment": Key((dict,), merge="merge", doc="variables for scripts and package installation"),
    "init": Key((str,), doc="default init for VEs: minimal or distro"),
}
PACKAGE_MANAGERS = ("apt", "dnf", "yum")
#: keys of a dnf/yum repository table (`id` names the section; the others are dnf's repository options)
DNF_REPOSITORY_KEYS = ("id", "name", "baseurl", "mirrorlist", "metalink", "gpgcheck", "repo_gpgcheck", "gpgkey",
                       "enabled", "priority", "cost", "exclude", "includepkgs", "module_hotfixes", "sslverify",
                       "skip_if_unavailable", "metadata_expire", "countme")
INITS = ("minimal", "distro")


@dataclass
class Template:
    name: str
    path: Path
    data: dict[str, Any]
    chain: list[Path] = field(default_factory=list)  # template dirs, base first

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    @property
    def packages(self) -> list[str]:
        return list(self.data.get("packages", []))

    @property
    def environment(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in self.data.get("environment", {}).items()}

    def scripts(self, which: str) -> list[Path]:
        """The executable scripts called `which`, base template's first."""
        found = []
        for d in self.chain:
            p = d / "scripts" / which
            if p.is_file():
                found.append(p)
        return found

    def customizes_root(self) -> bool:
        """Whether the template changes the root beyond its packages (files or build scripts)."""
        return bool(self.file_trees()) or any(self.scripts(s) for s in ("pre-cache", "post-install", "post-cache"))

    def file_trees(self) -> list[Path]:
        return [d / "files" for d in self.chain if (d / "files").is_dir()]

    def digest(self) -> str:
        """sha256 over the full definition: resolved data, and every file and script of the chain."""
        h = hashlib.sha256()
        h.update(repr(sorted(_canonical(self.data).items())).encode())
        for d in self.chain:
            for p in sorted(d.rglob("*")):
                if p.is_file() and p.name != DEFINITION_FILE:
                    h.update(str(p.relative_to(d)).encode() + b"\0")
                    h.update(p.read_bytes())
                    h.update(b"\0")
        return h.hexdigest()

    def render_context(self, mirrors: dict[str, str], native_arch: str) -> dict[str, Any]:
        ctx: dict[str, Any] = {k: v for k, v in self.data.items() if isinstance(v, str)}
        ctx.update(mirrors)
        ctx.update(name=self.name, arch=native_arch, environment=self.environment)
        return ctx

    def render_repositories(self, context: dict[str, Any]) -> list[Any]:
        out = []
        for i, repo in enumerate(self.data.get("repositories", [])):
            if isinstance(repo, str):
                out.append(render_string(repo, context, where=f"{self.name}: repositories[{i}]"))
            else:
                out.append({k: render_string(v, context, where=f"{self.name}: repositories[{i}].{k}")
                            if isinstance(v, str) else v for k, v in repo.items()})
        return [r for r in out if r]


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def render_string(text: str, context: dict[str, Any], *, where: str) -> str:
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        return env.from_string(text).render(context).strip()
    except jinja2.TemplateError as e:
        raise TemplateError(f"{where}: cannot render {text!r}: {e}") from e


def _read_definition(path: Path) -> dict[str, Any]:
    file = path / DEFINITION_FILE
    try:
        with file.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as e:
        raise TemplateError(f"{file}: template definition missing") from e
    except tomllib.TOMLDecodeError as e:
        raise TemplateError(f"{file}: not valid TOML: {e}") from e
    for key, value in data.items():
        spec = SCHEMA.get(key)
        if spec is None:
            raise TemplateError(f"{file}: {key}: unknown key (known: {', '.join(sorted(SCHEMA))})")
        if not isinstance(value, spec.types):
            want = " or ".join(t.__name__ for t in spec.types)
            raise TemplateError(f"{file}: {key}: expected {want}, got {type(value).__name__} {value!r}")
        if spec.item_types:
            for i, item in enumerate(value):
                if not isinstance(item, spec.item_types):
                    want = " or ".join(t.__name__ for t in spec.item_types)
                    raise TemplateError(f"{file}: {key}[{i}]: expected {want}, got {type(item).__name__} {item!r}")
    return data


class TemplateRepository:
    """Finds templates by name in an ordered list of directories (first match wins)."""

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = dirs

    def find(self, name: str) -> Path:
        for d in self.dirs:
            candidate = d / name
            if (candidate / DEFINITION_FILE).is_file():
                return candidate
        searched = ", ".join(str(d) for d in self.dirs)
        raise TemplateError(f"template {name!r} not found (searched {searched}); 'vzpkg list' shows the templates")

    def names(self) -> list[str]:
        seen: set[str] = set()
        for d in self.dirs:
            if d.is_dir():
                seen.update(p.name for p in d.iterdir() if (p / DEFINITION_FILE).is_file())
        return sorted(seen)

    def load(self, name: str) -> Template:
        chain: list[Path] = []
        datas: list[dict[str, Any]] = []
        current = name
        while True:
            path = self.find(current)
            if path in chain:
                raise TemplateError(f"{path / DEFINITION_FILE}: inherits: inheritance loop through {current!r}")
            data = _read_definition(path)
            chain.insert(0, path)
            datas.insert(0, data)
            base = data.get("inherits")
            if base is None:
                break
            try:
                self.find(base)
            except TemplateError as e:
                raise TemplateError(f"{path / DEFINITION_FILE}: inherits: unknown base template {base!r}") from e
            current = base
        merged: dict[str, Any] = {}
        for data in datas:
            for key, value in data.items():
                if key == "inherits":
                    continue
                mode = SCHEMA[key].merge
                if mode == "append":
                    merged[key] = list(merged.get(key, [])) + [v for v in value if v not in merged.get(key, [])]
                elif mode == "merge":
                    merged[key] = {**merged.get(key, {}), **value}
                else:
                    merged[key] = value
        template = Template(name=name, path=chain[-1], data=merged, chain=chain)
        validate(template)
        return template


def validate(template: Template) -> None:
    from .distro import get_distribution, known_distributions

    file = template.path / DEFINITION_FILE
    if not NAME_RE.match(template.name):
        raise TemplateError(f"{template.path}: name {template.name!r} is not <os>-<version>-<arch>[-<set>]")
    for key, spec in SCHEMA.items():
        if spec.required and key not in template.data:
            raise TemplateError(f"{file}: {key}: missing required key ({spec.doc})")
    pm = template.data["package_manager"]
    if pm not in PACKAGE_MANAGERS:
        raise TemplateError(f"{file}: package_manager: unknown package manager {pm!r} (known: {', '.join(PACKAGE_MANAGERS)})")
    distro = template.data["distribution"]
    if distro not in known_distributions():
        raise TemplateError(f"{file}: distribution: unknown distribution {distro!r} (known: {', '.join(known_distributions())})")
    if pm not in get_distribution(distro).package_managers:
        raise TemplateError(f"{file}: package_manager: {distro} is not built with {pm!r}")
    if pm == "apt" and "suite" not in template.data:
        raise TemplateError(f"{file}: suite: missing required key for apt templates (the codename, e.g. bookworm)")
    if pm in ("dnf", "yum"):
        for i, repo in enumerate(template.data.get("repositories", [])):
            if isinstance(repo, dict):
                for key in repo:
                    if key not in DNF_REPOSITORY_KEYS:
                        raise TemplateError(f"{file}: repositories[{i}].{key}: unknown dnf repository key "
                                            f"(known: {', '.join(sorted(DNF_REPOSITORY_KEYS))})")
                if not any(repo.get(k) for k in ("baseurl", "mirrorlist", "metalink")):
                    raise TemplateError(f"{file}: repositories[{i}]: needs one of baseurl, mirrorlist or metalink")
    init = template.data.get("init", "minimal")
    if init not in INITS:
        raise TemplateError(f"{file}: init: {init!r} is not one of {', '.join(INITS)}")
    for d in template.chain:
        scripts = d / "scripts"
        if scripts.is_dir():
            for p in scripts.iterdir():
                if p.name not in SCRIPT_NAMES:
                    raise TemplateError(f"{p}: unknown script name (known: {', '.join(SCRIPT_NAMES)})")
