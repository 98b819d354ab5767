"""Read the host's apt sources, so mirrors come from the machine's own configuration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def _parse_one_line(text: str) -> list[AptSource]:
    sources = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        words = line.split()[1:]
        if words and words[0].startswith("["):  # options like [arch=amd64 signed-by=...]
            while words and not words[0].endswith("]"):
                words.pop(0)
            words.pop(0) if words else None
        if len(words) >= 2:
            sources.append(AptSource(words[0], (words[1],), tuple(words[2:])))
    return sources


def _parse_deb822(text: str) -> list[AptSource]:
    sources = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
                continue
            if ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        suites = tuple(fields.get("suites", "").split())
        components = tuple(fields.get("components", "").split())
        for uri in fields.get("uris", "").split():
            sources.append(AptSource(uri, suites, components))
    return sources


def host_sources(root: Path = Path("/")) -> list[AptSource]:
    """Every enabled `deb` source of the host, in apt's reading order."""
    etc = root / "etc/apt"
    found: list[AptSource] = []
    main = etc / "sources.list"
    if main.is_file():
        found += _parse_one_line(main.read_text(errors="replace"))
    d = etc / "sources.list.d"
    if d.is_dir():
        for path in sorted(d.iterdir()):
            if path.name.endswith(".list"):
                found += _parse_one_line(path.read_text(errors="replace"))
            elif path.name.endswith(".sources"):
                found += _parse_deb822(path.read_text(errors="replace"))
    return found
