"""Paths and settings. Precedence: built-in default < config file < environment < command-line flag.

The config file is TOML, read from $VZPKG_CONFIG or /etc/vzpkg/vzpkg.conf:

    cache_dir = "/var/lib/vz/template/cache"
    template_dirs = ["/etc/vzpkg/templates"]
    bootstrapper = "auto"            # auto | mmdebstrap | debootstrap
    build_in_memory = "auto"         # auto | yes | no: build the root on a tmpfs (auto: with >= 4 GiB free)
    compression_level = 6            # zstd level of caches, 1..19 (higher: smaller and slower)
    metadata_expire = 86400          # seconds
    fetch_timeout = 120              # seconds one metadata download (InRelease, Packages) may take in all
    build_timeout = 7200             # seconds one bootstrap or apt-get run may take in all
    apt_timeout = 15                 # seconds apt waits on a stalled connection (Acquire::http::Timeout)
    apt_retries = 1                  # apt's retries of a failed download (Acquire::Retries)
    max_index_size = 134217728       # bytes a decompressed Packages index may have when Release gives no size
    criu = "/opt/vzpkg/criu/bin/criu"  # the CRIU vzctl chkpnt/restore run ($VZ_CRIU wins; docs/checkpoint.md)
    [mirrors]
    debian = "http://mirror.example/debian"
    debian-security = "http://mirror.example/debian-security"
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = Path("/etc/vzpkg/vzpkg.conf")
DEFAULT_CACHE_DIR = Path("/var/lib/vz/template/cache")
DEFAULT_VZ_ROOT = Path("/var/lib/vz")
BOOTSTRAPPERS = ("auto", "mmdebstrap", "debootstrap")

_KNOWN_KEYS = {"criu", "cache_dir", "template_dirs", "bootstrapper", "build_in_memory", "compression_level", "metadata_expire",
               "mirrors", "vz_root", "fetch_timeout", "build_timeout", "apt_timeout", "apt_retries", "max_index_size"}
# Network bounds: key -> (environment variable, smallest value). Integers; see the module docstring.
NETWORK_LIMITS = {"fetch_timeout": ("VZPKG_FETCH_TIMEOUT", 1), "build_timeout": ("VZPKG_BUILD_TIMEOUT", 1),
                  "apt_timeout": ("VZPKG_APT_TIMEOUT", 1), "apt_retries": ("VZPKG_APT_RETRIES", 0),
                  "max_index_size": ("VZPKG_MAX_INDEX_SIZE", 1024)}
IN_MEMORY_CHOICES = ("auto", "yes", "no")


@dataclass
class Settings:
    cache_dir: Path = DEFAULT_CACHE_DIR
    template_dirs: list[Path] = field(default_factory=list)
    bootstrapper: str = "auto"
    build_in_memory: str = "auto"
    compression_level: int = 6
    metadata_expire: int = 86400
    fetch_timeout: int = 120
    build_timeout: int = 7200
    apt_timeout: int = 15
    apt_retries: int = 1
    max_index_size: int = 128 << 20
    mirrors: dict[str, str] = field(default_factory=dict)
    vz_root: Path = DEFAULT_VZ_ROOT
    config_file: Path | None = None

    @property
    def package_cache_dir(self) -> Path:
        return self.cache_dir / ".packages"

    @property
    def metadata_cache_dir(self) -> Path:
        return self.cache_dir / ".metadata"

    @property
    def lock_dir(self) -> Path:
        return self.cache_dir / ".locks"


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (tomllib.TOMLDecodeError, OSError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from e
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(_KNOWN_KEYS))})")
    return data


def load_settings(
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    mirror: str | None = None,
    vz_root: str | os.PathLike[str] | None = None,
    limits: dict[str, int] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Build the effective settings; keyword arguments are the command-line flags (LIMITS: NETWORK_LIMITS keys)."""
    env = os.environ if environ is None else environ
    settings = Settings()
    config_path = Path(env.get("VZPKG_CONFIG", DEFAULT_CONFIG_FILE))
    data = _read_config_file(config_path)
    if data:
        settings.config_file = config_path

    if "cache_dir" in data:
        settings.cache_dir = Path(data["cache_dir"])
    if "vz_root" in data:
        settings.vz_root = Path(data["vz_root"])
    if "template_dirs" in data:
        if not isinstance(data["template_dirs"], list):
            raise ConfigError(f"{config_path}: template_dirs: expected a list of paths")
        settings.template_dirs = [Path(p) for p in data["template_dirs"]]
    if "bootstrapper" in data:
        settings.bootstrapper = str(data["bootstrapper"])
    if "build_in_memory" in data:
        settings.build_in_memory = str(data["build_in_memory"]).lower()
    if "compression_level" in data:
        settings.compression_level = data["compression_level"]
    if "metadata_expire" in data:
        if not isinstance(data["metadata_expire"], int):
            raise ConfigError(f"{config_path}: metadata_expire: expected an integer number of seconds")
        settings.metadata_expire = data["metadata_expire"]
    if "mirrors" in data:
        if not isinstance(data["mirrors"], dict):
            raise ConfigError(f"{config_path}: mirrors: expected a table of distribution = URL")
        settings.mirrors.update({str(k): str(v) for k, v in data["mirrors"].items()})

    for key, (var, _low) in NETWORK_LIMITS.items():
        if key in data:
            setattr(settings, key, _limit(key, data[key], str(config_path)))
        if env.get(var):
            setattr(settings, key, _limit(key, env[var], var))
        if limits and limits.get(key) is not None:
            setattr(settings, key, _limit(key, limits[key], "command line"))

    if env.get("VZPKG_CACHE_DIR"):
        settings.cache_dir = Path(env["VZPKG_CACHE_DIR"])
    if env.get("VZ_ROOT"):
        settings.vz_root = Path(env["VZ_ROOT"])
    if env.get("VZPKG_TEMPLATE_DIR"):
        settings.template_dirs = [Path(p) for p in env["VZPKG_TEMPLATE_DIR"].split(":") if p]
    if env.get("VZPKG_BOOTSTRAPPER"):
        settings.bootstrapper = env["VZPKG_BOOTSTRAPPER"]
    if env.get("VZPKG_COMPRESSION_LEVEL"):
        settings.compression_level = int(env["VZPKG_COMPRESSION_LEVEL"]) if env["VZPKG_COMPRESSION_LEVEL"].isdigit() else -1
    if env.get("VZPKG_BUILD_IN_MEMORY"):
        settings.build_in_memory = env["VZPKG_BUILD_IN_MEMORY"].lower()
    # VZPKG_MIRROR sets the main mirror of whatever distribution is built; VZPKG_MIRROR_<DISTRO>
    # (e.g. VZPKG_MIRROR_DEBIAN_SECURITY) sets one mirror by name.
    for key, value in env.items():
        if key.startswith("VZPKG_MIRROR_") and value:
            settings.mirrors[key[len("VZPKG_MIRROR_"):].lower().replace("_", "-")] = value
    if env.get("VZPKG_MIRROR"):
        settings.mirrors["default"] = env["VZPKG_MIRROR"]

    if cache_dir is not None:
        settings.cache_dir = Path(cache_dir)
    if vz_root is not None:
        settings.vz_root = Path(vz_root)
    if mirror is not None:
        settings.mirrors["default"] = mirror

    if settings.bootstrapper not in BOOTSTRAPPERS:
        raise ConfigError(f"bootstrapper: {settings.bootstrapper!r} is not one of {', '.join(BOOTSTRAPPERS)}")
    if not isinstance(settings.compression_level, int) or not 1 <= settings.compression_level <= 19:
        raise ConfigError(f"compression_level: {settings.compression_level!r} is not an integer 1..19")
    if settings.build_in_memory not in IN_MEMORY_CHOICES:
        raise ConfigError(f"build_in_memory: {settings.build_in_memory!r} is not one of {', '.join(IN_MEMORY_CHOICES)}")
    settings.cache_dir = settings.cache_dir.absolute()
    settings.vz_root = settings.vz_root.absolute()
    if not settings.template_dirs:
        settings.template_dirs = [PROJECT_DIR / "templates", Path("/etc/vzpkg/templates")]
    return settings


def _limit(key: str, value: Any, where: str) -> int:
    """A network bound: an integer of at least its smallest value (a string from the environment too)."""
    low = NETWORK_LIMITS[key][1]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where}: {key}: {value!r} is not an integer >= {low}")
    return value
