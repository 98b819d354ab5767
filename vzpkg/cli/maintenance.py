"""`vzpkg status`, `update-cache`, `rollback-cache`, `clean`: keeping caches current."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from ..build.status import StatusReport

from .common import PrintingReporter, handle_errors, human_size, print_json

_cache_dir = click.option("--cache-dir", type=click.Path(file_okay=False),
                          help="Where caches live (default: $VZPKG_CACHE_DIR, config file, /var/lib/vz/template/cache).")
_json = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _settings(cache_dir: str | None = None, mirror: str | None = None):
    from ..config import load_settings

    return load_settings(cache_dir=cache_dir, mirror=mirror)


def _print_status(report: StatusReport) -> None:
    from ..build.status import repository_label

    name = report.name
    if report.current:
        click.echo(f"{name}: current (cache of {report.cache_created})")
    else:
        click.echo(f"{name}: updates available (cache of {report.cache_created})")
    if report.template_changed:
        extra = []
        if report.install:
            extra.append(f"install {' '.join(report.install)}")
        if report.remove:
            extra.append(f"purge {' '.join(report.remove)}")
        click.echo("  template definition changed since the cache was built" + (f" ({'; '.join(extra)})" if extra else ""))
    for repo in report.repositories:
        if repo["changed"]:
            when = repo.get("date") or (f"revision {repo['revision']}" if repo.get("revision") else "")
            click.echo(f"  repository changed: {repository_label(repo)}" + (f" ({when})" if when else ""))
    if report.updates:
        click.echo(f"  {'PACKAGE':<32} {'CACHED':<28} AVAILABLE")
        for u in report.updates:
            click.echo(f"  {u.name:<32} {u.cached:<28} {u.available}")


def register(group: click.Group) -> None:
    """Attach this module's commands to the `vzpkg` group."""

    @group.command()
    @click.argument("names", nargs=-1, required=True)
    @click.option("--refresh", is_flag=True, help="Ask the mirrors even when the metadata cache is fresh.")
    @click.option("--mirror", help="Main mirror URL (default: $VZPKG_MIRROR, config file, the host's apt sources).")
    @_cache_dir
    @_json
    @handle_errors("vzpkg")
    def status(names: tuple[str, ...], refresh: bool, mirror: str | None, cache_dir: str | None, as_json: bool) -> None:
        """Whether each cache is current, without unpacking it: packages with newer versions in the
        repositories, and whether the template definition changed.

        Exit status 0 when every cache is current, 20 when updates are available."""
        from ..build.status import check_status
        from ..errors import UpdatesAvailable

        settings = _settings(cache_dir, mirror)
        reports = [check_status(name, settings, refresh=refresh) for name in names]
        if as_json:
            print_json(reports[0].to_dict() if len(reports) == 1 else [r.to_dict() for r in reports])
        else:
            for report in reports:
                _print_status(report)
        if not all(r.current for r in reports):
            sys.exit(UpdatesAvailable.exit_code)

    @group.command("update-cache")
    @click.argument("names", nargs=-1)
    @click.option("--all", "all_", is_flag=True, help="Every template that has a cache.")
    @click.option("--keep", type=click.IntRange(min=0), default=1, show_default=True,
                  help="Earlier caches kept as generations for rollback-cache.")
    @click.option("--mirror", help="Main mirror URL (default: $VZPKG_MIRROR, config file, the host's apt sources).")
    @click.option("--timeout", type=float, default=600, show_default=True, help="Seconds to wait for the template's lock.")
    @click.option("-q", "--quiet", is_flag=True, help="No progress output.")
    @click.option("-v", "--verbose", is_flag=True, help="Show the output of the tools that run.")
    @_cache_dir
    @_json
    @handle_errors("vzpkg")
    def update_cache(names: tuple[str, ...], all_: bool, keep: int, mirror: str | None, timeout: float, quiet: bool,
                     verbose: bool, cache_dir: str | None, as_json: bool) -> None:
        """Bring each cache up to date: upgrade its packages and apply template changes, in place.

        Nothing is unpacked when nothing changed. The previous cache is kept as a generation."""
        from ..build.update import UpdateOptions
        from ..build.update import update_cache as update
        from ..errors import UsageError
        from ..store.cache import CacheStore

        settings = _settings(cache_dir, mirror)
        if all_ and names:
            raise UsageError("give template names or --all, not both")
        if all_:
            names = tuple(CacheStore(settings.cache_dir).names())
            if not names:
                click.echo(f"no caches in {settings.cache_dir}", err=True)
        elif not names:
            raise UsageError("name the templates to update, or pass --all")
        results = []
        for name in names:
            reporter = PrintingReporter(quiet=quiet, verbose=verbose, prefix=f"{name}: " if len(names) > 1 else "")
            result = update(name, settings, UpdateOptions(keep=keep, lock_timeout=timeout, verbose=verbose), reporter)
            if result["updated"]:
                m = result["manifest"]
                reporter.note(f"updated {settings.cache_dir / m['archive']} ({result['reason']}; "
                              f"{len(result['changes'])} package changes, {human_size(m['packed_size'])}, "
                              f"{result['durations']['total']:.1f} s)")
                if not quiet and not as_json:
                    for c in result["changes"]:
                        click.echo(f"  {c['name']:<32} {c['from'] or '(new)':<28} {c['to'] or '(removed)'}", err=True)
            else:
                reporter.note(f"{name}: nothing to do, {result['reason']} ({result['durations']['total']:.2f} s)")
            results.append({k: v for k, v in result.items() if k != "manifest"})
        if as_json:
            print_json(results[0] if len(results) == 1 else results)

    @group.command("rollback-cache")
    @click.argument("name")
    @click.option("--generation", type=int, help="Generation to restore (default: the newest).")
    @click.option("--timeout", type=float, default=600, show_default=True, help="Seconds to wait for the template's lock.")
    @_cache_dir
    @_json
    @handle_errors("vzpkg")
    def rollback_cache(name: str, generation: int | None, timeout: float, cache_dir: str | None, as_json: bool) -> None:
        """Put the previous cache of NAME (kept by update-cache) back in place; the current one is dropped."""
        from ..build.update import rollback_cache as rollback

        manifest = rollback(name, _settings(cache_dir), generation=generation, lock_timeout=timeout)
        if as_json:
            print_json({k: v for k, v in manifest.items() if k != "packages"})
        else:
            click.echo(f"{name}: restored generation {manifest['restored_generation']} "
                       f"(created {manifest.get('created')}, {manifest.get('package_count')} packages)")

    @group.command()
    @click.argument("names", nargs=-1)
    @click.option("--packages", is_flag=True, help="Downloaded packages (<cache_dir>/.packages).")
    @click.option("--metadata", is_flag=True, help="Repository metadata (<cache_dir>/.metadata).")
    @click.option("--generations", is_flag=True, help="Earlier caches kept for rollback (of NAMES, or all).")
    @click.option("--stages", is_flag=True, help="Build stages that speed up rebuilds (<cache_dir>/.stages).")
    @click.option("--templates", is_flag=True,
                  help="Unpacked template generations in the VZ root that no VE uses any more, and prepared "
                       "disk images (template/.images) that no VE's or sample's limits would copy.")
    @click.option("--ves", is_flag=True,
                  help="What interrupted vzctl runs left in the VZ root: half-created or half-destroyed VEs, "
                       "temporary files, lock files of VEs that do not exist, interrupted template unpacks.")
    @click.option("--root", "vz_root", type=click.Path(file_okay=False),
                  help="VZ root for --templates and --ves (default: $VZ_ROOT, config file, /var/lib/vz).")
    @_cache_dir
    @_json
    @handle_errors("vzpkg")
    def clean(names: tuple[str, ...], packages: bool, metadata: bool, generations: bool, stages: bool,
              templates: bool, ves: bool, vz_root: str | None, cache_dir: str | None, as_json: bool) -> None:
        """Free space. Without options: downloaded packages and repository metadata. Work files of interrupted
        runs are always removed (those of runs still going are left alone)."""
        from ..build.update import clean as do_clean

        if not (packages or metadata or generations or stages or templates or ves):
            packages = metadata = True
        settings = _settings(cache_dir)
        reporter = PrintingReporter(quiet=as_json, verbose=False)
        report = do_clean(settings, packages=packages, metadata=metadata, generations=generations, stages=stages,
                          names=list(names) or None, reporter=reporter)
        if templates or ves:
            from ..config import load_settings
            from ..runtime.layout import Layout, usable_root

            # as vzctl: `--root /` would sweep the host's /run, /lock and /root as if they were the VZ root's
            layout = Layout(usable_root(load_settings(cache_dir=cache_dir, vz_root=vz_root).vz_root))
            found: list = []
            if ves:
                from ..runtime.sweep import sweep

                found += sweep(layout)
            if templates:
                from ..runtime.backends.image import remove_unused_prepared
                from ..runtime.storage import remove_unused_templates

                found += remove_unused_templates(layout)
                found += remove_unused_prepared(layout)
            for path, size in found:
                report["removed"].append(str(path))
                report["freed"] += size
        if as_json:
            print_json(report)
            return
        for path in report["removed"]:
            click.echo(f"removed {path}")
        click.echo(f"freed {human_size(report['freed'])}")
