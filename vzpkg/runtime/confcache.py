"""A VE's config as the lifecycle reads it: load (any verb), the validated cache (start), derived parameters.

`load_conf` parses conf/<id>.conf (importing conf.py). `start` instead calls `load_conf_cached`, which keeps
the validated values and limits in run/<id>.conf-cache so the hot path imports no config parser. The rest
derives what the verbs need from either: privileged, id shift, layout, template directory, idmap shift, limits.
"""

from __future__ import annotations

import os
from pathlib import Path

from vzpkg.errors import ConfigError, VENotFoundError

from .layout import DEFAULT_ID_SHIFT, ID_RANGE, Layout, template_shift


def load_conf(layout: Layout, veid: str):
    from .conf import VEConfig

    path = layout.conf(veid)
    if not path.exists():
        raise VENotFoundError(f"VE {veid} does not exist (no {path}): create it with 'vzctl create {veid} --ostemplate NAME'")
    return VEConfig.load(path, strict=False)


class _ConfView:
    """The parts of a validated VE config that start needs, read from a cache (see load_conf_cached)."""

    def __init__(self, values: dict[str, str], limits: dict, source: str) -> None:
        self.values = values
        self.limits = limits
        self.source = source  # the config file, for messages (as VEConfig.source)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)


def _cache_key(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def load_conf_cached(layout: Layout, veid: str) -> _ConfView:
    """The VE's config, validated, for start.

    Parsing and validating a config means importing conf.py (~15 ms with its dependencies, most of the
    start-up budget); so the validated values and the derived limits are cached in run/<id>.conf-cache, keyed
    by the config file's inode, size and mtime. Any edit of the file (vzctl set --save, an editor) misses the
    cache and the file is validated again.
    """
    path = layout.conf(veid)
    try:
        key = _cache_key(path)
    except FileNotFoundError:
        raise VENotFoundError(f"VE {veid} does not exist (no {path}): create it with 'vzctl create {veid} "
                              "--ostemplate NAME'") from None
    cache = layout.run_dir / f"{veid}.conf-cache"
    try:
        lines = cache.read_text().split("\n")
        if lines[0] == key:
            values: dict[str, str] = {}
            limits: dict = {}
            for line in lines[1:]:
                kind, _, rest = line.partition("\t")
                name, _, raw = rest.partition("\t")
                value = raw.encode().decode("unicode_escape")
                if kind == "V":
                    values[name] = value
                elif kind == "L":
                    limits[name] = int(value) if value.isdigit() else value
            return _ConfView(values, limits, str(path))
    except (OSError, ValueError, UnicodeError):
        pass
    conf = load_conf(layout, veid)
    conf.validate_ve()  # a hand-edited config with a bad value is refused here, naming file, line and key
    view = _ConfView(conf.to_dict(), _limits_from_conf(conf), str(path))
    out = [key]
    for k, v in view.values.items():
        out.append(f"V\t{k}\t{v.encode('unicode_escape').decode()}")
    for k, v in view.limits.items():
        out.append(f"L\t{k}\t{v}")
    try:
        layout.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        tmp.write_text("\n".join(out))
        os.rename(tmp, cache)
    except OSError:
        pass
    return view


def _conf_params(conf) -> tuple[bool, int, str, str]:
    privileged = conf.get("PRIVILEGED") == "yes"
    shift_text = conf.get("ID_SHIFT")
    id_shift = 0 if privileged else int(shift_text) if shift_text else DEFAULT_ID_SHIFT
    if id_shift == 0 and not privileged:
        # The VE's root would be host root (uid_map 0 0): a privileged VE that its config does not call one.
        raise ConfigError(f'{conf.source}: ID_SHIFT="0" with PRIVILEGED="no" would run the VE as host root: set '
                          'ID_SHIFT to the VE\'s own range (vzctl create chooses one), or PRIVILEGED="yes" if that is '
                          'really meant')
    return privileged, id_shift, conf.get("LAYOUT") or "overlay", conf.get("TEMPLATE_SHA256") or ""


_HEX = frozenset("0123456789abcdef")


def _template_of(layout: Layout, veid: str, conf) -> Path:
    privileged, id_shift, _, sha = _conf_params(conf)
    if len(sha) != 64 or not set(sha) <= _HEX:
        # with "" the lower layer would be the whole template area: refuse (conf.template_sha256_problem says
        # why, in full; imported only here, off the hot path)
        from .conf import template_sha256_problem

        raise ConfigError(template_sha256_problem(conf.get("TEMPLATE_SHA256"), str(layout.conf(veid)))
                          or f"{layout.conf(veid)}: TEMPLATE_SHA256 is invalid")
    return layout.template(sha, template_shift(privileged, id_shift, conf.get("IDMAP")))


def _check_private_range(layout: Layout, veid: str, conf, id_shift: int) -> None:
    """A private range shared with another VE (a hand-edited or copied config) is not private: the VEs' ids
    would be the same host ids, each able to own the other's files. Refused before anything is set up."""
    from .idrange import overlapping

    if conf.get("IDRANGE_SHARED") == "yes":
        return  # a clone restored from another VE's checkpoint: CRIU restored its source's map (checkpoint.md)
    others = overlapping(layout, veid, id_shift)
    if others:
        other, shift = others[0]
        raise ConfigError(f'{conf.source}: ID_SHIFT="{id_shift}" overlaps the id range of VE {other} '
                          f'(ID_SHIFT="{shift}"; a range is {ID_RANGE} ids): the two VEs would share host ids. '
                          "Restore this VE's own ID_SHIFT, or recreate it (vzctl create picks a free range)")


def _idmap_shift(conf) -> int | None:
    """The VE's private range when its root is mounted through an idmapped template (overlay layout), else None.
    A config without IDMAP (made before it existed) is shared: its template was unpacked at its ID_SHIFT."""
    privileged, id_shift, kind, _ = _conf_params(conf)
    if privileged or conf.get("IDMAP") != "private" or kind not in ("overlay", "image", "btrfs", "projquota"):
        return None
    return id_shift


def _limits_from_conf(conf) -> dict:
    limits: dict = {"cpuunits": conf.cpuunits, "cpulimit": conf.cpulimit, "cpus": conf.cpus}
    ram, swap, numproc = conf.ram_bytes, conf.swap_bytes, conf.numproc
    limits["ram"] = "unlimited" if ram is None else ram
    if conf.get("SWAP"):
        limits["swap"] = "unlimited" if swap is None else swap
    limits["numproc"] = "unlimited" if numproc is None else numproc
    return limits
