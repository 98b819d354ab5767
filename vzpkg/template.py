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
import os
import re
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .build.template_files import check_scripts, files_entries, files_tree, read_regular, walk
from .errors import TemplateError
from .pkgmgr.dnf_repos import check_repository_keys
from .pkgmgr.names import APT, PACKAGE_MANAGERS, RPM_MANAGERS, package_name_problem

DEFINITION_FILE = "template.toml"
SCRIPT_NAMES = ("pre-cache", "post-install", "post-cache", "pre-update", "post-update")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.+_]*(-[a-z0-9.+_]+)+$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
INITS = ("minimal", "distro")


@dataclass
class Template:
    name: str
    path: Path
    data: dict[str, Any]
    chain: list[Path] = field(default_factory=list)  # template dirs, base first
    #: each definition file of the chain with its own data (base first): errors name the file that says it
    sources: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)

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
        return [tree for d in self.chain if (tree := files_tree(d)) is not None]

    def digest(self) -> str:
        """sha256 over the full definition: resolved data, and every file and script of the chain.

        Symlinks count by their target string: what they point to on the host is never read."""
        h = hashlib.sha256()
        h.update(repr(sorted(_canonical(self.data).items())).encode())
        for d in self.chain:
            for entry in walk(d):
                if entry.kind == "file" and str(entry.rel) != DEFINITION_FILE:
                    h.update(str(entry.rel).encode() + b"\0")
                    h.update(read_regular(entry.path))
                    h.update(b"\0")
                elif entry.kind == "symlink":
                    h.update(str(entry.rel).encode() + b"\0symlink:" + os.fsencode(os.readlink(entry.path)) + b"\0")
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


def short(value: Any, limit: int = 60) -> str:
    """repr of VALUE cut to LIMIT characters: an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jinja_render(text: str, context: dict[str, Any], filename: str) -> str:
    """Render TEXT with undefined variables as errors; no loader, so include/import/extends find nothing.

    Sandboxed: a template is data, and `vzpkg validate` of one from elsewhere must not run code on the host
    ({{ cycler.__init__.__globals__.os.system(...) }} does in a plain Environment), nor loop for ever
    (the sandbox caps range() at 100000 items), nor take the host's memory (vzpkg/template_sandbox.py)."""
    import jinja2

    from .template_sandbox import sandbox_class

    env = sandbox_class()(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                           loader=jinja2.DictLoader({}))
    code = env.compile(text, name=filename, filename=filename)
    return env.template_class.from_code(env, code, env.make_globals(None)).render(context)


def _jinja_problem(e: Exception, filename: str) -> tuple[int | None, str]:
    """The template line an error of a render points at (jinja rewrites tracebacks to template lines)."""
    line = getattr(e, "lineno", None)
    if line is None:
        for frame in traceback.extract_tb(e.__traceback__):
            if frame.filename == filename:
                line = frame.lineno
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if type(e).__name__ == "TemplateNotFound":
        message = f"cannot include {message}: templates render on their own (no include, import or extends)"
    return line, message


def render_string(text: str, context: dict[str, Any], *, where: str) -> str:
    """Render a jinja2 string of a template definition (a repository entry, a key path)."""
    try:
        return _jinja_render(text, context, "<string>").strip()
    except Exception as e:  # a template expression can raise anything (TypeError, ZeroDivisionError, ...)
        _line, message = _jinja_problem(e, "<string>")
        raise TemplateError(f"{where}: cannot render {short(text)}: {message}") from e


def render_file(path: Path, context: dict[str, Any]) -> str:
    """Render the `files/*.j2` file PATH; errors name PATH:LINE and jinja's message."""
    try:
        text = read_regular(path).decode()
    except UnicodeDecodeError as e:
        raise TemplateError(f"{path}: not UTF-8 text (byte {e.start}): a .j2 file is rendered as text") from e
    try:
        return _jinja_render(text, context, str(path))
    except Exception as e:
        line, message = _jinja_problem(e, str(path))
        raise TemplateError(f"{path}{f':{line}' if line else ''}: {message}") from e


def _read_definition(path: Path) -> dict[str, Any]:
    file = path / DEFINITION_FILE
    try:
        with file.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as e:
        raise TemplateError(f"{file}: template definition missing") from e
    except tomllib.TOMLDecodeError as e:
        raise TemplateError(f"{file}: not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise TemplateError(f"{file}: not valid TOML: not UTF-8 text (byte {e.start})") from e
    except RecursionError as e:
        raise TemplateError(f"{file}: not valid TOML: arrays or tables nested too deeply") from e
    except OSError as e:
        raise TemplateError(f"{file}: cannot read: {e.strerror}") from e
    for key, value in data.items():
        spec = SCHEMA.get(key)
        if spec is None:
            raise TemplateError(f"{file}: {short(key)[1:-1]}: unknown key (known: {', '.join(sorted(SCHEMA))})")
        if not isinstance(value, spec.types):
            want = " or ".join(t.__name__ for t in spec.types)
            raise TemplateError(f"{file}: {key}: expected {want}, got {type(value).__name__} {short(value)}")
        if spec.item_types:
            for i, item in enumerate(value):
                if not isinstance(item, spec.item_types):
                    want = " or ".join(t.__name__ for t in spec.item_types)
                    raise TemplateError(f"{file}: {key}[{i}]: expected {want}, got {type(item).__name__} {short(item)}")
        if isinstance(value, str) and "\0" in value:
            raise TemplateError(f"{file}: {key}: contains a NUL character")
    for name, value in data.get("environment", {}).items():
        if not ENV_NAME_RE.match(name):
            raise TemplateError(f"{file}: environment.{short(name)}: not a variable name (letters, digits, _)")
        if not isinstance(value, (str, int, float, bool)) or "\0" in str(value):
            raise TemplateError(f"{file}: environment.{name}: expected a string, got {type(value).__name__} "
                                f"{short(value)}")
    return data


class TemplateRepository:
    """Finds templates by name in an ordered list of directories (first match wins)."""

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = dirs

    def find(self, name: str) -> Path:
        if not NAME_RE.match(name):  # also keeps a name from being a path (../, /etc) into the host
            raise TemplateError(f"{short(name)} is not a template name (<os>-<version>-<arch>[-<set>], e.g. "
                                f"debian-12-x86_64)")
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
            if not NAME_RE.match(base):
                raise TemplateError(f"{path / DEFINITION_FILE}: inherits: {short(base)} is not a template name")
            try:
                self.find(base)
            except TemplateError as e:
                raise TemplateError(f"{path / DEFINITION_FILE}: inherits: unknown base template {short(base)}") from e
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
        template = Template(name=name, path=chain[-1], data=merged, chain=chain,
                            sources=[(p / DEFINITION_FILE, data) for p, data in zip(chain, datas, strict=True)])
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
        raise TemplateError(f"{file}: package_manager: unknown package manager {short(pm)} (known: {', '.join(PACKAGE_MANAGERS)})")
    distro = template.data["distribution"]
    if distro not in known_distributions():
        raise TemplateError(f"{file}: distribution: unknown distribution {short(distro)} (known: {', '.join(known_distributions())})")
    if pm not in get_distribution(distro).package_managers:
        raise TemplateError(f"{file}: package_manager: {distro} is not built with {pm!r}")
    if pm == APT and "suite" not in template.data:
        raise TemplateError(f"{file}: suite: missing required key for apt templates (the codename, e.g. bookworm)")
    if pm in RPM_MANAGERS:
        for i, repo in enumerate(template.data.get("repositories", [])):
            if isinstance(repo, dict):
                check_repository_keys(repo, f"{file}: repositories[{i}]")
    init = template.data.get("init", "minimal")
    if init not in INITS:
        raise TemplateError(f"{file}: init: {short(init)} is not one of {', '.join(INITS)}")
    _check_package_names(template, pm)
    for d in template.chain:
        check_scripts(d, SCRIPT_NAMES)
    trees = [(tree, files_entries(tree)) for tree in template.file_trees()]
    _check_rendering(template, trees)


def _check_package_names(template: Template, pm: str) -> None:
    """Every package name has the package manager's syntax (the backend knows it): a name is never an option
    or a shell word by the time it reaches mmdebstrap, apt-get or dnf."""
    for file, data in template.sources or [(template.path / DEFINITION_FILE, template.data)]:
        for key in ("packages", "remove_packages"):
            for i, name in enumerate(data.get(key, [])):
                problem = package_name_problem(pm, name)
                if problem:
                    raise TemplateError(f"{file}: {key}[{i}]: {short(name)} {problem}")


def dry_run_context(template: Template) -> dict[str, Any]:
    """The variables a build renders with, mirrors as placeholders: what `validate` renders every template with."""
    from .distro import get_distribution

    distro = get_distribution(template["distribution"])
    mirrors = {var: f"http://{var.replace('_', '-')}.invalid" for var in distro.mirror_variables}
    return template.render_context(mirrors, distro.native_arch(template["architecture"]))


def _check_rendering(template: Template, trees: list[tuple[Path, list[Any]]]) -> None:
    """A dry render of everything a build renders: bad jinja or an undefined variable is found before a build."""
    context = dry_run_context(template)
    for file, data in template.sources or [(template.path / DEFINITION_FILE, template.data)]:
        for i, repo in enumerate(data.get("repositories", [])):
            values = repo.items() if isinstance(repo, dict) else [(None, repo)]
            for key, value in values:
                if isinstance(value, str):
                    render_string(value, context, where=f"{file}: repositories[{i}]" + (f".{key}" if key else ""))
        for i, key in enumerate(data.get("gpg_keys", [])):
            render_string(key, context, where=f"{file}: gpg_keys[{i}]")
    for _tree, entries in trees:
        for entry in entries:
            if entry.kind == "file" and entry.rel.suffix == ".j2":
                render_file(entry.path, context)
