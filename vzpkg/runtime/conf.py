"""VE configuration files in OpenVZ's ``KEY="value"`` format.

A config is kept as the list of its lines so that comments, blank lines, unknown keys and the order of
everything survive a rewrite byte for byte: only lines whose value was changed through :meth:`VEConfig.set`
are re-rendered. Known keys are validated; unknown keys are carried along untouched (other tools and
future versions may own them).

What each known key accepts is in confkeys.py (KNOWN_KEYS, validate_value, the size syntax); its names are
available from here too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from vzpkg.errors import ConfigError

from .confkeys import (  # the names of the keys' module, from here as before it was split off
    CPULIMIT_MAX,
    CPUS_MAX,
    CPUUNITS_MAX,
    CPUUNITS_MIN,
    DEFAULT_CPUUNITS,
    DISKINODES_MAX,
    DISKSPACE_MAX,
    KNOWN_KEYS,
    MEMORY_MAX,
    NUMPROC_MAX,
    RAM_MIN,
    SHA256_HEX,
    UNLIMITED,
    KeySpec,
    _parse_count,
    format_size,
    is_sha256,
    parse_barrier_limit,
    parse_size,
    template_sha256_problem,
    validate_value,
)

__all__ = [  # re-exported: callers import them from here
    "CPULIMIT_MAX", "CPUS_MAX", "CPUUNITS_MAX", "CPUUNITS_MIN", "DEFAULT_CPUUNITS", "DISKINODES_MAX",
    "DISKSPACE_MAX", "KNOWN_KEYS", "KeySpec", "MEMORY_MAX", "NUMPROC_MAX", "RAM_MIN", "SAMPLES_DIR", "SHA256_HEX",
    "UNLIMITED", "VEConfig", "format_size", "is_sha256", "list_samples", "parse_barrier_limit", "parse_size",
    "sample_path", "template_sha256_problem", "validate_value",
]

SAMPLES_DIR = Path(__file__).with_name("samples")
_ASSIGN_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


# ---------------------------------------------------------------------------------------------------------
# line-level parsing and rendering


def _quote(value: str) -> str:
    # Configs are also sourced by shell scripts (OpenVZ's action scripts), so quote as a shell would.
    return '"' + re.sub(r'(["\\$`])', r"\\\1", value) + '"'


def _unquote(raw: str, where: str) -> tuple[str, str]:
    """Split the text after '=' into (value, trailing text such as a comment)."""
    if raw[:1] in ('"', "'"):
        quote, out, i = raw[0], [], 1
        while i < len(raw):
            c = raw[i]
            if c == "\\" and quote == '"' and i + 1 < len(raw):
                out.append(raw[i + 1])
                i += 2
                continue
            if c == quote:
                rest = raw[i + 1 :]
                if rest.strip() and not rest.lstrip().startswith("#"):
                    raise ConfigError(f"{where}: unexpected text after the closing quote: {rest.strip()!r}")
                return "".join(out), rest
            out.append(c)
            i += 1
        raise ConfigError(f"{where}: missing closing {quote}")
    m = re.match(r"^([^\s#]*)(.*)$", raw)
    assert m  # the pattern matches any string
    value, rest = m.group(1), m.group(2)
    if rest.strip() and not rest.lstrip().startswith("#"):
        raise ConfigError(f'{where}: a value with spaces must be quoted: {raw.strip()!r}')
    return value, rest


class _Line:
    __slots__ = ("text", "key", "value", "trailer", "lineno")

    def __init__(self, text: str, key: str | None = None, value: str | None = None, trailer: str = "",
                 lineno: int = 0) -> None:
        self.text = text  # verbatim, without the newline
        self.key = key
        self.value = value
        self.trailer = trailer  # what followed the value (a comment); kept on re-render
        self.lineno = lineno

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Line) and all(getattr(self, a) == getattr(other, a) for a in self.__slots__)

    def __repr__(self) -> str:
        return f"_Line({self.text!r}, key={self.key!r}, value={self.value!r})"


class VEConfig:
    """One VE config file: ordered lines, with the values of KEY="value" lines accessible by key."""

    def __init__(self, lines: list[_Line] | None = None, source: str = "<config>") -> None:
        self._lines: list[_Line] = lines or []
        self.source = source

    # -- reading ------------------------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str, source: str = "<config>", *, strict: bool = True) -> VEConfig:
        """Parse text; with strict (the default) known keys are validated too."""
        lines = []
        for n, raw in enumerate(text.splitlines(), 1):
            lines.append(cls._parse_line(raw, f"{source}:{n}", n))
        cfg = cls(lines, source)
        if strict:
            cfg.validate()
        return cfg

    @staticmethod
    def _parse_line(raw: str, where: str, n: int) -> _Line:
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            return _Line(raw, lineno=n)
        m = _ASSIGN_RE.match(raw)
        if not m:
            raise ConfigError(f'{where}: expected KEY="value", a comment or a blank line, got {stripped!r}')
        value, trailer = _unquote(m.group(2), where)
        return _Line(raw, m.group(1), value, trailer, n)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, strict: bool = True) -> VEConfig:
        from vzpkg.safeio import CONF_MAX, NotRegularFileError, read_small_text

        p = Path(path)
        try:
            text = read_small_text(p, CONF_MAX)  # a FIFO in its place would block open(2) for ever
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except NotRegularFileError as e:
            raise ConfigError(f"{p}: cannot read config: it is {e.strerror}; a VE config is a regular file of "
                              'KEY="value" lines') from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read config: {e}") from None
        return cls.parse(text, str(p), strict=strict)

    def get(self, key: str, default: str | None = None) -> str | None:
        # Last assignment wins, as when the file is sourced by a shell.
        for line in reversed(self._lines):
            if line.key == key:
                return line.value
        return default

    def __contains__(self, key: str) -> bool:
        return any(line.key == key for line in self._lines)

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for line in self._lines:
            if line.key is not None:
                seen[line.key] = None
        return list(seen)

    def to_dict(self) -> dict[str, str]:
        """Effective values of all keys, known and unknown, in first-appearance order."""
        return {k: v for k in self.keys() if (v := self.get(k)) is not None}

    def validate(self) -> None:
        for line in self._lines:
            if line.key is None or line.value is None:
                continue
            try:
                validate_value(line.key, line.value)
            except ConfigError as e:
                raise ConfigError(f"{self.source}:{line.lineno}: {e.message}") from None

    def validate_ve(self) -> None:
        """validate() plus what a VE's own config (not a sample) must have: TEMPLATE_SHA256."""
        problem = template_sha256_problem(self.get("TEMPLATE_SHA256"), self.source)
        if problem is not None:
            raise ConfigError(problem)
        self.validate()

    # -- writing ------------------------------------------------------------------------------------------

    def set(self, key: str, value: str) -> None:
        """Validate and set; every existing line of the key is updated in place, else a line is appended."""
        validate_value(key, value)
        found = False
        for line in self._lines:
            if line.key == key:
                if line.value != value:
                    line.value = value
                    line.text = f"{key}={_quote(value)}{line.trailer}"
                found = True
        if not found:
            self._lines.append(_Line(f"{key}={_quote(value)}", key, value))

    def unset(self, key: str) -> None:
        self._lines = [line for line in self._lines if line.key != key]

    def render(self) -> str:
        return "".join(line.text + "\n" for line in self._lines)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomically replace path: a crash leaves either the old or the new file, never a torn one."""
        p = Path(path)
        mode = p.stat().st_mode & 0o7777 if p.exists() else 0o644
        fd, tmp = _mkstemp(p)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.render())
                f.flush()
                os.fchmod(f.fileno(), mode)
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # The rename is durable only once the directory entry is on disk.
        dfd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # -- typed accessors ----------------------------------------------------------------------------------

    def _typed(self, key: str, conv: Callable[[str], object]) -> object:
        value = self.get(key)
        if not value:
            return None
        try:
            validate_value(key, value)
            return conv(value)
        except ConfigError as e:
            raise ConfigError(f"{self.source}: {e.message}") from None

    @property
    def ram_bytes(self) -> int | None:
        """None when unset or unlimited."""
        return self._typed("RAM", parse_size)  # type: ignore[return-value]

    @property
    def swap_bytes(self) -> int | None:
        """None when unset or unlimited; 0 means no swap."""
        return self._typed("SWAP", parse_size)  # type: ignore[return-value]

    @property
    def cpuunits(self) -> int:
        v = self._typed("CPUUNITS", int)
        return DEFAULT_CPUUNITS if v is None else v  # type: ignore[return-value]

    @property
    def cpulimit(self) -> int:
        """Percent of one CPU; 0 = unlimited."""
        return self._typed("CPULIMIT", int) or 0  # type: ignore[return-value]

    @property
    def cpus(self) -> int:
        """Number of CPUs; 0 = all."""
        return self._typed("CPUS", int) or 0  # type: ignore[return-value]

    @property
    def numproc(self) -> int | None:
        """The process limit (the limit half of barrier:limit); None = unlimited."""
        v = self._typed("NUMPROC", lambda s: parse_barrier_limit(s, _parse_count)[1])
        return v  # type: ignore[return-value]

    @property
    def diskspace(self) -> tuple[int | None, int | None]:
        """(barrier, limit) in bytes; None = unlimited."""
        v = self._typed("DISKSPACE", lambda s: parse_barrier_limit(s, parse_size))
        return v or (None, None)  # type: ignore[return-value]

    @property
    def diskinodes(self) -> tuple[int | None, int | None]:
        """(barrier, limit) in inodes; None = unlimited."""
        v = self._typed("DISKINODES", lambda s: parse_barrier_limit(s, _parse_count))
        return v or (None, None)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------
# sample configs (vzctl create --config NAME)


def list_samples() -> list[str]:
    return sorted(p.stem for p in SAMPLES_DIR.glob("*.conf"))


def sample_path(name: str) -> Path:
    p = SAMPLES_DIR / f"{name}.conf"
    if "/" in name or not p.is_file():
        raise ConfigError(f'sample config "{name}" not found; available: {", ".join(list_samples()) or "none"}')
    return p


_TMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"


def _mkstemp(p: Path) -> tuple[int, str]:
    """tempfile.mkstemp(prefix=".<name>.", suffix=".tmp", dir=<its dir>), the same names (leftovers.py knows them:
    8 random characters), without importing tempfile (shutil, random, bz2, lzma: ~3 ms of `vzctl create`)."""
    while True:
        tmp = f"{p.parent}/.{p.name}.{''.join(_TMP_CHARS[b % 37] for b in os.urandom(8))}.tmp"
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            continue
