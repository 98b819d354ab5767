"""`vzpkg push` and `vzpkg pull`: template caches in an OCI registry (see docs/registry.md)."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from .common import handle_errors, human_size, print_json

_cache_dir = click.option("--cache-dir", type=click.Path(file_okay=False),
                          help="Where caches live (default: $VZPKG_CACHE_DIR, config file, /var/lib/vz/template/cache).")
_json = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
_insecure = click.option("--insecure", is_flag=True,
                         help="Talk plain HTTP to the registry (on 127.0.0.1 and localhost HTTP is allowed without it).")
_ca_file = click.option("--ca-file", type=click.Path(dir_okay=False),
                        help="PEM file of the CA that signed the registry's certificate (default: the system CAs).")
_quiet = click.option("-q", "--quiet", is_flag=True, help="No progress output.")


class ProgressBar:
    """A one-line transfer bar on stderr (only on a terminal, never with --quiet or --json)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._last = 0.0
        self._drawn = False

    def __call__(self, label: str):  # type: ignore[no-untyped-def]
        if not self.enabled:
            return None
        started = time.monotonic()

        def draw(done: int, total: int) -> None:
            now = time.monotonic()
            if now - self._last < 0.1 and done < total:
                return
            self._last = now
            frac = min(done / total, 1.0) if total else 1.0
            rate = done / max(now - started, 1e-3)
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{label} [{bar:<30}] {frac * 100:3.0f}% {human_size(done)}/{human_size(total)} "
                             f"{human_size(rate)}/s ")
            sys.stderr.flush()
            self._drawn = True
            if done >= total:
                self.end()

        return draw

    def end(self) -> None:
        if self._drawn:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()
            self._drawn = False


def _settings(cache_dir: str | None):
    from ..config import load_settings

    return load_settings(cache_dir=cache_dir)


def print_cache_only_info(name: str, manifest: dict[str, Any], show_packages: bool, as_json: bool) -> None:
    """`vzpkg info` of a cache without a template definition here (pulled under its own name): the manifest."""
    if as_json:
        print_json({"template": None, "cache": manifest if show_packages else
                    {k: v for k, v in manifest.items() if k != "packages"}, "generations": []})
        return
    click.echo(f"Template:      {name} (no template definition here; from the cache's manifest)")
    click.echo(f"Distribution:  {manifest.get('distribution', '?')} {manifest.get('release', '?')}"
               + (f" ({manifest['suite']})" if manifest.get("suite") else ""))
    click.echo(f"Architecture:  {manifest.get('architecture', '?')}")
    if manifest.get("pulled_from"):
        click.echo(f"Pulled from:   {manifest['pulled_from']} ({manifest.get('image_digest', '')})")
    click.echo(f"  created:     {manifest.get('created')}  (vzpkg {manifest.get('vzpkg_version')})")
    click.echo(f"  size:        {human_size(manifest.get('packed_size'))} packed, "
               f"{human_size(manifest.get('unpacked_size'))} unpacked")
    click.echo(f"  packages:    {manifest.get('package_count', len(manifest.get('packages', [])))}")
    click.echo(f"  sha256:      {manifest.get('sha256')}")
    if show_packages:
        for p in manifest.get("packages", []):
            click.echo(f"    {p['name']:<36} {p.get('version', '')} {p.get('architecture', '')}")


def register(group: click.Group) -> None:
    """Attach push and pull to the `vzpkg` group."""

    @group.command()
    @click.argument("args", nargs=-1, required=True, metavar="[NAME] REF")
    @click.option("--all", "push_all", is_flag=True,
                  help="Push every cache: REF is HOST/PATH[:TAG] and each cache goes to HOST/PATH/NAME:TAG.")
    @click.option("--delta", is_flag=True,
                  help="Also push a patch from the newest earlier generation (kept by update-cache), tagged TAG.delta: "
                       "a puller that has that generation downloads only the patch.")
    @_insecure
    @_ca_file
    @_quiet
    @_cache_dir
    @_json
    @handle_errors("vzpkg")
    def push(args: tuple[str, ...], push_all: bool, delta: bool, insecure: bool, ca_file: str | None, quiet: bool,
             cache_dir: str | None, as_json: bool) -> None:
        """Upload cache NAME to the registry as the OCI image REF (HOST[:PORT]/PATH/NAME[:TAG], tag default
        `latest`). Blobs the registry already has are not uploaded again."""
        from ..errors import CacheNotFoundError, UsageError
        from ..registry.reference import parse_reference
        from ..registry.transfer import Connection, push_cache
        from ..store.cache import CacheStore

        if len(args) != (1 if push_all else 2):
            raise UsageError("give NAME and REF, or --all and REF")
        name, ref = (None, args[0]) if push_all else args
        store = CacheStore(_settings(cache_dir).cache_dir)
        target = parse_reference(ref)
        jobs = [(n, target.child(n)) for n in store.names()] if push_all else [(name, target)]
        if push_all and not jobs:
            raise CacheNotFoundError(f"no caches in {store.root} to push")
        bar = ProgressBar(not quiet and not as_json and sys.stderr.isatty())
        results: list[dict[str, Any]] = []
        for cache_name, cache_ref in jobs:
            r = push_cache(store, str(cache_name), cache_ref, Connection(insecure, ca_file), bar, delta=delta)
            bar.end()
            results.append(r)
            if not as_json and not quiet:
                click.echo(f"pushed {r['name']} to {r['reference']} ({r['digest'][:19]}...): "
                           f"{r['blobs_uploaded']} blobs uploaded ({human_size(r['bytes_uploaded'])}), "
                           f"{r['blobs_skipped']} already there, {r['seconds']:.1f} s"
                           + (f"; patch from {r['delta']['from_sha256'][:12]}... ({human_size(r['delta']['patch_bytes'])}) "
                              f"as {r['delta']['tag']}" if r.get("delta") else ""))
        if as_json:
            print_json(results if push_all else results[0])

    @group.command()
    @click.argument("ref")
    @click.option("--name", help="Cache name to publish as (default: the template name the image was pushed as).")
    @click.option("--timeout", type=float, default=600, show_default=True,
                  help="Seconds to wait for the template's lock.")
    @click.option("--no-delta", is_flag=True, help="Download the whole layer even if a patch from the local cache exists.")
    @_insecure
    @_ca_file
    @_quiet
    @_cache_dir
    @_json
    @handle_errors("vzpkg")
    def pull(ref: str, name: str | None, timeout: float, no_delta: bool, insecure: bool, ca_file: str | None, quiet: bool,
             cache_dir: str | None, as_json: bool) -> None:
        """Download the cache image REF, verify every digest and the archive against its manifest, and publish
        it into the cache directory atomically (a failed pull leaves the previous cache in place)."""
        from ..registry.reference import parse_reference
        from ..registry.transfer import Connection, pull_cache
        from ..store.cache import CacheStore

        settings = _settings(cache_dir)
        store = CacheStore(settings.cache_dir)
        bar = ProgressBar(not quiet and not as_json and sys.stderr.isatty())
        try:
            r = pull_cache(store, parse_reference(ref), Connection(insecure, ca_file), lock_dir=settings.lock_dir,
                           name=name, lock_timeout=timeout, progress=bar, delta=not no_delta,
                           note=lambda m: None if quiet or as_json else click.echo(m, err=True))
        finally:
            bar.end()
        if as_json:
            print_json(r)
        elif not quiet:
            if r["up_to_date"]:
                click.echo(f"{r['name']}: already has {r['layer'][:19]}... from {r['reference']}; nothing downloaded")
            else:
                how = "patched from the local cache, " if r.get("delta") else ""
                click.echo(f"pulled {r['reference']} into {store.archive_path(r['name'])} "
                           f"({how}{human_size(r['bytes_downloaded'])} downloaded, {r['seconds']:.1f} s)")
