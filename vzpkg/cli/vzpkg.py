"""`vzpkg`: build and manage template caches."""

from __future__ import annotations

import time
from typing import Any

import click

from .common import PrintingReporter, handle_errors, human_age, human_size, print_json

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _settings(cache_dir: str | None = None, mirror: str | None = None):
    from ..config import load_settings

    return load_settings(cache_dir=cache_dir, mirror=mirror)


def cache_dir_option(fn):
    return click.option("--cache-dir", type=click.Path(file_okay=False), envvar=None,
                        help="Where caches live (default: $VZPKG_CACHE_DIR, config file, /var/lib/vz/template/cache).")(fn)


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(fn)


@click.group(context_settings=_CONTEXT)
@click.version_option(package_name="vzpkg")
def main() -> None:
    """Build and manage OS template caches (OpenVZ's vzpkg, for today's Linux)."""


@main.command("create-cache")
@click.argument("names", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Rebuild even if a cache exists.")
@click.option("--mirror", help="Main mirror URL (default: $VZPKG_MIRROR, config file, the host's apt sources).")
@click.option("--timeout", type=float, default=600, show_default=True, help="Seconds to wait for the template's lock.")
@click.option("--no-stage-cache", is_flag=True,
              help="Always bootstrap: do not reuse the installed root of an earlier build with unchanged inputs.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("-v", "--verbose", is_flag=True, help="Show the output of the tools that run.")
@cache_dir_option
@json_option
@handle_errors("vzpkg")
def create_cache(names: tuple[str, ...], force: bool, mirror: str | None, timeout: float, no_stage_cache: bool,
                 quiet: bool, verbose: bool, cache_dir: str | None, as_json: bool) -> None:
    """Bootstrap, install, pack and publish the cache of each template NAME."""
    from ..build.pipeline import BuildOptions
    from ..build.pipeline import create_cache as build

    settings = _settings(cache_dir, mirror)
    manifests = []
    for name in names:
        reporter = PrintingReporter(quiet=quiet, verbose=verbose, prefix=f"{name}: " if len(names) > 1 else "")
        manifest = build(name, settings, BuildOptions(force=force, lock_timeout=timeout, verbose=verbose, stage_cache=not no_stage_cache), reporter)
        reporter.note(f"published {settings.cache_dir / manifest['archive']} "
                      f"({human_size(manifest['packed_size'])}, {manifest['package_count']} packages, "
                      f"{manifest['durations']['total']:.1f} s)")
        manifests.append(manifest)
    if as_json:
        print_json(manifests[0] if len(manifests) == 1 else manifests)


@main.command("list")
@cache_dir_option
@json_option
@handle_errors("vzpkg")
def list_(cache_dir: str | None, as_json: bool) -> None:
    """Every template, whether it is cached, and the cache's size and age."""
    from ..store.cache import CacheStore
    from ..template import TemplateRepository

    settings = _settings(cache_dir)
    store = CacheStore(settings.cache_dir)
    rows: list[dict[str, Any]] = []
    names = sorted(set(TemplateRepository(settings.template_dirs).names()) | set(store.names()))
    now = time.time()
    for name in names:
        cached = store.exists(name)
        row: dict[str, Any] = {"name": name, "cached": cached, "size": None, "age_seconds": None}
        if cached:
            st = store.archive_path(name).stat()
            row["size"] = st.st_size
            row["age_seconds"] = round(now - st.st_mtime)
        rows.append(row)
    if as_json:
        print_json(rows)
        return
    click.echo(f"{'TEMPLATE':<34} {'CACHED':<7} {'SIZE':>8} {'AGE':>6}")
    for r in rows:
        age = human_age(r["age_seconds"]) if r["cached"] else "-"
        click.echo(f"{r['name']:<34} {'yes' if r['cached'] else 'no':<7} {human_size(r['size']):>8} {age:>6}")


@main.command()
@click.argument("name")
@click.option("--packages", "show_packages", is_flag=True, help="List the cache's packages.")
@cache_dir_option
@json_option
@handle_errors("vzpkg")
def info(name: str, show_packages: bool, cache_dir: str | None, as_json: bool) -> None:
    """The template's fields and its cache's manifest."""
    from ..errors import TemplateError
    from ..store.cache import CacheStore
    from ..template import TemplateRepository

    settings = _settings(cache_dir)
    manifest = CacheStore(settings.cache_dir).manifest_or_none(name)
    try:
        template = TemplateRepository(settings.template_dirs).load(name)
    except TemplateError:
        if manifest is None:
            raise
        from .registry import print_cache_only_info  # a pulled cache whose template is not installed here

        print_cache_only_info(name, manifest, show_packages, as_json)
        return
    from ..build.update import list_generations

    generations = list_generations(CacheStore(settings.cache_dir), name)
    if as_json:
        data = {"template": {"name": name, **template.data, "digest": template.digest(),
                             "chain": [str(p) for p in template.chain]}, "cache": manifest,
                "generations": generations}
        if manifest and not show_packages:
            data["cache"] = {k: v for k, v in manifest.items() if k != "packages"}
        print_json(data)
        return
    click.echo(f"Template:      {name}")
    click.echo(f"Summary:       {template['summary']}")
    click.echo(f"Distribution:  {template['distribution']} {template['release']}"
               + (f" ({template.get('suite')})" if template.get("suite") else ""))
    click.echo(f"Architecture:  {template['architecture']}")
    click.echo(f"Package mgr:   {template['package_manager']}")
    if len(template.chain) > 1:
        click.echo(f"Inherits:      {' <- '.join(p.name for p in template.chain)}")
    click.echo(f"Packages:      {' '.join(template.packages)}")
    click.echo(f"Description:   {' '.join(template['description'].split())}")
    if manifest is None:
        click.echo(f"Cache:         none (vzpkg create-cache {name})")
        return
    stale = manifest.get("template_digest") != template.digest()
    click.echo(f"Cache:         {settings.cache_dir / manifest['archive']}")
    click.echo(f"  created:     {manifest['created']}  (vzpkg {manifest.get('vzpkg_version')})")
    click.echo(f"  size:        {human_size(manifest['packed_size'])} packed, {human_size(manifest['unpacked_size'])} unpacked")
    click.echo(f"  packages:    {manifest['package_count']}")
    click.echo(f"  mirror:      {manifest.get('mirror')}")
    for repo in manifest.get("repositories", []):
        click.echo(f"  repository:  {repo.get('uri')} {repo.get('suite', '')} ({repo.get('date', '')})")
    click.echo(f"  sha256:      {manifest['sha256']}")
    click.echo(f"  definition:  {'changed since the cache was built' if stale else 'unchanged'}")
    durations = manifest.get("durations", {})
    click.echo("  build steps: " + ", ".join(f"{k} {v:.1f}s" for k, v in durations.items()))
    for gen in generations:
        click.echo(f"  generation {gen['generation']}: {gen.get('created', '?')}, "
                   f"{human_size(gen.get('packed_size'))}, {gen.get('package_count', '?')} packages "
                   f"(vzpkg rollback-cache {name})")
    if show_packages:
        for p in manifest.get("packages", []):
            click.echo(f"    {p['name']:<36} {p.get('version', '')} {p.get('architecture', '')}")


@main.command("remove-cache")
@click.argument("names", nargs=-1, required=True)
@cache_dir_option
@handle_errors("vzpkg")
def remove_cache(names: tuple[str, ...], cache_dir: str | None) -> None:
    """Remove the cache (archive and manifest) of each template NAME."""
    from ..build.stage import StageStore
    from ..errors import CacheNotFoundError
    from ..lock import locked
    from ..store.cache import CacheStore, check_writable

    settings = _settings(cache_dir)
    store = CacheStore(settings.cache_dir)
    for name in names:
        if not store.exists(name) and not store.manifest_path(name).exists():
            raise CacheNotFoundError(f"no cache for template {name!r} in {settings.cache_dir}")
        check_writable(settings.cache_dir)
        with locked(settings.lock_dir / f"{name}.lock", timeout=60, what=f"template {name}"):
            store.remove(name)
            StageStore(settings.cache_dir).remove(name)
        click.echo(f"removed cache {name}")


@main.command("verify-cache")
@click.argument("names", nargs=-1, required=True)
@cache_dir_option
@json_option
@handle_errors("vzpkg")
def verify_cache(names: tuple[str, ...], cache_dir: str | None, as_json: bool) -> None:
    """Recompute each cache's sha256 and read the whole archive; exit non-zero on any mismatch."""
    from ..store.cache import CacheStore

    store = CacheStore(_settings(cache_dir).cache_dir)
    results = [store.verify(name) for name in names]
    if as_json:
        print_json(results)
    else:
        for r in results:
            click.echo(f"{r['name']}: ok ({r['members']} members, sha256 {r['sha256'][:16]}...)")


@main.command()
@click.argument("names", nargs=-1)
@json_option
@handle_errors("vzpkg")
def validate(names: tuple[str, ...], as_json: bool) -> None:
    """Check template definitions (all of them without NAME)."""
    from ..errors import TemplateError
    from ..template import TemplateRepository

    repo = TemplateRepository(_settings().template_dirs)
    failures = []
    checked = list(names) or repo.names()
    for name in checked:
        try:
            repo.load(name)
        except TemplateError as e:
            failures.append({"name": name, "error": e.message})
    if as_json:
        print_json({"checked": checked, "failures": failures})
    else:
        for name in checked:
            err = next((f["error"] for f in failures if f["name"] == name), None)
            click.echo(f"{name}: {'ok' if err is None else err}")
    if failures:
        raise TemplateError(f"{len(failures)} of {len(checked)} templates are invalid")


def _register_more() -> None:
    from . import maintenance, registry

    maintenance.register(main)
    registry.register(main)


_register_more()

if __name__ == "__main__":
    main()
